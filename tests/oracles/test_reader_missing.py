"""A dump that lacks data says so: ``Dump.incomplete`` and ``Dump.missing``, on cut and lying
inputs of every format (ELF, kdump-compressed, flattened), and ``to_image()`` carries the
readable pages and names the rest in ``CoreImage.missing`` (issue 10 item 6, issue 11 item 1).
Empty dumps open with 0 pages (issue 10 item 1), and kdumpling notes of both numberings are
shown by name (issue 10 item 2).

Oracles: makedumpfile makes the kdump and flattened inputs, libkdumpfile and drgn read the
same pages back (and fail on the ones we call missing), pyelftools reads the ELF headers.
"""

from __future__ import annotations

import re
import struct
import subprocess
import warnings
from pathlib import Path

import pytest
from kdumpling import write_dump
from kdumpling.layout import (
    DUMP_DH_COMPRESSED_INCOMPLETE,
    DUMP_ELF_INCOMPLETE,
    FLAT_END,
    FLAT_HEADER,
    FLAT_HEADER_SIZE,
    FLAT_RECORD,
    FLAT_SIGNATURE,
    PAGE_DESC,
)
from kdumpling.notes import CustomNoteType, Note, annotations_text
from kdumpling.reader import Dump, PageNotDumpedError, open_dump

from tests import testdumps as td
from tests.readers import drgn_module, drgn_program, kdumpfile_module, lkf_open, tool

PAGE = td.PAGE


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("missing")
    m = td.x86_64_machine(small=True)
    files = {"elf": d / "small.elf", "kdump": d / "small.kdump", "flat": d / "small.flat"}
    td.pack_elf_vmcore(files["elf"], m)
    td.makedumpfile(["-c", "-d", "1", str(files["elf"]), str(files["kdump"])])
    td.makedumpfile(["-F", "-c", "-d", "1", str(files["elf"])], stdout=files["flat"])
    return files


def _pages(path: Path) -> dict[int, bytes]:
    with open_dump(path) as dump:
        return dict(dump.iter_pages())


