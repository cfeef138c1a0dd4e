"""makedumpfile's kdump-compressed ("diskdump") format, normal and flattened.

Layout (makedumpfile.c write_kdump_header / write_kdump_pages_and_bitmap_cyclic, diskdump_mod.h;
dump-formats.md §3), in blocks of the dumped kernel's page size:
  block 0                 disk_dump_header (464 bytes on 64-bit targets)
  block 1                 kdump_sub_header (104 bytes), then the ELF note blob at block_size + 104
  1 + sub_hdr_size        bitmap 1 (pages present), then bitmap 2 (pages with a descriptor)
  ... + bitmap_blocks     page_desc[N], one per set bit of bitmap 2 in ascending PFN order
  right after them        page data: [the shared zero page], then each page back to back
All header fields use the dumped machine's byte order.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass

from .arch import phys_base_u64, vmcoreinfo_phys_base
from .codecs import DEFAULT_LEVEL, CompressionType, PageCodec
from .errors import LayoutError
from .image import CoreImage, DumpKind
from .layout import (
    DISK_DUMP_HEADER,
    DUMP_DH_COMPRESSED_INCOMPLETE,
    KDUMP_HEADER_VERSION,
    KDUMP_SIGNATURE,
    KDUMP_SUB_HEADER,
    NEW_UTS_LEN,
    PAGE_DESC,
)
from .notes import pack_notes
from .pages import checked_segments, iter_page_chunks, pfn_runs, prefetch, zero_page_flags

# libkdumpfile accepts block sizes in this range only (kdumpfile-priv.h MIN/MAX_PAGE_SIZE).
MIN_PAGE_SIZE, MAX_PAGE_SIZE = 4096, 262144
DUMP_LEVEL_EXCLUDE_ZERO = 1
DESC_FLUSH = 8192  # descriptors buffered before they are written out
# LZO and snappy compress a page in a few microseconds: a thread pool costs more than it gains
# (codec-speed.md: no gain from a second thread), so they run on the calling thread.
INLINE_CODECS = frozenset({CompressionType.LZO, CompressionType.SNAPPY})

ProgressFn = Callable[[int], None]


@dataclass
class KdumpStats:
    pages: int = 0
    zero_pages: int = 0
    compressed_pages: int = 0
    raw_pages: int = 0
    data_bytes: int = 0


def header_phys_base(image: CoreImage) -> int:
    """phys_base for the sub-header: from the image, else from VMCOREINFO (kdumpling.arch:
    the kernel prints it in decimal, negative under KASLR; QEMU misreads it as hex)."""
    if image.phys_base is not None:
        return phys_base_u64(image.phys_base)
    value = vmcoreinfo_phys_base(image.arch.name, image.vmcoreinfo_fields)
    return phys_base_u64(value) if value is not None else 0


def _uts(value: str) -> bytes:
    return value.encode("utf-8", "replace")[:NEW_UTS_LEN]


def pack_disk_dump_header(image: CoreImage, *, status: int, block_size: int, sub_hdr_size: int,
                          bitmap_blocks: int, max_mapnr: int, nr_cpus: int) -> bytes:
    fields = image.vmcoreinfo_fields
    release = fields.get("OSRELEASE") or "unknown"
    crash_time = image.crash_time
    if crash_time is None:
        try:
            crash_time = int(fields.get("CRASHTIME", "0"))
        except ValueError:
            crash_time = 0
    # utsname must look sane or libkdumpfile cannot tell the architecture (util.c
    # uts_looks_sane): sysname "Linux", non-empty release, version and machine.
    # tv_usec stays 0: libkdumpfile probes the 32-bit layout first and misreads a tv_usec that
    # looks like a page size (dump-formats.md §3.11 item 3).
    return DISK_DUMP_HEADER[image.arch.endian].pack(
        KDUMP_SIGNATURE, KDUMP_HEADER_VERSION,
        b"Linux", _uts(image.extra.get("nodename", "(none)")), _uts(release),
        _uts(image.uts_version or "#1"), _uts(image.arch.uts_machine),
        _uts(image.extra.get("domainname", "(none)")),
        crash_time, 0, status, block_size, sub_hdr_size, bitmap_blocks,
        min(max_mapnr, 0xFFFFFFFF), 0, 0, 0, 0, nr_cpus,
    )


def _set_bits(bitmap: bytearray, start: int, end: int) -> None:
    """Set bits [start, end) LSB-first (makedumpfile.h is_on: bit pfn%8 of byte pfn/8)."""
    if start >= end:
        return
    first_byte, last_byte = start >> 3, (end - 1) >> 3
    if first_byte == last_byte:
        bitmap[first_byte] |= ((1 << (end - start)) - 1) << (start & 7)
        return
    bitmap[first_byte] |= (0xFF << (start & 7)) & 0xFF
    bitmap[first_byte + 1 : last_byte] = b"\xff" * (last_byte - first_byte - 1)
    bitmap[last_byte] |= (1 << (((end - 1) & 7) + 1)) - 1


def write_kdump(
    image: CoreImage,
    sink: object,
    *,
    compression: CompressionType = CompressionType.ZLIB,
    level: int = DEFAULT_LEVEL,
    dump_level: int = 0,
    threads: int | None = None,
    progress: ProgressFn | None = None,
) -> KdumpStats:
    """Write ``image`` in kdump-compressed format to ``sink`` (a writer.sinks.Sink)."""
    from .sinks import Sink

    assert isinstance(sink, Sink)
    if image.kind is not DumpKind.KERNEL:
        raise LayoutError("the kdump-compressed format holds kernel dumps only; use ELF")
    endian = image.arch.endian
    page = image.effective_page_size
    if not (MIN_PAGE_SIZE <= page <= MAX_PAGE_SIZE and page & (page - 1) == 0):
        raise LayoutError(f"page size {page} is not a power of two in [4096, 262144]")
    codec = PageCodec(compression, level, page)
    segments = checked_segments(image) if image.segments else []
    runs = pfn_runs(segments, page)
    # No memory at all is a valid file: max_mapnr 0, empty bitmaps, no page descriptors.
    max_pfn = runs[-1][1] if runs else 0
    n_pages = sum(end - start for start, end in runs)

    bitmap_len = -(-max_pfn // 8)
    # At least one block each: crash mmaps the bitmap and fails on a zero-length one.
    one_bitmap_blocks = max(1, -(-bitmap_len // page))
    bitmap = bytearray(one_bitmap_blocks * page)
    for start, end in runs:
        _set_bits(bitmap, start, end)

    notes = pack_notes(endian, image.notes)
    notes_off = page + KDUMP_SUB_HEADER[endian].size
    sub_hdr_size = max(1, -(-(KDUMP_SUB_HEADER[endian].size + len(notes.data)) // page))
    bitmap1_off = (1 + sub_hdr_size) * page
    desc_off = bitmap1_off + 2 * one_bitmap_blocks * page
    data_off = desc_off + PAGE_DESC[endian].size * n_pages

    vmci_off = notes_off + notes.vmcoreinfo_offset if notes.vmcoreinfo_offset is not None else 0
    sub_header = KDUMP_SUB_HEADER[endian].pack(
        header_phys_base(image), dump_level, 0, 0, 0,
        vmci_off, notes.vmcoreinfo_size if vmci_off else 0,
        notes_off, len(notes.data), 0, 0, 0, 0, max_pfn,
    )

    def header(status: int) -> bytes:
        return pack_disk_dump_header(
            image, status=status, block_size=page, sub_hdr_size=sub_hdr_size,
            bitmap_blocks=2 * one_bitmap_blocks, max_mapnr=max_pfn,
            # crash warns "invalid nr_cpus value: 0" (diskdump.c read_dump_header) for dumps
            # without CPU notes, e.g. from raw images; one CPU is the truth for such a dump.
            nr_cpus=max(1, notes.prstatus_count),
        )

    # The header goes out first flagged incomplete; the final rewrite clears the flag, so a file
    # cut short by a crash or a full disk is reported as incomplete by crash.
    sink.write_at(0, header(codec.flag | DUMP_DH_COMPRESSED_INCOMPLETE))
    sink.write_at(page, sub_header + notes.data)
    sink.write_at(bitmap1_off, bitmap)
    sink.write_at(bitmap1_off + len(bitmap), bitmap)

    stats = KdumpStats(pages=n_pages)
    pd = PAGE_DESC[endian]
    exclude_zero = bool(dump_level & DUMP_LEVEL_EXCLUDE_ZERO)
    cur = data_off
    zero_desc = b""
    if exclude_zero:
        # One shared zero page first in the data area; every zero page points at it and stays
        # in bitmap 2 (makedumpfile "Write the data of zero-filled page").
        sink.write_at(cur, bytes(page))
        zero_desc = pd.pack(cur, page, 0, 0)
        cur += page

    descs = bytearray()
    desc_written = desc_off
    flag = codec.flag

    def work(data: bytes | bytearray, count: int) -> tuple[bytes, list[int]]:
        comp = codec.compressor()
        zeros = zero_page_flags(data, page) if exclude_zero else [False] * count
        sizes = [0] * count  # >0 compressed size, -page raw, 0 zero page
        keep = [i for i in range(count) if not zeros[i]]
        # One copy per page: slicing a bytearray directly would copy twice (slice, then bytes).
        view = data if isinstance(data, bytes) else memoryview(data)
        raw = [bytes(view[i * page : (i + 1) * page]) for i in keep]
        if comp is None:
            for i in keep:
                sizes[i] = -page
            return b"".join(raw), sizes
        packed = comp(raw)
        parts: list[bytes] = []
        for i, original, small in zip(keep, raw, packed, strict=True):
            n = len(small)
            if n < page:  # keep only if strictly smaller (write_kdump_pages_cyclic)
                parts.append(small)
                sizes[i] = n
            else:
                parts.append(original)
                sizes[i] = -page
        return b"".join(parts), sizes

    def emit(blob: bytes, sizes: list[int]) -> None:
        nonlocal cur, descs, desc_written
        sink.write_at(cur, blob)
        for size in sizes:
            if size == 0:
                descs += zero_desc
                stats.zero_pages += 1
            elif size > 0:
                descs += pd.pack(cur, size, flag, 0)
                cur += size
                stats.compressed_pages += 1
            else:
                descs += pd.pack(cur, page, 0, 0)
                cur += page
                stats.raw_pages += 1
        if len(descs) >= DESC_FLUSH * pd.size:
            sink.write_at(desc_written, descs)
            desc_written += len(descs)
            descs = bytearray()
        if progress:
            progress(len(sizes) * page)

    chunk_pages = max(16, (1 << 20) // page)
    nthreads = threads or os.cpu_count() or 1
    if compression in INLINE_CODECS and threads is None:
        nthreads = 1  # cheaper per page than handing pages to another thread
    # closing(): an error in the consumer stops the prefetch thread before the caller releases
    # the target (a process is detached right after we return or raise).
    with closing(prefetch(iter_page_chunks(segments, page, chunk_pages))) as chunks:
        if nthreads <= 1 or compression == CompressionType.NONE:
            for chunk in chunks:
                emit(*work(chunk.data, chunk.count))
        else:
            with ThreadPoolExecutor(nthreads, thread_name_prefix="kdump-codec") as pool:
                pending: deque[Future[tuple[bytes, list[int]]]] = deque()
                try:
                    for chunk in chunks:
                        pending.append(pool.submit(work, chunk.data, chunk.count))
                        if len(pending) > 2 * nthreads:
                            emit(*pending.popleft().result())
                    while pending:
                        emit(*pending.popleft().result())
                finally:
                    for fut in pending:
                        fut.cancel()
    if descs:
        sink.write_at(desc_written, descs)
    stats.data_bytes = cur - data_off
    if sink.size < data_off:
        # Without pages the file would end inside the sub-header block; crash reads whole blocks
        # and refuses a file shorter than its metadata ("cannot read dump header"). A written
        # last byte (not a hole) also reaches the end of a reassembled flattened stream.
        sink.write_at(data_off - 1, b"\0")
    # Ranges the sources could not read keep the flag set (makedumpfile sets it on a dump it had
    # to cut short: check_and_modify_kdump_headers), and so does a source that says it lacks
    # data without naming where (image.incomplete); crash warns on it.
    marked = image.missing or image.incomplete
    sink.write_at(0, header(codec.flag | (DUMP_DH_COMPRESSED_INCOMPLETE if marked else 0)))
    return stats
