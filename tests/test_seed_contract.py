"""The seed API (../shared/seeds/000_1443bb4945a294f3.txt): every docstring example runs as
written, and what it writes is read back by readers we did not write. Also the contract items
of issue 10: dumps without memory, any custom note type, add_metadata.

Where kdumpling deliberately differs from the seed, README "The writer library" says so."""

from __future__ import annotations

import io
import os
import struct
import subprocess

import kdumpling
import pytest
from kdumpling import (
    CustomNote,
    CustomNoteType,
    DumpStats,
    EmptyDumpWarning,
    KdumpBuilder,
    KdumplingWarning,
    MemorySegment,
)
from kdumpling.notes import kdumpling_note_kind

from tests.readers import (
    lkf_open,
    tool,
)

SEED_VMCOREINFO = "OSRELEASE=5.14.0\nPAGE_SIZE=4096\n"  # the seed's example, as written
# What drgn and libkdumpfile need besides OSRELEASE to open a kernel dump.
VMCI = "OSRELEASE=6.1.0-seed\nPAGESIZE=4096\nSYMBOL(swapper_pg_dir)=ffffffff82a0c000\n"


# --- the seed's docstring examples, as written ------------------------------------------------


def test_aarch64_register_names_from_the_seed() -> None:
    regs = {f"X{i}": i for i in range(31)} | {"SP": 1, "PC": 2, "PSTATE": 3}
    KdumpBuilder(arch="aarch64").add_cpu_context(0, regs)


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


def ctx_pid(path: str) -> int:
    return int(lkf_open(path).attr["cpu.0.pid"])


# --- item 2: custom note types ----------------------------------------------------------------


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