def _pfns(ranges: list[tuple[int, int]]) -> set[int]:
    return {pfn for a, b in ranges for pfn in range(a // PAGE, -(-b // PAGE))}


def _desc_off(path: Path) -> int:
    with open_dump(path) as dump:
        return int(dump._desc_off)  # type: ignore[attr-defined]


def _accounted(dump: Dump, ref: dict[int, bytes]) -> set[int]:
    """Every page of the intact file is either read back unchanged or inside ``missing``;
    no page in ``missing`` reads. Returns the missing PFNs."""
    missing = _pfns(dump.missing)
    got = dict(dump.iter_pages())
    for pfn, page in ref.items():
        if pfn in missing:
            assert pfn not in got
            with pytest.raises(PageNotDumpedError):
                dump.read_phys(pfn * PAGE, PAGE)
        else:
            assert got.get(pfn) == page, f"pfn {pfn:#x} lost in silence"
    assert missing <= ref.keys()
    return missing


def _converted(dump: Dump, ref: dict[int, bytes], missing: set[int], out: Path, fmt: str
               ) -> None:
    """to_image keeps every readable page, names the missing ranges, and the output is marked
    incomplete; libkdumpfile reads the kdump output's pages as ours."""
    image = dump.to_image()
    assert image.missing == dump.missing
    covered = _pfns([(s.phys_addr, s.phys_addr + s.size) for s in image.segments])
    assert not covered & missing
    write_dump(image, out, format=fmt, compression="zlib", dump_level=1)
    kept = {p: page for p, page in ref.items() if p not in missing}
    with open_dump(out) as back:
        assert back.incomplete
        got = dict(back.iter_pages())
        assert {p: got[p] for p in kept} == kept
        assert not missing & got.keys()
    if fmt == "kdump":
        status = struct.unpack_from("<I", out.read_bytes(), 424)[0]
        assert status & DUMP_DH_COMPRESSED_INCOMPLETE
        kd = kdumpfile_module()
        ctx = lkf_open(str(out))
        for pfn, page in kept.items():
            assert bytes(ctx.read(kd.KDUMP_MACHPHYSADDR, pfn * PAGE, PAGE)) == page
    else:
        from elftools.elf.elffile import ELFFile

        with out.open("rb") as f:
            assert ELFFile(f).header["e_flags"] & DUMP_ELF_INCOMPLETE


# --- kdump-compressed --------------------------------------------------------------------------


def _flatten(normal: Path, out: Path) -> None:
    """A normal kdump file as a flattened stream (makedumpfile.h): the 4 KiB header, records
    of at most 1 MiB, the end marker. makedumpfile -R must give the file back."""
    data = normal.read_bytes()
    parts = [FLAT_HEADER.pack(FLAT_SIGNATURE, 1, 1).ljust(FLAT_HEADER_SIZE, b"\0")]
    for pos in range(0, len(data), 1 << 20):
        chunk = data[pos : pos + (1 << 20)]
        parts += [FLAT_RECORD.pack(pos, len(chunk)), chunk]
    out.write_bytes(b"".join([*parts, FLAT_END]))
    back = out.with_suffix(".R")
    with out.open("rb") as stream:
        subprocess.run([tool("makedumpfile"), "-R", str(back)], stdin=stream, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
    assert back.read_bytes() == data


@pytest.mark.parametrize("fmt", ["kdump", "elf", "flat"])
def test_kdump_descriptors_past_eof(src: dict[str, Path], tmp_path: Path, fmt: str) -> None:
    """Descriptors in the middle of the table that point past the end of the file (no header
    flag): those pages are missing, libkdumpfile cannot read them either, the rest converts.
    ``flat``: the same file as a flattened stream."""
    ref = _pages(src["kdump"])
    data = bytearray(src["kdump"].read_bytes())
    desc_off = _desc_off(src["kdump"])
    size = PAGE_DESC["<"].size
    lied = sorted(ref)[10:13]
    for i in range(10, 13):
        _, length, flags, pflags = PAGE_DESC["<"].unpack_from(data, desc_off + size * i)
        PAGE_DESC["<"].pack_into(data, desc_off + size * i, len(data) + 4 * PAGE, length,
                                 flags, pflags)
    path = tmp_path / "lying.kdump"
    path.write_bytes(bytes(data))
    kd = kdumpfile_module()
    ctx = lkf_open(str(path))
    for pfn in lied:
        with pytest.raises(kd.exceptions.KDumpBaseException):
            ctx.read(kd.KDUMP_MACHPHYSADDR, pfn * PAGE, PAGE)
    if fmt == "flat":
        _flatten(path, tmp_path / "lying.flat")
        path = tmp_path / "lying.flat"
    with open_dump(path) as dump:
        assert not dump.header["status"] & DUMP_DH_COMPRESSED_INCOMPLETE
        assert dump.missing == [(lied[0] * PAGE, (lied[-1] + 1) * PAGE)]
        assert dump.incomplete
        missing = _accounted(dump, ref)
        out_fmt = "kdump" if fmt == "flat" else fmt
        _converted(dump, ref, missing, tmp_path / f"out.{out_fmt}", out_fmt)


def test_kdump_incomplete_flag_and_unwritten_descriptors(src: dict[str, Path],
                                                         tmp_path: Path) -> None:
    """makedumpfile's own mark of a dump it cut short: status DUMP_DH_COMPRESSED_INCOMPLETE
    and the descriptors it never wrote left at offset 0."""
    ref = _pages(src["kdump"])
    data = bytearray(src["kdump"].read_bytes())
    status = struct.unpack_from("<I", data, 424)[0]
    struct.pack_into("<I", data, 424, status | DUMP_DH_COMPRESSED_INCOMPLETE)
    desc_off = _desc_off(src["kdump"])
    for i in range(len(ref) - 4, len(ref)):
        PAGE_DESC["<"].pack_into(data, desc_off + PAGE_DESC["<"].size * i, 0, 0, 0, 0)
    path = tmp_path / "flagged.kdump"
    path.write_bytes(bytes(data))
    with open_dump(path) as dump:
        assert dump.incomplete
        assert _pfns(dump.missing) == set(sorted(ref)[-4:])
        missing = _accounted(dump, ref)
        _converted(dump, ref, missing, tmp_path / "out.kdump", "kdump")


@pytest.mark.parametrize("cut", ["page data", "descriptors"])
def test_kdump_cut_short(src: dict[str, Path], tmp_path: Path, cut: str) -> None:
    full = src["kdump"].read_bytes()
    ref = _pages(src["kdump"])
    desc_off = _desc_off(src["kdump"])
    size = len(full) - 3 * PAGE if cut == "page data" else \
        desc_off + PAGE_DESC["<"].size * (len(ref) // 2) + 5
    path = tmp_path / "cut.kdump"
    path.write_bytes(full[:size])
    with open_dump(path) as dump:
        assert dump.incomplete
        missing = _accounted(dump, ref)
        assert missing
        if cut == "descriptors":  # and all page data, which follows the table
            assert missing == set(ref)
        _converted(dump, ref, missing, tmp_path / "out.kdump", "kdump")


def test_intact_files_are_complete(src: dict[str, Path]) -> None:
    for path in src.values():
        with open_dump(path) as dump:
            assert (dump.incomplete, dump.missing) == (False, [])
            assert dump.to_image().missing == []


# --- flattened ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.5, 0.8, 0.97])
def test_flattened_cut_short(src: dict[str, Path], tmp_path: Path, fraction: float) -> None:
    """A flattened stream cut anywhere: no end marker, so incomplete; every page that did
    arrive reads as in the whole stream, the rest is named missing."""
    full = src["flat"].read_bytes()
    ref = _pages(src["flat"])
    path = tmp_path / "cut.flat"
    path.write_bytes(full[: int(len(full) * fraction)])
    with open_dump(path) as dump:
        assert dump.incomplete
        missing = _accounted(dump, ref)
        _converted(dump, ref, missing, tmp_path / "out.kdump", "kdump")


def test_flattened_without_end_marker_only(src: dict[str, Path], tmp_path: Path) -> None:
    full = src["flat"].read_bytes()
    path = tmp_path / "noend.flat"
    path.write_bytes(full[:-16])  # the {-1, -1} end record
    with open_dump(path) as dump:
        assert dump.incomplete and dump.missing == []


# --- ELF ---------------------------------------------------------------------------------------


def test_elf_cut_short(src: dict[str, Path], tmp_path: Path) -> None:
    """PT_LOAD data past the end of the file is missing, from the byte where the file ends;
    drgn reads the same bytes before it."""
    full = src["elf"].read_bytes()
    path = tmp_path / "cut.elf"
    path.write_bytes(full[: len(full) - 3 * PAGE - 100])
    with open_dump(src["elf"]) as whole:
        last = whole.segments[-1]
        end = last.phys_addr + last.file_size
        ref = dict(whole.iter_pages())
    with open_dump(path) as dump:
        assert dump.incomplete
        assert dump.missing == [(end - 3 * PAGE - 100, end)]
        prog = drgn_program(str(path))
        before = end - 5 * PAGE
        assert dump.read_phys(before, PAGE) == bytes(prog.read(before, PAGE, True))
        with pytest.raises(PageNotDumpedError):
            dump.read_phys(end - PAGE, 1)
        image = dump.to_image()
        assert image.missing == dump.missing
        out = tmp_path / "out.kdump"
        write_dump(image, out, format="kdump", compression="zlib", dump_level=0)
    with open_dump(out) as back:
        assert back.incomplete
        got = dict(back.iter_pages())
    cut_pfn = (end - 3 * PAGE - 100) // PAGE
    assert all(got[p] == ref[p] for p in ref if p < cut_pfn)
    # The page the cut runs through keeps its readable bytes.
    assert got[cut_pfn][: PAGE - 100] == ref[cut_pfn][: PAGE - 100]


def test_elf_load_pointing_past_eof(src: dict[str, Path], tmp_path: Path) -> None:
    """A PT_LOAD in the middle whose p_offset lies past the end of the file."""
    data = bytearray(src["elf"].read_bytes())
    with open_dump(src["elf"]) as whole:
        seg = whole.segments[1]
        ref = dict(whole.iter_pages())
    phoff = struct.unpack_from("<Q", data, 32)[0]
    struct.pack_into("<Q", data, phoff + 2 * 56 + 8, len(data) + PAGE)  # phdr 2 = PT_LOAD 1
    path = tmp_path / "lying.elf"
    path.write_bytes(bytes(data))
    with open_dump(path) as dump:
        assert dump.missing == [(seg.phys_addr, seg.phys_addr + seg.file_size)]
        missing = _accounted(dump, ref)
        assert missing == _pfns(dump.missing)
        _converted(dump, ref, missing, tmp_path / "out.kdump", "kdump")


def test_elf_incomplete_marker_without_cut(src: dict[str, Path], tmp_path: Path) -> None:
    data = bytearray(src["elf"].read_bytes())
    struct.pack_into("<I", data, 48, DUMP_ELF_INCOMPLETE)
    path = tmp_path / "marked.elf"
    path.write_bytes(bytes(data))
    with open_dump(path) as dump:
        assert dump.incomplete and dump.missing == []


# --- empty dumps (issue 10 item 1) -------------------------------------------------------------


def _bare_elf(path: Path, phdrs: list[bytes], notes: bytes = b"") -> None:
    """An ELF64 core packed by hand (gABI): e_phoff 0 when there are no program headers."""
    phnum = len(phdrs)
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", ident, 4, 62, 1, 0, 64 if phnum else 0, 0, 0, 64,
                       56 if phnum else 0, phnum, 0, 0, 0)
    path.write_bytes(ehdr + b"".join(phdrs) + notes)


def test_elf_without_program_headers(tmp_path: Path) -> None:
    from elftools.elf.elffile import ELFFile

    path = tmp_path / "empty.elf"
    _bare_elf(path, [])
    with path.open("rb") as f:
        elf = ELFFile(f)
        assert elf.num_segments() == 0 and elf.header["e_type"] == "ET_CORE"
    with open_dump(path) as dump:
        assert (dump.segments, dump.notes, list(dump.iter_pages())) == ([], [], [])
        assert (dump.incomplete, dump.missing) == (False, [])
        assert dump.to_image().segments == []


def test_elf_notes_only(tmp_path: Path) -> None:
    from kdumpling.notes import pack_note, vmcoreinfo_note

    notes = pack_note("<", vmcoreinfo_note(b"OSRELEASE=6.1.0\nPAGESIZE=4096\n"))
    path = tmp_path / "notes.elf"
    _bare_elf(path, [struct.pack("<IIQQQQQQ", 4, 0, 64 + 56, 0, 0, len(notes), len(notes), 0)],
              notes)
    with open_dump(path) as dump:
        assert dump.vmcoreinfo_fields["OSRELEASE"] == "6.1.0"
        assert list(dump.iter_pages()) == [] and dump.segments == []
        assert dump.kind.value == "kernel"


@pytest.mark.parametrize("fmt", ["elf", "kdump", "kdump-flat"])
@pytest.mark.parametrize("content", ["nothing", "vmcoreinfo", "cpu", "custom note"])
def test_empty_builder_dumps_open(tmp_path: Path, fmt: str, content: str) -> None:
    from kdumpling import KdumpBuilder

    builder = KdumpBuilder(arch="x86_64")
    if content == "vmcoreinfo":
        builder.set_vmcoreinfo("OSRELEASE=6.1.0\nPAGESIZE=4096\n")
    elif content == "cpu":
        builder.add_cpu_context(cpu_id=0, registers={"RIP": 0xFFFFFFFF81000000}, pid=1)
    elif content == "custom note":
        builder.add_custom_note(name=b"MYAPP", note_type=0x1234, data=b"version=1.0")
    path = tmp_path / f"empty.{fmt}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        builder.write(str(path), format=fmt)
    with open_dump(path) as dump:
        assert list(dump.iter_pages()) == []
        assert dump.memory_size == 0
        assert (dump.incomplete, dump.missing) == (False, [])
        if content == "vmcoreinfo":
            assert dump.vmcoreinfo_fields["OSRELEASE"] == "6.1.0"
        if content == "cpu":
            assert [pid for pid, _ in dump.cpus] == [1]
        if content == "custom note":
            assert any(n.name == b"MYAPP" and n.desc == b"version=1.0" for n in dump.notes)
        assert dump.to_image().memory_size == 0


# --- kdumpling notes of both numberings (issue 10 item 2) --------------------------------------


def test_kdumpling_notes_of_both_numberings(tmp_path: Path) -> None:
    """The seed (kdumpling 0.4.0) wrote METADATA=1, ANNOTATIONS=2, FILE_INFO=3 under owner
    KDUMPLING; we write 0x4B444Cxx. Both are shown by name; type 2 under another owner is not
    an annotation."""
    m = td.x86_64_machine(small=True)
    notes = [*m.notes,
             Note(b"KDUMPLING", 1, b"sha256=abc\n"),
             Note(b"KDUMPLING", 2, annotations_text({"old": "seed"})),
             Note(b"KDUMPLING", 3, b"file info"),
             Note(b"KDUMPLING", CustomNoteType.ANNOTATIONS, annotations_text({"new": "ours"})),
             Note(b"KDUMPLING", CustomNoteType.METADATA, b"tool=kdumpling\n"),
             Note(b"OTHER", 2, b"not=ours\n")]
    path = tmp_path / "notes.elf"
    td.pack_elf_vmcore(path, m, notes=notes)
    with open_dump(path) as dump:
        assert dump.annotations == {"old": "seed", "new": "ours"}
        assert dump.metadata == {"sha256": "abc", "tool": "kdumpling"}
        assert [kind for kind, _ in dump.kdumpling_notes] == [
            "METADATA", "ANNOTATIONS", "FILE_INFO", "ANNOTATIONS", "METADATA"]
        assert len(dump.cpus) == len(m.cpus)  # type 1 under KDUMPLING is no CPU


# --- cut records, cut streams, flags without ranges (issue 10 item 6 follow-ups) ---------------


def _crash_d1(path: Path) -> str:
    """crash -d1 prints the header as it understood it (status flags, e_flags)."""
    return subprocess.run([tool("crash"), "-d1", "--osrelease", str(path)], capture_output=True,
                          text=True, timeout=120).stdout


def _arrived(stream: bytes) -> list[tuple[int, int]]:
    """Logical [start, end) ranges a flattened stream's records deliver, a cut last record up
    to where it ends (makedumpfile.h makedumpfile_data_header: big-endian offset, size)."""
    out, pos = [], FLAT_HEADER_SIZE
    while pos + FLAT_RECORD.size <= len(stream):
        offset, size = FLAT_RECORD.unpack_from(stream, pos)
        if offset == -1:
            break
        got = min(size, len(stream) - pos - FLAT_RECORD.size)
        if got > 0:
            out.append((offset, offset + got))
        pos += FLAT_RECORD.size + size
    return out


def _inside(ranges: list[tuple[int, int]], a: int, b: int) -> bool:
    return any(lo <= a and b <= hi for lo, hi in ranges)


@pytest.fixture(scope="module")
def big_flat(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """makedumpfile -F of the bigger machine: descriptors and page data in alternating
    records of about 64 KiB (the small one writes all page data before its descriptors)."""
    d = tmp_path_factory.mktemp("bigflat")
    elf, flat, normal = d / "big.elf", d / "big.flat", d / "big.kdump"
    td.pack_elf_vmcore(elf, td.x86_64_machine())
    td.makedumpfile(["-F", "-c", "-d", "1", str(elf)], stdout=flat)
    with flat.open("rb") as stream:
        subprocess.run([tool("makedumpfile"), "-R", str(normal)], stdin=stream, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
    return {"flat": flat, "normal": normal}


def _record_cuts(stream: bytes) -> list[int]:
    """Cut points inside records: a third into every record bigger than a page but the first
    few (header, sub-header, bitmaps), and 3 bytes into a descriptor of the last record."""
    cuts, pos, records = [], FLAT_HEADER_SIZE, []
    while True:
        offset, size = FLAT_RECORD.unpack_from(stream, pos)
        if offset == -1:
            break
        records.append((pos, offset, size))
        pos += FLAT_RECORD.size + size
    for rpos, _, size in records[5:]:
        if size > PAGE:
            cuts.append(rpos + FLAT_RECORD.size + size // 3)
    last = records[-1][0] + FLAT_RECORD.size
    cuts.append(last + PAGE_DESC["<"].size * 7 + 3)
    return cuts


@pytest.mark.parametrize("which", ["small", "big"])
def test_flattened_cut_record_keeps_what_arrived(src: dict[str, Path], big_flat: dict[str, Path],
                                                 tmp_path: Path, which: str) -> None:
    """A stream made by makedumpfile -F, cut inside a record at several points: every page
    whose descriptor and data arrived reads as libkdumpfile reads it from the whole file
    (makedumpfile -R's), exactly the others are missing, and the conversion keeps the former.
    (makedumpfile -R itself cannot serve: on a cut stream it spins at EOF waiting for more.)"""
    if which == "small":
        flat = src["flat"]
        normal = tmp_path / "small.kdump"
        with flat.open("rb") as stream:
            subprocess.run([tool("makedumpfile"), "-R", str(normal)], stdin=stream, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
    else:
        flat, normal = big_flat["flat"], big_flat["normal"]
    full = flat.read_bytes()
    whole = normal.read_bytes()
    desc_off = _desc_off(normal)
    kd = kdumpfile_module()
    ctx = lkf_open(str(normal))
    pfns = sorted(_pages(normal))  # one descriptor per dumped page, in PFN order
    ref = {p: bytes(ctx.read(kd.KDUMP_MACHPHYSADDR, p * PAGE, PAGE)) for p in pfns}
    size = PAGE_DESC["<"].size
    cuts = _record_cuts(full)
    assert len(cuts) >= (1 if which == "small" else 4)
    from_cut_records = 0  # pages read with their descriptor or data in the cut record
    for n, cut in enumerate(cuts):
        arrived = _arrived(full[:cut])
        expect = set()
        for i, pfn in enumerate(pfns):
            at = desc_off + i * size
            offset, length, _, _ = PAGE_DESC["<"].unpack_from(whole, at)
            if _inside(arrived, at, at + size) and _inside(arrived, offset, offset + length):
                expect.add(pfn)
                from_cut_records += _inside(arrived[-1:], at, at + size) or \
                    _inside(arrived[-1:], offset, offset + length)
        path = tmp_path / f"cut{n}.flat"
        path.write_bytes(full[:cut])
        with open_dump(path) as dump:
            assert dump.incomplete
            assert _pfns(dump.missing) == set(pfns) - expect, f"cut at {cut:#x}"
            got = dict(dump.iter_pages())
            assert got == {p: ref[p] for p in expect}, f"cut at {cut:#x}"
            if expect:
                _converted(dump, ref, set(pfns) - expect, tmp_path / f"out{n}.kdump", "kdump")
    # Cutting inside a record is worth something: pages of the cut records are read. (The
    # small stream's page data precedes its descriptors: cut there, no reader can place it.)
    assert from_cut_records >= (7 if which == "small" else 20)


def test_reassemble_cut_stream_keeps_what_arrived(big_flat: dict[str, Path],
                                                  tmp_path: Path) -> None:
    """reassemble_flattened_into on a cut stream writes every byte that arrived, the cut
    record's too, then raises: the file holds what arrived where the records put it."""
    import os

    from kdumpling.errors import FormatError
    from kdumpling.reader import reassemble_flattened_into

    full = big_flat["flat"].read_bytes()
    whole = big_flat["normal"].read_bytes()
    cut = _record_cuts(full)[1]
    out = tmp_path / "rebuilt"
    fd = os.open(out, os.O_RDWR | os.O_CREAT, 0o600)
    (tmp_path / "cut.flat").write_bytes(full[:cut])
    try:
        with open(tmp_path / "cut.flat", "rb") as stream, \
                pytest.raises(FormatError, match="middle of the record data"):
            reassemble_flattened_into(stream, fd)
    finally:
        os.close(fd)
    rebuilt = out.read_bytes()
    arrived = _arrived(full[:cut])
    assert len(rebuilt) == max(b for _, b in arrived)
    for a, b in arrived:
        assert rebuilt[a:b] == whole[a:b]


def _elf_loads(path: Path) -> list[tuple[int, int, int, int]]:
    """(p_offset, p_filesz, p_memsz, p_paddr) of every PT_LOAD, as pyelftools reads them."""
    from elftools.elf.elffile import ELFFile

    with path.open("rb") as f:
        return [(s["p_offset"], s["p_filesz"], s["p_memsz"], s["p_paddr"])
                for s in ELFFile(f).iter_segments() if s["p_type"] == "PT_LOAD"]


def test_elf_stream_cut_short(src: dict[str, Path], tmp_path: Path) -> None:
    """An ELF vmcore on a pipe that ends in the middle of a page of its last PT_LOADs: every
    byte that arrived is written (drgn reads the same bytes from the whole file, libkdumpfile
    from the output), exactly what did not arrive is named missing, and the output says
    incomplete (crash -d1)."""
    import os
    import threading

    from kdumpling.reader import open_elf_stream

    full = src["elf"].read_bytes()
    cut = len(full) - 5 * PAGE - 123
    lost = sorted((paddr + max(cut, off) - off, paddr + filesz)
                  for off, filesz, _, paddr in _elf_loads(src["elf"])
                  if filesz and off + filesz > cut)
    assert lost
    r, w = os.pipe()

    def feed() -> None:
        with os.fdopen(w, "wb") as f:
            f.write(full[:cut])

    t = threading.Thread(target=feed)
    t.start()
    out = tmp_path / "out.kdump"
    try:
        reader = open_elf_stream(r)
        result = write_dump(reader.image, out, format="kdump", compression="zlib",
                            dump_level=0)
    finally:
        t.join()
        os.close(r)
    assert result.missing == lost and result.incomplete
    assert any("stream ended" in w for w in reader.warnings)
    prog = drgn_program(str(src["elf"]))
    first = lost[0][0]
    kd = kdumpfile_module()
    ctx = lkf_open(str(out))
    for addr in (first - 2 * PAGE, first - first % PAGE):  # in the last region
        assert bytes(ctx.read(kd.KDUMP_MACHPHYSADDR, addr, first - addr)) == \
            bytes(prog.read(addr, first - addr, True))
    with open_dump(out) as back:
        assert back.incomplete
    assert "DUMP_DH_COMPRESSED_INCOMPLETE" in _crash_d1(out)


def test_elf_cut_short_image_leaves_the_lost_tail_out(src: dict[str, Path],
                                                      tmp_path: Path) -> None:
    """to_image of an ELF file cut short: no segment's p_memsz reaches into what is missing
    (it would read back as zeros, gABI), so drgn finds no memory there in the ELF output,
    and reads the bytes before the cut as from the whole file."""
    drgn = drgn_module()
    full = src["elf"].read_bytes()
    path = tmp_path / "cut.elf"
    path.write_bytes(full[: len(full) - 3 * PAGE - 100])
    with open_dump(path) as dump:
        missing = dump.missing
        assert missing
        image = dump.to_image()
        for seg in image.segments:
            assert all(seg.phys_addr + seg.memsz <= a or b <= seg.phys_addr
                       for a, b in missing)
        out = tmp_path / "out.elf"
        write_dump(image, out, format="elf")
    for _, _, memsz, paddr in _elf_loads(out):
        assert all(paddr + memsz <= a or b <= paddr for a, b in missing)
    prog, whole = drgn_program(str(out)), drgn_program(str(src["elf"]))
    a = missing[0][0]
    assert bytes(prog.read(a - 2 * PAGE, 2 * PAGE, True)) == \
        bytes(whole.read(a - 2 * PAGE, 2 * PAGE, True))
    with pytest.raises(drgn.FaultError):
        prog.read(a, 1, True)


def _flagged(src: dict[str, Path], tmp_path: Path, source: str) -> Path:
    """An intact dump whose header says incomplete: no range can be named."""
    if source == "elf":
        data = bytearray(src["elf"].read_bytes())
        struct.pack_into("<I", data, 48, DUMP_ELF_INCOMPLETE)  # e_flags
    elif source == "kdump":
        data = bytearray(src["kdump"].read_bytes())
        status = struct.unpack_from("<I", data, 424)[0]
        struct.pack_into("<I", data, 424, status | DUMP_DH_COMPRESSED_INCOMPLETE)
    else:
        data = bytearray(src["flat"].read_bytes()[:-16])  # no end marker
    path = tmp_path / f"flagged.{source}"
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("out_fmt", ["elf", "kdump"])
@pytest.mark.parametrize("source", ["elf", "kdump", "flat"])
def test_incomplete_without_ranges_carries_into_conversion(
        src: dict[str, Path], tmp_path: Path, source: str, out_fmt: str) -> None:
    """A dump marked incomplete with every promised page present: the image says
    incomplete, the writers mark the output (crash -d1 reads the mark) and
    WriteResult.incomplete is true though no range is missing."""
    path = _flagged(src, tmp_path, source)
    out = tmp_path / f"out.{out_fmt}"
    with open_dump(path) as dump:
        assert dump.incomplete and dump.missing == []
        image = dump.to_image()
        assert image.incomplete and image.missing == []
        result = write_dump(image, out, format=out_fmt)
    assert result.incomplete and result.missing == []
    with open_dump(out) as back:
        assert back.incomplete and back.missing == []
    shown = _crash_d1(out)
    if out_fmt == "kdump":
        assert "DUMP_DH_COMPRESSED_INCOMPLETE" in shown, shown[-2000:]
    else:
        assert re.search(r"e_flags: 1\b", shown), shown[-2000:]


@pytest.mark.parametrize("source", ["elf", "kdump", "flat"])
def test_convert_of_a_dump_marked_incomplete_exits_65(src: dict[str, Path], tmp_path: Path,
                                                      source: str) -> None:
    """kdumpling-agent convert of a dump marked incomplete with no range to name: exit 65 as
    verify gives, the output marked incomplete (crash -d1), nothing in --json 'missing'."""
    from tests.agenttools import json_out, run_agent

    path = _flagged(src, tmp_path, source)
    out = tmp_path / "out.kdump"
    proc = run_agent(["convert", str(path), str(out), "--format", "kdump", "--json"], tmp_path)
    assert proc.returncode == 65, proc.stderr
    rec = json_out(proc)
    assert rec["exit_code"] == 65 and not rec.get("missing")
    assert "DUMP_DH_COMPRESSED_INCOMPLETE" in _crash_d1(out)
    verify = run_agent(["verify", str(out)], tmp_path)
    assert verify.returncode == 65, verify.stderr
