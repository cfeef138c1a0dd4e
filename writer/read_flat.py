"""makedumpfile's flattened format (``makedumpfile -F``): a stream of {offset, size} records.

``FlatBlob`` reads a flattened file in place as the normal file it describes; the
``reassemble_flattened*`` functions rebuild that normal file (what ``makedumpfile -R`` does).
Layout: makedumpfile.h makedumpfile_header / makedumpfile_data_header (layout.py).
"""

from __future__ import annotations

import bisect
import os
from array import array
from typing import BinaryIO

from .dump import atomic_output
from .errors import DumpWriteError, FormatError
from .layout import FLAT_HEADER, FLAT_HEADER_SIZE, FLAT_RECORD, FLAT_SIGNATURE
from .read_base import COPY, Blob, FileBlob, StreamIn


class FlatBlob(Blob):
    """The rearranged view of a flattened file, from an in-memory map of its records.

    Records are applied in file order, so a later record overrides an earlier one at the same
    offset, as ``makedumpfile -R`` does. Bytes no record covers read as zeros (a hole). A file
    cut short (no end marker) keeps every byte that arrived, of a cut last record too;
    ``undelivered`` then tells what did not arrive from what is a hole.
    """

    def __init__(self, fd: int, path: str, warnings: list[str]) -> None:
        self.fd, self.path = fd, path
        self._file = FileBlob(fd, path)
        self.stored = self._file.size
        starts, ends, srcs = array("q"), array("q"), array("q")
        pos = FLAT_HEADER_SIZE
        total = self._file.size
        ended = False
        while pos + FLAT_RECORD.size <= total:
            offset, size = FLAT_RECORD.unpack(self._file.pread(pos, FLAT_RECORD.size))
            if offset == -1 and size == -1:
                ended = True
                pos += FLAT_RECORD.size
                break
            if offset < 0 or size < 0:
                raise FormatError(
                    f"flattened record with offset {offset} and size {size}", pos, path
                )
            if pos + FLAT_RECORD.size + size > total:
                arrived = total - pos - FLAT_RECORD.size
                warnings.append(
                    f"flattened record at offset {pos:#x} runs past the end of the file "
                    f"(the dump was cut short): {arrived} of its {size} bytes arrived"
                )
                if arrived:
                    starts.append(offset)
                    ends.append(offset + arrived)
                    srcs.append(pos + FLAT_RECORD.size)
                break
            if size:
                starts.append(offset)
                ends.append(offset + size)
                srcs.append(pos + FLAT_RECORD.size)
            pos += FLAT_RECORD.size + size
        if not ended:
            warnings.append("flattened file has no end marker: the dump is incomplete")
        elif pos < total:
            warnings.append(f"{total - pos} bytes after the flattened end marker are ignored")
        self.ended = ended  # False: the stream was cut short (no end marker)
        self.records = len(starts)
        self._build(starts, ends, srcs)
        self.size = self._ends[-1] if len(self._ends) else 0

    def _build(self, starts: array[int], ends: array[int], srcs: array[int]) -> None:
        order = sorted(range(len(starts)), key=lambda i: (starts[i], i))
        overlap = any(
            starts[order[k + 1]] < ends[order[k]] for k in range(len(order) - 1)
        )
        if not overlap:
            self._starts = array("q", (starts[i] for i in order))
            self._ends = array("q", (ends[i] for i in order))
            self._srcs = array("q", (srcs[i] for i in order))
            return
        # Rare (makedumpfile rewrites its sub-header when it adds ERASEINFO): within each
        # cluster of overlapping records, paint them in stream order, later ones cutting
        # earlier ones. Clusters keep the work local to the records that overlap.
        pieces: list[tuple[int, int, int]] = []
        k = 0
        while k < len(order):
            cluster = [order[k]]
            reach = ends[order[k]]
            k += 1
            while k < len(order) and starts[order[k]] < reach:
                cluster.append(order[k])
                reach = max(reach, ends[order[k]])
                k += 1
            pieces += _paint(sorted(cluster), starts, ends, srcs)
        self._starts = array("q", (p[0] for p in pieces))
        self._ends = array("q", (p[1] for p in pieces))
        self._srcs = array("q", (p[2] for p in pieces))

    def pread(self, offset: int, length: int) -> bytes:
        if length <= 0 or offset >= self.size:
            return b""
        out = bytearray()
        for _, take, src in self.fragments(offset, min(length, self.size - offset)):
            out += bytes(take) if src is None else self._file.pread(src, take)
        return bytes(out)

    def undelivered(self, offset: int, length: int) -> bool:
        """True when part of [offset, offset + length) lies past the end or, in a stream cut
        short, in a hole: a range the stream had not delivered yet, not one it left empty."""
        if offset + length > self.size:
            return True
        if self.ended or length <= 0:
            return False
        return any(src is None for _, _, src in self.fragments(offset, length))

    def fragments(self, offset: int, length: int) -> list[tuple[int, int, int | None]]:
        """(logical offset, length, source file offset or None for a hole) covering the range."""
        out: list[tuple[int, int, int | None]] = []
        pos, end = offset, offset + length
        idx = bisect.bisect_right(self._starts, pos) - 1
        while pos < end:
            if idx >= 0 and pos < self._ends[idx]:
                take = min(end, self._ends[idx]) - pos
                out.append((pos, take, self._srcs[idx] + (pos - self._starts[idx])))
            else:
                nxt = self._starts[idx + 1] if idx + 1 < len(self._starts) else end
                take = min(end, nxt) - pos
                out.append((pos, take, None))
            pos += take
            if idx + 1 < len(self._starts) and pos >= self._starts[idx + 1]:
                idx += 1
        return out


