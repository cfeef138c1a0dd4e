"""Shared test setup: tiers by what the machine must provide (drgn's habit).

Unmarked tests in tests/ need nothing but Python and the package. Every other tier lives in its
own folder whose conftest marks and gates it (tests/tiers.py has the table and the one function
that skips, or fails under KDUMPLING_REQUIRE_ALL=1, when a tier's requirement is missing).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import tiers
from tests.agenttools import NotifyListener

# Debian's python3-libkdumpfile installs its module here; it loads in any CPython 3.11.
DEBIAN_DIST_PACKAGES = "/usr/lib/python3/dist-packages"
if os.path.isdir(DEBIAN_DIST_PACKAGES) and DEBIAN_DIST_PACKAGES not in sys.path:
    sys.path.append(DEBIAN_DIST_PACKAGES)


def pytest_runtest_setup(item: pytest.Item) -> None:
    tiers.gate(item)


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[NotifyListener]:
    """A stand-in for systemd's $NOTIFY_SOCKET (the service tests of several tiers)."""
    lst = NotifyListener(tmp_path / "notify.sock")
    yield lst
    lst.close()
