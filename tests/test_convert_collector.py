"""DumpFileCollector without a guest: QEMU-layout ELF in, the phys_base repair, and files that
promise memory they cannot deliver (cut short, descriptors past the end): every page still in
them is kept, the rest named, the output marked incomplete and the agent exits 65."""

from __future__ import annotations

import re
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kdumpling import write_dump
from kdumpling.arch import parse_vmcoreinfo_number, phys_base_u64, qemu_header_phys_base
from kdumpling.collectors.convert import DumpFileCollector
from kdumpling.reader import open_dump

from tests import testdumps as td
from tests.agenttools import json_out, run_agent
from tests.readers import (
    drgn_module,
    drgn_program,
    kdumpfile_module,
    lkf_open,
    lkf_read_phys,
    tool,
)

# A KASLR phys_base the rig's guest had on one boot: the kernel sits below its link address.
NEGATIVE = -0xA400000


@pytest.fixture(scope="module")
def machine() -> td.Machine:
    return td.x86_64_machine(small=True)


def _sub_header_phys_base(path: Path) -> int:
    # struct disk_dump_header: block_size (int) at 0x1ac; kdump_sub_header starts one block in,
    # phys_base first (makedumpfile diskdump_mod.h)
    with open(path, "rb") as f:
        head = f.read(0x1B0)
        block_size = struct.unpack_from("<i", head, 0x1AC)[0]
        f.seek(block_size)
        value: int = struct.unpack("<Q", f.read(8))[0]
    return value


def test_header_phys_base_replaced_by_vmcoreinfo(machine: td.Machine, tmp_path: Path) -> None:
    """A kdump whose sub-header phys_base disagrees with NUMBER(phys_base), and not in QEMU's
    known way, comes out with VMCOREINFO's value and a warning."""
    src = tmp_path / "qemu.elf"
    td.pack_elf_vmcore(src, machine, layout="qemu")
    bad = tmp_path / "bad.kdump"
    with DumpFileCollector(src) as snap:
        snap.image.phys_base = 0x222298112  # NUMBER(phys_base)=0: no misreading gives this
        write_dump(snap.image, bad, format="kdump", compression="zlib")
    assert _sub_header_phys_base(bad) == 0x222298112
    fixed = tmp_path / "fixed.kdump"
    with DumpFileCollector(bad) as snap:
        assert snap.image.phys_base == 0  # NUMBER(phys_base)=0 in the machine's VMCOREINFO
        assert any("phys_base" in w for w in snap.warnings)
        assert "fixes" not in snap.meta
        write_dump(snap.image, fixed, format="kdump", compression="zlib")
    assert _sub_header_phys_base(fixed) == 0


def _negative_machine() -> td.Machine:
    m = td.x86_64_machine(small=True)
    m.vmcoreinfo = m.vmcoreinfo.replace(b"NUMBER(phys_base)=0\n",
                                        f"NUMBER(phys_base)={NEGATIVE}\n".encode())
    assert f"={NEGATIVE}\n".encode() in m.vmcoreinfo
    return m


