"""What the guest collectors (QMP, libvirt) share: the dump stream, the spool file, and the
collector skeleton around them.

QEMU writes its ELF dump front to back with plain write() calls and never seeks, into a pipe
(QMP getfd) or a FIFO (libvirt's iohelper). The guest stays paused until the last byte has been
read, so the stream is either converted on the fly (pause = conversion time, no copy on disk) or
first spooled (pause = reading the stream; zero pages stay holes) and converted afterwards.
QEMU's own kdump-zlib arrives as a flattened stream and is always spooled (rebuilt) first.

A stream that ends before the end its ELF program headers promise (QEMU died, the dump failed)
keeps every byte that arrived: the rest reads as zeros for the writer, is named in
``image.missing`` (the output is marked incomplete) and in a warning, and the spool leaves it
out altogether.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, BinaryIO, cast

from kdumpling.errors import (
    CaptureInterrupted,
    DumpWriteError,
    FormatError,
    KdumplingError,
    UsageError,
)
from kdumpling.image import CoreImage

from .base import GUEST_DUMP_FORMATS, Snapshot
from .convert import cut_out, missing_warning

HEAD_KEEP = 1 << 20  # the stream's first bytes, kept to map a short stream back to addresses


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
        self.head = bytearray()
        # Where the ELF headers say the memory data ends; a stream ending before it is padded
        # with zeros up to there (``padded``) and ``on_short`` hears where it ended.
        self.expect_end: int | None = None
        self.short_at: int | None = None
        self.padded = 0
        self.on_short: Callable[[int], None] | None = None

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

    def _keep(self, data: Any) -> None:
        if len(self.head) < HEAD_KEEP:
            self.head += bytes(data[: HEAD_KEEP - len(self.head)])

    def _pad(self, want: int) -> int:
        """At EOF: how many zero bytes stand in for memory data QEMU never wrote."""
        if self.expect_end is None:
            return 0
        n = min(want, self.expect_end - self.bytes_read - self.padded)
        if n <= 0:
            return 0
        if self.short_at is None:
            self.short_at = self.bytes_read
            if self.on_short is not None:
                self.on_short(self.short_at)
        self.padded += n
        return n

    def readinto(self, buffer: Any) -> int:
        self._check()
        n = os.readv(self.fd, [buffer])
        if n == 0:
            view = memoryview(buffer).cast("B")
            pad = self._pad(len(view))
            if pad:
                view[:pad] = bytes(pad)
                return pad
            self.eof = True
        else:
            self._keep(memoryview(buffer).cast("B")[:n])
        self.bytes_read += n
        return n

    def read(self, size: int = -1) -> bytes:
        """One read(2): a single copy (RawIOBase.read would copy twice)."""
        if size < 0:
            return self.readall()
        self._check()
        data = os.read(self.fd, size)
        if not data:
            pad = self._pad(size)
            if pad:
                return bytes(pad)
            self.eof = True
        else:
            self._keep(data)
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


def _elf_loads(head: bytes, name: str) -> list[tuple[int, int, int]]:
    """(p_offset, p_filesz, p_paddr) of every PT_LOAD with data, from the stream's head."""
    from kdumpling import layout
    from kdumpling.read_elf import parse_ehdr

    ehdr = parse_ehdr(head[: layout.EHDR_SIZE], name)
    phnum = ehdr.phnum
    if phnum == layout.PN_XNUM and ehdr.shoff + layout.SHDR_SIZE <= len(head):
        phnum = layout.SHDR[ehdr.endian].unpack_from(head, ehdr.shoff)[7]  # sh_info
    loads = []
    for i in range(phnum):
        at = ehdr.phoff + i * layout.PHDR_SIZE
        if at + layout.PHDR_SIZE > len(head):
            break
        p_type, _, off, _, paddr, filesz, _, _ = layout.PHDR[ehdr.endian].unpack_from(head, at)
        if p_type == layout.PT_LOAD and filesz:
            loads.append((off, filesz, paddr))
    return loads


def watch_short_stream(stream: DumpStream, image: CoreImage) -> None:
    """Arm ``stream`` so that ending before its last PT_LOAD's data pads with zeros and puts
    the physical ranges it never delivered into ``image.missing`` (writers read that list
    when they finish)."""
    loads = _elf_loads(bytes(stream.head), stream.name)
    if not loads:
        return
    stream.expect_end = max(off + size for off, size, _ in loads)

    def short(at: int) -> None:
        lost = sorted((paddr + max(off, at) - off, paddr + size)
                      for off, size, paddr in loads if off + size > at)
        image.missing.extend(lost)

    stream.on_short = short


