"""The ``readers`` tier: what we write is read back by readers nobody here wrote.

Checked once here: crash, makedumpfile and readelf on PATH, drgn, libkdumpfile's bindings
(Debian's python3-libkdumpfile) and pyelftools importable. The folder is not named after the
marker because tests/readers.py, the oracles' helpers, owns that name.
"""

from __future__ import annotations

import importlib
from functools import cache
from pathlib import Path

import pytest

from tests import tiers

TIER = "readers"
TOOLS = ("crash", "makedumpfile", "readelf")
MODULES = ("drgn", "kdumpfile", "elftools")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    del config
    tiers.mark_folder(items, str(Path(__file__).parent), pytest.mark.readers)


@cache
def lacking() -> str:
    """What of the tier this machine lacks; empty when it has it all."""
    absent = [t for t in TOOLS if tiers.which(t) is None]
    tiers.add_debian_dist_packages()
    for name in MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            absent.append(f"Python module {name}")
    if absent:
        return (f"{', '.join(absent)} not installed (apt install crash makedumpfile binutils "
                "python3-libkdumpfile; pip install drgn pyelftools)")
    return ""


@pytest.fixture(autouse=True, scope="session")
def readers_tier() -> None:
    if lacking():
        tiers.missing(TIER, lacking())
