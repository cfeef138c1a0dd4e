"""The ``libvirt`` tier's daemon-less part: libvirt-python against libvirt's in-process test
driver (test:///default). The tests that need a daemon and a guest live in tests/guest."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import tiers


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    del config
    tiers.mark_folder(items, str(Path(__file__).parent), pytest.mark.libvirt)


@pytest.fixture(autouse=True, scope="session")
def libvirt_python() -> None:
    tiers.module("libvirt", "libvirt", "pip install libvirt-python")
