"""Independent readers used as oracles: libkdumpfile, drgn, crash, readelf, makedumpfile.

Each helper raises ``pytest.skip`` when its tool is missing (``pytest.fail`` under
KDUMPLING_REQUIRE_ALL=1), so tiers degrade instead of erroring.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import Any

import pytest

if os.path.isdir("/usr/lib/python3/dist-packages") and \
        "/usr/lib/python3/dist-packages" not in sys.path:
    sys.path.append("/usr/lib/python3/dist-packages")


def _missing(what: str) -> None:
    if os.environ.get("KDUMPLING_REQUIRE_ALL") == "1":
        pytest.fail(f"{what} is required (KDUMPLING_REQUIRE_ALL=1) but missing")
    pytest.skip(f"{what} not available")


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        _missing(name)
    assert path is not None
    return path


def kdumpfile_module() -> Any:
    try:
        import kdumpfile
    except ImportError:
        _missing("libkdumpfile Python bindings (python3-libkdumpfile)")
    return kdumpfile


def drgn_module() -> Any:
    try:
        import drgn
    except ImportError:
        _missing("drgn")
    return drgn


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
