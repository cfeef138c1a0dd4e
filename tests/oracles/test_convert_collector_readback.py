"""Converted dumps read back by libkdumpfile, drgn and crash (from test_convert_collector.py)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from kdumpling import write_dump
from kdumpling.collectors.convert import DumpFileCollector
from kdumpling.reader import open_dump

from tests import test_convert_collector
from tests import testdumps as td
from tests.readers import (
    kdumpfile_module,
    lkf_open,
)
from tests.test_convert_collector import (
    _check_output,
    _convert_incomplete,
    _dumpable_pfns,
    _flat_records,
    _kdump_geometry,
    _ranges,
)

# The fixtures of the tests these came from (pytest finds fixtures among module names).
machine = test_convert_collector.machine
level0_kdump = test_convert_collector.level0_kdump


@pytest.mark.readers
def test_qemu_layout_elf_to_kdump(machine: td.Machine, tmp_path: Path) -> None:
    src = tmp_path / "qemu.elf"
    td.pack_elf_vmcore(src, machine, layout="qemu")
    out = tmp_path / "out.kdump"
    with DumpFileCollector(src) as snap:
        assert snap.meta["source_format"] == "elf"
        assert snap.image.cpu_count == len(machine.cpus)
        write_dump(snap.image, out, format="kdump", compression="zstd")
    kdumpfile = kdumpfile_module()
    ctx = lkf_open(str(out))
    assert bytes(ctx.attr["linux.vmcoreinfo.raw"]) == machine.vmcoreinfo
    for pfn in machine.pfns():
        assert bytes(ctx.read(kdumpfile.KDUMP_MACHPHYSADDR, pfn * td.PAGE, td.PAGE)) == \
            machine.page(pfn)


@pytest.mark.readers
@pytest.mark.parametrize("out_fmt", ["elf", "kdump"])
def test_cut_elf_keeps_every_page_it_has(machine: td.Machine, tmp_path: Path,
                                         out_fmt: str) -> None:
    src = tmp_path / "cut.elf"
    td.pack_elf_vmcore(src, machine)
    td.pack_elf_vmcore(tmp_path / "whole.elf", machine)
    cut = os.path.getsize(src) - 5 * td.PAGE - 100
    os.truncate(src, cut)
    out, rec = _convert_incomplete(src, tmp_path, out_fmt)
    missing = _ranges(rec)
    # the last region loses its tail: 5 pages and 100 bytes of the page before
    last = machine.regions[-1]
    assert missing == [(last.end - 5 * td.PAGE - 100, last.end)]
    # The lost tail is in no segment, not even as p_memsz past the data (it would read back
    # as zeros, gABI): the reader's to_image() leaves it out, the converter adds nothing.
    with DumpFileCollector(src) as snap:
        assert snap.image.missing == missing
        assert all(seg.phys_addr + seg.memsz <= a or b <= seg.phys_addr
                   for seg in snap.image.segments for a, b in missing)
    _check_output(out, out_fmt, machine, missing, tmp_path / "whole.elf")


@pytest.mark.readers
@pytest.mark.parametrize("out_fmt", ["elf", "kdump"])
def test_cut_kdump_keeps_every_page_it_has(machine: td.Machine, level0_kdump: Path,
                                           tmp_path: Path, out_fmt: str) -> None:
    src = tmp_path / "cut.kdump"
    data = level0_kdump.read_bytes()
    src.write_bytes(data[: len(data) * 3 // 4])
    out, rec = _convert_incomplete(src, tmp_path, out_fmt)
    missing = _ranges(rec)
    with open_dump(src) as d:
        assert missing == d.missing
    _check_output(out, out_fmt, machine, missing, level0_kdump)


@pytest.mark.readers
@pytest.mark.parametrize("out_fmt", ["elf", "kdump"])
def test_kdump_descriptors_past_eof(machine: td.Machine, level0_kdump: Path, tmp_path: Path,
                                    out_fmt: str) -> None:
    """Three page descriptors point past the end of the file: their pages are named missing,
    all others kept (a 108 KiB input once became a 20.6 KiB dump, exit 0)."""
    src = tmp_path / "lying.kdump"
    data = bytearray(level0_kdump.read_bytes())
    _, desc0 = _kdump_geometry(level0_kdump)
    pfns = _dumpable_pfns(level0_kdump)
    victims = [3, 4, 10]  # descriptor i belongs to the i-th set bit of bitmap 2
    for i in victims:
        struct.pack_into("<Q", data, desc0 + 24 * i, len(data) + 4096 * i)
    src.write_bytes(bytes(data))
    out, rec = _convert_incomplete(src, tmp_path, out_fmt)
    missing = _ranges(rec)
    want = sorted((pfns[i] * td.PAGE, (pfns[i] + 1) * td.PAGE) for i in victims)
    merged: list[tuple[int, int]] = []
    for a, b in want:
        if merged and merged[-1][1] == a:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    assert missing == merged
    _check_output(out, out_fmt, machine, missing, level0_kdump)


@pytest.mark.readers
def test_cut_flattened_kdump(machine: td.Machine, tmp_path: Path) -> None:
    """A flattened stream that stops inside its page data. makedumpfile writes the page data
    before the descriptors; records may come in any order, so the descriptors go first here
    and the cut falls among the data records: the pages whose data arrived are kept."""
    src = tmp_path / "kexec.elf"
    td.pack_elf_vmcore(src, machine)
    flat = tmp_path / "full.flat"
    td.makedumpfile(["-F", "-c", "-d", "0", str(src)], stdout=flat)
    data = flat.read_bytes()
    records = sorted(_flat_records(data), key=lambda r: len(r[1]))  # the page data last
    off, blob = records.pop()
    # the page data in 4 KiB records, as makedumpfile writes bigger dumps (one per buffer)
    records += [(off + i, blob[i : i + 4096]) for i in range(0, len(blob), 4096)]
    stream = bytearray(data[:4096])
    for off, blob in records:
        stream += struct.pack(">qq", off, len(blob)) + blob
    cut = tmp_path / "cut.flat"
    cut.write_bytes(bytes(stream[: len(stream) * 2 // 3]))
    out, rec = _convert_incomplete(cut, tmp_path, "kdump")
    whole = tmp_path / "whole.kdump"
    td.makedumpfile(["-c", "-d", "0", str(src), str(whole)])
    _check_output(out, "kdump", machine, _ranges(rec), whole)
