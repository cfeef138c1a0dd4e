"""The ``ptrace`` tier: live processes the collector stops, reads and releases.

Checked once here: attaching to a process that is not our descendant needs CAP_SYS_PTRACE (root
has it), and Yama's kernel.yama.ptrace_scope must allow it: 0 and 1 do for such a tracer, 2
("admin-only attach") does with CAP_SYS_PTRACE, 3 forbids attaching at all
(Documentation/admin-guide/LSM/Yama.rst). The C fixtures need gcc; cores are judged by gdb and
eu-stack.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest

from tests import tiers

TIER = "ptrace"
CAP_SYS_PTRACE = 19  # include/uapi/linux/capability.h
YAMA_SCOPE = Path("/proc/sys/kernel/yama/ptrace_scope")
TOOLS = ("gcc", "gdb", "eu-stack")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    del config
    tiers.mark_folder(items, str(Path(__file__).parent), pytest.mark.ptrace)


def _effective_capabilities() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


@cache
def lacking() -> str:
    """Why this machine cannot run the tier; empty when it can."""
    if not _effective_capabilities() >> CAP_SYS_PTRACE & 1:
        return "needs root or CAP_SYS_PTRACE to attach to processes it did not start"
    if YAMA_SCOPE.exists() and int(YAMA_SCOPE.read_text()) > 2:
        return f"kernel.yama.ptrace_scope is {YAMA_SCOPE.read_text().strip()}: no attaching"
    absent = [t for t in TOOLS if tiers.which(t) is None]
    if absent:
        return f"{', '.join(absent)} not installed (apt install gcc gdb elfutils)"
    return ""


@pytest.fixture(autouse=True, scope="session")
def ptrace_tier() -> None:
    if lacking():
        tiers.missing(TIER, lacking())
