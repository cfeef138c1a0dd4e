"""RawMemoryCollector on synthetic memory: flat /dev/mem-style images, phys maps, LiME files,
VMCOREINFO from a file or from the image, and every way the input can be wrong.

The memory is the test suite's synthetic x86_64 kernel (real page tables, a utsname), so
libkdumpfile can translate kernel virtual addresses in what we write; the guest tests do the
same with a real kernel's RAM.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest
from kdumpling.collectors.raw import (
    LIME_HEADER,
    LIME_MAGIC,
    PhysRange,
    RawMemoryCollector,
    parse_phys_map,
    qemu_x86_phys_map,
)
from kdumpling.errors import FormatError, UsageError
from kdumpling.notes import pack_note, vmcoreinfo_note

from tests import testdumps as td
from tests.agenttools import json_out, run_agent
from tests.readers import kdumpfile_module, lkf_open

PAGE = td.PAGE
NOTE_AT = 0x50000  # a hole of the synthetic machine: the VMCOREINFO note goes there


def _flat_image(m: td.Machine, path: Path, note: bytes | None = None) -> int:
    """/dev/mem-style: byte N = physical N, holes as zeros; returns the size."""
    end = max(r.end for r in m.regions)
    buf = bytearray(end)
    for r in m.regions:
        buf[r.phys : r.end] = r.data
    if note is not None:
        buf[NOTE_AT : NOTE_AT + len(note)] = note
    path.write_bytes(buf)
    return end


def _note(m: td.Machine) -> bytes:
    return pack_note("<", vmcoreinfo_note(m.vmcoreinfo))


def _lime(path: Path, parts: list[tuple[int, bytes]]) -> None:
    with open(path, "wb") as f:
        for start, data in parts:
            f.write(LIME_HEADER.pack(LIME_MAGIC, 1, start, start + len(data) - 1, bytes(8)))
            f.write(data)


@pytest.fixture(scope="module")
def machine() -> td.Machine:
    return td.x86_64_machine(small=True)


# --- errors ------------------------------------------------------------------------------------

def test_no_vmcoreinfo_says_how_to_get_it(machine: td.Machine, tmp_path: Path) -> None:
    img = tmp_path / "mem.raw"
    _flat_image(machine, img)
    with pytest.raises(UsageError, match="/sys/kernel/vmcoreinfo"), RawMemoryCollector(img):
        pass


def test_vmcoreinfo_address_outside_image(machine: td.Machine, tmp_path: Path) -> None:
    img = tmp_path / "mem.raw"
    size = _flat_image(machine, img, _note(machine))
    with pytest.raises(UsageError, match=f"{size + 0x1000:#x} is not in the image"), \
            RawMemoryCollector(img, vmcoreinfo_at=(size + 0x1000, 0x1024)):
        pass


def test_vmcoreinfo_address_wrong(machine: td.Machine, tmp_path: Path) -> None:
    img = tmp_path / "mem.raw"
    _flat_image(machine, img, _note(machine))
    with pytest.raises(FormatError, match="no VMCOREINFO note at physical 0x51000"), \
            RawMemoryCollector(img, vmcoreinfo_at="51000 1024"):
        pass


def test_vmcoreinfo_at_wrong_phys_map(machine: td.Machine, tmp_path: Path) -> None:
    """The right address with a map that shifts the image finds no note."""
    img = tmp_path / "mem.raw"
    size = _flat_image(machine, img, _note(machine))
    with pytest.raises(FormatError, match="phys_map does not match"), \
            RawMemoryCollector(img, phys_map=[(0x1000, size)],
                               vmcoreinfo_at=(NOTE_AT, 0x1024)):
        pass


def test_vmcoreinfo_text_is_not_vmcoreinfo(machine: td.Machine, tmp_path: Path) -> None:
    img = tmp_path / "mem.raw"
    _flat_image(machine, img)
    with pytest.raises(FormatError, match="no OSRELEASE"), \
            RawMemoryCollector(img, vmcoreinfo=b"hello=world\n"):
        pass


def test_vmcoreinfo_twice(tmp_path: Path) -> None:
    img = tmp_path / "mem.raw"
    img.write_bytes(bytes(PAGE))
    with pytest.raises(UsageError, match="not both"), \
            RawMemoryCollector(img, vmcoreinfo=b"OSRELEASE=x\nPAGESIZE=4096\n",
                               vmcoreinfo_at=(0, 0x1024)):
        pass


def _incomplete_capture(args: list[str], tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    out = tmp_path / "out.kdump"
    proc = run_agent(["capture", "raw", *args, "-o", str(out), "--format", "kdump", "--json"],
                     tmp_path)
    assert proc.returncode == 65, proc.stderr
    rec = json_out(proc)
    assert any("could not be read" in w for w in rec["warnings"])
    with open(out, "rb") as f:
        assert struct.unpack_from("<I", f.read(0x1AC), 0x1A8)[0] & 0x8  # INCOMPLETE status
    return out, rec


def _pages_back(out: Path, m: td.Machine, lost: set[int], cut_at: int | None = None) -> None:
    """libkdumpfile: pages in ``lost`` absent, the page holding ``cut_at`` as far as it goes,
    every other page as in the machine."""
    kdumpfile = kdumpfile_module()
    ctx = lkf_open(str(out))
    for pfn in m.pfns():
        if cut_at is not None and pfn == cut_at // PAGE:
            got = bytes(ctx.read(kdumpfile.KDUMP_MACHPHYSADDR, pfn * PAGE, PAGE))
            assert got[: cut_at % PAGE] == m.page(pfn)[: cut_at % PAGE]
        elif pfn in lost:
            with pytest.raises(kdumpfile.exceptions.KDumpBaseException):
                ctx.read(kdumpfile.KDUMP_MACHPHYSADDR, pfn * PAGE, PAGE)
        else:
            assert bytes(ctx.read(kdumpfile.KDUMP_MACHPHYSADDR, pfn * PAGE, PAGE)) == \
                m.page(pfn), hex(pfn)


def test_lime_cut_inside_a_header_warns(machine: td.Machine, tmp_path: Path) -> None:
    f = tmp_path / "cut.lime"
    _lime(f, [(r.phys, r.data) for r in machine.regions])
    raw = f.read_bytes()
    f.write_bytes(raw[: len(raw) - len(machine.regions[-1].data) - 10])
    with RawMemoryCollector(f, vmcoreinfo=machine.vmcoreinfo) as snap:
        assert [s.phys_addr for s in snap.image.segments] == \
            [r.phys for r in machine.regions[:-1]]
        assert any("inside a LiME range header" in w for w in snap.warnings)


def test_lime_bad_second_header(machine: td.Machine, tmp_path: Path) -> None:
    f = tmp_path / "bad.lime"
    _lime(f, [(r.phys, r.data) for r in machine.regions[:2]])
    raw = bytearray(f.read_bytes())
    second = LIME_HEADER.size + len(machine.regions[0].data)
    raw[second : second + 4] = b"XXXX"
    f.write_bytes(raw)
    with pytest.raises(FormatError, match="no LiME range header") as err, \
            RawMemoryCollector(f, vmcoreinfo=machine.vmcoreinfo):
        pass
    assert err.value.offset == second


def test_lime_version_and_inverted_range(tmp_path: Path) -> None:
    f = tmp_path / "v2.lime"
    f.write_bytes(LIME_HEADER.pack(LIME_MAGIC, 2, 0, PAGE - 1, bytes(8)) + bytes(PAGE))
    with pytest.raises(FormatError, match="version 2"), \
            RawMemoryCollector(f, vmcoreinfo=b"OSRELEASE=x\nPAGESIZE=4096\n"):
        pass
    f.write_bytes(LIME_HEADER.pack(LIME_MAGIC, 1, PAGE, 0, bytes(8)))
    with pytest.raises(FormatError, match="before it starts"), \
            RawMemoryCollector(f, vmcoreinfo=b"OSRELEASE=x\nPAGESIZE=4096\n"):
        pass


def test_overlapping_ranges(tmp_path: Path) -> None:
    a, b = tmp_path / "a.lime", tmp_path / "b.lime"
    _lime(a, [(0, bytes(2 * PAGE))])
    _lime(b, [(PAGE, bytes(PAGE))])
    with pytest.raises(UsageError, match="overlap"), \
            RawMemoryCollector([a, b], vmcoreinfo=b"OSRELEASE=x\nPAGESIZE=4096\n"):
        pass


def test_several_raw_images_need_a_map(tmp_path: Path) -> None:
    a, b = tmp_path / "a.raw", tmp_path / "b.raw"
    a.write_bytes(bytes(PAGE))
    b.write_bytes(bytes(PAGE))
    with pytest.raises(UsageError, match="give a phys_map"), \
            RawMemoryCollector([a, b], vmcoreinfo=b"OSRELEASE=x\nPAGESIZE=4096\n"):
        pass
    with pytest.raises(UsageError, match="places nothing from"), \
            RawMemoryCollector([a, b], phys_map=[(0, PAGE, 0)],
                               vmcoreinfo=b"OSRELEASE=x\nPAGESIZE=4096\n"):
        pass


def test_missing_image(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot read memory image"), \
            RawMemoryCollector(tmp_path / "nope", vmcoreinfo=b"OSRELEASE=x\nPAGESIZE=4096\n"):
        pass


def test_phys_map_text_and_qemu_layout() -> None:
    assert parse_phys_map("0:0x80000000,0x100000000:0x40000000@0+0x80000000") == [
        PhysRange(0, 0x80000000), PhysRange(0x100000000, 0x40000000, 0, 0x80000000)]
    with pytest.raises(UsageError, match="bad phys_map item"):
        parse_phys_map("zero:1")
    # pc below 3.5 GiB: all RAM at 0; 4 GiB: 3 GiB low, the rest above 4 GiB
    assert qemu_x86_phys_map(512 << 20) == [PhysRange(0, 512 << 20)]
    assert qemu_x86_phys_map(4 << 30) == [PhysRange(0, 3 << 30),
                                          PhysRange(4 << 30, 1 << 30, 0, 3 << 30)]
    assert qemu_x86_phys_map(3 << 30, "q35") == [PhysRange(0, 2 << 30),
                                                 PhysRange(4 << 30, 1 << 30, 0, 2 << 30)]


def test_note_header_is_parsed_not_guessed(machine: td.Machine, tmp_path: Path) -> None:
    """A descriptor size running past the note buffer is refused."""
    note = bytearray(_note(machine))
    struct.pack_into("<I", note, 4, 0x10000)  # n_descsz far beyond the 0x1024 buffer
    img = tmp_path / "mem.raw"
    _flat_image(machine, img, bytes(note))
    with pytest.raises(FormatError, match="claims 65536 bytes"), \
            RawMemoryCollector(img, vmcoreinfo_at=(NOTE_AT, 0x1024)):
        pass
