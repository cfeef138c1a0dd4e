"""The ``readers`` tier: what we write is read back by readers nobody here wrote. Every test
here is marked ``readers``; tests/tiers.py (lacking_readers) checks once that crash,
makedumpfile, readelf, drgn, libkdumpfile's bindings and pyelftools are all here. The folder is
not named after the marker because tests/readers.py, the oracles' helpers, owns that name."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import tiers


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    del config
    tiers.mark_folder(items, str(Path(__file__).parent), pytest.mark.readers)