@pytest.mark.parametrize("out_fmt", ["elf", "kdump"])
def test_negative_phys_base_elf_converts_without_a_correction(tmp_path: Path,
                                                              out_fmt: str) -> None:
    """QEMU's ELF carries phys_base only in VMCOREINFO: the reader's signed value equals it,
    so nothing is corrected, nothing warned, the agent exits 0 (it exited 1 with "header
    phys_base -0xa400000 replaced by VMCOREINFO's -0xa400000")."""
    src = tmp_path / "qemu.elf"
    td.pack_elf_vmcore(src, _negative_machine(), layout="qemu")
    with DumpFileCollector(src) as snap:
        assert snap.warnings == []
        assert "fixes" not in snap.meta
        assert snap.image.phys_base == NEGATIVE
    out = tmp_path / f"out.{out_fmt}"
    proc = run_agent(["convert", str(src), str(out), "--format", out_fmt, "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    rec = json_out(proc)
    assert rec["warnings"] == [] and rec["exit_code"] == 0 and "missing" not in rec
    if out_fmt == "kdump":
        assert _sub_header_phys_base(out) == phys_base_u64(NEGATIVE)
    with open_dump(out) as back:
        assert back.header["phys_base"] in (NEGATIVE, phys_base_u64(NEGATIVE))


@pytest.mark.parametrize("out_fmt", ["elf", "kdump"])
def test_qemu_misread_header_phys_base_is_an_expected_fix(tmp_path: Path, out_fmt: str) -> None:
    """QEMU's kdump header holds the decimal NUMBER(phys_base) read as hex: corrected from
    VMCOREINFO and recorded in meta.fixes, not warned; the agent exits 0."""
    m = _negative_machine()
    src = tmp_path / "qemu.elf"
    td.pack_elf_vmcore(src, m, layout="qemu")
    qemu_kdump = tmp_path / "qemu.kdump"
    qemu_value = qemu_header_phys_base(str(NEGATIVE))
    assert qemu_value == phys_base_u64(-0x171966464)  # "-171966464" read as hex
    with DumpFileCollector(src) as snap:
        snap.image.phys_base = qemu_value
        write_dump(snap.image, qemu_kdump, format="kdump", compression="zlib")
    assert _sub_header_phys_base(qemu_kdump) == qemu_value
    with DumpFileCollector(qemu_kdump) as snap:
        assert snap.warnings == []
        assert len(snap.meta["fixes"]) == 1 and "QEMU" in snap.meta["fixes"][0]  # type: ignore
    out = tmp_path / f"out.{out_fmt}"
    proc = run_agent(["convert", str(qemu_kdump), str(out), "--format", out_fmt, "--json"],
                     tmp_path)
    assert proc.returncode == 0, proc.stderr
    rec = json_out(proc)
    assert rec["warnings"] == [] and rec["meta"]["fixes"]
    if out_fmt == "kdump":
        assert _sub_header_phys_base(out) == phys_base_u64(NEGATIVE)


def test_vmcoreinfo_number_forms() -> None:
    assert parse_vmcoreinfo_number("-222298112") == -222298112
    assert parse_vmcoreinfo_number("0x40000000") == 0x40000000
    assert parse_vmcoreinfo_number("-0123") == -123
    with pytest.raises(ValueError):
        parse_vmcoreinfo_number("zz")
    assert qemu_header_phys_base("-222298112") == 0xFFFFFFFDDDD67EEE  # the rig's observation


# --- memory a file promises but cannot deliver -----------------------------------------------


def _kdump_geometry(path: Path) -> tuple[int, int]:
    """(block_size, file offset of the first page descriptor) of a kdump file
    (disk_dump_header: block_size 0x1ac, sub_hdr_size 0x1b0, bitmap_blocks 0x1b4)."""
    with open(path, "rb") as f:
        head = f.read(0x1B8)
    block_size, sub_hdr_size, bitmap_blocks = struct.unpack_from("<iii", head, 0x1AC)
    return block_size, (1 + sub_hdr_size + bitmap_blocks) * block_size


def _dumpable_pfns(path: Path) -> list[int]:
    """PFNs with a page descriptor, in descriptor order: the set bits of bitmap 2, which
    follows bitmap 1 (each bitmap_blocks / 2 blocks), LSB first (makedumpfile is_on)."""
    with open(path, "rb") as f:
        head = f.read(0x1B8)
        block_size, sub_hdr_size, bitmap_blocks = struct.unpack_from("<iii", head, 0x1AC)
        half = bitmap_blocks // 2 * block_size
        f.seek((1 + sub_hdr_size) * block_size + half)
        bitmap = f.read(half)
    return [i * 8 + b for i, byte in enumerate(bitmap) for b in range(8) if byte >> b & 1]


def _convert_incomplete(src: Path, tmp_path: Path, out_fmt: str) -> tuple[Path, Any]:
    out = tmp_path / f"out.{out_fmt}"
    proc = run_agent(["convert", str(src), str(out), "--format", out_fmt, "--json"], tmp_path)
    assert proc.returncode == 65, proc.stderr
    rec = json_out(proc)
    assert rec["exit_code"] == 65 and rec["missing"]
    named = [w for w in rec["warnings"] if "could not be read" in w]
    assert named and f"{rec['missing'][0]['start']:#x}" in named[0]
    return out, rec


def _check_output(out: Path, out_fmt: str, m: td.Machine, missing: list[tuple[int, int]],
                  reference: Path) -> None:
    """Readers we did not write: every page of the uncut ``reference`` outside ``missing`` as
    in the machine, none inside; the file says it is incomplete."""
    def lost(pfn: int) -> str:
        lo, hi = pfn * td.PAGE, (pfn + 1) * td.PAGE
        if any(a <= lo and hi <= b for a, b in missing):
            return "whole"
        return "part" if any(a < hi and lo < b for a, b in missing) else ""

    kdumpfile = kdumpfile_module()
    ref = lkf_open(str(reference))
    read: Callable[[int], bytes]
    if out_fmt == "elf":
        # drgn reads ELF itself; libkdumpfile 0.5.1 returned zeros for some pages no PT_LOAD
        # covers (right after a failed read), so it cannot show what is absent
        prog = drgn_program(str(out))
        errors: tuple[type[BaseException], ...] = (drgn_module().FaultError,)
        read = lambda pfn: prog.read(pfn * td.PAGE, td.PAGE, True)  # noqa: E731
    else:
        ctx = lkf_open(str(out))
        errors = (kdumpfile.exceptions.KDumpBaseException,)
        read = lambda pfn: lkf_read_phys(ctx, pfn * td.PAGE, td.PAGE)  # noqa: E731
    kept = 0
    whole = [pfn for pfn in m.pfns() if any(r.phys <= pfn * td.PAGE and (pfn + 1) * td.PAGE
                                             <= r.end for r in m.regions)]
    for pfn in whole:
        try:
            lkf_read_phys(ref, pfn * td.PAGE, td.PAGE)
        except kdumpfile.exceptions.KDumpBaseException:
            continue  # not in the source to begin with (makedumpfile drops partial pages)
        if lost(pfn) == "whole":
            with pytest.raises(errors):
                read(pfn)
        elif not lost(pfn):
            assert read(pfn) == m.page(pfn), hex(pfn)
            kept += 1
    assert kept > 0
    with open(out, "rb") as f:
        head = f.read(0x1B0)
    # crash -d1 shows the header as it understood it
    proc = subprocess.run([tool("crash"), "-d1", "--osrelease", str(out)], capture_output=True,
                          text=True, timeout=120)
    if out_fmt == "elf":
        assert struct.unpack_from("<I", head, 0x30)[0] & 1  # e_flags DUMP_ELF_INCOMPLETE
        assert re.search(r"e_flags: 1\b", proc.stdout), proc.stdout[-2000:]
    else:
        assert struct.unpack_from("<I", head, 0x1A8)[0] & 0x8  # DUMP_DH_COMPRESSED_INCOMPLETE
        assert "DUMP_DH_COMPRESSED_INCOMPLETE" in proc.stdout, proc.stdout[-2000:]


def _ranges(rec: Any) -> list[tuple[int, int]]:
    return [(r["start"], r["end"]) for r in rec["missing"]]


@pytest.fixture(scope="module")
def level0_kdump(machine: td.Machine, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("mdf")
    src = d / "kexec.elf"
    td.pack_elf_vmcore(src, machine)
    out = d / "level0.kdump"
    td.makedumpfile(["-c", "-d", "0", str(src), str(out)])
    return out


def _flat_records(data: bytes) -> list[tuple[int, bytes]]:
    """(offset, bytes) records of makedumpfile's flattened format: a 4 KiB header, then
    big-endian {int64 offset, int64 size} + data, ended by offset -1 (makedumpfile.h
    makedumpfile_data_header)."""
    pos, out = 4096, []
    while True:
        off, size = struct.unpack_from(">qq", data, pos)
        if off < 0:
            return out
        out.append((off, data[pos + 16 : pos + 16 + size]))
        pos += 16 + size
