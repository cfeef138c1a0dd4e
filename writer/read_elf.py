"""Reading ELF64 cores: kexec/kdump vmcores, QEMU ``dump-guest-memory`` output, process cores.

Layout: the gABI's Elf64_Ehdr / Elf64_Phdr / Elf64_Shdr (layout.py), PN_XNUM with the real
program header count in section header 0 (gABI; QEMU write_elf_section), notes in PT_NOTE.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from . import layout
from .arch import ArchInfo, arch_from_machine
from .errors import FormatError, SourceReadError, UnsupportedArchError, UsageError
from .image import CoreImage, DumpKind
from .notes import CORE_NOTE_NAME, NT_AUXV, NT_FILE, NT_PRPSINFO, NT_SIGINFO, VMCOREINFO_NOTE_NAME
from .read_base import (
    COPY,
    MAX_BLOCK_SIZE,
    MIN_BLOCK_SIZE,
    NO_PADDR,
    QEMU_NOTE_NAME,
    Dump,
    DumpSegment,
    FileBlob,
    PageNotDumpedError,
    Range,
    merge_ranges,
    vmcoreinfo_facts,
)
from .segments import FdRangeSource, MemorySegment


@dataclass(frozen=True)
class ElfHeader:
    """The Elf64_Ehdr fields a core reader needs, checked by ``parse_ehdr``."""

    endian: str
    arch: ArchInfo
    machine: int
    flags: int
    phoff: int
    phnum: int  # as stored: PN_XNUM means the real count is in section header 0
    phentsize: int
    shoff: int
    shnum: int
    shentsize: int


def parse_ehdr(head: bytes, name: str) -> ElfHeader:
    """The checks every ELF reader makes first (files and streams): ELF64 in either byte order,
    ET_CORE, a machine we know. FormatError names the offending field's offset."""
    if len(head) < layout.EHDR_SIZE:
        raise FormatError(f"ELF header truncated: {len(head)} of {layout.EHDR_SIZE} bytes", 0, name)
    if head[:4] != layout.ELFMAG:
        raise FormatError(f"not an ELF file (starts with {head[:4]!r})", 0, name)
    if head[4] != layout.ELFCLASS64:
        raise FormatError(f"only ELF64 dumps are supported (EI_CLASS {head[4]})", 4, name)
    if head[5] not in (layout.ELFDATA2LSB, layout.ELFDATA2MSB):
        raise FormatError(f"bad EI_DATA {head[5]}", 5, name)
    endian = "<" if head[5] == layout.ELFDATA2LSB else ">"
    (_, e_type, machine, _, _, phoff, shoff, flags, _, phentsize, phnum, shentsize,
     shnum, _) = layout.EHDR[endian].unpack(head)
    if e_type != layout.ET_CORE:
        raise FormatError(f"not a core file (e_type {e_type})", 16, name)
    try:
        arch = arch_from_machine(machine, endian == ">")
    except UnsupportedArchError as err:
        raise FormatError(str(err), 18, name) from None
    return ElfHeader(endian, arch, machine, flags, phoff, phnum, phentsize, shoff, shnum,
                     shentsize)


