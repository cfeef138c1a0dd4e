"""Test-only dump fixtures: a small synthetic x86_64 kernel memory image, an ELF vmcore packer
for it (kexec and QEMU layouts, PN_XNUM, big-endian), and wrappers around the real tools
(makedumpfile, libkdumpfile, drgn) that turn it into other formats or read it back.

The packer is deliberately independent of kdumpling's writer; what it produces is checked by
readers we did not write (pyelftools, libkdumpfile, drgn, makedumpfile), so the reader is never
tested against our own understanding alone.

The memory satisfies makedumpfile's minimum (dump-formats.md §4): VMCOREINFO with OSRELEASE,
PAGESIZE, SYMBOL(init_uts_ns) + OFFSET(uts_namespace.name) pointing at a matching new_utsname,
SYMBOL(init_top_pgt) with real 4-level page tables mapping the kernel text map
(__START_KERNEL_map + phys), NUMBER(phys_base) = 0, and a FLATMEM mem_map pointer.
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
from dataclasses import dataclass, field

from kdumpling.arch import ArchInfo, get_arch
from kdumpling.notes import CpuContext, Note, pack_note, prstatus_note, vmcoreinfo_note

from tests import readers

PAGE = 4096
START_KERNEL_MAP = 0xFFFFFFFF80000000
PAGE_OFFSET = 0xFFFF888000000000
VMALLOC_NO_PADDR = 0xFFFFC90000000000
OSRELEASE = "6.1.0-kdumpling-test"
CRASHTIME = 1700000000

# physical layout of the synthetic machine
KERNEL_BASE = 0x100000  # page tables, utsname, mem_map pointer live here
PML4, PDPT, PD = KERNEL_BASE, KERNEL_BASE + 0x1000, KERNEL_BASE + 0x2000
UTS_NS = KERNEL_BASE + 0x3000
UTS_NAME_OFFSET = 4  # OFFSET(uts_namespace.name): after the kref
MEM_MAP_VAR = KERNEL_BASE + 0x3800

PT_LOAD, PT_NOTE = 1, 4


@dataclass
class Region:
    phys: int
    data: bytes

    @property
    def end(self) -> int:
        return self.phys + len(self.data)


@dataclass
class Machine:
    """Physical memory, notes and VMCOREINFO of one synthetic crashed kernel."""

    arch: ArchInfo
    regions: list[Region]
    vmcoreinfo: bytes
    cpus: list[CpuContext] = field(default_factory=list)

    @property
    def notes(self) -> list[Note]:
        return [prstatus_note(self.arch, c) for c in self.cpus] + [vmcoreinfo_note(self.vmcoreinfo)]

    def byte_at(self, addr: int) -> int | None:
        for r in self.regions:
            if r.phys <= addr < r.end:
                return r.data[addr - r.phys]
        return None

    def page(self, pfn: int) -> bytes:
        """Page ``pfn`` as a reader should return it: zeros where no region has data."""
        out = bytearray(PAGE)
        lo, hi = pfn * PAGE, (pfn + 1) * PAGE
        for r in self.regions:
            a, b = max(lo, r.phys), min(hi, r.end)
            if a < b:
                out[a - lo : b - lo] = r.data[a - r.phys : b - r.phys]
        return bytes(out)

    def pfns(self) -> list[int]:
        out: set[int] = set()
        for r in self.regions:
            out.update(range(r.phys // PAGE, (r.end + PAGE - 1) // PAGE))
        return sorted(out)

    @property
    def max_pfn(self) -> int:
        return max(r.end for r in self.regions) // PAGE + 1


def _pattern_page(pfn: int, kind: str) -> bytes:
    if kind == "zero":
        return bytes(PAGE)
    if kind == "random":
        out = b""
        seed = pfn.to_bytes(8, "little")
        while len(out) < PAGE:
            seed = hashlib.sha256(seed).digest()
            out += seed
        return out[:PAGE]
    # compressible text with the PFN in it, so a misplaced page is caught
    line = f"kdumpling test page pfn={pfn:#x} ".encode()
    return (line * (PAGE // len(line) + 1))[:PAGE]


def x86_64_machine(*, small: bool = False) -> Machine:
    """The synthetic x86_64 kernel: about 600 pages in three RAM ranges, or 60 when small."""
    arch = get_arch("x86_64")
    # Range 1: like the real first RAM range, its end is not page-aligned.
    r1_start, r1_end = 0x1000, 0x9C00 if small else 0x9FC00
    r1 = bytearray()
    for pfn in range(r1_start // PAGE, (r1_end + PAGE - 1) // PAGE):
        kind = ("zero", "text", "random", "text")[pfn % 4]
        r1 += _pattern_page(pfn, kind)
    r1 = r1[: r1_end - r1_start]
    # Range 2: the kernel image area with page tables, utsname and mem_map.
    r2 = bytearray()
    for i in range(40 if small else 128):
        pfn = KERNEL_BASE // PAGE + i
        kind = "zero" if i in (7, 8, 9, 40, 99) else "random" if i % 5 == 0 else "text"
        r2 += _pattern_page(pfn, kind)

    def put(addr: int, data: bytes) -> None:
        r2[addr - KERNEL_BASE : addr - KERNEL_BASE + len(data)] = data

    for base in (PML4, PDPT, PD):
        put(base, bytes(PAGE))
    # 4-level tables for __START_KERNEL_map: PML4[511] -> PDPT, PDPT[510] -> PD, PD[0..1] ->
    # 2 MiB pages at physical 0 (arch/x86/include/asm/pgtable_types.h: P|RW|A|D = 0x63, PSE 0x80).
    put(PML4 + 511 * 8, struct.pack("<Q", PDPT | 0x63))
    put(PDPT + 510 * 8, struct.pack("<Q", PD | 0x63))
    put(PD, struct.pack("<QQ", 0x0 | 0xE3, 0x200000 | 0xE3))
    uts = b"".join(s.encode().ljust(65, b"\0") for s in (
        "Linux", "kdumpling-test", OSRELEASE, "#1 SMP PREEMPT_DYNAMIC test", "x86_64", "(none)"))
    put(UTS_NS, bytes(PAGE // 2))
    put(UTS_NS + UTS_NAME_OFFSET, uts)
    put(MEM_MAP_VAR, struct.pack("<Q", 0xFFFFEA0000000000))
    # Range 3: 300 pages with a run of 260 zero pages (makedumpfile -E splits segments on
    # runs of >= 256 excluded pages).
    r3_start = 0x400000
    r3 = bytearray()
    for i in range(8 if small else 300):
        pfn = r3_start // PAGE + i
        kind = "zero" if 20 <= i < 280 else "text" if i % 2 else "random"
        r3 += _pattern_page(pfn, kind)
    sym = lambda phys: f"{START_KERNEL_MAP + phys:x}"  # noqa: E731
    vmcoreinfo = "\n".join([
        f"OSRELEASE={OSRELEASE}",
        f"PAGESIZE={PAGE}",
        f"SYMBOL(init_uts_ns)={sym(UTS_NS)}",
        f"OFFSET(uts_namespace.name)={UTS_NAME_OFFSET}",
        f"SYMBOL(init_top_pgt)={sym(PML4)}",
        f"SYMBOL(swapper_pg_dir)={sym(PML4)}",
        f"SYMBOL(_stext)={sym(KERNEL_BASE)}",
        f"SYMBOL(mem_map)={sym(MEM_MAP_VAR)}",
        "SIZE(page)=64",
        "OFFSET(page.flags)=0",
        "OFFSET(page._refcount)=52",
        "OFFSET(page.mapping)=24",
        "OFFSET(page.lru)=8",
        "OFFSET(page._mapcount)=48",
        "OFFSET(page.private)=40",
        "NUMBER(phys_base)=0",
        "NUMBER(pgtable_l5_enabled)=0",
        "KERNELOFFSET=0",
        f"CRASHTIME={CRASHTIME}",
        "",
    ]).encode()
    cpus = [
        CpuContext(cpu_id=i, pr_pid=100 + i, registers={
            "RIP": START_KERNEL_MAP + 0x1000 + i, "RSP": PAGE_OFFSET + 0x8000 + 16 * i,
            "RAX": 0x1111 * (i + 1), "CS": 0x10, "SS": 0x18, "EFLAGS": 0x246,
        })
        for i in range(2)
    ]
    return Machine(arch, [Region(r1_start, bytes(r1)), Region(KERNEL_BASE, bytes(r2)),
                          Region(r3_start, bytes(r3))], vmcoreinfo, cpus)


def generic_machine(arch_name: str, pages: int = 24) -> Machine:
    """A small kernel memory for any arch (only physical reads; no page tables)."""
    arch = get_arch(arch_name)
    page = arch.default_page_size
    regions = []
    for base, n in ((0x200000, pages // 2), (0x800000, pages - pages // 2)):
        data = b"".join(
            (_pattern_page(base // page + i, ("text", "random", "zero")[i % 3]) * (page // PAGE))
            for i in range(n)
        )
        regions.append(Region(base, data))
    vmci = (f"OSRELEASE={OSRELEASE}\nPAGESIZE={page}\nSYMBOL(swapper_pg_dir)=1000000\n"
            + ("NUMBER(VA_BITS)=48\nNUMBER(kimage_voffset)=0\nNUMBER(PHYS_OFFSET)=0\n"
               if arch_name == "aarch64" else "")
            # drgn reads kdump files through libkdumpfile, which must know x86_64's paging mode
            + ("NUMBER(pgtable_l5_enabled)=0\n" if arch_name == "x86_64" else "")).encode()
    regs = {arch.regs(0).name: 0x1234, arch.regs(1).name: 0x5678}
    cpus = [CpuContext(cpu_id=0, pr_pid=1, registers=regs)]
    return Machine(arch, regions, vmci, cpus)


# --- the test-only ELF packer ------------------------------------------------------------------


def pack_elf_vmcore(
    path: str | os.PathLike[str], m: Machine, *, layout: str = "kexec",
    extra_loads: int = 0, text_duplicate: bool = False, notes: list[Note] | None = None,
    e_flags: int = 0, no_paddr_data: bytes | None = None,
) -> None:
    """Write ``m`` as an ELF64 vmcore.

    layout "kexec": /proc/vmcore style (fs/proc/vmcore.c): phdrs at 64, one PT_NOTE first,
    notes at the next page boundary, each PT_LOAD's data page-congruent (p_offset % PAGE ==
    p_paddr % PAGE), p_align 0. layout "qemu": QEMU 7.2 dump/dump.c style: section header
    table at 64 (two entries), phdrs at 192, e_ehsize 8 (as QEMU 7.2 wrote it), notes right
    after the phdrs, data packed. ``extra_loads`` adds empty-data PT_LOADs (p_filesz 0) far up,
    to push the count past PN_XNUM; ``text_duplicate`` adds kexec's kernel-text PT_LOAD that
    repeats part of range 2 with a __START_KERNEL_map virtual address; ``no_paddr_data`` adds a
    PT_LOAD with p_paddr -1 (kexec-tools' "no physical address") at VMALLOC_START_NO_PADDR.
    """
    e = m.arch.endian
    page = max(PAGE, m.arch.default_page_size)
    note_blob = b"".join(pack_note(e, n) for n in (m.notes if notes is None else notes))
    loads: list[tuple[int, int, int, bytes]] = []  # (paddr, vaddr, memsz, data)
    if text_duplicate:
        r = m.regions[1]
        loads.append((r.phys, START_KERNEL_MAP + r.phys, 64 * PAGE, r.data[: 64 * PAGE]))
    for r in m.regions:
        loads.append((r.phys, PAGE_OFFSET + r.phys, len(r.data), r.data))
    if no_paddr_data is not None:
        loads.append(((1 << 64) - 1, VMALLOC_NO_PADDR, len(no_paddr_data), no_paddr_data))
    for i in range(extra_loads):
        base = (1 << 40) + i * 2 * PAGE
        loads.append((base, PAGE_OFFSET + base, PAGE, b""))
    phnum = 1 + len(loads)
    xnum = phnum >= 0xFFFF
    if layout == "qemu":
        shoff, shnum = 64, 2
        phoff = shoff + shnum * 64
        note_off = phoff + phnum * 56
        pos = note_off + len(note_blob)
    else:
        phoff = 64
        shnum = 1 if xnum else 0
        shoff = phoff + phnum * 56 if xnum else 0
        hdr_end = phoff + phnum * 56 + shnum * 64
        note_off = -(-hdr_end // page) * page
        pos = -(-(note_off + len(note_blob)) // page) * page
    phdrs = [struct.pack(e + "IIQQQQQQ", PT_NOTE, 0, note_off, 0, 0, len(note_blob),
                         len(note_blob), 0)]
    placed: list[tuple[int, bytes]] = []
    for paddr, vaddr, memsz, data in loads:
        if layout != "qemu" and data:
            pos = -(-pos // page) * page + paddr % page
        off = pos if data else 0
        phdrs.append(struct.pack(e + "IIQQQQQQ", PT_LOAD, 7, off, vaddr, paddr, len(data),
                                 memsz, 0))
        if data:
            placed.append((off, data))
            pos += len(data)
    ident = b"\x7fELF" + bytes([2, 2 if e == ">" else 1, 1]) + bytes(9)
    ehsize = 8 if layout == "qemu" else 64
    ehdr = struct.pack(e + "16sHHIQQQIHHHHHH", ident, 4, m.arch.machine, 1, 0, phoff, shoff,
                       e_flags, ehsize, 56, 0xFFFF if xnum else phnum, 64 if shnum else 0,
                       shnum, 0)
    shdrs = b""
    if shnum:
        sh0 = struct.pack(e + "IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, phnum if xnum else 0, 0, 0)
        shdrs = sh0 + bytes(64 * (shnum - 1))
    with open(path, "wb") as f:
        f.write(ehdr)
        if layout == "qemu":
            f.write(shdrs)
            f.write(b"".join(phdrs))
        else:
            f.write(b"".join(phdrs))
            f.write(shdrs)
        f.seek(note_off)
        f.write(note_blob)
        for off, data in placed:
            f.seek(off)
            f.write(data)
        f.truncate(max([note_off + len(note_blob)] + [o + len(d) for o, d in placed]))


# --- real tools --------------------------------------------------------------------------------


def makedumpfile(args: list[str], stdout: str | os.PathLike[str] | None = None) -> None:
    """Run makedumpfile (skips the test when it is missing); raise with its output on failure."""
    exe = readers.tool("makedumpfile")
    with open(stdout, "wb") if stdout else open(os.devnull, "wb") as out:
        proc = subprocess.run([exe, *args], stdout=out, stderr=subprocess.PIPE, timeout=120,
                              check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"makedumpfile {' '.join(args)} failed ({proc.returncode}):\n"
                           + proc.stderr.decode(errors="replace")[-3000:])
