"""Memory segments and the lazy sources behind them.

A source knows its size and reads ``(offset, length)`` on demand; nothing here holds a whole
segment in memory unless the caller handed over ``bytes``. Sources that sit on a file can also
expose ``(fd, offset)`` so that writers copy them with ``os.copy_file_range``/``sendfile``.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol, runtime_checkable

from .errors import SourceReadError, UsageError

PF_X, PF_W, PF_R = 1, 2, 4


@runtime_checkable
class SegmentSource(Protocol):
    """Anything that can read a segment's bytes lazily."""

    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes | bytearray:
        """Exactly ``length`` bytes at ``offset`` (offset + length <= size).

        A bytearray is allowed (one copy fewer for stream readers); nobody changes it after."""
        ...

    def file_range(self) -> tuple[int, int] | None:
        """``(fd, file offset of byte 0)`` when the bytes sit in a regular file, else None."""
        ...

    def close(self) -> None: ...


class BytesSource:
    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._data = memoryview(data).cast("B")

    @property
    def size(self) -> int:
        return len(self._data)

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self._data[offset : offset + length])

    def file_range(self) -> None:
        return None

    def close(self) -> None:
        pass


class ZeroSource:
    """A range known to be all zeros (written as a hole or a shared zero page)."""

    is_zero = True

    def __init__(self, size: int) -> None:
        self._size = size

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        return bytes(length)

    def file_range(self) -> None:
        return None

    def close(self) -> None:
        pass


def pread_full(fd: int, length: int, offset: int, name: str) -> bytes:
    """Up to ``length`` bytes at ``offset``; short only at end of file. pread may return short
    on pipes and network file systems, so keep reading; errors become SourceReadError."""
    try:
        data = os.pread(fd, length, offset)
        while len(data) < length:
            more = os.pread(fd, length - len(data), offset + len(data))
            if not more:
                break
            data += more
    except OSError as err:
        raise SourceReadError(f"cannot read {name}: {err.strerror}", offset) from err
    return data


class FdRangeSource:
    """``length`` bytes at ``offset`` of an open file descriptor (caller keeps ownership)."""

    def __init__(self, fd: int, offset: int, length: int, *, name: str = "") -> None:
        self._fd, self._offset, self._size, self.name = fd, offset, length, name

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        pos = self._offset + offset
        data = pread_full(self._fd, length, pos, self.name or "fd")
        if len(data) != length:
            raise SourceReadError(f"{self.name or 'fd'} is shorter than expected", pos + len(data))
        return data

    def file_range(self) -> tuple[int, int]:
        return self._fd, self._offset

    def close(self) -> None:
        pass


class FileRangeSource(FdRangeSource):
    """A byte range of a file given by path; opened on first use, closed by ``close()``."""

    def __init__(self, path: str | os.PathLike[str], offset: int = 0,
                 length: int | None = None) -> None:
        self.path = os.fspath(path)
        try:
            total = os.stat(self.path).st_size
        except OSError as err:
            raise UsageError(f"cannot use {self.path}: {err.strerror}") from err
        if length is None:
            length = max(0, total - offset)
        elif offset + length > total:
            raise UsageError(
                f"{self.path}: range {offset:#x}+{length:#x} runs past the end ({total:#x})"
            )
        super().__init__(-1, offset, length, name=self.path)

    def _ensure_open(self) -> None:
        if self._fd < 0:
            try:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as err:
                raise SourceReadError(f"cannot open {self.path}: {err.strerror}") from err

    def read(self, offset: int, length: int) -> bytes:
        self._ensure_open()
        return super().read(offset, length)

    def file_range(self) -> tuple[int, int]:
        self._ensure_open()
        return super().file_range()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class FileObjectSource:
    """A binary file object; uses ``pread`` on its descriptor when it has one."""

    def __init__(self, fileobj: BinaryIO, offset: int = 0, length: int | None = None) -> None:
        self._f = fileobj
        self._offset = offset
        self._fd: int | None = None
        try:
            fd = fileobj.fileno()
            if _is_regular(fd):
                self._fd = fd
        except (OSError, io.UnsupportedOperation, AttributeError):
            self._fd = None
        if length is None:
            pos = fileobj.tell()
            fileobj.seek(0, os.SEEK_END)
            length = max(0, fileobj.tell() - offset)
            fileobj.seek(pos)
        self._size = length

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        if self._fd is not None:
            return FdRangeSource(self._fd, self._offset, self._size).read(offset, length)
        pos = self._f.tell()
        try:
            self._f.seek(self._offset + offset)
            data = self._f.read(length)
        finally:
            self._f.seek(pos)
        if len(data) != length:
            raise SourceReadError("file object is shorter than expected", offset + len(data))
        return data

    def file_range(self) -> tuple[int, int] | None:
        return None if self._fd is None else (self._fd, self._offset)

    def close(self) -> None:
        pass


