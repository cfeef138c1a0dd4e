"""The seed API contract and the writer's own checks; no external readers needed."""

from __future__ import annotations

import io
import os
import struct

import kdumpling
import pytest
from kdumpling import (
    AArch64Reg,
    CompressionType,
    CpuContext,
    CustomNote,
    CustomNoteType,
    DumpStats,
    KdumpBuilder,
    MemorySegment,
    OutputFormat,
    X86_64Reg,
)
from kdumpling.arch import ARCHITECTURES, get_arch
from kdumpling.notes import iter_notes, pack_prstatus, parse_prstatus

VMCI = "OSRELEASE=6.1.0-test\nPAGESIZE=4096\nSYMBOL(swapper_pg_dir)=ffffffff82000000\n"


def test_seed_names_are_exported() -> None:
    for name in ["KdumpBuilder", "DumpStats", "MemorySegment", "CpuContext", "X86_64Reg",
                 "AArch64Reg", "OutputFormat", "CompressionType", "CustomNote",
                 "CustomNoteType"]:
        assert hasattr(kdumpling, name), name
    assert CompressionType.ZLIB == 1 and CompressionType.ZSTD == 8  # seed values kept
    assert {OutputFormat.ELF, OutputFormat.KDUMP_COMPRESSED} <= set(OutputFormat)


def test_methods_chain_and_stats_text() -> None:
    b = KdumpBuilder(arch="x86_64")
    same = (b.set_vmcoreinfo(VMCI)
            .add_memory_segment(0x1000, b"\0" * 4096)
            .add_memory_segment(0x100000, b"x" * 2048, virt_addr=0xFFFF888000100000)
            .add_cpu_context(0, {"RIP": 1}, pid=1)
            .add_custom_note("VENDOR", CustomNoteType.METADATA, "sha256=abc")
            .add_annotations({"host": "a"}))
    assert same is b
    stats = b.stats
    assert isinstance(stats, DumpStats)
    assert stats.num_memory_segments == 2 and stats.num_cpu_contexts == 1
    assert stats.total_memory_size == 4096 + 2048
    assert stats.total_memory_size_human == "6.0 KB"
    text = str(stats)
    assert text.splitlines()[0] == "Dump Statistics:"
    assert "  Architecture: x86_64" in text
    assert "  Total Memory: 6.0 KB (6144 bytes)" in text
    assert "    0x0000000000001000: 4.0 KB" in text
    assert "    phys=0x0000000000100000 virt=0xffff888000100000: 2.0 KB" in text


def test_estimated_size_is_the_elf_size(tmp_path: str) -> None:
    b = KdumpBuilder().set_vmcoreinfo(VMCI).add_memory_segment(0x1000, os.urandom(5000))
    b.add_cpu_context(0, {"RIP": 5}).add_annotations({"k": "v"})
    out = os.path.join(tmp_path, "x.elf")
    b.write(out)
    assert os.path.getsize(out) == b.stats.estimated_file_size


def test_sizes_in_human_units() -> None:
    stats = DumpStats("x86_64", 0, 0, 3 * 1024**3, 0, 1023, [])
    assert stats.total_memory_size_human == "3.0 GB"
    assert stats.estimated_file_size_human == "1023 B"


@pytest.mark.parametrize("name", ["sparc64", "i386", ""])
def test_unknown_arch_names_supported_ones(name: str) -> None:
    with pytest.raises(ValueError, match=r"Supported: .*x86_64"):
        KdumpBuilder(arch=name)


def test_arm64_alias() -> None:
    assert KdumpBuilder(arch="arm64").stats.architecture == "aarch64"


@pytest.mark.parametrize("arch,size", [("x86_64", 336), ("aarch64", 392), ("s390x", 336),
                                       ("ppc64", 504), ("ppc64le", 504), ("riscv64", 376)])
def test_prstatus_has_the_kernels_size(arch: str, size: int) -> None:
    info = get_arch(arch)
    assert len(pack_prstatus(info, CpuContext(pr_pid=7))) == size


def test_register_round_trip_every_arch() -> None:
    for info in ARCHITECTURES.values():
        regs = {m.name: (0x1111 * (i + 1)) & 0xFFFFFFFF for i, m in enumerate(info.regs)}
        desc = pack_prstatus(info, CpuContext(pr_pid=42, registers=regs))
        pid, back = parse_prstatus(info, desc)
        assert pid == 42
        assert back == regs, info.name


def test_x86_64_register_slots_match_user_regs_struct() -> None:
    desc = pack_prstatus(get_arch("x86_64"), CpuContext(registers={X86_64Reg.RIP: 0xAA,
                                                                    "rsp": 0xBB}))
    # user_regs_struct: rip is slot 16, rsp slot 19; pr_reg starts at 112; pr_pid at 32
    assert struct.unpack_from("<Q", desc, 112 + 16 * 8)[0] == 0xAA
    assert struct.unpack_from("<Q", desc, 112 + 19 * 8)[0] == 0xBB


def test_aarch64_pc_slot() -> None:
    desc = pack_prstatus(get_arch("aarch64"), CpuContext(registers={AArch64Reg.PC: 0xCC}))
    assert struct.unpack_from("<Q", desc, 112 + 32 * 8)[0] == 0xCC


def test_big_endian_prstatus() -> None:
    desc = pack_prstatus(get_arch("s390x"), CpuContext(pr_pid=3, registers={"PSW_ADDR": 0x10}))
    assert struct.unpack_from(">i", desc, 32)[0] == 3
    assert struct.unpack_from(">Q", desc, 112 + 8)[0] == 0x10


def test_unknown_register_is_refused() -> None:
    with pytest.raises(ValueError, match=r"unknown x86_64 register 'XYZ'.*RIP"):
        KdumpBuilder().add_cpu_context(0, {"XYZ": 1})
    with pytest.raises(ValueError, match="does not belong"):
        KdumpBuilder().add_cpu_context(0, {AArch64Reg.PC: 1})
    with pytest.raises(ValueError, match="does not fit"):
        KdumpBuilder().add_cpu_context(0, {"RIP": 1 << 64})


def test_duplicate_cpu_and_bad_prstatus_field() -> None:
    b = KdumpBuilder().add_cpu_context(0, {})
    with pytest.raises(ValueError, match="already"):
        b.add_cpu_context(0, {})
    with pytest.raises(ValueError, match="unknown prstatus"):
        b.add_cpu_context(1, {}, pr_bogus=1)


def test_custom_note_types_avoid_reader_types() -> None:
    claimed = {1, 2, 3, 4, 6, 0x100, 0x200, 0x202, 0x301, 0x400, 0x46494C45, 0x53494749,
               0x70000001}
    for member in CustomNoteType:
        assert int(member) not in claimed
        assert int(member) > 0xFFFF
    with pytest.warns(kdumpling.NoteTypeWarning, match="crash reads every note of type 1-4"):
        KdumpBuilder().add_custom_note("X", 1, b"")


def test_custom_note_dataclass() -> None:
    note = CustomNote(name=b"KDUMPLING", note_type=CustomNoteType.METADATA, data=b"x")
    assert note.name == b"KDUMPLING"


def test_notes_order_cpus_then_vmcoreinfo(tmp_path: str) -> None:
    b = KdumpBuilder().set_vmcoreinfo(VMCI).add_memory_segment(0, b"a" * 4096)
    b.add_cpu_context(1, {"RIP": 11}, pid=11).add_cpu_context(0, {"RIP": 10}, pid=10)
    b.add_annotations({"k": "v"})
    out = os.path.join(tmp_path, "o.elf")
    b.write(out)
    with open(out, "rb") as f:
        data = f.read()
    (off,) = struct.unpack_from("<Q", data, 64 + 8)  # phdr 0 p_offset
    (size,) = struct.unpack_from("<Q", data, 64 + 32)  # phdr 0 p_filesz
    notes = [n for _, n in iter_notes(data[off : off + size], "<")]
    assert [(n.name, n.type) for n in notes] == [
        (b"CORE", 1), (b"CORE", 1), (b"VMCOREINFO", 0),
        (b"KDUMPLING", int(CustomNoteType.ANNOTATIONS))]
    assert [parse_prstatus(get_arch("x86_64"), n.desc)[0] for n in notes[:2]] == [10, 11]


@pytest.mark.parametrize("segs,msg", [
    ([(0x1000, 8192), (0x2000, 4096)], "overlap"),
    ([(0x1000, 0)], "empty"),
])
def test_bad_layouts_are_refused(tmp_path: str, segs: list[tuple[int, int]], msg: str) -> None:
    b = KdumpBuilder().set_vmcoreinfo(VMCI)
    for addr, size in segs:
        b.add_memory_segment(addr, bytes(size))
    for fmt in ("elf", "kdump"):
        out = os.path.join(tmp_path, "bad." + fmt)
        with pytest.raises(ValueError, match=msg):
            b.write(out, format=fmt)
        assert not os.path.exists(out) and not os.path.exists(out + ".incomplete")


def test_missing_codec_module_names_the_extra(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: str) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "lzo", None)  # makes "import lzo" fail
    b = KdumpBuilder().set_vmcoreinfo(VMCI).add_memory_segment(0, b"a" * 4096)
    with pytest.raises(kdumpling.CodecUnavailableError, match=r"kdumpling\[lzo\]"):
        b.write(os.path.join(tmp_path, "x"), format="kdump", compression="lzo")


def test_memory_segment_sources(tmp_path: str) -> None:
    path = os.path.join(tmp_path, "mem")
    with open(path, "wb") as f:
        f.write(b"0123456789")
    assert MemorySegment(0, path).size == 10
    assert MemorySegment(0, path).get_data() == b"0123456789"
    bio = io.BytesIO(b"abc")
    seg = MemorySegment(0, bio)
    assert seg.size == 3 and seg.get_data() == b"abc"
    out = io.BytesIO()
    seg.write_to(out)
    assert out.getvalue() == b"abc"
    assert MemorySegment(5, b"xy").effective_virt_addr == 5
    r = kdumpling.FileRangeSource(path, 2, 3)
    assert r.read(0, 3) == b"234"
    r.close()
    with pytest.raises(ValueError, match="past the end"):
        kdumpling.FileRangeSource(path, 8, 5)


def test_kdump_to_a_pipe_needs_the_flattened_format() -> None:
    b = KdumpBuilder().set_vmcoreinfo(VMCI).add_memory_segment(0, b"a" * 4096)
    r, w = os.pipe()
    with os.fdopen(w, "wb") as stream, os.fdopen(r, "rb"), \
            pytest.raises(ValueError, match="kdump-flat"):
        b.write(stream, format="kdump")


def test_dump_levels_needing_struct_page_are_refused(tmp_path: str) -> None:
    b = KdumpBuilder().set_vmcoreinfo(VMCI).add_memory_segment(0, b"a" * 4096)
    with pytest.raises(ValueError, match="dump level 31 is not supported"):
        b.write(os.path.join(tmp_path, "x"), format="kdump", dump_level=31)


@pytest.mark.parametrize("fmt", ["elf", "kdump-flat"])
def test_streams_carry_the_incomplete_marker(fmt: str) -> None:
    """A stream gets one ELF header: flagged when CoreImage.missing is known before writing.
    The flattened stream's last header record carries the kdump status bit."""
    from kdumpling import write_dump
    from kdumpling.layout import FLAT_RECORD

    image = KdumpBuilder().set_vmcoreinfo(VMCI).add_memory_segment(0, b"a" * 4096).to_image()
    image.missing.append((0x1000, 0x2000))
    out = io.BytesIO()
    result = write_dump(image, out, format=fmt)
    assert result.missing == [(0x1000, 0x2000)]
    data = out.getvalue()
    if fmt == "elf":
        assert struct.unpack_from("<I", data, 48)[0] & 0x1
        return
    pos, status = 4096, None
    while pos + FLAT_RECORD.size <= len(data):
        offset, size = FLAT_RECORD.unpack_from(data, pos)
        if offset < 0:
            break
        if offset == 0:
            (status,) = struct.unpack_from("<I", data, pos + 16 + 424)
        pos += 16 + size
    assert status is not None and status & 0x08
