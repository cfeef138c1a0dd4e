"""The one place that decides what a test does when the machine lacks what its tier needs.

Tiers by what the machine must provide (drgn's habit: tests needing a live kernel or a vmcore
live in their own folders, gated in one place). Unmarked tests in tests/ need only Python and
the package; every other tier has its folder, whose conftest marks each test in it and gates it
once through :func:`missing`:

========  ======================  ===============================================================
marker    folder                  needs
========  ======================  ===============================================================
readers   tests/oracles/          crash, makedumpfile, readelf, gdb, drgn, libkdumpfile
ptrace    tests/ptrace/           root or CAP_SYS_PTRACE, kernel.yama.ptrace_scope <= 2, gcc
s3        tests/s3/               boto3 and moto's server
guest     tests/guest/            QEMU, Debian's kernel package (libvirt tests: a daemon)
systemd   tests/systemd/          root, systemd-nspawn
========  ======================  ===============================================================

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


def mark_folder(items: list[pytest.Item], folder: str, *markers: pytest.MarkDecorator) -> None:
    """Add ``markers`` to every collected test under ``folder`` (a tier conftest's hook)."""
    prefix = os.path.join(folder, "")
    for item in items:
        if str(item.path).startswith(prefix):
            for marker in markers:
                item.add_marker(marker)