class ElfDump(Dump):
    """An ELF64 core: kexec/kdump vmcore, QEMU dump-guest-memory output, or a process core."""

    format = "elf"

    def __init__(self, path: str, fd: int) -> None:
        super().__init__(path, fd)
        self._blob = FileBlob(fd, path)
        self._parse()

    def _parse(self) -> None:
        blob = self._blob
        size = blob.size
        ehdr = parse_ehdr(blob.pread(0, layout.EHDR_SIZE), self.path)
        endian = self.endian = ehdr.endian
        self.arch = ehdr.arch
        machine, phoff, shoff, e_flags = ehdr.machine, ehdr.phoff, ehdr.shoff, ehdr.flags
        phentsize, phnum, shentsize, shnum = ehdr.phentsize, ehdr.phnum, ehdr.shentsize, ehdr.shnum
        if phnum == layout.PN_XNUM:
            # The real count is in section header 0's sh_info (gABI; QEMU write_elf_section).
            if shoff == 0 or shoff + layout.SHDR_SIZE > size:
                raise self._err("e_phnum is PN_XNUM but there is no section header 0", 0x28)
            sh = layout.SHDR[endian].unpack(blob.pread(shoff, layout.SHDR_SIZE))
            phnum = sh[7]  # sh_info
        # No program headers at all is a valid, empty core (the seed's writer made them; gABI:
        # e_phoff 0 and e_phentsize may be 0 then).
        if phnum and phentsize != layout.PHDR_SIZE:
            raise self._err(f"e_phentsize is {phentsize}, expected {layout.PHDR_SIZE}", 0x36)
        if phnum and (phoff < layout.EHDR_SIZE // 2 or phoff + phnum * layout.PHDR_SIZE > size):
            raise self._err(
                f"{phnum} program headers at {phoff:#x} do not fit in the file ({size} bytes)",
                0x20,
            )
        self.header = {
            "e_machine": machine, "e_flags": e_flags, "e_phoff": phoff, "e_phnum": phnum,
            "e_shoff": shoff, "e_shnum": shnum, "e_shentsize": shentsize,
            "layout": "kexec" if phoff == layout.EHDR_SIZE
            else "qemu" if shoff == layout.EHDR_SIZE else "other",
            "incomplete": bool(e_flags & layout.DUMP_ELF_INCOMPLETE),
        }
        if e_flags & layout.DUMP_ELF_INCOMPLETE:
            self.warnings.append(
                "ELF e_flags has DUMP_ELF_INCOMPLETE: the dump was cut short (makedumpfile)"
            )
        table = blob.pread(phoff, phnum * layout.PHDR_SIZE)
        phdr = layout.PHDR[endian]
        note_bytes = 0
        loads: list[DumpSegment] = []
        truncated = no_paddr = 0
        cut: list[tuple[DumpSegment, int]] = []  # PT_LOADs whose data runs past EOF, p_filesz
        for i in range(phnum):
            off = phoff + i * layout.PHDR_SIZE
            p_type, p_flags, p_offset, vaddr, paddr, filesz, memsz, _ = phdr.unpack_from(
                table, i * layout.PHDR_SIZE
            )
            if p_type == layout.PT_NOTE:
                note_bytes += filesz
                if p_offset + filesz > size or note_bytes > size:
                    raise self._err(
                        f"PT_NOTE {i} ({filesz} bytes at {p_offset:#x}) runs past the end of "
                        "the file", off
                    )
                self._collect_notes(blob.pread(p_offset, filesz), endian, p_offset)
            elif p_type == layout.PT_LOAD:
                if memsz < filesz:
                    raise self._err(
                        f"PT_LOAD {i}: p_filesz {filesz:#x} > p_memsz {memsz:#x}", off
                    )
                promised = filesz
                if filesz and p_offset + filesz > size:
                    have = max(0, size - p_offset)
                    truncated += filesz - have
                    filesz = have
                if paddr == NO_PADDR:
                    # kexec-tools writes -1 where it knows no physical address; drgn skips
                    # those in its physical map too (libdrgn program.c).
                    no_paddr += 1
                elif paddr + memsz > 1 << 64:
                    raise self._err(f"PT_LOAD {i} wraps around the physical address space", off)
                if vaddr + memsz > 1 << 64:
                    raise self._err(f"PT_LOAD {i} wraps around the virtual address space", off)
                loads.append(DumpSegment(paddr, vaddr, p_offset, filesz, memsz, p_flags))
                if promised != filesz:
                    cut.append((loads[-1], promised))
        if truncated:
            self.warnings.append(
                f"file is truncated: {truncated} bytes of PT_LOAD data lie past its end "
                "(they read as not dumped)"
            )
            self.header["incomplete"] = True
        if no_paddr:
            self.warnings.append(f"{no_paddr} PT_LOADs have no physical address (p_paddr -1)")
        self.segments = loads
        for note in self.notes:
            if note.name == VMCOREINFO_NOTE_NAME and not self.vmcoreinfo:
                self.vmcoreinfo = note.desc
        self.kind = self._guess_kind()
        self.page_size = self._guess_page_size()
        self.header.update(vmcoreinfo_facts(self.vmcoreinfo_fields))
        self.header["nr_cpus"] = len(self.cpus)
        # Reads resolve through a map without overlaps (kexec adds a kernel-text PT_LOAD
        # that repeats part of a RAM PT_LOAD).
        self._map = build_map(self.segments, self.kind is DumpKind.PROCESS)
        self._starts = [r.start for r in self._map]
        self._vmap: list[Range] | None = None  # kernel dumps: built on the first read_virt
        self._vstarts: list[int] = []
        self._missing = self._cut_ranges(cut)

    def _cut_ranges(self, cut: list[tuple[DumpSegment, int]]) -> list[tuple[int, int]]:
        """Addresses of PT_LOAD data past EOF (physical for kernel dumps, virtual for process
        cores), as far as the map reads them from that PT_LOAD (kexec's duplicates lose)."""
        virtual = self.kind is DumpKind.PROCESS
        out = []
        for seg, promised in cut:
            if not virtual and seg.phys_addr == NO_PADDR:
                continue
            base = (seg.virt_addr or 0) if virtual else seg.phys_addr
            lo, hi = base + seg.file_size, base + promised
            for rng in self._map:
                if rng.file_offset - rng.start == (seg.file_offset or 0) - base:
                    a, b = max(lo, rng.start), min(hi, rng.end)
                    if a < b:
                        out.append((a, b))
        return merge_ranges(out)

    def _guess_kind(self) -> DumpKind:
        if self.vmcoreinfo or any(n.name == QEMU_NOTE_NAME for n in self.notes):
            return DumpKind.KERNEL
        process_types = {NT_PRPSINFO, NT_FILE, NT_AUXV, NT_SIGINFO}
        if any(n.name == CORE_NOTE_NAME and n.type in process_types for n in self.notes):
            return DumpKind.PROCESS
        # Process cores always carry process notes; an empty file is what the kernel-dump
        # builder writes without memory.
        if not any(s.mem_size for s in self.segments):
            return DumpKind.KERNEL
        # A vmcore without VMCOREINFO still has physical addresses; process cores have p_paddr 0.
        if any(s.phys_addr for s in self.segments):
            return DumpKind.KERNEL
        return DumpKind.PROCESS

    def _guess_page_size(self) -> int:
        if self.kind is DumpKind.KERNEL:
            return self._parse_vmcoreinfo_page_size() or self.arch.default_page_size
        for note in self.notes:
            if note.type == NT_FILE and note.name == CORE_NOTE_NAME and len(note.desc) >= 16:
                # The kernel stores PAGE_SIZE here (fs/binfmt_elf.c fill_files_note); gdb's
                # gcore stores 1 (offsets in bytes), which says nothing about the page size.
                size = struct.unpack_from(self.endian + "Q", note.desc, 8)[0]
                if MIN_BLOCK_SIZE <= size <= MAX_BLOCK_SIZE and size & (size - 1) == 0:
                    return int(size)
        return self.arch.default_page_size

    def _read(self, addr: int, length: int, zero_fill: bool, *, virtual: bool = False
              ) -> bytes:
        if addr < 0 or length < 0 or addr + length > 1 << 64:
            raise UsageError(f"bad read of {length} bytes at {addr:#x}")
        if virtual and self.kind is DumpKind.KERNEL:
            if self._vmap is None:
                self._vmap = build_map(self.segments, True)
                self._vstarts = [r.start for r in self._vmap]
            ranges, starts = self._vmap, self._vstarts
        else:
            ranges, starts = self._map, self._starts
        out = bytearray()
        pos, end = addr, addr + length
        idx = bisect.bisect_right(starts, pos) - 1
        if idx >= 0 and pos >= ranges[idx].end:
            idx += 1
        idx = max(idx, 0)
        while pos < end:
            rng = ranges[idx] if idx < len(ranges) else None
            if rng is None or pos < rng.start:  # a gap before the next range
                stop = min(end, rng.start) if rng is not None else end
                if not zero_fill:
                    raise PageNotDumpedError("address not in the dump", pos, "absent")
                out += bytes(stop - pos)
                pos = stop
                continue
            if pos < rng.data_end:
                take = min(end, rng.data_end) - pos
                data = self._blob.pread(rng.file_offset + (pos - rng.start), take)
                if len(data) != take:
                    raise SourceReadError(f"{self.path} shrank while reading", pos + len(data))
                out += data
            else:
                take = min(end, rng.end) - pos
                if not zero_fill:
                    reason = "incomplete" if self.header.get("incomplete") else "not-dumped"
                    raise PageNotDumpedError(
                        "address has no data in the dump (p_filesz < p_memsz)", pos, reason
                    )
                out += bytes(take)
            pos += take
            if pos >= rng.end:
                idx += 1
        return bytes(out)

    def read_phys(self, addr: int, length: int, *, zero_fill: bool = False) -> bytes:
        if self.kind is DumpKind.PROCESS:
            raise UsageError("a process core has no physical addresses; use read_virt")
        return self._read(addr, length, zero_fill)

    def read_virt(self, addr: int, length: int, *, zero_fill: bool = False) -> bytes:
        return self._read(addr, length, zero_fill, virtual=True)

    def iter_pages(self) -> Iterator[tuple[int, bytes]]:
        ps = self.page_size
        pending_pfn = -1
        pending = bytearray()
        for rng in self._map:
            pos = rng.start
            while pos < rng.data_end:
                # Read up to 1 MiB at a time, then cut it into pages.
                chunk_end = min(rng.data_end, pos + COPY)
                data = self._blob.pread(rng.file_offset + (pos - rng.start), chunk_end - pos)
                if len(data) != chunk_end - pos:
                    raise SourceReadError(f"{self.path} shrank while reading", pos + len(data))
                cur = 0
                while cur < len(data):
                    addr = pos + cur
                    pfn = addr // ps
                    inpage = addr - pfn * ps
                    take = min(len(data) - cur, ps - inpage)
                    if take == ps and pfn != pending_pfn:  # a whole page: no copy
                        if pending_pfn >= 0:
                            yield pending_pfn, bytes(pending)
                            pending_pfn = -1
                        yield pfn, data[cur : cur + ps]
                        cur += ps
                        continue
                    if pfn != pending_pfn:
                        if pending_pfn >= 0:
                            yield pending_pfn, bytes(pending)
                        pending_pfn, pending = pfn, bytearray(ps)
                    pending[inpage : inpage + take] = data[cur : cur + take]
                    cur += take
                pos = chunk_end
        if pending_pfn >= 0:
            yield pending_pfn, bytes(pending)

    def to_image(self) -> CoreImage:
        if self._fd < 0:
            raise UsageError("the dump is closed")
        segs: list[MemorySegment] = []
        ranges = self._map if self.kind is DumpKind.KERNEL else _file_order(self)
        for rng in _without(ranges, self.missing):
            src = FdRangeSource(self._fd, rng.file_offset, rng.data_end - rng.start,
                                name=self.path)
            segs.append(MemorySegment(
                phys_addr=rng.phys_addr,
                data=src, virt_addr=rng.virt_addr, mem_size=rng.end - rng.start,
                flags=rng.flags,
            ))
        return CoreImage(
            arch=self.arch, kind=self.kind, segments=segs, notes=self._image_notes(),
            vmcoreinfo=self.vmcoreinfo, page_size=self.page_size, crash_time=None,
            extra={"source_format": self.format, "source": self.path},
            missing=list(self.missing), incomplete=self.incomplete,
        )


def build_map(segments: list[DumpSegment], virtual: bool) -> list[Range]:
    """Address ranges without overlaps, sorted. Where program headers overlap, the larger one
    wins and the smaller is cut around it: kexec's kernel-text PT_LOAD repeats part of a RAM
    PT_LOAD (kexec/crashdump-elf.c), and keeping the RAM one keeps file order = address order,
    which a stream needs. A list of merged covered intervals finds the gaps, so hostile
    overlapping headers cost O(n log n), not O(n^2)."""
    placed: list[Range] = []
    cov_starts: list[int] = []  # merged coverage, sorted and disjoint
    cov_ends: list[int] = []
    for seg in sorted(segments, key=lambda s: -s.mem_size):
        if seg.mem_size == 0 or (not virtual and seg.phys_addr == NO_PADDR):
            continue
        base = (seg.virt_addr or 0) if virtual else seg.phys_addr
        lo, hi = base, base + seg.mem_size
        first = bisect.bisect_left(cov_ends, lo)  # first interval ending at/after lo
        last = first
        pieces: list[tuple[int, int]] = []
        pos = lo
        while last < len(cov_starts) and cov_starts[last] <= hi:
            if cov_starts[last] > pos:
                pieces.append((pos, min(hi, cov_starts[last])))
            pos = max(pos, cov_ends[last])
            last += 1
        if pos < hi:
            pieces.append((pos, hi))
        new_lo = min(lo, cov_starts[first]) if first < last else lo
        new_hi = max(hi, cov_ends[last - 1]) if first < last else hi
        cov_starts[first:last] = [new_lo]
        cov_ends[first:last] = [new_hi]
        for a, b in pieces:
            delta = a - base
            placed.append(Range(
                start=a, end=b,
                data_end=max(a, min(b, base + seg.file_size)),
                file_offset=(seg.file_offset or 0) + delta,
                virt_addr=None if seg.virt_addr is None else seg.virt_addr + delta,
                phys_addr=seg.phys_addr + delta, flags=seg.flags,
            ))
    placed.sort(key=lambda r: r.start)
    return placed


def _without(ranges: list[Range], missing: list[tuple[int, int]]) -> list[Range]:
    """``ranges`` with the ``missing`` addresses cut out. A PT_LOAD cut short by the end of its
    file keeps its readable bytes; the part the file promised but lacks is left out rather
    than kept in p_memsz, where it would read back as zeros (gABI: p_memsz past p_filesz is
    zero-filled) and pass memory the file never had off as zeros. A part the PT_LOAD itself
    declares not dumped (past its p_filesz) stays."""
    if not missing:
        return ranges
    starts = [a for a, _ in missing]
    out: list[Range] = []
    for rng in ranges:
        pos = rng.start
        idx = max(bisect.bisect_right(starts, pos) - 1, 0)
        while pos < rng.end:
            while idx < len(missing) and missing[idx][1] <= pos:
                idx += 1
            if idx < len(missing) and missing[idx][0] <= pos:
                pos = min(rng.end, missing[idx][1])
                continue
            stop = min(rng.end, missing[idx][0]) if idx < len(missing) else rng.end
            delta = pos - rng.start
            out.append(Range(
                start=pos, end=stop, data_end=max(pos, min(stop, rng.data_end)),
                file_offset=rng.file_offset + delta,
                virt_addr=None if rng.virt_addr is None else rng.virt_addr + delta,
                phys_addr=rng.phys_addr + delta, flags=rng.flags,
            ))
            pos = stop
    return out


def _file_order(dump: ElfDump) -> list[Range]:
    """Process cores keep their PT_LOADs as written (virtual order, flags, empty ranges)."""
    out = []
    for seg in dump.segments:
        if seg.mem_size == 0:
            continue
        out.append(Range(
            start=seg.virt_addr or 0, end=(seg.virt_addr or 0) + seg.mem_size,
            data_end=(seg.virt_addr or 0) + seg.file_size, file_offset=seg.file_offset or 0,
            virt_addr=seg.virt_addr, phys_addr=seg.phys_addr, flags=seg.flags,
        ))
    return out

