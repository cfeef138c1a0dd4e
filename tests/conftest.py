"""Shared test setup: tiers by what the machine must provide (drgn's habit).

Tiers (markers declared in pyproject.toml): unmarked tests need nothing but Python;
``readers`` need crash/makedumpfile/libkdumpfile/drgn; ``ptrace`` live processes;
``guest``/``libvirt`` a real QEMU guest / libvirt daemon. A marked test whose tool is missing is
skipped with the reason; set KDUMPLING_REQUIRE_ALL=1 (CI does) to turn such skips into failures.
"""

from __future__ import annotations

import os
import sys

import pytest

# Debian's python3-libkdumpfile installs its module here; it loads in any CPython 3.11.
DEBIAN_DIST_PACKAGES = "/usr/lib/python3/dist-packages"
if os.path.isdir(DEBIAN_DIST_PACKAGES) and DEBIAN_DIST_PACKAGES not in sys.path:
    sys.path.append(DEBIAN_DIST_PACKAGES)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    del config, items  # markers are applied per test; nothing to reorder


@pytest.fixture
def require_all() -> bool:
    return os.environ.get("KDUMPLING_REQUIRE_ALL") == "1"