def short_stream_warning(stream: DumpStream, missing: list[tuple[int, int]]) -> str:
    return (f"the dump stream ended after {stream.short_at} of {stream.expect_end} bytes: "
            + missing_warning(missing, "guest memory"))


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


def spool_sparse(stream: DumpStream, spool_fd: int) -> tuple[int, list[str],
                                                             list[tuple[int, int]]]:
    """Copy the ELF vmcore arriving on ``stream`` into the spool file, zero pages left as holes.

    The copy is our own ELF of the same image (notes, PT_LOADs, addresses), written with dump
    level 1, so a mostly free guest costs a fraction of its size in the spool and the guest's
    pause is the time to read the stream and find its zero pages, without compressing.
    Returns the bytes read from the stream, the stream reader's warnings and the physical
    ranges the stream ended before (holes in the spool, not memory).
    """
    from kdumpling.dump import write_dump

    image, warnings = image_from_stream(stream)
    watch_short_stream(stream, image)
    with os.fdopen(os.dup(spool_fd), "r+b", buffering=0) as spool:
        try:
            write_dump(image, spool, format="elf", dump_level=1)
        except OSError as err:
            raise DumpWriteError.from_oserror(err, "spool file") from err
    # QEMU >= 7.2 ends its ELF with the section-name string table (dump/dump.c
    # prepare_elf_section_hdrs): a few bytes nobody needs, but QEMU must get to write them.
    stream.drain()
    return stream.bytes_read, warnings, list(image.missing)


def image_from_stream(stream: DumpStream) -> tuple[CoreImage, list[str]]:
    """The CoreImage of an ELF vmcore arriving on a stream (segments read it sequentially)."""
    from kdumpling.reader import open_elf_stream

    reader = open_elf_stream(cast(BinaryIO, stream), name=stream.name)
    return reader.image, reader.warnings


def image_from_spool(spool_fd: int, name: str) -> tuple[CoreImage, list[str], list[str], Any]:
    """The CoreImage of the dump in a spool file (random access through the reader), with
    phys_base taken from VMCOREINFO as the converter does (QEMU's kdump header misparses it:
    expected, so the fixes come apart from the warnings). Returns image, warnings, fixes and
    the open dump (the image reads it)."""
    from kdumpling.reader import open_dump

    from .convert import image_of_dump

    # /proc/self/fd/N opens the unlinked file again, with its own file offset.
    try:
        dump = open_dump(f"/proc/self/fd/{spool_fd}")
    except FormatError as err:
        raise FormatError(f"{name}: {err}", err.offset) from err
    try:
        image, _meta, warnings, fixes = image_of_dump(dump)
    except BaseException:
        dump.close()
        raise
    image.extra["source"] = name
    return image, warnings, fixes, dump


def spool_flattened(stream: DumpStream, spool_fd: int) -> tuple[int, list[str],
                                                                list[tuple[int, int]]]:
    """Rebuild QEMU's flattened kdump stream (its kdump-* formats) in the spool file; returns
    the bytes read, warnings and missing ranges (none: the rebuilt file is read and checked
    afterwards, the reader names what it lacks)."""
    from kdumpling.reader import reassemble_flattened_into

    try:
        reassemble_flattened_into(cast(BinaryIO, stream), spool_fd, "spool file")
    except FormatError as err:
        raise FormatError(f"{stream.name}: {err}", err.offset) from err
    stream.drain()
    return stream.bytes_read, [], []


