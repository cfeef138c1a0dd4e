"""Pieces shared by the guest collectors (QMP, libvirt): the dump stream and the spool file.

QEMU writes its ELF dump front to back with plain write() calls and never seeks, into a pipe
(QMP getfd) or a FIFO (libvirt's iohelper). The guest stays paused until the last byte has been
read, so the stream is either converted on the fly (pause = conversion time, no copy on disk) or
first spooled to fast storage (pause = copy time) and converted afterwards.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from typing import Any, BinaryIO, cast

from kdumpling.errors import CaptureInterrupted, DumpWriteError, FormatError, UsageError
from kdumpling.image import CoreImage


class DumpStream(io.RawIOBase):
    """A read-only raw stream over a pipe or FIFO descriptor that we own.

    Counts bytes, and raises ``CaptureInterrupted`` on the next read once ``abort()`` was called
    (closing a descriptor another thread is blocked on is racy; a flag is not).
    """

    def __init__(self, fd: int, name: str) -> None:
        super().__init__()
        self.fd = fd
        self._name = name
        self.bytes_read = 0
        self.eof = False
        self._abort = threading.Event()

    @property
    def name(self) -> str:
        return self._name

    def readable(self) -> bool:
        return True

    def _check(self) -> None:
        if self._abort.is_set():
            raise CaptureInterrupted("the capture was aborted")
        if self.fd < 0:
            raise ValueError("read from a closed dump stream")

    def readinto(self, buffer: Any) -> int:
        self._check()
        n = os.readv(self.fd, [buffer])
        if n == 0:
            self.eof = True
        self.bytes_read += n
        return n

    def read(self, size: int = -1) -> bytes:
        """One read(2): a single copy (RawIOBase.read would copy twice)."""
        if size < 0:
            return self.readall()
        self._check()
        data = os.read(self.fd, size)
        if not data:
            self.eof = True
        self.bytes_read += len(data)
        return data

    read1 = read

    def abort(self) -> None:
        self._abort.set()

    def drain(self) -> int:
        """Read to EOF, discarding; returns how many bytes were left."""
        left = 0
        while self.fd >= 0:
            chunk = os.read(self.fd, 1 << 20)
            if not chunk:
                self.eof = True
                break
            left += len(chunk)
        self.bytes_read += left
        return left

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        super().close()


def spool_file(directory: str, need: int | None) -> int:
    """An anonymous 0600 file in ``directory``: O_TMPFILE, else created and unlinked at once.

    Nothing is left behind even if we are killed. ``need`` bytes must fit on the filesystem.
    """
    if not os.path.isdir(directory):
        raise UsageError(f"spool directory {directory} does not exist")
    if need is not None:
        free = shutil.disk_usage(directory).free
        if free < need:
            raise UsageError(f"spool directory {directory} has {free >> 20} MiB free, "
                             f"the guest's dump needs about {need >> 20} MiB")
    try:
        return os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise DumpWriteError.from_oserror(err, directory) from err
    fd, path = tempfile.mkstemp(prefix=".kdumpling-spool-", dir=directory)
    os.unlink(path)
    return fd


def copy_to_spool(stream: DumpStream, spool_fd: int,
                  progress: Callable[[int], None] | None = None) -> int:
    """Copy the whole stream into the spool file with splice(2) (no copy through Python)."""
    total = 0
    while True:
        if stream._abort.is_set():
            raise CaptureInterrupted("the capture was aborted")
        try:
            n = os.splice(stream.fd, spool_fd, 1 << 20)
        except OSError as err:
            if err.errno in (errno.EINVAL, errno.ENOSYS):  # filesystem without splice support
                data = os.read(stream.fd, 1 << 20)
                n = len(data)
                if n:
                    os.write(spool_fd, data)
            else:
                raise DumpWriteError.from_oserror(err, "spool file") from err
        if n == 0:
            stream.eof = True
            break
        total += n
        stream.bytes_read += n
        if progress:
            progress(total)
    return total


def image_from_stream(stream: DumpStream) -> tuple[CoreImage, list[str]]:
    """The CoreImage of an ELF vmcore arriving on a stream (segments read it sequentially)."""
    from kdumpling.reader import open_elf_stream

    reader = open_elf_stream(cast(BinaryIO, stream), name=stream.name)
    return reader.image, reader.warnings


def image_from_spool(spool_fd: int, name: str) -> tuple[CoreImage, list[str], Any]:
    """The CoreImage of the ELF vmcore in a spool file (random access through the reader)."""
    from kdumpling.reader import open_dump

    # /proc/self/fd/N opens the unlinked file again, with its own file offset.
    try:
        dump = open_dump(f"/proc/self/fd/{spool_fd}")
    except FormatError as err:
        raise FormatError(f"{name}: {err}", err.offset) from err
    image = dump.to_image()
    image.extra["source"] = name
    return image, list(getattr(dump, "warnings", [])), dump
