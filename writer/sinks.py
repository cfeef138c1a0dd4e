"""Where dump bytes go: a regular file (random access, holes, zero-copy), a sequential stream,
or makedumpfile's flattened stream.

Writers address every write by its final file offset; the sink decides how that reaches the
output. That one rule lets the kdump writer stream pages first and fill the descriptor table
afterwards, and lets the flattened format carry the same writes as records
(makedumpfile.h makedumpfile_data_header; makedumpfile.c write_buffer / rearrange_dumpdata).
"""

from __future__ import annotations

import errno
import os
import queue
import threading
from typing import BinaryIO

from .errors import DumpWriteError, SourceReadError, UsageError
from .layout import (
    FLAT_END,
    FLAT_HEADER,
    FLAT_HEADER_SIZE,
    FLAT_RECORD,
    FLAT_SIGNATURE,
    FLAT_TYPE,
    FLAT_VERSION,
)

_COPY_CHUNK = 64 << 20


class Sink:
    """Base: subclasses implement ``_write``; everything else is shared."""

    supports_holes = False
    seekable = True

    def __init__(self, name: str) -> None:
        self.name = name
        self.bytes_written = 0
        self.size = 0  # highest offset written + 1 (or hole end)

    def write_at(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        try:
            self._write(offset, data)
        except OSError as err:
            raise DumpWriteError.from_oserror(err, self.name) from err
        self.bytes_written += len(data)
        self.size = max(self.size, offset + len(data))

    def hole(self, offset: int, length: int) -> None:
        """Bytes at [offset, offset+length) are zero; sparse where the sink allows."""
        if length <= 0:
            return
        zeros = bytes(min(length, 1 << 20))
        pos = offset
        end = offset + length
        while pos < end:
            n = min(len(zeros), end - pos)
            self.write_at(pos, memoryview(zeros)[:n])
            pos += n

    def copy_from_fd(self, offset: int, fd: int, src_offset: int, length: int) -> bool:
        """Copy a file range without passing it through Python; False when not possible."""
        return False

    def _write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        pass

    def close(self) -> None:
        """Release resources without finishing (error paths)."""


class FileSink(Sink):
    """A regular file opened by the caller (``fd`` stays the caller's).

    Writes go through one background thread (write-behind), so the kernel's copy into the page
    cache overlaps reading and compressing the next chunk. Callers must not change a buffer
    after handing it to ``write_at``; ``finish`` waits for every write and reports errors.
    """

    supports_holes = True
    _QUEUE_DEPTH = 4

    def __init__(self, fd: int, name: str, *, write_behind: bool = True) -> None:
        super().__init__(name)
        self.fd = fd
        self._can_copy = hasattr(os, "copy_file_range")
        self._write_behind = write_behind
        self._queue: queue.Queue[tuple[int, bytes | bytearray | memoryview] | None] | None = None
        self._thread: threading.Thread | None = None
        self._error: OSError | None = None

    def _pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n

    def _writer(self) -> None:
        assert self._queue is not None
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is None:
                try:
                    self._pwrite(*item)
                except OSError as err:
                    self._error = err

    def _write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self._error is not None:
            raise self._error
        if self._thread is None:
            if not self._write_behind or len(data) < 65536:
                self._pwrite(offset, data)  # headers and small files need no thread
                return
            self._queue = queue.Queue(self._QUEUE_DEPTH)
            self._thread = threading.Thread(target=self._writer, name="kdump-writer",
                                            daemon=True)
            self._thread.start()
        assert self._queue is not None
        self._queue.put((offset, data))  # once the thread runs, every write queues: FIFO order

    def _drain(self) -> None:
        if self._thread is not None:
            assert self._queue is not None
            self._queue.put(None)
            self._thread.join()
            self._thread = None
            self._queue = None

    def close(self) -> None:
        """Stop the write-behind thread; safe to call on error paths before closing ``fd``."""
        self._drain()

    def hole(self, offset: int, length: int) -> None:
        if length > 0:
            self.size = max(self.size, offset + length)

    def copy_from_fd(self, offset: int, fd: int, src_offset: int, length: int) -> bool:
        if not self._can_copy:
            return False
        done = 0
        try:
            while done < length:
                n = os.copy_file_range(
                    fd, self.fd, min(_COPY_CHUNK, length - done), src_offset + done, offset + done
                )
                if n == 0:
                    break
                done += n
        except OSError as err:
            if err.errno in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP) \
                    and done == 0:
                self._can_copy = False
                return False
            raise DumpWriteError.from_oserror(err, self.name) from err
        self.bytes_written += done
        self.size = max(self.size, offset + done)
        if done < length:
            raise SourceReadError("source file ended early", src_offset + done)
        return True

    def finish(self) -> None:
        self._drain()
        try:
            if self._error is not None:
                raise self._error
            if os.fstat(self.fd).st_size < self.size:
                os.ftruncate(self.fd, self.size)  # trailing hole
        except OSError as err:
            raise DumpWriteError.from_oserror(err, self.name) from err


class StreamSink(Sink):
    """A non-seekable stream: writes must come in offset order; holes become zeros."""

    seekable = False

    def __init__(self, stream: BinaryIO, name: str = "<stream>") -> None:
        super().__init__(name)
        self.stream = stream
        self.pos = 0

    def _write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if offset != self.pos:
            raise UsageError(
                f"this format needs a seekable output (write at {offset:#x}, stream at "
                f"{self.pos:#x}); use the flattened format for pipes"
            )
        self.stream.write(data)
        self.pos += len(data)

    def finish(self) -> None:
        try:
            self.stream.flush()
        except OSError as err:
            raise DumpWriteError.from_oserror(err, self.name) from err


class FlattenedSink(Sink):
    """makedumpfile ``-F`` stream: every write becomes an {offset, size} record."""

    seekable = False
    max_record = 1 << 20

    def __init__(self, stream: BinaryIO, name: str = "<stream>") -> None:
        super().__init__(name)
        self.stream = stream
        header = bytearray(FLAT_HEADER_SIZE)
        FLAT_HEADER.pack_into(header, 0, FLAT_SIGNATURE, FLAT_TYPE, FLAT_VERSION)
        self._raw(header)

    def _raw(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self.stream.write(data)
        except OSError as err:
            raise DumpWriteError.from_oserror(err, self.name) from err

    def _write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        # Never emit empty records: libkdumpfile rejects size <= 0 (flatmap.c).
        while view:
            part = view[: self.max_record]
            self.stream.write(FLAT_RECORD.pack(offset, len(part)))
            self.stream.write(part)
            offset += len(part)
            view = view[len(part):]

    def hole(self, offset: int, length: int) -> None:
        # Reassembly leaves unwritten ranges zero, so a hole needs no record.
        if length > 0:
            self.size = max(self.size, offset + length)

    def finish(self) -> None:
        self._raw(FLAT_END)
        try:
            self.stream.flush()
        except OSError as err:
            raise DumpWriteError.from_oserror(err, self.name) from err