class StreamedDumpCollector:
    """What the QMP and libvirt collectors share: a dump read from a stream, or spooled first.

    Subclasses start the dump in ``_enter`` (which calls ``_read_dump``), say in
    ``_dump_finished`` how to wait for its end and what the pause was, and release their own
    resources in ``_cleanup`` around ``_end_stream`` and ``_close_spool``.
    """

    def __init__(self, spool: str | None, dump_format: str = "elf") -> None:
        if dump_format not in GUEST_DUMP_FORMATS:
            raise UsageError(f"unknown guest dump format {dump_format!r}; choose one of "
                             f"{', '.join(GUEST_DUMP_FORMATS)}")
        if dump_format != "elf" and spool is None:
            raise UsageError(f"a {dump_format} capture needs a spool directory: QEMU writes it "
                             "as a flattened stream that is rebuilt before it can be read")
        self.spool = spool
        self.dump_format = dump_format
        self._stream: DumpStream | None = None
        self._spool_fd = -1
        self._spool_dump: Any = None
        self._snapshot: Snapshot | None = None

    def __enter__(self) -> Snapshot:
        try:
            return self._enter()
        except BaseException:
            self._cleanup(failed=True)
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._cleanup(failed=exc is not None)

    def abort(self) -> None:
        """Stop the capture from another thread: the next read raises CaptureInterrupted."""
        if self._stream is not None:
            self._stream.abort()

    def _enter(self) -> Snapshot:
        raise NotImplementedError

    def _cleanup(self, *, failed: bool) -> None:
        raise NotImplementedError

    def _dump_finished(self) -> float | None:
        """After the whole stream was spooled: wait for the dump's end, return the pause."""
        raise NotImplementedError

    def _open_spool(self, need: int | None) -> None:
        if self.spool is not None:
            self._spool_fd = spool_file(self.spool, need)

    def _read_dump(self, target: str, meta: dict[str, object]) -> Snapshot:
        """The Snapshot: segments that read the stream, or (spool) the spooled copy."""
        assert self._stream is not None
        if self.spool is None:
            image, warnings = image_from_stream(self._stream)
            watch_short_stream(self._stream, image)
            snap = Snapshot(image, target, meta=meta, warnings=warnings)
        else:
            t0 = time.monotonic()
            spool = spool_sparse if self.dump_format == "elf" else spool_flattened
            meta["stream_bytes"], warnings, lost = spool(self._stream, self._spool_fd)
            meta["spool_copy_seconds"] = time.monotonic() - t0
            meta["spool_bytes"] = os.fstat(self._spool_fd).st_blocks * 512
            self._stream.close()
            pause, failure = None, None
            try:
                pause = self._dump_finished()
            except KdumplingError as err:
                failure = err
            try:
                image, spool_warnings, fixes, self._spool_dump = image_from_spool(
                    self._spool_fd, target)
            except KdumplingError as err:
                if failure is not None:
                    raise failure from err  # QEMU's word on why the spool is unreadable
                raise
            if failure is not None:
                # QEMU failed part way: what arrived is kept when the stream shows the gap
                # (ELF cut short, or a rebuilt kdump lacking pages), else it is an error
                if not (lost or image.missing):
                    raise failure
                warnings.append(f"{failure}; kept what arrived")
            if lost:  # holes in the spool: left out, named
                cut_out(image, lost)
                image.missing[:] = sorted({*image.missing, *lost})
                warnings.append(short_stream_warning(self._stream, lost))
                spool_warnings = [w for w in spool_warnings if "INCOMPLETE" not in w]
            if fixes:
                meta["fixes"] = fixes  # QEMU's known header mistakes: expected, not warnings
            snap = Snapshot(image, target, pause_seconds=pause, meta=meta,
                            warnings=warnings + spool_warnings)
        self._snapshot = snap
        return snap

    def _dump_failure_kept(self, err: KdumplingError) -> bool:
        """QEMU failed the dump after its stream ended short: what arrived was written and the
        rest is named missing, so the failure becomes a warning (True) instead of an error."""
        stream, snap = self._stream, self._snapshot
        if stream is None or stream.short_at is None or snap is None:
            return False
        snap.warnings.append(f"{err}; kept what arrived")
        return True

    def _note_short_stream(self) -> None:
        """Stream mode: name what the stream did not deliver (the writer has finished)."""
        stream, snap = self._stream, self._snapshot
        if stream is not None and stream.short_at is not None and snap is not None \
                and self.spool is None:
            snap.warnings.append(short_stream_warning(stream, snap.image.missing))

    def _end_stream(self, *, drain: bool) -> None:
        """Read what is left (a whole dump) or close early (the writer then gets EPIPE)."""
        stream = self._stream
        if stream is None or stream.fd < 0:
            return
        if drain:
            # QEMU >= 7.2 ends its ELF with the section-name string table
            # (dump/dump.c prepare_elf_section_hdrs): a few bytes nobody needs.
            left = stream.drain()
            if self._snapshot is not None:
                self._snapshot.meta["trailing_bytes"] = left
        stream.close()

    def _close_spool(self) -> None:
        if self._spool_dump is not None:
            self._spool_dump.close()
            self._spool_dump = None
        if self._spool_fd >= 0:
            os.close(self._spool_fd)
            self._spool_fd = -1
