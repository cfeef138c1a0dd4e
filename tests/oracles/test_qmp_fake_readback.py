"""The QMP collector against the fake QEMU, its output read back by libkdumpfile (from
test_qmp_fake.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from kdumpling import write_dump
from kdumpling.collectors.qmp import QmpCollector

from tests import test_qmp_fake
from tests import testdumps as td
from tests.test_qmp_fake import FakeQemu, _lost, _pages_before_cut, _read_back

# The fixtures of the tests these came from (pytest finds fixtures among module names).
deadline = test_qmp_fake.deadline
machine = test_qmp_fake.machine
qemu_elf = test_qmp_fake.qemu_elf
fake = test_qmp_fake.fake
cut_fake = test_qmp_fake.cut_fake


@pytest.mark.readers
def test_stream_converts_while_qemu_writes(fake: FakeQemu, machine: td.Machine,
                                           tmp_path: Path) -> None:
    progress: list[tuple[int, int]] = []
    out = tmp_path / "out.kdump"
    with QmpCollector(fake.path, progress=lambda d, t: progress.append((d, t))) as snap:
        write_dump(snap.image, out, format="kdump", compression="zlib")
    dump_cmd = next(c for c in fake.commands if c["execute"] == "dump-guest-memory")
    getfd = next(c for c in fake.commands if c["execute"] == "getfd")
    assert dump_cmd["arguments"] == {"paging": False, "format": "elf", "detach": True,
                                     "protocol": "fd:" + getfd["arguments"]["fdname"]}
    assert snap.pause_seconds == pytest.approx(1.25)
    assert snap.meta["mode"] == "stream" and snap.meta["pipe_size"] >= 1 << 20
    assert fake.written == len(fake.payload) and fake.write_error is None
    assert all(t == len(fake.payload) for _, t in progress)
    _read_back(out, machine)


@pytest.mark.readers
def test_spool_then_convert(fake: FakeQemu, machine: td.Machine, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    out = tmp_path / "out.elf"
    with QmpCollector(fake.path, spool=str(spool)) as snap:
        assert fake.dump_status == "completed"  # QEMU is done before conversion starts
        assert snap.pause_seconds == pytest.approx(1.25)
        assert snap.meta["stream_bytes"] == len(fake.payload)
        assert os.listdir(spool) == []
        write_dump(snap.image, out, format="elf")
    assert os.listdir(spool) == []
    _read_back(out, machine)


@pytest.mark.readers
def test_stream_cut_short_keeps_what_arrived(cut_fake: FakeQemu, machine: td.Machine,
                                             tmp_path: Path) -> None:
    """QEMU fails after most of its dump (it raised DumpFailedError and kept nothing): the
    writer got every byte that arrived, the rest is named missing and the file says
    incomplete. In stream mode the missing tail was already written as zeros."""
    out = tmp_path / "out.kdump"
    with QmpCollector(cut_fake.path) as snap:
        result = write_dump(snap.image, out, format="kdump", compression="zlib")
    assert cut_fake.write_error is not None
    assert result.missing == _lost(machine)
    assert any("ended after" in w and f"{_lost(machine)[0][0]:#x}" in w for w in snap.warnings)
    # one line on the cut: the stream reader's own (added while the writer read) gave way
    assert len([w for w in snap.warnings if "stream ended" in w]) == 1, snap.warnings
    assert any("failed" in w and "kept what arrived" in w for w in snap.warnings)
    _pages_before_cut(out, machine, read_ok_past_cut=True)


@pytest.mark.readers
def test_spool_cut_short_leaves_the_rest_out(cut_fake: FakeQemu, machine: td.Machine,
                                             tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    out = tmp_path / "out.kdump"
    with QmpCollector(cut_fake.path, spool=str(spool)) as snap:
        assert snap.image.missing == _lost(machine)
        result = write_dump(snap.image, out, format="kdump", compression="zlib")
    assert result.missing == _lost(machine)
    assert any("ended after" in w for w in snap.warnings)
    _pages_before_cut(out, machine, read_ok_past_cut=False)
