"""ELF64 core files: kernel vmcores and process cores.

Layouts: Elf64_Ehdr / Elf64_Phdr / Elf64_Shdr from the gABI (include/uapi/linux/elf.h).
Reader demands (dump-formats.md §2.4, §8): exactly one PT_NOTE, as program header 0, before all
data (crash reads only phdr 0 as notes and only the file prefix before the first PT_LOAD);
PT_LOAD p_align 0 for vmcores (crash calls a file "netdump" otherwise); PN_XNUM with the real
count in section header 0's sh_info at >= 0xffff program headers (crash segfaults without it).
Process cores follow fs/binfmt_elf.c elf_core_dump: page-aligned data, p_align = page size,
p_paddr 0, p_filesz 0 for ranges not dumped; pages of zeros are left as holes.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from contextlib import closing
from dataclasses import dataclass

from .image import CoreImage, DumpKind
from .layout import (
    DUMP_ELF_INCOMPLETE,
    EHDR,
    EHDR_SIZE,
    ELFCLASS64,
    ELFDATA2LSB,
    ELFDATA2MSB,
    ELFMAG,
    ET_CORE,
    EV_CURRENT,
    PHDR,
    PHDR_SIZE,
    PN_XNUM,
    PT_LOAD,
    PT_NOTE,
    SHDR,
    SHDR_SIZE,
)
from .notes import pack_notes
from .pages import checked_segments, prefetch, zero_page_flags
from .segments import PF_R, PF_W, PF_X, MemorySegment, ZeroSource
from .sinks import Sink

CHUNK = 1 << 20
MIN_HOLE_PAGES = 8  # zero runs shorter than this inside a chunk are written, not skipped
# copy_file_range runs ~1.4x faster (ext4, measured by bench_writer.py) when source and target
# offsets agree modulo 64 KiB, so big file-backed segments start at such an offset; the gap is a
# hole. Readers follow p_offset, and p_align stays 0.
COPY_ALIGN = 64 << 10
COPY_ALIGN_MIN = 1 << 20


def _copy_gap(seg: MemorySegment, pos: int) -> int:
    frange = seg.source.file_range() if not isinstance(seg.source, ZeroSource) else None
    if frange is None:
        return 0
    return (frange[1] - pos) % COPY_ALIGN
ProgressFn = Callable[[int], None]


def pack_ehdr(endian: str, machine: int, phnum: int, phoff: int, shoff: int,
              flags: int = 0) -> bytes:
    ident = ELFMAG + bytes(
        [ELFCLASS64, ELFDATA2MSB if endian == ">" else ELFDATA2LSB, EV_CURRENT]
    )
    xnum = phnum >= PN_XNUM
    return EHDR[endian].pack(
        ident.ljust(16, b"\0"), ET_CORE, machine, EV_CURRENT, 0, phoff,
        shoff if xnum else 0, flags, EHDR_SIZE, PHDR_SIZE,
        PN_XNUM if xnum else phnum,
        SHDR_SIZE if xnum else 0, 1 if xnum else 0, 0,
    )


def phdr_count(segments: int, has_notes: bool, process: bool) -> int:
    """Program headers ``write_elf`` emits: none for an image with neither memory nor notes,
    else PT_NOTE + one PT_LOAD per segment, or + one empty PT_LOAD for a kernel dump without
    memory (see ``write_elf``)."""
    if not segments and not has_notes:
        return 0
    return 1 + (segments or (0 if process else 1))


@dataclass
class _Load:
    seg: MemorySegment
    offset: int


def write_elf(
    image: CoreImage,
    sink: Sink,
    *,
    zero_holes: bool | None = None,
    progress: ProgressFn | None = None,
    mark_incomplete: bool = True,
) -> int:
    """Write ``image`` as an ELF core to ``sink``; returns the file size.

    ``zero_holes``: skip writing all-zero pages (a sparse file). Default: on for process cores
    when the sink can make holes. The header first goes out with DUMP_ELF_INCOMPLETE set and is
    rewritten at the end, so a file cut short says so (seekable sinks only); the final header
    keeps the flag when ``image.missing`` names ranges that could not be read or
    ``image.incomplete`` says the source lacks data. A stream gets one header, flagged if either
    holds when writing starts.
    An image without segments or notes is a bare ELF header (no program headers, as the seed's
    writer made it). A kernel dump with notes but no memory gets one PT_LOAD of size 0 after its
    PT_NOTE: crash takes an ELF file for a vmcore only with e_phnum >= 2 (netdump.c
    is_netdump) and libkdumpfile refuses one without PT_LOAD ("No content found").
    """
    endian = image.arch.endian
    process = image.kind is DumpKind.PROCESS
    segments: Sequence[MemorySegment] = checked_segments(image) if image.segments else []
    page = image.effective_page_size
    if zero_holes is None:
        zero_holes = process and sink.supports_holes
    notes = pack_notes(endian, image.notes).data

    phnum = phdr_count(len(segments), bool(notes), process)
    empty_load = phnum == 2 and not segments
    xnum = phnum >= PN_XNUM
    phoff = EHDR_SIZE if phnum else 0  # gABI: e_phoff 0 without a program header table
    shoff = EHDR_SIZE + phnum * PHDR_SIZE
    notes_off = shoff + (SHDR_SIZE if xnum else 0)
    data_off = notes_off + len(notes)
    if process and segments:
        data_off += -data_off % page  # ELF_EXEC_PAGESIZE alignment, as the kernel does

    loads: list[_Load] = []
    pos = data_off
    for seg in segments:
        if process and seg.size:
            pos += -pos % page
        elif seg.size >= COPY_ALIGN_MIN and sink.supports_holes:
            pos += _copy_gap(seg, pos)
        loads.append(_Load(seg, pos))
        pos += seg.size
    file_size = pos

    phdrs = bytearray()
    ph = PHDR[endian]
    if phnum:
        phdrs += ph.pack(PT_NOTE, 0, notes_off, 0, 0, len(notes), len(notes),
                         4 if process else 0)
    if empty_load:
        phdrs += ph.pack(PT_LOAD, PF_R | PF_W | PF_X, data_off, 0, 0, 0, 0, 0)
    for load in loads:
        seg = load.seg
        if process:
            vaddr, paddr, align = seg.effective_virt_addr, 0, page
        else:
            vaddr, paddr, align = seg.effective_virt_addr, seg.phys_addr, 0
        phdrs += ph.pack(PT_LOAD, seg.flags, load.offset, vaddr, paddr, seg.size, seg.memsz, align)

    head = bytearray()
    live_incomplete = mark_incomplete and sink.seekable
    head += pack_ehdr(endian, image.arch.machine, phnum, phoff, shoff,
                      DUMP_ELF_INCOMPLETE if live_incomplete or image.missing or image.incomplete
                      else 0)
    head += phdrs
    if xnum:
        # Section header 0 carries the real program header count (gABI "Extended numbering").
        head += SHDR[endian].pack(0, 0, 0, 0, 0, 0, 0, phnum, 0, 0)
    head += notes
    # the digest hashes the header the final rewrite (below) will put there
    final = pack_ehdr(endian, image.arch.machine, phnum, phoff, shoff,
                      DUMP_ELF_INCOMPLETE if image.missing or image.incomplete else 0
                      ) + head[EHDR_SIZE:]
    sink.write_at(0, head, final=final if live_incomplete else None)
    if data_off > len(head):
        sink.hole(len(head), data_off - len(head))

    zero = bytes(CHUNK)
    end = data_off
    for load in loads:
        seg = load.seg
        if load.offset > end:
            sink.hole(end, load.offset - end)  # alignment gaps (streams get zeros)
        end = load.offset + seg.size
        _write_segment(sink, seg, load.offset, zero if zero_holes else None, page, progress)

    if sink.size < file_size:
        sink.hole(sink.size, file_size - sink.size)
    if live_incomplete:
        sink.write_at(0, pack_ehdr(endian, image.arch.machine, phnum, phoff, shoff,
                                   DUMP_ELF_INCOMPLETE if image.missing or image.incomplete
                                   else 0))
    return file_size


def _write_segment(
    sink: Sink, seg: MemorySegment, offset: int, zero: bytes | None, page: int,
    progress: ProgressFn | None,
) -> None:
    src = seg.source
    if isinstance(src, ZeroSource):
        sink.hole(offset, seg.size)
        if progress:
            progress(seg.size)
        return
    if zero is None and sink.supports_holes:
        frange = src.file_range()
        if frange is not None and sink.copy_from_fd(offset, frange[0], frange[1], seg.size):
            if progress:
                progress(seg.size)
            return
    def reads() -> Generator[tuple[int, bytes | bytearray], None, None]:
        for done in range(0, seg.size, CHUNK):
            yield done, src.read(done, min(CHUNK, seg.size - done))

    chunks = prefetch(reads()) if seg.size > CHUNK else reads()
    with closing(chunks):
        for done, data in chunks:
            if zero is not None:
                _write_sparse(sink, offset + done, data, zero, page)
            else:
                sink.write_at(offset + done, data)
            if progress:
                progress(len(data))


def _write_sparse(sink: Sink, offset: int, data: bytes | bytearray, zero: bytes, page: int) -> None:
    """Write ``data`` at ``offset``, leaving runs of all-zero pages as holes."""
    n = len(data)
    if (data == zero) if n == len(zero) else (data == zero[:n]):
        sink.hole(offset, n)
        return
    flags = zero_page_flags(data, page)
    if not any(flags):
        sink.write_at(offset, data)
        return
    view = memoryview(data)
    start = 0  # first byte not yet written or skipped
    i = 0
    while i < len(flags):
        if not flags[i]:
            i += 1
            continue
        j = i
        while j < len(flags) and flags[j]:
            j += 1
        if j - i < MIN_HOLE_PAGES and j < len(flags):
            i = j  # a short run costs more as an extra write call than as zeros on disk
            continue
        if start < i * page:
            sink.write_at(offset + start, view[start : i * page])
        sink.hole(offset + i * page, (j - i) * page)
        start = j * page
        i = j
    if start < n:
        sink.write_at(offset + start, view[start:n])
