"""The ``ptrace`` tier: live processes the collector stops, reads and releases. Every test here
is marked ``ptrace``; tests/tiers.py (lacking_ptrace) checks once what the tier needs: root or
CAP_SYS_PTRACE, a Yama ptrace_scope that allows attaching, gcc, gdb and eu-stack."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import tiers


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    del config
    tiers.mark_folder(items, str(Path(__file__).parent), pytest.mark.ptrace)
