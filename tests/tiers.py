"""The one place that decides what a test does when the machine lacks what its tier needs.

Tiers by what the machine must provide (drgn's habit: tests needing a live kernel or a vmcore
live in their own folders, gated in one place). Unmarked tests in tests/ need only Python and
the package; every other tier has its folder, whose conftest marks each test in it and gates it
once through :func:`missing`:

========  ======================  ===============================================================
marker    folder                  needs
========  ======================  ===============================================================
readers   tests/oracles/          crash, makedumpfile, readelf, drgn, libkdumpfile, pyelftools
ptrace    tests/ptrace/           root or CAP_SYS_PTRACE, Yama ptrace_scope < 3, gcc, gdb,
                                  eu-stack
libvirt   tests/libvirt_api/      libvirt-python (its in-process test driver)
s3        tests/s3/               boto3 and moto's server
guest     tests/guest/            QEMU, Debian's kernel package (``libvirt``: also a daemon)
systemd   tests/systemd/          systemd-analyze; the container tests root and systemd-nspawn
========  ======================  ===============================================================

The readers and ptrace tiers are checked once per session, before their first test
(:func:`gate`, called by tests/conftest.py for each marker of a test, wherever the test lives);
the others check in the session fixtures that start their server, guest or container.

Within the unmarked tier, a test that needs one of the package's extras (a codec's module,
prometheus_client) or a test plugin says so as ``missing("extras", ...)``, the lint test
``missing("lint", ...)`` and a test that mounts a small tmpfs ``missing("root", ...)``.

Without the tier's requirement a test is skipped with the reason; under KDUMPLING_REQUIRE_ALL=1
(CI and ``./setup.sh test``) it fails instead. A few skips are not about the machine lacking a
tier's tool but about a case that cannot exist here (s390x kdump files drgn/libkdumpfile cannot
set up, a core_pattern that pipes): those go through :func:`not_applicable`, which
REQUIRE_ALL accepts, and each says why at its call.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest

REQUIRE_ALL_VARIABLE = "KDUMPLING_REQUIRE_ALL"
# Debian's python3-libkdumpfile installs its module here; it loads in any CPython 3.11.
DEBIAN_DIST_PACKAGES = "/usr/lib/python3/dist-packages"


def required() -> bool:
    """Whether a missing requirement fails (KDUMPLING_REQUIRE_ALL=1) instead of skipping."""
    return os.environ.get(REQUIRE_ALL_VARIABLE) == "1"


def missing(tier: str, what: str) -> NoReturn:
    """Skip the running test because ``what`` is lacking for ``tier``; fail under REQUIRE_ALL."""
    if required():
        pytest.fail(f"{tier} tier: {what} ({REQUIRE_ALL_VARIABLE}=1 requires it)")
    pytest.skip(f"{tier} tier: {what}", allow_module_level=True)


def not_applicable(reason: str) -> NoReturn:
    """A deliberate skip REQUIRE_ALL accepts: the case does not exist on this machine or for
    this input (the caller says why); never for a missing tool."""
    pytest.skip(reason, allow_module_level=True)


def which(name: str) -> str | None:
    return shutil.which(name)


def add_debian_dist_packages() -> None:
    if os.path.isdir(DEBIAN_DIST_PACKAGES) and DEBIAN_DIST_PACKAGES not in sys.path:
        sys.path.append(DEBIAN_DIST_PACKAGES)


def tool(tier: str, name: str, hint: str = "") -> str:
    """The path of executable ``name``, or :func:`missing`."""
    path = which(name)
    if path is None:
        missing(tier, f"{name} is not installed{f' ({hint})' if hint else ''}")
    return path


def module(tier: str, name: str, hint: str = "") -> ModuleType:
    """Import ``name`` (Debian's dist-packages reachable too), or :func:`missing`."""
    add_debian_dist_packages()
    try:
        return importlib.import_module(name)
    except ImportError as err:
        missing(tier, f"cannot import {name}{f' ({hint})' if hint else ''}: {err}")


def codec(name: str) -> None:
    """:func:`missing` ("extras" tier) unless the Python module behind codec ``name`` imports;
    the library's own check names the module and the extra to install."""
    from kdumpling.codecs import PageCodec, parse_compression
    from kdumpling.errors import CodecUnavailableError

    try:
        PageCodec(parse_compression(name)).compressor()
    except CodecUnavailableError as err:
        missing("extras", str(err))


def mark_folder(items: list[pytest.Item], folder: str, *markers: pytest.MarkDecorator) -> None:
    """Add ``markers`` to every collected test under ``folder`` (a tier conftest's hook)."""
    prefix = os.path.join(folder, "")
    for item in items:
        if str(item.path).startswith(prefix):
            for marker in markers:
                item.add_marker(marker)


# --- the tiers checked once, by marker ----------------------------------------------------------
CAP_SYS_PTRACE = 19  # include/uapi/linux/capability.h
YAMA_SCOPE = Path("/proc/sys/kernel/yama/ptrace_scope")


def _effective_capabilities() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def lacking_ptrace() -> str:
    """Why live processes cannot be traced here; empty when they can. Attaching to a process
    that is not our descendant needs CAP_SYS_PTRACE (root has it); Yama's ptrace_scope 0 and 1
    allow such a tracer, 2 ("admin-only attach") does with the capability, 3 forbids attaching
    at all (Documentation/admin-guide/LSM/Yama.rst). The fixtures need gcc; gdb and eu-stack
    judge the cores."""
    if not _effective_capabilities() >> CAP_SYS_PTRACE & 1:
        return "needs root or CAP_SYS_PTRACE to attach to processes it did not start"
    if YAMA_SCOPE.exists() and int(YAMA_SCOPE.read_text()) > 2:
        return f"kernel.yama.ptrace_scope is {YAMA_SCOPE.read_text().strip()}: no attaching"
    absent = [t for t in ("gcc", "gdb", "eu-stack") if which(t) is None]
    if absent:
        return f"{', '.join(absent)} not installed (apt install gcc gdb elfutils)"
    return ""


def lacking_readers() -> str:
    """Which of the independent readers are missing; empty when all are here."""
    absent = [t for t in ("crash", "makedumpfile", "readelf") if which(t) is None]
    add_debian_dist_packages()
    for name in ("drgn", "kdumpfile", "elftools"):
        try:
            importlib.import_module(name)
        except ImportError:
            absent.append(f"Python module {name}")
    if absent:
        return (f"{', '.join(absent)} not installed (apt install crash makedumpfile binutils "
                "python3-libkdumpfile; pip install drgn pyelftools)")
    return ""


GATES: dict[str, Callable[[], str]] = {"ptrace": lacking_ptrace, "readers": lacking_readers}


@cache
def _lacking(tier: str) -> str:
    return GATES[tier]()


def gate(item: pytest.Item) -> None:
    """Before each test: skip (or fail) it when a tier it is marked with cannot run here."""
    for tier in GATES:
        if item.get_closest_marker(tier) is not None and _lacking(tier):
            missing(tier, _lacking(tier))