def _is_regular(fd: int) -> bool:
    return stat.S_ISREG(os.fstat(fd).st_mode)


class CallableSource:
    """Bytes produced by ``reader(offset, length)``, e.g. a live process or a guest."""

    def __init__(self, size: int, reader: Callable[[int, int], bytes | bytearray],
                 closer: Callable[[], None] | None = None) -> None:
        self._size, self._reader, self._closer = size, reader, closer

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes | bytearray:
        data = self._reader(offset, length)
        if len(data) != length:
            raise SourceReadError(f"source returned {len(data)} bytes, expected {length}", offset)
        return data

    def file_range(self) -> None:
        return None

    def close(self) -> None:
        if self._closer:
            self._closer()


SegmentData = bytes | bytearray | memoryview | str | os.PathLike[str] | BinaryIO | SegmentSource


def make_source(data: SegmentData) -> SegmentSource:
    """The source for any of the ways a caller can hand over a segment's bytes."""
    if isinstance(data, bytes | bytearray | memoryview):
        return BytesSource(data)
    if isinstance(data, str | os.PathLike):
        return FileRangeSource(data)
    if isinstance(data, SegmentSource):
        return data
    if hasattr(data, "read") and hasattr(data, "seek"):
        return FileObjectSource(data)
    raise UsageError(f"unsupported segment data of type {type(data).__name__}")


@dataclass
class MemorySegment:
    """One range of memory in a dump.

    ``phys_addr``/``virt_addr`` become p_paddr/p_vaddr (virt defaults to phys). ``size`` is the
    number of bytes the source provides (p_filesz); ``mem_size`` can be larger for ranges that
    were not dumped (p_memsz, read back as zeros). ``flags`` are the PT_LOAD p_flags.
    """

    phys_addr: int
    data: SegmentData | None
    virt_addr: int | None = None
    size: int = 0
    mem_size: int | None = None
    flags: int = PF_R | PF_W | PF_X
    source: SegmentSource = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.source = make_source(self.data) if self.data is not None else ZeroSource(0)
        self.size = self.source.size
        if self.mem_size is None:
            self.mem_size = self.size
        elif self.mem_size < self.size:
            raise UsageError("mem_size is smaller than the data")
        if self.phys_addr < 0 or (self.virt_addr is not None and self.virt_addr < 0):
            raise UsageError("segment addresses must not be negative")

    @property
    def effective_virt_addr(self) -> int:
        return self.virt_addr if self.virt_addr is not None else self.phys_addr

    @property
    def memsz(self) -> int:
        return self.mem_size if self.mem_size is not None else self.size

    def iter_chunks(self, chunk_size: int = 1 << 20) -> Iterator[bytes | bytearray]:
        for off in range(0, self.size, chunk_size):
            yield self.source.read(off, min(chunk_size, self.size - off))

    def get_data(self) -> bytes:
        """The whole segment as bytes (seed API; loads it all, so avoid on big segments)."""
        return bytes(self.source.read(0, self.size))

    def write_to(self, output: BinaryIO) -> None:
        """Stream the segment's bytes to ``output`` in 1 MiB chunks (seed API)."""
        for chunk in self.iter_chunks():
            output.write(chunk)


