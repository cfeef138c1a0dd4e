"""The raw and LiME collector's output read back by libkdumpfile and crash (from
test_raw_collector.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from kdumpling import write_dump
from kdumpling.collectors.raw import (
    RawMemoryCollector,
)

from tests import test_raw_collector
from tests import testdumps as td
from tests.readers import kdumpfile_module, lkf_open, tool
from tests.test_raw_collector import (
    NOTE_AT,
    PAGE,
    _flat_image,
    _incomplete_capture,
    _lime,
    _note,
    _pages_back,
)

# The fixtures of the tests these came from (pytest finds fixtures among module names).
machine = test_raw_collector.machine


@pytest.mark.readers
@pytest.mark.parametrize(("fmt", "codec"), [("elf", "none"), ("kdump", "zlib"),
                                            ("kdump", "zstd")])
def test_flat_image_with_vmcoreinfo_in_memory(machine: td.Machine, tmp_path: Path, fmt: str,
                                              codec: str) -> None:
    img = tmp_path / "mem.raw"
    size = _flat_image(machine, img, _note(machine))
    out = tmp_path / f"out.{fmt}"
    note_size = 0x1024  # what /sys/kernel/vmcoreinfo reports: the whole note buffer
    with RawMemoryCollector(img, vmcoreinfo_at=f"{NOTE_AT:#x} {note_size:x}") as snap:
        assert snap.image.vmcoreinfo == machine.vmcoreinfo.rstrip(b"\0")
        assert [(s.phys_addr, s.size) for s in snap.image.segments] == [(0, size)]
        write_dump(snap.image, out, format=fmt, compression=codec)
    kdumpfile = kdumpfile_module()
    ctx = lkf_open(str(out), "linux")
    assert bytes(ctx.attr["linux.vmcoreinfo.raw"]) == machine.vmcoreinfo
    for pfn in machine.pfns():
        assert bytes(ctx.read(kdumpfile.KDUMP_MACHPHYSADDR, pfn * PAGE, PAGE)) == machine.page(pfn)
    # the kernel's own page tables translate init_uts_ns.name.release
    uts = td.START_KERNEL_MAP + td.UTS_NS + td.UTS_NAME_OFFSET + 2 * 65
    release = bytes(ctx.read(kdumpfile.KDUMP_KVADDR, uts, 65)).split(b"\0")[0].decode()
    assert release == td.OSRELEASE
    # crash may warn first (no CPU notes in a raw image: nr_cpus 0); the release is last
    proc = subprocess.run([tool("crash"), "--osrelease", str(out)], capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.strip().splitlines()[-1] == td.OSRELEASE


@pytest.mark.readers
def test_lime_ranges_with_unaligned_end(machine: td.Machine, tmp_path: Path) -> None:
    """LiME files keep their own ranges (one ends mid-page) across two files."""
    a, b = tmp_path / "a.lime", tmp_path / "b.lime"
    _lime(a, [(r.phys, r.data) for r in machine.regions[:2]])
    _lime(b, [(r.phys, r.data) for r in machine.regions[2:]])
    vmci = tmp_path / "vmcoreinfo"
    vmci.write_bytes(machine.vmcoreinfo)
    out = tmp_path / "out.kdump"
    with RawMemoryCollector([b, a], vmcoreinfo=vmci) as snap:
        spans = [(s.phys_addr, s.size) for s in snap.image.segments]
        assert spans == [(r.phys, len(r.data)) for r in machine.regions]
        write_dump(snap.image, out, format="kdump", compression="lzo")
    kdumpfile = kdumpfile_module()
    ctx = lkf_open(str(out))
    for pfn in machine.pfns():
        assert bytes(ctx.read(kdumpfile.KDUMP_MACHPHYSADDR, pfn * PAGE, PAGE)) == machine.page(pfn)


@pytest.mark.readers
def test_several_raw_images_with_phys_map(machine: td.Machine, tmp_path: Path) -> None:
    files = []
    for i, r in enumerate(machine.regions):
        f = tmp_path / f"part{i}.raw"
        f.write_bytes(b"\xee" * 100 + r.data)  # data at offset 100 of each file
        files.append(f)
    pmap = [(r.phys, len(r.data), i, 100) for i, r in enumerate(machine.regions)]
    out = tmp_path / "out.elf"
    with RawMemoryCollector(files, phys_map=pmap, vmcoreinfo=machine.vmcoreinfo) as snap:
        write_dump(snap.image, out, format="elf")
    from elftools.elf.elffile import ELFFile

    with open(out, "rb") as f:
        elf = ELFFile(f)
        loads = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        assert [(s["p_paddr"], s["p_filesz"]) for s in loads] == \
            [(r.phys, len(r.data)) for r in machine.regions]
        for seg, r in zip(loads, machine.regions, strict=True):
            assert seg.data() == r.data


@pytest.mark.readers
def test_cut_lime_keeps_what_it_has(machine: td.Machine, tmp_path: Path) -> None:
    """A LiME file cut inside its last range: every byte it has is dumped, the range it lacks
    is named, the kdump says incomplete, the agent exits 65 (it refused the whole file)."""
    f = tmp_path / "cut.lime"
    _lime(f, [(r.phys, r.data) for r in machine.regions])
    f.write_bytes(f.read_bytes()[: -3 * PAGE - 10])
    last = machine.regions[-1]
    with RawMemoryCollector(f, vmcoreinfo=machine.vmcoreinfo) as snap:
        assert snap.image.missing == [(last.end - 3 * PAGE - 10, last.end)]
        assert snap.image.segments[-1].size == len(last.data) - 3 * PAGE - 10
    vmci = tmp_path / "vmcoreinfo"
    vmci.write_bytes(machine.vmcoreinfo)
    out, rec = _incomplete_capture([str(f), "--vmcoreinfo", str(vmci)], tmp_path)
    assert rec["missing"] == [{"start": last.end - 3 * PAGE - 10, "end": last.end}]
    # the page cut in the middle keeps its first bytes
    _pages_back(out, machine, {last.end // PAGE - i for i in (1, 2, 3)},
                cut_at=last.end - 3 * PAGE - 10)


@pytest.mark.readers
def test_phys_map_past_end_of_image(machine: td.Machine, tmp_path: Path) -> None:
    """A raw image shorter than its phys_map: kept as far as it goes, the rest named."""
    img = tmp_path / "mem.raw"
    size = _flat_image(machine, img)
    claimed = size + 5 * PAGE
    with RawMemoryCollector(img, phys_map=[(0, claimed)], vmcoreinfo=machine.vmcoreinfo) as snap:
        assert [(s.phys_addr, s.size) for s in snap.image.segments] == [(0, size)]
        assert snap.image.missing == [(size, claimed)]
    vmci = tmp_path / "vmcoreinfo"
    vmci.write_bytes(machine.vmcoreinfo)
    out, rec = _incomplete_capture([str(img), "--phys-map", f"0:{claimed:#x}", "--vmcoreinfo",
                                    str(vmci)], tmp_path)
    assert rec["missing"] == [{"start": size, "end": claimed}]
    _pages_back(out, machine, set())
