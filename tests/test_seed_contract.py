"""The seed API (../shared/seeds/000_1443bb4945a294f3.txt): every docstring example runs as
written, and what it writes is read back by readers we did not write. Also the contract items
of issue 10: dumps without memory, any custom note type, add_metadata.

Where kdumpling deliberately differs from the seed, README "The writer library" says so."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import warnings

import kdumpling
import pytest
from elftools.elf.elffile import ELFFile
from kdumpling import (
    CompressionType,
    CustomNote,
    CustomNoteType,
    DumpStats,
    EmptyDumpWarning,
    KdumpBuilder,
    KdumplingWarning,
    MemorySegment,
    NoteTypeWarning,
    OutputFormat,
)
from kdumpling.notes import kdumpling_note_kind, parse_annotations

from tests.readers import (
    crash_osrelease,
    drgn_program,
    kdumpfile_module,
    lkf_open,
    lkf_read_phys,
    readelf,
    tool,
)

SEED_VMCOREINFO = "OSRELEASE=5.14.0\nPAGE_SIZE=4096\n"  # the seed's example, as written
# What drgn and libkdumpfile need besides OSRELEASE to open a kernel dump.
VMCI = "OSRELEASE=6.1.0-seed\nPAGESIZE=4096\nSYMBOL(swapper_pg_dir)=ffffffff82a0c000\n"


def elf_notes(path: str) -> list[tuple[str, int | str, bytes]]:
    """(owner, type, descriptor) of every note, as pyelftools parses them."""
    with open(path, "rb") as f:
        elf = ELFFile(f)
        return [(n["n_name"], n["n_type"], bytes(n["n_descdata"]))
                for seg in elf.iter_segments() if seg["p_type"] == "PT_NOTE"
                for n in seg.iter_notes()]


# --- the seed's docstring examples, as written ------------------------------------------------

def test_builder_class_example(tmp_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    memory_bytes = bytes(range(256)) * 16
    builder = KdumpBuilder(arch='x86_64')
    builder.set_vmcoreinfo("OSRELEASE=5.14.0\\nPAGE_SIZE=4096\\n")
    builder.add_memory_segment(phys_addr=0x100000, data=memory_bytes)
    builder.write("output.vmcore")
    with pytest.warns(NoteTypeWarning, match="crash reads every note of type 1-4"):
        builder.add_custom_note(
            name=b"MYAPP",
            note_type=1,
            data=b"version=1.0"
        )
    builder.write("output.vmcore")
    # The docstring's "\\n" is a literal backslash-n in the seed's source too: one line.
    assert ("MYAPP", "NT_PRSTATUS", b"version=1.0") in elf_notes("output.vmcore")
    assert "MYAPP" in readelf("-n", "output.vmcore")


def test_builder_class_example_with_real_newlines_reads_back(tmp_path: str) -> None:
    out = os.path.join(tmp_path, "output.vmcore")
    builder = KdumpBuilder(arch='x86_64')
    builder.set_vmcoreinfo(SEED_VMCOREINFO)
    builder.add_memory_segment(phys_addr=0x100000, data=b"\xab" * 4096)
    builder.write(out)
    assert crash_osrelease(out) == "5.14.0"
    assert lkf_read_phys(lkf_open(out), 0x100000, 4096) == b"\xab" * 4096


def test_add_memory_segment_example(tmp_path: str) -> None:
    memory_bytes = os.urandom(8192)
    builder = KdumpBuilder().set_vmcoreinfo(VMCI)
    # Physical address only (virt_addr defaults to phys_addr)
    builder.add_memory_segment(phys_addr=0x100000, data=memory_bytes)
    # With explicit virtual address (for kernel memory mappings)
    builder.add_memory_segment(
        phys_addr=0x200000,
        data=memory_bytes,
        virt_addr=0xffff888000200000
    )
    out = os.path.join(tmp_path, "o.vmcore")
    builder.write(out)
    with open(out, "rb") as f:
        loads = [(s["p_paddr"], s["p_vaddr"]) for s in ELFFile(f).iter_segments()
                 if s["p_type"] == "PT_LOAD"]
    assert loads == [(0x100000, 0x100000), (0x200000, 0xffff888000200000)]
    prog = drgn_program(out)
    assert prog.read(0x200000, 8192, True) == memory_bytes


def test_add_cpu_context_example(tmp_path: str) -> None:
    builder = KdumpBuilder().set_vmcoreinfo(VMCI).add_memory_segment(0, b"\0" * 4096)
    builder.add_cpu_context(
        cpu_id=0,
        registers={'RIP': 0xffffffff81000000, 'RSP': 0xffff888000000000},
        pid=1
    )
    builder.add_cpu_context(cpu_id=1, registers={"RIP": 2}, pid=2, pr_ppid=1, pr_pgrp=2)
    out = os.path.join(tmp_path, "cpu.kdump")
    builder.write(out, format="kdump")
    ctx = lkf_open(out)
    assert ctx.attr["cpu.0.reg.rip"] == 0xffffffff81000000
    assert ctx.attr["cpu.0.reg.rsp"] == 0xffff888000000000
    assert ctx.attr["cpu.0.pid"] == 1 and ctx.attr["cpu.1.pid"] == 2


def test_aarch64_register_names_from_the_seed() -> None:
    regs = {f"X{i}": i for i in range(31)} | {"SP": 1, "PC": 2, "PSTATE": 3}
    KdumpBuilder(arch="aarch64").add_cpu_context(0, regs)


def test_add_custom_note_example(tmp_path: str) -> None:
    builder = KdumpBuilder().set_vmcoreinfo(VMCI).add_memory_segment(0, b"\0" * 4096)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # our own numbering draws no warning
        builder.add_custom_note(
            name=b"KDUMPLING",
            note_type=CustomNoteType.METADATA,
            data=b"sha256=abc123..."
        )
    out = os.path.join(tmp_path, "n.vmcore")
    builder.write(out)
    assert ("KDUMPLING", int(CustomNoteType.METADATA), b"sha256=abc123...") in elf_notes(out)


def test_add_annotations_example(tmp_path: str) -> None:
    builder = KdumpBuilder().set_vmcoreinfo(VMCI).add_memory_segment(0, b"\0" * 4096)
    builder.add_annotations({
        "hostname": "prod-server-01",
        "kernel_panic_reason": "out of memory",
        "captured_by": "crash_collector v2.1"
    })
    out = os.path.join(tmp_path, "a.vmcore")
    builder.write(out)
    (desc,) = [d for name, t, d in elf_notes(out)
               if name == "KDUMPLING" and t == CustomNoteType.ANNOTATIONS]
    assert parse_annotations(desc) == {"hostname": "prod-server-01",
                                       "kernel_panic_reason": "out of memory",
                                       "captured_by": "crash_collector v2.1"}


def test_stats_example(capsys: pytest.CaptureFixture[str]) -> None:
    builder = KdumpBuilder()
    builder.add_memory_segment(0x1000, b"\x00" * 4096)
    print(builder.stats)
    # Dump Statistics:
    # Architecture: x86_64
    # Memory Segments: 1
    # ...
    lines = [ln.strip() for ln in capsys.readouterr().out.splitlines()]
    assert lines[:3] == ["Dump Statistics:", "Architecture: x86_64", "Memory Segments: 1"]


def test_write_examples(tmp_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    builder = KdumpBuilder().set_vmcoreinfo(VMCI).add_memory_segment(0x100000, b"z" * 8192)
    # Write standard ELF vmcore (default)
    builder.write("output.vmcore")
    assert lkf_open("output.vmcore").attr["file.format"] == "elf"
    # Write kdump compressed format with zlib
    builder.write(
        "output.vmcore",
        format=OutputFormat.KDUMP_COMPRESSED,
        compression=CompressionType.ZLIB
    )
    ctx = lkf_open("output.vmcore")
    assert ctx.attr["file.format"] == "diskdump"
    assert lkf_read_phys(ctx, 0x100000, 8192) == b"z" * 8192
    # The seed's signature, every argument by keyword, its documented default level 6.
    builder.write(output_path="output.vmcore", format=OutputFormat.KDUMP_COMPRESSED,
                  compression=CompressionType.ZSTD, compression_level=6)
    assert crash_osrelease("output.vmcore") == "6.1.0-seed"


def test_custom_note_dataclass_example() -> None:
    note = CustomNote(
        name=b"KDUMPLING",
        note_type=CustomNoteType.METADATA,
        data=b"sha256=abc123..."
    )
    assert (note.name, note.note_type, note.data) == (b"KDUMPLING", CustomNoteType.METADATA,
                                                      b"sha256=abc123...")


def test_memory_segment_get_data_and_write_to(tmp_path: str) -> None:
    path = os.path.join(tmp_path, "mem.bin")
    with open(path, "wb") as f:
        f.write(b"0123456789")
    from_bytes = MemorySegment(phys_addr=0x1000, data=b"abc")
    from_path = MemorySegment(phys_addr=0x2000, data=path, virt_addr=0xffff888000002000)
    stream = io.BytesIO(b"stream-data")
    stream.seek(3)
    from_file = MemorySegment(phys_addr=0x3000, data=stream)
    assert (from_bytes.size, from_path.size, from_file.size) == (3, 10, 11)
    assert stream.tell() == 3  # measuring the size restores the position
    assert from_bytes.effective_virt_addr == 0x1000
    assert from_path.effective_virt_addr == 0xffff888000002000
    assert from_bytes.get_data() == b"abc"
    assert from_path.get_data() == b"0123456789"
    assert from_file.get_data() == b"stream-data"
    assert stream.tell() == 3  # get_data restores it too
    for seg, want in ((from_bytes, b"abc"), (from_path, b"0123456789"),
                      (from_file, b"stream-data")):
        out = io.BytesIO()
        seg.write_to(out)
        assert out.getvalue() == want
    assert stream.tell() == 3


def test_dump_stats_fields_and_text() -> None:
    stats = DumpStats(
        architecture="x86_64",
        num_memory_segments=2,
        num_cpu_contexts=1,
        total_memory_size=3 * 1024 * 1024,
        vmcoreinfo_size=40,
        estimated_file_size=3 * 1024 * 1024 + 600,
        memory_segments=[(0x1000, 0x1000, 1024 * 1024),
                         (0x200000, 0xffff888000200000, 2 * 1024 * 1024)],
    )
    assert stats.total_memory_size_human == "3.0 MB"
    assert stats.estimated_file_size_human == "3.0 MB"
    assert str(stats).splitlines() == [
        "Dump Statistics:",
        "  Architecture: x86_64",
        "  Memory Segments: 2",
        "  CPU Contexts: 1",
        "  Total Memory: 3.0 MB (3145728 bytes)",
        "  VMCOREINFO Size: 40 bytes",
        "  Estimated File Size: 3.0 MB",
        "  Segments:",
        "    0x0000000000001000: 1.0 MB",
        "    phys=0x0000000000200000 virt=0xffff888000200000: 2.0 MB",
    ]
    assert DumpStats("x86_64", 0, 0, 512, 0, 1, []).total_memory_size_human == "512 B"
    assert DumpStats("x86_64", 0, 0, 0, 0, 5 << 30, []).estimated_file_size_human == "5.0 GB"


def test_stats_estimate_is_the_elf_size(tmp_path: str) -> None:
    b = (KdumpBuilder().set_vmcoreinfo(VMCI).add_memory_segment(0x1000, b"a" * 5000)
         .add_cpu_context(0, {"RIP": 1}).add_metadata({"k": "v"}))
    out = os.path.join(tmp_path, "e.vmcore")
    b.write(out)
    assert b.stats.estimated_file_size == os.path.getsize(out)
    empty = KdumpBuilder()
    with pytest.warns(EmptyDumpWarning):
        empty.write(out)
    assert empty.stats.estimated_file_size == os.path.getsize(out) == 64


# --- item 1: dumps without memory -------------------------------------------------------------

def _empty_builders() -> dict[str, KdumpBuilder]:
    return {
        "nothing": KdumpBuilder(),
        "vmcoreinfo": KdumpBuilder().set_vmcoreinfo(VMCI),
        "cpus": KdumpBuilder().add_cpu_context(0, {"RIP": 0xffffffff81000000}, pid=1),
        "notes": KdumpBuilder().add_custom_note("MYAPP", 0x4D59_0001, b"x=1"),
    }


def _write_warned(b: KdumpBuilder, out: str, fmt: str) -> None:
    with pytest.warns(EmptyDumpWarning, match="without memory") as record:
        b.write(out, format=fmt)
    assert issubclass(record[0].category, KdumplingWarning)
    assert record[0].filename == __file__  # attributed to the caller, not to kdumpling


def _reassembled(flat: str) -> str:
    out = flat + ".re"
    with open(flat, "rb") as src:
        res = subprocess.run([tool("makedumpfile"), "-R", out], stdin=src, capture_output=True,
                             timeout=60)
    assert res.returncode == 0, res.stderr
    return out


@pytest.mark.parametrize("what", ["nothing", "vmcoreinfo", "cpus", "notes"])
def test_empty_elf_dumps_read_back(tmp_path: str, what: str) -> None:
    """No memory: a bare ELF header (nothing at all) or PT_NOTE plus one PT_LOAD of size 0
    (crash wants e_phnum >= 2, libkdumpfile a PT_LOAD); readelf and pyelftools read both."""
    out = os.path.join(tmp_path, what + ".elf")
    _write_warned(_empty_builders()[what], out, "elf")
    readelf("-h", "-l", "-n", out)  # asserts exit status 0
    with open(out, "rb") as f:
        elf = ELFFile(f)
        types = [s["p_type"] for s in elf.iter_segments()]
        loads = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        assert all(s["p_filesz"] == s["p_memsz"] == 0 for s in loads)
    if what == "nothing":
        assert types == [] and os.path.getsize(out) == 64
        with open(out, "rb") as f:
            assert struct.unpack_from("<Q", f.read(), 32)[0] == 0  # e_phoff
        # The reader wins: libkdumpfile refuses an ELF file without any PT_LOAD.
        kdumpfile = kdumpfile_module()
        with pytest.raises(kdumpfile.exceptions.NotImplementedException, match="No content"):
            lkf_open(out)
    else:
        assert types == ["PT_NOTE", "PT_LOAD"]
    if what == "vmcoreinfo":
        assert crash_osrelease(out) == "6.1.0-seed"
        ctx = lkf_open(out)
        assert ctx.attr["linux.uts.release"] == "6.1.0-seed"
        drgn_program(out)  # opens
    if what == "cpus":
        assert ctx_pid(out) == 1


def ctx_pid(path: str) -> int:
    return int(lkf_open(path).attr["cpu.0.pid"])


@pytest.mark.parametrize("fmt", ["kdump", "kdump-flat"])
@pytest.mark.parametrize("what", ["nothing", "vmcoreinfo", "cpus", "notes"])
def test_empty_kdump_dumps_read_back(tmp_path: str, what: str, fmt: str) -> None:
    """Zero pages: max_mapnr 0, one block per bitmap (crash mmaps them), no descriptors. The
    flattened stream reassembles (makedumpfile -R) into the same file."""
    out = os.path.join(tmp_path, what + "." + fmt)
    _write_warned(_empty_builders()[what], out, fmt)
    path = _reassembled(out) if fmt == "kdump-flat" else out
    ctx = lkf_open(path)
    assert ctx.attr["file.format"] == "diskdump"
    assert ctx.attr["max_pfn"] == 0
    if what == "vmcoreinfo":
        assert ctx.attr["linux.uts.release"] == "6.1.0-seed"
        assert crash_osrelease(path) == "6.1.0-seed"
        assert crash_osrelease(out) == "6.1.0-seed"  # crash reads the stream itself too
        drgn_program(path)
    if fmt == "kdump-flat":
        plain = os.path.join(tmp_path, what + ".kdump")
        _write_warned(_empty_builders()[what], plain, "kdump")
        with open(plain, "rb") as a, open(path, "rb") as b:
            assert a.read() == b.read()


@pytest.mark.parametrize("fmt", ["kdump", "elf"])
def test_empty_dump_without_vmcoreinfo_is_refused_by_crash(tmp_path: str, fmt: str) -> None:
    """The reader wins: crash needs VMCOREINFO (or a vmlinux) to say anything about a dump, and
    refuses a bare 64-byte ELF header as "file too small"; documented in the README."""
    out = os.path.join(tmp_path, "bare." + fmt)
    _write_warned(KdumpBuilder(), out, fmt)
    assert crash_osrelease(out) == "unknown"


# --- item 2: custom note types ----------------------------------------------------------------

@pytest.mark.parametrize("note_type", [1, 2, 3, 4])
def test_reader_claimed_types_are_written_with_a_warning(tmp_path: str, note_type: int) -> None:
    b = KdumpBuilder().set_vmcoreinfo(VMCI).add_memory_segment(0, b"\0" * 4096)
    with pytest.warns(NoteTypeWarning, match=f"note type {note_type} .*crash reads every note"):
        b.add_custom_note(name=b"MYAPP", note_type=note_type, data=b"version=1.0")
    out = os.path.join(tmp_path, "t.vmcore")
    b.write(out)
    assert [(n, d) for n, t, d in elf_notes(out) if n == "MYAPP"] == [("MYAPP", b"version=1.0")]


@pytest.mark.parametrize("fmt", ["elf", "kdump"])
def test_the_warning_is_true_crash_counts_a_type_1_note_as_a_cpu(tmp_path: str,
                                                                  fmt: str) -> None:
    def prstatus_notes(note_type: int) -> int:
        b = KdumpBuilder().set_vmcoreinfo(VMCI).add_memory_segment(0, b"a" * 4096)
        b.add_cpu_context(0, {"RIP": 1}, pid=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NoteTypeWarning)
            b.add_custom_note(b"MYAPP", note_type, b"version=1.0")
        out = os.path.join(tmp_path, f"{note_type}.{fmt}")
        b.write(out, format=fmt)
        res = subprocess.run([tool("crash"), "-d1", "--osrelease", out], capture_output=True,
                             text=True, timeout=60)
        (line,) = [ln for ln in res.stdout.splitlines() if "num_prstatus_notes:" in ln]
        return int(line.split(":")[1])

    assert prstatus_notes(1) == 2  # one CPU, and our note taken for a second one
    assert prstatus_notes(int(CustomNoteType.METADATA)) == 1


@pytest.mark.parametrize("note_type", [0, 5, 255, 256, 0x4B444C01, 0xFFFFFFFF])
@pytest.mark.parametrize("owner", [b"MYAPP", b"KDUMPLING", b"", "unicode-\u00e9"])
def test_every_32bit_type_under_every_owner(tmp_path: str, note_type: int,
                                            owner: bytes | str) -> None:
    b = KdumpBuilder().set_vmcoreinfo(VMCI).add_memory_segment(0, b"\0" * 4096)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b.add_custom_note(owner, note_type, "data")
    out = os.path.join(tmp_path, "t.vmcore")
    b.write(out)
    owner_b = owner.encode() if isinstance(owner, str) else owner
    assert (owner_b, note_type, b"data") in _raw_notes(out)
    if owner_b.isascii():  # readelf cuts names inside a UTF-8 character
        assert [(n, d) for n, _, d in elf_notes(out) if n == owner_b.decode()] == \
            [(owner_b.decode(), b"data")]
        assert owner_b.decode() in readelf("-n", out)  # exits 0; an empty owner is "corrupt"


def _raw_notes(path: str) -> list[tuple[bytes, int, bytes]]:
    """The PT_NOTE (program header 0) of a little-endian ELF file, parsed by hand."""
    with open(path, "rb") as f:
        data = f.read()
    off, size = struct.unpack_from("<QQQQ", data, 64 + 8)[0::3]
    out, pos = [], off
    while pos < off + size:
        namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
        name = data[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
        desc_at = pos + 12 + (namesz + 3) // 4 * 4
        out.append((name, ntype, data[desc_at : desc_at + descsz]))
        pos = desc_at + (descsz + 3) // 4 * 4
    return out


@pytest.mark.parametrize("note_type", [-1, 1 << 32, "1"])
def test_note_types_outside_32_bits_are_refused(note_type: object) -> None:
    with pytest.raises(ValueError, match="0-0xffffffff"):
        KdumpBuilder().add_custom_note("X", note_type, b"")  # type: ignore[arg-type]


def test_kdumpling_note_kind_names_both_numberings() -> None:
    for member in CustomNoteType:
        assert kdumpling_note_kind(b"ANYONE", int(member)) == member.name
    seed = {1: "METADATA", 2: "ANNOTATIONS", 3: "FILE_INFO", 256: "USER_DEFINED"}
    for value, name in seed.items():
        assert kdumpling_note_kind(b"KDUMPLING", value) == name
        assert kdumpling_note_kind(b"MYAPP", value) is None  # 1 is NT_PRSTATUS elsewhere
    assert kdumpling_note_kind(b"KDUMPLING", 5) is None


# --- item 3: add_metadata ---------------------------------------------------------------------

def test_add_metadata_is_one_metadata_note(tmp_path: str) -> None:
    b = KdumpBuilder().set_vmcoreinfo(VMCI).add_memory_segment(0x100000, b"\0" * 4096)
    same = b.add_metadata({"sha256": "abc123def456", "created_at": "2024-01-28T10:30:00Z"})
    assert same is b
    b.add_metadata({"key": "value"}, vendor=b"MYCOMPANY")
    out = os.path.join(tmp_path, "m.vmcore")
    b.write(out)
    notes = [(n, t, d) for n, t, d in elf_notes(out) if n in ("KDUMPLING", "MYCOMPANY")]
    assert notes == [
        ("KDUMPLING", int(CustomNoteType.METADATA),
         b"sha256=abc123def456\ncreated_at=2024-01-28T10:30:00Z"),
        ("MYCOMPANY", int(CustomNoteType.METADATA), b"key=value"),
    ]
    assert kdumpling_note_kind(b"KDUMPLING", notes[0][1]) == "METADATA"  # type: ignore[arg-type]
    prog = drgn_program(out)  # readers ignore the note
    assert prog.read(0x100000, 16, True) == bytes(16)


@pytest.mark.parametrize("method", ["add_metadata", "add_annotations"])
@pytest.mark.parametrize("bad", [{"a=b": "c"}, {"a\nb": "c"}, {"a": "line1\nline2"}])
def test_key_value_notes_refuse_what_would_not_read_back(method: str,
                                                         bad: dict[str, str]) -> None:
    b = KdumpBuilder()
    with pytest.raises(ValueError, match="must not contain"):
        getattr(b, method)(bad)
    assert b.stats.estimated_file_size == 64  # nothing was added


def test_public_names() -> None:
    for name in ("EmptyDumpWarning", "KdumplingWarning", "NoteTypeWarning"):
        assert name in kdumpling.__all__
    assert issubclass(EmptyDumpWarning, UserWarning)
