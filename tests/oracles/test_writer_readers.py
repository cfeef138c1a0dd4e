"""Every arch x format x codec, read back byte for byte by readers we did not write."""

from __future__ import annotations

import os
import random
import struct
import subprocess
from dataclasses import dataclass
from itertools import accumulate

import pytest
from kdumpling import KdumpBuilder
from kdumpling.arch import get_arch

from tests import tiers
from tests.readers import (
    crash_osrelease,
    drgn_program,
    lkf_open,
    lkf_read_phys,
    readelf,
    tool,
)

ARCHES = ["x86_64", "aarch64", "s390x", "ppc64", "ppc64le", "riscv64"]
FORMATS = [("elf", "none"), ("kdump", "none"), ("kdump", "zlib"), ("kdump", "lzo"),
           ("kdump", "snappy"), ("kdump", "zstd"), ("kdump-flat", "zlib")]
CPU_REGS = {"x86_64": ("RIP", "rip"), "aarch64": ("PC", "pc")}


def vmcoreinfo_for(arch: str, page: int) -> str:
    lines = [f"OSRELEASE=6.1.0-kdl-{arch}", f"PAGESIZE={page}",
             "SYMBOL(swapper_pg_dir)=ffffffff82a0c000", "CRASHTIME=1700000000"]
    if arch == "x86_64":
        lines += ["NUMBER(pgtable_l5_enabled)=0", "NUMBER(phys_base)=0"]
    if arch == "riscv64":  # libkdumpfile's riscv64 translation wants these (kdump files)
        # (arch/riscv/kernel/vmcore_info.c arch_crash_save_vmcoreinfo)
        lines += ["NUMBER(VA_BITS)=39", "NUMBER(phys_ram_base)=0x0",
                  "NUMBER(PAGE_OFFSET)=0xffffffd800000000",
                  "NUMBER(va_kernel_pa_offset)=0xffffffff00000000"]
    if arch == "aarch64":
        lines += ["NUMBER(VA_BITS)=48", "NUMBER(kimage_voffset)=0xffff800000000000",
                  "NUMBER(PHYS_OFFSET)=0x0"]
    return "\n".join(lines) + "\n"


@dataclass
class Memory:
    """What the dump should contain: (phys, bytes) ranges, and ranges that must read as zero."""

    ranges: list[tuple[int, bytes]]
    zero_gaps: list[tuple[int, int]]


