"""Independent readers used as oracles: libkdumpfile, drgn, crash, readelf, makedumpfile.

A missing tool goes through tests/tiers.py (skipped with the reason, a failure under
KDUMPLING_REQUIRE_ALL=1); the whole tier is checked once (tiers.lacking_readers).
"""

from __future__ import annotations

import subprocess
from typing import Any

from tests import tiers

TIER = "readers"
KDUMPFILE_HINT = "libkdumpfile's Python bindings: apt install python3-libkdumpfile"
DRGN_HINT = "pip install drgn"


def tool(name: str) -> str:
    return tiers.tool(TIER, name)


def kdumpfile_module() -> Any:
    return tiers.module(TIER, "kdumpfile", KDUMPFILE_HINT)


def drgn_module() -> Any:
    return tiers.module(TIER, "drgn", DRGN_HINT)


def lkf_open(path: str, ostype: str | None = None) -> Any:
    kdumpfile = kdumpfile_module()
    ctx = kdumpfile.kdumpfile(path)
    if ostype:
        ctx.attr["addrxlat.ostype"] = ostype
    return ctx


def lkf_read_phys(ctx: Any, addr: int, length: int) -> bytes:
    kdumpfile = kdumpfile_module()
    return bytes(ctx.read(kdumpfile.KDUMP_MACHPHYSADDR, addr, length))


def drgn_program(path: str) -> Any:
    drgn = drgn_module()
    prog = drgn.Program()
    prog.set_core_dump(path)
    return prog


def crash_osrelease(path: str) -> str:
    out = subprocess.run([tool("crash"), "--osrelease", path], capture_output=True, text=True,
                         timeout=120)
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else ""


def readelf(*args: str) -> str:
    out = subprocess.run([tool("readelf"), "-W", *args], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout
