"""The seed API's examples and contract, read back by crash, drgn, libkdumpfile, readelf and
pyelftools (from test_seed_contract.py)."""

from __future__ import annotations

import os
import struct
import subprocess
import warnings

import pytest
from kdumpling import (
    CompressionType,
    CustomNoteType,
    KdumpBuilder,
    NoteTypeWarning,
    OutputFormat,
)
from kdumpling.notes import kdumpling_note_kind, parse_annotations

from tests import tiers
from tests.readers import (
    crash_osrelease,
    drgn_program,
    kdumpfile_module,
    lkf_open,
    lkf_read_phys,
    readelf,
    tool,
)
from tests.test_seed_contract import (
    SEED_VMCOREINFO,
    VMCI,
    _empty_builders,
    _raw_notes,
    _reassembled,
    _write_warned,
    ctx_pid,
)

ELFFile = tiers.module("readers", "elftools.elf.elffile", "pip install pyelftools").ELFFile


def elf_notes(path: str) -> list[tuple[str, int | str, bytes]]:
    """(owner, type, descriptor) of every note, as pyelftools parses them."""
    with open(path, "rb") as f:
        elf = ELFFile(f)
        return [(n["n_name"], n["n_type"], bytes(n["n_descdata"]))
                for seg in elf.iter_segments() if seg["p_type"] == "PT_NOTE"
                for n in seg.iter_notes()]



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
