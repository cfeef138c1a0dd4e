"""agent.capture with stand-in collectors: what happens around the target's pause."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

import pytest
from kdumpling import KdumpBuilder
from kdumpling.agent.capture import capture
from kdumpling.agent.settings import CaptureSettings, Destination
from kdumpling.agent.store_dir import DirectoryStore
from kdumpling.agent.targets import LibvirtTarget, Opened, QmpTarget
from kdumpling.collectors.base import Snapshot
from kdumpling.errors import TargetGoneError

VMCI = ("OSRELEASE=6.1.0-capture\nPAGESIZE=4096\nSYMBOL(swapper_pg_dir)=ffffffff82a0c000\n"
        "NUMBER(pgtable_l5_enabled)=0\nNUMBER(phys_base)=0\n")


class StandIn:
    """A collector that records which store files exist while the target is 'stopped'."""

    def __init__(self, store_dir: Path, fail: bool = False) -> None:
        self.store_dir, self.fail = store_dir, fail
        self.seen_at_enter: list[str] = []

    def __enter__(self) -> Snapshot:
        self.seen_at_enter = sorted(p.name for p in self.store_dir.iterdir())
        if self.fail:
            raise TargetGoneError("the guest went away")
        b = KdumpBuilder().set_vmcoreinfo(VMCI).add_memory_segment(0x100000, b"\x5a" * 8192)
        return Snapshot(b.to_image(), "stand-in guest")

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        return None


def test_store_reservation_is_made_before_the_target_stops(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    collector = StandIn(store_dir)
    store = DirectoryStore(str(store_dir), create=True)
    try:
        result = capture(QmpTarget(key="qmp-x", label="qmp x", socket="x"),
                         Destination(store=store),
                         CaptureSettings(opener=lambda target, ctx: Opened(collector)))
    finally:
        store.close()
    # the sidecar that reserves the name already existed when the collector paused the guest
    assert any(name.endswith(".json") for name in collector.seen_at_enter), collector.seen_at_enter
    assert result.exit_code == 0 and result.path is not None and Path(result.path).is_file()


def test_a_target_that_fails_leaves_no_reservation(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    store = DirectoryStore(str(store_dir), create=True)
    try:
        with pytest.raises(TargetGoneError):
            capture(LibvirtTarget(key="vm1", label="domain vm1", domain="vm1"),
                    Destination(store=store),
                    CaptureSettings(opener=lambda target, ctx: Opened(StandIn(store_dir,
                                                                              fail=True))))
    finally:
        store.close()
    assert [p.name for p in store_dir.iterdir() if not p.name.startswith(".")] == []
