"""Where dump bytes go: a regular file (random access, holes, zero-copy), a sequential stream,
or makedumpfile's flattened stream.

Writers address every write by its final file offset; the sink decides how that reaches the
output. That one rule lets the kdump writer stream pages first and fill the descriptor table
afterwards, and lets the flattened format carry the same writes as records
(makedumpfile.h makedumpfile_data_header; makedumpfile.c write_buffer / rearrange_dumpdata).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import queue
import threading
from collections.abc import Callable, Iterator
from typing import BinaryIO, cast

from .digest import WriteDigest
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
    """Base: subclasses implement ``_write`` (and ``_hole`` for sparse holes); the rest, the
    byte accounting and the digest hooks, is shared."""

    supports_holes = False
    seekable = True

    def __init__(self, name: str) -> None:
        self.name = name
        self.bytes_written = 0
        self.size = 0  # highest offset written + 1 (or hole end)
        self.digest: WriteDigest | None = None

    # -- the sha256 of what is written (write_dump(sha256=True)) --------------------------------

    def start_digest(self) -> None:
        """Hash the output while it is written, from the next write on (call it before the
        first); ``finish_digest`` returns the result."""
        if self.digest is None:
            self.digest = WriteDigest(self._read_back if self._can_read_back else None)

    _can_read_back = False

    def _read_back(self, offset: int, buf: memoryview) -> int:
        """Fill ``buf`` from the output at ``offset`` (sinks with ``_can_read_back``)."""
        raise NotImplementedError

    @property
    def digest_size(self) -> int:
        """How many bytes the output holds (what the digest covers)."""
        return self.size

    def finish_digest(self) -> str | None:
        """After ``finish``: the sha256 (hex) of every byte of the output, or None when this
        sink could not follow its writes (see kdumpling.digest) or no digest was started."""
        digest, self.digest = self.digest, None
        return digest.finish(self.digest_size) if digest is not None else None

    def stop_digest(self) -> None:
        """Stop a digest that will not be finished (error paths); harmless otherwise."""
        digest, self.digest = self.digest, None
        if digest is not None:
            digest.close()

    # -- writing ------------------------------------------------------------------------------

    def write_at(self, offset: int, data: bytes | bytearray | memoryview, *,
                 final: bytes | None = None) -> None:
        """Write ``data`` at ``offset``. ``final``: the bytes a later ``write_at`` will put in
        this range when the dump is finished (a header first written flagged incomplete); the
        digest hashes those, so the rewrite does not cost a second read of the output."""
        if not data:
            return
        try:
            self._write(offset, data)
        except OSError as err:
            raise DumpWriteError.from_oserror(err, self.name) from err
        self.bytes_written += len(data)
        self.size = max(self.size, offset + len(data))
        if self.digest is not None:
            self._digest_write(offset, data, final)

    def _digest_write(self, offset: int, data: bytes | bytearray | memoryview,
                      final: bytes | None) -> None:
        assert self.digest is not None
        self.digest.data(offset, data, final)

    def hole(self, offset: int, length: int) -> None:
        """Bytes at [offset, offset+length) are zero; sparse where the sink allows."""
        if length <= 0:
            return
        if self._hole(offset, length) and self.digest is not None:
            self.digest.zeros(offset, length)
        self.size = max(self.size, offset + length)

    def _hole(self, offset: int, length: int) -> bool:
        """Make [offset, offset+length) read as zeros. True: nothing was written (a sparse
        hole), the digest hashes zeros; False: nothing more to hash (the default writes the
        zeros through ``write_at``, which hashes them)."""
        zeros = bytes(min(length, 1 << 20))
        pos = offset
        end = offset + length
        while pos < end:
            n = min(len(zeros), end - pos)
            self.write_at(pos, memoryview(zeros)[:n])
            pos += n
        return False

    def copy_from_fd(self, offset: int, fd: int, src_offset: int, length: int) -> bool:
        """Copy a file range without passing it through Python; False when not possible."""
        return False

    def _write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        pass

    def close(self) -> None:
        """Release resources without finishing (error paths)."""


# sync_file_range(2) flag: start writeback of the range's dirty pages, do not wait for it.
SYNC_FILE_RANGE_WRITE = 2
WRITEBACK_STEP = 8 << 20  # written bytes per writeback request


def _libc_function(name: str, argtypes: list[type]) -> Callable[[int, int, int, int], int] | None:
    """libc's ``name`` returning int, or None where it has none (Python's os module has no
    binding for the calls below)."""
    try:
        func = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    func.restype = ctypes.c_int
    func.argtypes = argtypes
    return cast(Callable[[int, int, int, int], int], func)


_sync_file_range = _libc_function(
    "sync_file_range", [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint])

# fallocate(2) mode: allocate blocks past the end of file without changing its size.
FALLOC_FL_KEEP_SIZE = 1
_PREALLOC_MIN = 64 << 10  # smaller writes (headers, notes, short runs) are not worth a call
# libc's fallocate, not os.posix_fallocate: where the file system has no fallocate, glibc
# emulates it by writing zeros, which would double the writing.
_fallocate = _libc_function(
    "fallocate", [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64])


class Writeback:
    """Starts the kernel's writeback of the output as it is written, so that the final fsync
    finds little left to write: every ``WRITEBACK_STEP`` bytes written in sequence (holes in
    between included) get sync_file_range(SYNC_FILE_RANGE_WRITE). That call queues the I/O but
    blocks while the device's queue is full, so it runs on a thread of its own, never in the
    writer's way (it made a stopped process's pause 0.2 s longer per GiB here). A write
    elsewhere (a header, the kdump descriptor table) starts a new run. ``close`` (the writing
    is over) stops the thread; the fsync does the rest."""

    def __init__(self, fd: int, step: int = WRITEBACK_STEP) -> None:
        self.fd, self.step = fd, step
        self.start = self.end = 0
        self.requests = 0  # sync_file_range calls made (tests)
        self.enabled = _sync_file_range is not None
        self._ranges: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def written(self, offset: int, length: int) -> None:
        if not self.enabled:
            return
        if not self.start <= offset <= self.end + self.step:
            self._request()
            self.start = offset
        self.end = max(self.end, offset + length)
        if self.end - self.start >= self.step:
            self._request()

    def _request(self) -> None:
        if self.end > self.start and self.enabled:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kdump-writeback",
                                                daemon=True)
                self._thread.start()
            self._ranges.put((self.start, self.end - self.start))
        self.start = self.end

    def _run(self) -> None:
        assert _sync_file_range is not None
        while (item := self._ranges.get()) is not None:
            if not self.enabled:
                continue
            if _sync_file_range(self.fd, item[0], item[1], SYNC_FILE_RANGE_WRITE) != 0:
                self.enabled = False  # e.g. ESPIPE, EINVAL: the final fsync does it all
            self.requests += 1

    def close(self) -> None:
        if self._thread is not None:
            self._ranges.put(None)
            self._thread.join()
            self._thread = None


def _readable_dup(fd: int) -> int:
    """A new descriptor that reads the file ``fd`` writes, or -1: a dup when ``fd`` is open
    for reading, else the file reopened through /proc/self/fd (Linux; it names the open file
    even after a rename)."""
    try:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR:
            return os.dup(fd)
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1


_MAP_WINDOW = 8 << 20  # bytes of the output mapped at once by the digest's read-back
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # fault the window in with one call

_Pending = tuple[int, "bytes | bytearray | memoryview | int", "bytes | None"]


class FileSink(Sink):
    """A regular file opened by the caller (``fd`` stays the caller's).

    Writes go through one background thread (write-behind), so the kernel's copy into the page
    cache overlaps reading and compressing the next chunk. Callers must not change a buffer
    after handing it to ``write_at``; ``finish`` waits for every write and reports errors.
    That thread also reports each write and hole to the digest (in the order they reach the
    file) and, with ``writeback``, starts the kernel's writeback behind it (``Writeback``).
    """

    supports_holes = True
    _can_read_back = True
    _QUEUE_DEPTH = 4
    # The digest hashes only once the writing is over (``finish``: the sources are closed, a
    # stopped process runs again), from the buffers it could keep and then from the page cache
    # (WriteDigest(defer=)). Hashing alongside the writer lengthened a 1 GiB process's pause
    # by 0.1-0.2 s on this 2-core machine for a total 0-0.3 s shorter (bench_process.py);
    # the pause is what the target feels. False: hash alongside.
    defer_digest = True

    def __init__(self, fd: int, name: str, *, write_behind: bool = True,
                 writeback: bool = False) -> None:
        super().__init__(name)
        self.fd = fd
        self._can_copy = hasattr(os, "copy_file_range")
        self._write_behind = write_behind
        self.writeback = Writeback(fd) if writeback else None
        self._queue: queue.Queue[_Pending | None] | None = None
        self._thread: threading.Thread | None = None
        self._error: OSError | None = None
        self._digest_fd = -1
        self._prealloc = _fallocate is not None
        self.preallocated = 0  # bytes allocated ahead of their writes (tests)

    def start_digest(self) -> None:
        if self.digest is None:
            # The digest's own readable descriptor: it may finish after ``fd`` is fsynced and
            # closed. Without one, everything the digest needs stays in memory (no read-back).
            self._digest_fd = _readable_dup(self.fd)
            if self._digest_fd < 0:
                self.digest = WriteDigest(None)
            else:
                self.digest = WriteDigest(self._read_back, views=self._mapped,
                                          defer=self.defer_digest)

    def _read_back(self, offset: int, buf: memoryview) -> int:
        return os.preadv(self._digest_fd, [buf], offset)

    def _mapped(self, offset: int, length: int) -> Iterator[memoryview]:
        """[offset, offset + length) of the file through read-only mmap windows: the digest
        hashes the page cache in place instead of copying it out (pread), and only the window
        in hand is mapped, so the process's RSS stays bounded."""
        end = offset + length
        if os.fstat(self._digest_fd).st_size < end:  # a mapping past the end faults (SIGBUS)
            buf = bytearray(min(length, _MAP_WINDOW))
            pos = offset
            while pos < end:
                n = self._read_back(pos, memoryview(buf)[: min(len(buf), end - pos)])
                if n <= 0:
                    return
                yield memoryview(buf)[:n]
                pos += n
            return
        pos = offset
        while pos < end:
            base = pos - pos % mmap.ALLOCATIONGRANULARITY
            size = min(_MAP_WINDOW, end - base)
            with mmap.mmap(self._digest_fd, size, mmap.MAP_SHARED | _MAP_POPULATE,
                           mmap.PROT_READ, offset=base) as window:
                whole = memoryview(window)
                part = whole[pos - base : size]
                try:
                    yield part
                finally:
                    part.release()
                    whole.release()
            pos = base + size

    def finish_digest(self) -> str | None:
        try:
            return super().finish_digest()
        finally:
            self._close_digest_fd()

    def stop_digest(self) -> None:
        super().stop_digest()
        self._close_digest_fd()

    def _close_digest_fd(self) -> None:
        if self._digest_fd >= 0:
            os.close(self._digest_fd)
            self._digest_fd = -1

    def _pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n

    def _allocate(self, offset: int, length: int) -> None:
        """Allocate the blocks of a write before it (ext4, xfs): a buffered write into
        allocated blocks skips the file system's per-block delayed-allocation bookkeeping,
        ~28% of the write's CPU on ext4 here, and the write is what keeps a stopped process
        waiting (bench_process.py). Only what is written is allocated: holes stay holes."""
        assert _fallocate is not None
        if _fallocate(self.fd, FALLOC_FL_KEEP_SIZE, offset, length) != 0:
            err = ctypes.get_errno()
            if err in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG):
                raise OSError(err, os.strerror(err))
            self._prealloc = False  # EOPNOTSUPP, ENOSYS, EINVAL, ...: plain writes
            return
        self.preallocated += length

    def _do(self, item: _Pending) -> None:
        """One write or hole, then what follows it (digest, writeback)."""
        offset, payload, final = item
        if isinstance(payload, int):
            if self.digest is not None:
                self.digest.zeros(offset, payload)
            return
        if self._prealloc and len(payload) >= _PREALLOC_MIN:
            self._allocate(offset, len(payload))
        self._pwrite(offset, payload)
        if self.digest is not None:
            self.digest.data(offset, payload, final)
        if self.writeback is not None:
            self.writeback.written(offset, len(payload))

    def _writer(self) -> None:
        assert self._queue is not None
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is None:
                try:
                    self._do(item)
                except OSError as err:
                    self._error = err

    def _submit(self, item: _Pending) -> None:
        if self._error is not None:
            raise self._error
        if self._thread is None:
            payload = item[1]
            if isinstance(payload, int) or not self._write_behind or len(payload) < 65536:
                self._do(item)  # headers, holes and small files need no thread
                return
            self._queue = queue.Queue(self._QUEUE_DEPTH)
            self._thread = threading.Thread(target=self._writer, name="kdump-writer",
                                            daemon=True)
            self._thread.start()
        assert self._queue is not None
        self._queue.put(item)  # once the thread runs, everything queues: FIFO order

    def write_at(self, offset: int, data: bytes | bytearray | memoryview, *,
                 final: bytes | None = None) -> None:
        if not data:
            return
        try:
            self._submit((offset, data, final))
        except OSError as err:
            raise DumpWriteError.from_oserror(err, self.name) from err
        self.bytes_written += len(data)
        self.size = max(self.size, offset + len(data))

    def _drain(self) -> None:
        if self._thread is not None:
            assert self._queue is not None
            self._queue.put(None)
            self._thread.join()
            self._thread = None
            self._queue = None
        if self.writeback is not None:
            self.writeback.close()  # before ``fd`` may be closed

    def close(self) -> None:
        """Stop the write-behind thread; safe to call on error paths before closing ``fd``."""
        self._drain()

    def hole(self, offset: int, length: int) -> None:
        if length > 0:
            self._submit((offset, length, None))  # in order with the writes, for the digest
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
        if self.digest is not None:
            self.digest.copied(offset, done)  # read back from the page cache by the digest
        if self.writeback is not None:
            self.writeback.written(offset, done)
        if done < length:
            raise SourceReadError("source file ended early", src_offset + done)
        return True

    def finish(self) -> None:
        self._drain()
        if self.digest is not None:
            self.digest.hurry()  # the sources are closed: the digest may take a whole core
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
    """makedumpfile ``-F`` stream: every write becomes an {offset, size} record. Its digest
    covers the stream as written (records, header, end marker), not the reassembled file."""

    seekable = False
    max_record = 1 << 20

    def __init__(self, stream: BinaryIO, name: str = "<stream>") -> None:
        super().__init__(name)
        self.stream = stream
        self.stream_size = 0
        header = bytearray(FLAT_HEADER_SIZE)
        FLAT_HEADER.pack_into(header, 0, FLAT_SIGNATURE, FLAT_TYPE, FLAT_VERSION)
        self._header = bytes(header)
        self._raw(header)

    def start_digest(self) -> None:
        if self.digest is None:
            super().start_digest()
            assert self.digest is not None
            self.digest.data(0, self._header)  # went out before the digest started

    @property
    def digest_size(self) -> int:
        return self.stream_size

    def _emit(self, data: bytes | bytearray | memoryview) -> None:
        self.stream.write(data)
        if self.digest is not None:
            self.digest.data(self.stream_size, data)
        self.stream_size += len(data)

    def _raw(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self._emit(data)
        except OSError as err:
            raise DumpWriteError.from_oserror(err, self.name) from err

    def _write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        # Never emit empty records: libkdumpfile rejects size <= 0 (flatmap.c).
        while view:
            part = view[: self.max_record]
            self._emit(FLAT_RECORD.pack(offset, len(part)))
            self._emit(part)
            offset += len(part)
            view = view[len(part):]

    def _digest_write(self, offset: int, data: bytes | bytearray | memoryview,
                      final: bytes | None) -> None:
        pass  # the stream's bytes were hashed in _emit

    def _hole(self, offset: int, length: int) -> bool:
        return False  # reassembly leaves unwritten ranges zero, so a hole needs no record

    def finish(self) -> None:
        self._raw(FLAT_END)
        try:
            self.stream.flush()
        except OSError as err:
            raise DumpWriteError.from_oserror(err, self.name) from err