def _paint(records: list[int], starts: array[int], ends: array[int], srcs: array[int]
           ) -> list[tuple[int, int, int]]:
    """Disjoint (start, end, src) pieces of overlapping records applied in the given order."""
    pieces: list[tuple[int, int, int]] = []
    for i in records:
        a, b, src = starts[i], ends[i], srcs[i]
        keep: list[tuple[int, int, int]] = []
        lo = bisect.bisect_left(pieces, (a, -1, -1))
        if lo > 0 and pieces[lo - 1][1] > a:
            lo -= 1
        hi = lo
        while hi < len(pieces) and pieces[hi][0] < b:
            s, e, ps = pieces[hi]
            if s < a:
                keep.append((s, a, ps))
            if e > b:
                keep.append((b, e, ps + (b - s)))
            hi += 1
        pieces[lo:hi] = sorted([*keep, (a, b, src)])
    return pieces


def check_flat_header(head: bytes, name: str) -> None:
    if len(head) < FLAT_HEADER.size:
        raise FormatError("flattened header truncated", 0, name)
    _, ftype, version = FLAT_HEADER.unpack_from(head)
    if ftype != 1:
        raise FormatError(f"flattened header type {ftype}, expected 1", 16, name)
    if version != 1:
        raise FormatError(f"flattened header version {version}, expected 1", 24, name)



def reassemble_flattened(src: BinaryIO | int, dst_path: str | os.PathLike[str]) -> int:
    """Rebuild a normal kdump file from a flattened stream (what ``makedumpfile -R`` does).

    Records are applied in stream order. The output goes through the writers' atomic path
    (dump.atomic_output: ``DST.incomplete``, 0600, fsynced, renamed, directory fsynced; removed
    on failure). Returns the size of the file written.
    """
    dst = os.fspath(dst_path)
    with atomic_output(dst) as fd:
        return reassemble_flattened_into(src, fd, dst)


def reassemble_flattened_into(src: BinaryIO | int, fd: int, name: str = "<file>") -> int:
    """Apply a flattened stream's records to the open file ``fd``; returns the file's size.

    Reads up to the end marker (makedumpfile.h END_FLAG_FLAT_HEADER), not further. A stream
    that ends before it raises FormatError after writing every byte that arrived, of a cut
    record too (the caller may read what ``fd`` holds; ``open_dump`` names what it lacks).
    """
    reader = StreamIn(src)
    head = reader.read_exact(FLAT_HEADER_SIZE)
    if head[:16].rstrip(b"\0") != FLAT_SIGNATURE:
        raise FormatError(f"not a flattened dump (starts with {head[:12]!r})", 0)
    check_flat_header(head, "<stream>")
    size = 0
    while True:
        pos = reader.pos
        rec = reader.read_exact(FLAT_RECORD.size, what="record header")
        offset, length = FLAT_RECORD.unpack(rec)
        if offset == -1 and length == -1:
            break
        if offset < 0 or length < 0:
            raise FormatError(f"flattened record with offset {offset} and size {length}", pos)
        while length:
            want = min(length, COPY)
            part = reader.read_upto(want)  # short only where the stream ended
            _pwrite_all(fd, part, offset, name)
            offset += len(part)
            length -= len(part)
            size = max(size, offset)
            if len(part) < want:
                if os.fstat(fd).st_size < size:
                    os.ftruncate(fd, size)
                raise FormatError(f"stream ended in the middle of the record data, {length} "
                                  f"bytes short (record at {pos:#x})", reader.pos)
    if os.fstat(fd).st_size < size:
        os.ftruncate(fd, size)
    return size


def _pwrite_all(fd: int, data: bytes | bytearray, offset: int, name: str) -> None:
    view = memoryview(data)
    try:
        while view:
            n = os.pwrite(fd, view, offset)
            view = view[n:]
            offset += n
    except OSError as err:
        raise DumpWriteError.from_oserror(err, name) from err