def make_memory(page: int, seed: int) -> Memory:
    rng = random.Random(seed)

    def pages(kinds: str) -> bytes:
        out = bytearray()
        for k in kinds:
            if k == "z":
                out += bytes(page)
            elif k == "r":
                out += rng.randbytes(page)
            elif k == "t":  # ascending u32 addresses: the zlib writer redoes these with zlib
                steps = [8 * rng.choice((1, 1, 1, 2, 3, 5)) for _ in range(page // 4)]
                values = [v & 0xFFFFFFFF for v in accumulate(steps, initial=0x82C35380)][:-1]
                out += struct.pack(f"<{page // 4}I", *values)
            else:  # pattern: the page's own offset repeated (compressible, position-unique)
                out += struct.pack("<Q", len(out) + seed) * (page // 8)
        return bytes(out)

    a = pages("pprzpzzrptp")  # aligned run of mixed pages
    b_start = 0x40 * page + 0x234  # starts and ends inside a page
    b = rng.randbytes(3 * page + 100)
    d_start = b_start + len(b) + 16  # shares the last page of b
    d = pages("p")[: page // 2]
    c = pages("rzp" * 3)  # added first: out of order
    low = bytes(page)  # PFN 0 (s390x lowcore: libkdumpfile's s390x setup reads it)
    return Memory(
        ranges=[(0x800 * page, c), (0x100 * page, a), (b_start, b), (d_start, d), (0, low)],
        zero_gaps=[(0x40 * page, 0x234), (b_start + len(b), 16)],
    )


def build(arch: str, mem: Memory, cpus: int = 3) -> KdumpBuilder:
    info = get_arch(arch)
    b = KdumpBuilder(arch=arch).set_vmcoreinfo(vmcoreinfo_for(arch, info.default_page_size))
    for phys, data in mem.ranges:
        b.add_memory_segment(phys, data)
    for cpu in range(cpus):
        regs = {}
        if arch in CPU_REGS:
            regs[CPU_REGS[arch][0]] = 0xFFFFFFFF81000000 + cpu * 0x10
        b.add_cpu_context(cpu, regs, pid=100 + cpu)
    b.add_annotations({"test": arch})
    return b


@pytest.fixture(scope="module")
def dumps(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str, str], str]:
    root = tmp_path_factory.mktemp("dumps")
    out: dict[tuple[str, str, str], str] = {}
    for arch in ARCHES:
        page = get_arch(arch).default_page_size
        mem = make_memory(page, seed=len(arch))
        builder = build(arch, mem)
        for fmt, codec in FORMATS:
            path = str(root / f"{arch}.{fmt}.{codec}")
            builder.write(path, format=fmt, compression=codec, dump_level=1)
            out[(arch, fmt, codec)] = path
    return out


def expected(arch: str) -> Memory:
    return make_memory(get_arch(arch).default_page_size, seed=len(arch))


def check_reads(read: object, mem: Memory, gaps: bool = True) -> None:
    """Every range reads back; in kdump files (page granular) the uncovered bytes of a page
    that a segment covers only partly read as zeros. ELF files do not cover them at all."""
    for phys, data in mem.ranges:
        assert read(phys, len(data)) == data, f"mismatch at {phys:#x}"  # type: ignore[operator]
    for phys, size in mem.zero_gaps if gaps else []:
        assert read(phys, size) == bytes(size), f"gap at {phys:#x} not zero"  # type: ignore[operator]


@pytest.mark.parametrize("fmt,codec", FORMATS)
@pytest.mark.parametrize("arch", ARCHES)
def test_drgn_reads_every_byte(dumps: dict[tuple[str, str, str], str], arch: str, fmt: str,
                               codec: str) -> None:
    if arch == "s390x" and fmt != "elf":
        # Deliberate, accepted under REQUIRE_ALL: the reader, not the machine, lacks the case.
        tiers.not_applicable("libkdumpfile's s390x setup for kdump files reads the VMCOREINFO "
                             "pointer from lowcore (LC_VMCORE_INFO 0xe0c), which synthetic "
                             "memory lacks")
    prog = drgn_program(dumps[(arch, fmt, codec)])
    check_reads(lambda a, n: prog.read(a, n, True), expected(arch), gaps=fmt != "elf")


@pytest.mark.parametrize("fmt,codec", [f for f in FORMATS if f[0] != "kdump-flat"])
@pytest.mark.parametrize("arch", ARCHES)
def test_libkdumpfile_reads_every_byte_and_cpus(dumps: dict[tuple[str, str, str], str],
                                                arch: str, fmt: str, codec: str) -> None:
    ctx = lkf_open(dumps[(arch, fmt, codec)])
    check_reads(lambda a, n: lkf_read_phys(ctx, a, n), expected(arch), gaps=fmt != "elf")
    if arch == "riscv64" and ctx.attr.get("arch.name") is None:
        return  # Debian's libkdumpfile 0.5.1 predates riscv64: no arch, no CPU notes
    assert ctx.attr["cpu.number"] == 3
    assert ctx.attr["arch.name"] == get_arch(arch).name.replace("ppc64le", "ppc64")
    assert ctx.attr["arch.page_size"] == get_arch(arch).default_page_size
    if arch in CPU_REGS:
        reg = CPU_REGS[arch][1]
        for cpu in range(3):
            assert ctx.attr[f"cpu.{cpu}.reg.{reg}"] == 0xFFFFFFFF81000000 + cpu * 0x10
            assert ctx.attr[f"cpu.{cpu}.pid"] == 100 + cpu


def test_libkdumpfile_reads_reassembled_flattened(dumps: dict[tuple[str, str, str], str],
                                                  tmp_path: str) -> None:
    """Debian's libkdumpfile 0.5.1 cannot read flattened files; makedumpfile -R turns ours
    into a file byte-identical to the normal kdump output of the same input."""
    mdf = tool("makedumpfile")
    for arch in ARCHES:
        flat = dumps[(arch, "kdump-flat", "zlib")]
        out = os.path.join(tmp_path, arch + ".reassembled")
        with open(flat, "rb") as src:
            res = subprocess.run([mdf, "-R", out], stdin=src, capture_output=True, timeout=60)
        assert res.returncode == 0, res.stderr
        with open(out, "rb") as a, open(dumps[(arch, "kdump", "zlib")], "rb") as b:
            assert a.read() == b.read(), arch
        ctx = lkf_open(out)
        check_reads(lambda x, n, c=ctx: lkf_read_phys(c, x, n), expected(arch))


@pytest.mark.parametrize("fmt,codec", FORMATS)
def test_crash_reads_osrelease(dumps: dict[tuple[str, str, str], str], fmt: str,
                               codec: str) -> None:
    # Debian's crash reads only its host's architecture (dump-formats.md §10).
    assert crash_osrelease(dumps[("x86_64", fmt, codec)]) == "6.1.0-kdl-x86_64"


@pytest.mark.parametrize("arch", ARCHES)
def test_readelf_sees_notes_and_loads(dumps: dict[tuple[str, str, str], str], arch: str) -> None:
    path = dumps[(arch, "elf", "none")]
    notes = readelf("-n", path)
    assert notes.count("NT_PRSTATUS") == 3
    assert "VMCOREINFO" in notes
    assert "NT_PRSTATUS" not in notes.split("KDUMPLING")[-1]  # our note is not a CPU
    loads = [ln.split() for ln in readelf("-l", path).splitlines() if ln.strip().startswith(
        ("LOAD", "NOTE"))]
    assert loads[0][0] == "NOTE"
    assert [ln[0] for ln in loads[1:]] == ["LOAD"] * 5
    assert all(int(ln[-1], 16) == 0 for ln in loads[1:])  # p_align 0 (crash's kdump test)
    physaddrs = [int(ln[3], 16) for ln in loads[1:]]
    assert physaddrs == sorted(physaddrs)


def test_kdump_without_cpu_notes_opens_without_crash_warnings(tmp_path: str) -> None:
    out = os.path.join(tmp_path, "nocpu.kdump")
    KdumpBuilder().set_vmcoreinfo(vmcoreinfo_for("x86_64", 4096)).add_memory_segment(
        0, b"x" * 4096).write(out, format="kdump")
    res = subprocess.run([tool("crash"), "--osrelease", out], capture_output=True, text=True,
                         timeout=60)
    assert res.stdout.strip() == "6.1.0-kdl-x86_64"
    assert "WARNING" not in res.stdout + res.stderr


def _reassemble(flat: str, out: str) -> str:
    with open(flat, "rb") as src:
        res = subprocess.run([tool("makedumpfile"), "-R", out], stdin=src, capture_output=True,
                             timeout=60)
    assert res.returncode == 0, res.stderr
    return out


def _crash_header_dump(path: str) -> str:
    """crash -d1 prints the ELF header or the disk_dump_header it parsed, flags included."""
    res = subprocess.run([tool("crash"), "-d1", "--osrelease", path], capture_output=True,
                         text=True, timeout=60)
    assert res.stdout.strip().splitlines()[-1] == "6.1.0-kdl-x86_64", res.stdout + res.stderr
    return res.stdout


@pytest.mark.parametrize("fmt", ["elf", "kdump", "kdump-flat"])
@pytest.mark.parametrize("missing", [True, False])
def test_missing_ranges_mark_the_output_incomplete(tmp_path: str, fmt: str,
                                                   missing: bool) -> None:
    """CoreImage.missing (ranges a collector could not read) marks every format incomplete the
    way crash understands (kdump status DUMP_DH_COMPRESSED_INCOMPLETE, ELF e_flags
    DUMP_ELF_INCOMPLETE); the pages that were read stay readable. libkdumpfile and drgn ignore
    both flags (dump-formats.md §3.7), so only crash can report it."""
    from kdumpling import write_dump

    data = bytes(range(256)) * 64  # 4 pages
    b = KdumpBuilder().set_vmcoreinfo(vmcoreinfo_for("x86_64", 4096))
    image = b.add_memory_segment(0x100000, data).to_image()
    if missing:
        image.missing.append((0x102000, 0x103000))
    out = os.path.join(tmp_path, "dump." + fmt)
    result = write_dump(image, out, format=fmt)
    assert result.missing == ([(0x102000, 0x103000)] if missing else [])
    assert result.incomplete is missing
    path = _reassemble(out, out + ".re") if fmt == "kdump-flat" else out
    with open(path, "rb") as f:
        head = f.read(512)
    text = _crash_header_dump(path)
    if fmt == "elf":
        assert bool(struct.unpack_from("<I", head, 48)[0] & 0x1) is missing
        assert ("e_flags: 1\n" in text) is missing
    else:
        assert bool(struct.unpack_from("<I", head, 424)[0] & 0x08) is missing
        assert ("DUMP_DH_COMPRESSED_INCOMPLETE" in text) is missing
    assert lkf_read_phys(lkf_open(path), 0x100000, len(data)) == data
    assert drgn_program(path).read(0x100000, len(data), True) == data


@pytest.mark.parametrize("fmt", ["elf", "kdump"])
def test_a_range_found_missing_while_writing_still_marks_the_output(tmp_path: str,
                                                                     fmt: str) -> None:
    """Writers look at CoreImage.missing when they finish, so a source that fails part-way and
    records the range (zeros in its place) still gets the file marked."""
    from kdumpling import CallableSource, write_dump

    holder: list[list[tuple[int, int]]] = []

    def read(offset: int, length: int) -> bytes:
        if offset < 0x2000 < offset + length or offset == 0x2000:
            holder[0].append((0x102000, 0x103000))
        return bytes(length)

    image = KdumpBuilder().set_vmcoreinfo(vmcoreinfo_for("x86_64", 4096)).add_memory_segment(
        0x100000, CallableSource(0x4000, read)).to_image()
    holder.append(image.missing)
    out = os.path.join(tmp_path, "late." + fmt)
    result = write_dump(image, out, format=fmt)
    assert result.missing == [(0x102000, 0x103000)]
    text = _crash_header_dump(out)
    assert ("e_flags: 1\n" if fmt == "elf" else "DUMP_DH_COMPRESSED_INCOMPLETE") in text
