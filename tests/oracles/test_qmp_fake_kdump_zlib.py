"""QEMU's kdump-zlib stream (makedumpfile -F) cut short in spool mode, read back by libkdumpfile
against makedumpfile -R (from test_qmp_fake.py)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from kdumpling import write_dump
from kdumpling.collectors.qmp import QmpCollector

from tests import test_qmp_fake
from tests import testdumps as td
from tests.agenttools import json_out, run_agent
from tests.readers import kdumpfile_module, lkf_open
from tests.test_qmp_fake import FakeQemu, _dumped_pages, _kdump_cut

# The fixtures of the tests these came from (pytest finds fixtures among module names).
deadline = test_qmp_fake.deadline
machine = test_qmp_fake.machine
kdump_flat = test_qmp_fake.kdump_flat


@pytest.mark.readers
def test_kdump_zlib_spool_cut_short_keeps_what_arrived(kdump_flat: tuple[bytes, Path],
                                                       tmp_path: Path) -> None:
    """QEMU fails part way through its kdump-zlib stream: the spool keeps every record byte
    that arrived (it used to raise FormatError and keep nothing), the rebuilt file's reader
    names exactly the pages whose descriptor or data did not arrive, the output says
    incomplete and libkdumpfile reads the others as makedumpfile -R's whole file has them."""
    flat, normal = kdump_flat
    cut, kept, lost = _kdump_cut(flat, normal)
    assert kept and lost
    server = FakeQemu(tmp_path / "qmp.sock", flat, cut_at=cut)
    server.start()
    spool = tmp_path / "spool"
    spool.mkdir()
    out = tmp_path / "out.kdump"
    try:
        with QmpCollector(server.path, spool=str(spool), dump_format="kdump-zlib") as snap:
            assert snap.image.missing == lost and snap.image.incomplete
            result = write_dump(snap.image, out, format="kdump", compression="zlib")
    finally:
        server.close()
    assert server.write_error is not None and os.listdir(spool) == []
    assert result.missing == lost and result.incomplete
    assert any("kept what arrived" in w for w in snap.warnings)
    assert any("middle of the record data" in w for w in snap.warnings)
    assert any("could not be read" in w and f"{lost[0][0]:#x}" in w for w in snap.warnings)
    kd = kdumpfile_module()
    ref, got = lkf_open(str(normal)), lkf_open(str(out))
    for pfn, _, _, _ in _dumped_pages(normal):
        if pfn in kept:
            assert bytes(got.read(kd.KDUMP_MACHPHYSADDR, pfn * td.PAGE, td.PAGE)) == \
                bytes(ref.read(kd.KDUMP_MACHPHYSADDR, pfn * td.PAGE, td.PAGE)), hex(pfn)
        else:
            with pytest.raises(kd.exceptions.KDumpBaseException):
                got.read(kd.KDUMP_MACHPHYSADDR, pfn * td.PAGE, td.PAGE)
    with open(out, "rb") as f:
        assert struct.unpack_from("<I", f.read(0x1AC), 0x1A8)[0] & 0x8  # INCOMPLETE status


@pytest.mark.readers
def test_agent_kdump_zlib_capture_cut_short_exits_65(kdump_flat: tuple[bytes, Path],
                                                     tmp_path: Path) -> None:
    """The same cut through kdumpling-agent capture qmp --qemu-format kdump-zlib: exit 65,
    --json names the missing ranges, the warning the first of them, the file says
    incomplete (verify exits 65 too)."""
    flat, normal = kdump_flat
    cut, _, lost = _kdump_cut(flat, normal)
    server = FakeQemu(tmp_path / "qmp.sock", flat, cut_at=cut)
    server.start()
    out = tmp_path / "out.kdump"
    try:
        proc = run_agent(["capture", "qmp", str(server.path), "--qemu-format", "kdump-zlib",
                          "-o", str(out), "--json"], tmp_path, timeout=120)
    finally:
        server.close()
    assert proc.returncode == 65, proc.stderr
    rec = json_out(proc)
    assert [(r["start"], r["end"]) for r in rec["missing"]] == lost
    assert any(f"{lost[0][0]:#x}" in w for w in rec["warnings"])
    assert run_agent(["verify", str(out)], tmp_path).returncode == 65
