"""Checks and orderings shared by the writers: which segments go where, and page walks."""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator, Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import TypeVar

from .errors import LayoutError
from .image import CoreImage, DumpKind
from .segments import MemorySegment

T = TypeVar("T")


def address_of(image: CoreImage, seg: MemorySegment) -> int:
    return seg.effective_virt_addr if image.kind is DumpKind.PROCESS else seg.phys_addr


def checked_segments(image: CoreImage) -> list[MemorySegment]:
    """Segments in address order; empty or overlapping ones are refused with the addresses."""
    if image.kind is DumpKind.KERNEL and not image.segments:
        raise LayoutError("a kernel dump needs at least one memory segment")
    ordered = sorted(image.segments, key=lambda s: address_of(image, s))
    space = "virtual" if image.kind is DumpKind.PROCESS else "physical"
    prev: MemorySegment | None = None
    for seg in ordered:
        start = address_of(image, seg)
        if seg.memsz == 0:
            raise LayoutError(f"empty memory segment at {space} address {start:#x}")
        if start + seg.memsz > 1 << 64:
            raise LayoutError(f"segment at {start:#x} (+{seg.memsz:#x}) runs past 2^64")
        if prev is not None:
            pstart = address_of(image, prev)
            if start < pstart + prev.memsz:
                raise LayoutError(
                    f"memory segments overlap: {space} {pstart:#x}-{pstart + prev.memsz:#x} "
                    f"and {start:#x}-{start + seg.memsz:#x}"
                )
        prev = seg
    return ordered


@dataclass
class PageChunk:
    """Consecutive pages [first_pfn, first_pfn + count) and their bytes."""

    first_pfn: int
    count: int
    data: bytes | bytearray


def pfn_runs(segments: Sequence[MemorySegment], page_size: int) -> list[tuple[int, int]]:
    """Merged [start_pfn, end_pfn) runs covered by the segments (sorted by physical address)."""
    runs: list[tuple[int, int]] = []
    for seg in segments:
        if seg.size == 0:
            continue
        first = seg.phys_addr // page_size
        end = -(-(seg.phys_addr + seg.size) // page_size)
        if runs and first <= runs[-1][1]:
            runs[-1] = (runs[-1][0], max(runs[-1][1], end))
        else:
            runs.append((first, end))
    return runs


def iter_page_chunks(
    segments: Sequence[MemorySegment], page_size: int, chunk_pages: int
) -> Iterator[PageChunk]:
    """Walk the covered pages in ascending PFN order, reading each source byte once, in order.

    Bytes land at their true physical offsets: a segment that starts or ends inside a page fills
    only its part of that page (the rest reads as zero), and two segments may share a page.
    """
    live = [s for s in segments if s.size]
    idx = 0
    for run_start, run_end in pfn_runs(live, page_size):
        pfn = run_start
        while pfn < run_end:
            count = min(chunk_pages, run_end - pfn)
            lo = pfn * page_size
            hi = lo + count * page_size
            # Skip segments that end before this chunk.
            while idx < len(live) and live[idx].phys_addr + live[idx].size <= lo:
                idx += 1
            seg = live[idx]
            if seg.phys_addr <= lo and seg.phys_addr + seg.size >= hi:
                # Fast path: one segment covers the whole chunk.
                data: bytes | bytearray = seg.source.read(lo - seg.phys_addr, hi - lo)
            else:
                buf = bytearray(hi - lo)
                j = idx
                while j < len(live) and live[j].phys_addr < hi:
                    s = live[j]
                    a = max(lo, s.phys_addr)
                    b = min(hi, s.phys_addr + s.size)
                    if a < b:
                        buf[a - lo : b - lo] = s.source.read(a - s.phys_addr, b - a)
                    j += 1
                data = buf
            yield PageChunk(pfn, count, data)
            pfn += count


# Byte offsets sampled in every page before a page is compared in full: a page with data almost
# always has a non-zero byte at one of them, so only the few candidates pay for a full memcmp.
_SAMPLE_OFFSETS = (0, 8, 64, 256, 512, 1024, 1536, 2048, 2560, 3072, 3584, 4000, 4088)


def zero_page_flags(data: bytes | bytearray, page: int) -> list[bool]:
    """Which whole pages of ``data`` are all zeros, without a Python call per page.

    Strided slices pick one byte per page at a few offsets, one offset after the other until
    every page has shown a non-zero byte; OR-ing them as big integers leaves a zero byte only for
    pages that are zero at every sampled offset, and those are then checked with an in-place
    ``startswith`` (a memcmp; comparing memoryview slices is ~30x slower).
    """
    count = len(data) // page
    if count == 0:
        return []
    acc = 0
    flags = [False] * count
    for off in _SAMPLE_OFFSETS:
        if off >= page:
            break
        acc |= int.from_bytes(data[off : count * page : page], "little")
        sampled = acc.to_bytes(count, "little")
        if 0 not in sampled:
            # Every page has a non-zero byte: the other offsets would only cost cache misses
            # (one per page each: 13 passes were ~48 us per MiB, most of a chunk's scan).
            return flags
    zero_page = bytes(page)
    pos = sampled.find(0)
    while pos >= 0:
        flags[pos] = data.startswith(zero_page, pos * page)
        pos = sampled.find(0, pos + 1)
    return flags


_DONE = object()


def prefetch(items: Iterator[T], depth: int = 2) -> Generator[T, None, None]:
    """Run ``items`` in a background thread, ``depth`` items ahead of the consumer.

    Reading memory (pread, /proc/PID/mem, a pipe) releases the GIL, so it overlaps compressing
    and writing the previous chunk. Errors reach the consumer at the item where they happened.
    Closing the generator early stops the thread after its current item.
    """
    q: queue.Queue[object] = queue.Queue(depth)
    stop = threading.Event()

    def run() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put(item)
            q.put(_DONE)
        except BaseException as exc:  # handed to the consumer, re-raised there
            q.put(_Failure(exc))

    thread = threading.Thread(target=run, name="kdump-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            with suppress(queue.Empty):
                q.get(timeout=0.05)
        thread.join()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
