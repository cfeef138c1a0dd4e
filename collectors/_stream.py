"""What the guest collectors (QMP, libvirt) share: the dump stream, the spool file, and the
collector skeleton around them.

QEMU writes its ELF dump front to back with plain write() calls and never seeks, into a pipe
(QMP getfd) or a FIFO (libvirt's iohelper). The guest stays paused until the last byte has been
read, so the stream is either converted on the fly (pause = conversion time, no copy on disk) or
first spooled (pause = reading the stream; zero pages stay holes) and converted afterwards.
QEMU's own kdump-zlib arrives as a flattened stream and is always spooled (rebuilt) first.

A stream that ends before the end its ELF program headers promise (QEMU died, the dump failed)
keeps every byte that arrived: the stream reader (kdumpling.read_stream) names the rest in
``image.missing`` (the output is marked incomplete; in stream mode it reads as zeros, the spool
leaves it out altogether), and the Snapshot's warning names the ranges. A kdump-zlib stream cut
short leaves a rebuilt file whose reader names what it lacks.
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
from types import TracebackType
from typing import TYPE_CHECKING, Any, BinaryIO, cast

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

if TYPE_CHECKING:
    from kdumpling.reader import ElfStreamReader


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


def short_stream_warning(ended_at: int, missing: list[tuple[int, int]]) -> str:
    """The one line on an ELF stream that ended at byte ``ended_at``, before the data its
    program headers promise: it names every range missing (the stream reader's own line names
    only the first, and is left out for this one)."""
    return (f"the dump stream ended after {ended_at} bytes: "
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
                                                             list[tuple[int, int]], str | None]:
    """Copy the ELF vmcore arriving on ``stream`` into the spool file, zero pages left as holes.

    The copy is our own ELF of the same image (notes, PT_LOADs, addresses), written with dump
    level 1, so a mostly free guest costs a fraction of its size in the spool and the guest's
    pause is the time to read the stream and find its zero pages, without compressing.
    Returns the bytes read from the stream, the stream reader's warnings, the physical ranges
    the stream ended before (the reader's ``image.missing``: holes in the spool, not memory)
    and, when it did, the warning naming them.
    """
    from kdumpling.dump import write_dump

    reader = elf_stream_reader(stream)
    warnings = list(reader.warnings)  # before the data: a cut gets short_stream_warning
    with os.fdopen(os.dup(spool_fd), "r+b", buffering=0) as spool:
        try:
            write_dump(reader.image, spool, format="elf", dump_level=1)
        except OSError as err:
            raise DumpWriteError.from_oserror(err, "spool file") from err
    # QEMU >= 7.2 ends its ELF with the section-name string table (dump/dump.c
    # prepare_elf_section_hdrs): a few bytes nobody needs, but QEMU must get to write them.
    stream.drain()
    lost = list(reader.image.missing)
    cut = short_stream_warning(reader.ended_at, lost) \
        if reader.ended_at is not None and lost else None
    return stream.bytes_read, warnings, lost, cut


def elf_stream_reader(stream: DumpStream) -> ElfStreamReader:
    """The reader of an ELF vmcore arriving on a stream: its ``image``'s segments read the
    stream sequentially, and a stream ending early is named in ``image.missing``."""
    from kdumpling.reader import open_elf_stream

    return open_elf_stream(cast(BinaryIO, stream), name=stream.name)


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
                                                                list[tuple[int, int]], str | None]:
    """Rebuild QEMU's flattened kdump stream (its kdump-* formats) in the spool file; returns
    the bytes read, warnings, missing ranges (none: the rebuilt file is read afterwards, its
    reader names what it lacks) and, for a stream that ended before its end marker, what the
    rebuild said (the spool holds every byte that arrived, of a cut record too)."""
    from kdumpling.reader import reassemble_flattened_into

    cut = None
    try:
        reassemble_flattened_into(cast(BinaryIO, stream), spool_fd, "spool file")
    except FormatError as err:
        if not stream.eof:
            raise FormatError(f"{stream.name}: {err}", err.offset) from err  # not a cut
        cut = f"{stream.name}: {err}"
    stream.drain()
    return stream.bytes_read, [], [], cut


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
        self._reader: ElfStreamReader | None = None  # stream mode: the stream's reader
        self._spool_cut = False  # spool mode: the stream ended before the data it promised

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
            reader = self._reader = elf_stream_reader(self._stream)
            # A copy: the reader's own line on a cut (added while the writer reads) gives way
            # to short_stream_warning (_note_short_stream), which names every range.
            snap = Snapshot(reader.image, target, meta=meta, warnings=list(reader.warnings))
        else:
            t0 = time.monotonic()
            spool = spool_sparse if self.dump_format == "elf" else spool_flattened
            meta["stream_bytes"], warnings, lost, cut = spool(self._stream, self._spool_fd)
            self._spool_cut = cut is not None
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
                if cut is not None:
                    raise FormatError(f"{cut}; what arrived cannot be read: {err}") from err
                raise
            if failure is not None:
                # QEMU failed part way: what arrived is kept when the stream shows the gap
                # (ELF cut short, or a kdump stream cut or rebuilt without some pages), else
                # it is an error
                if not (lost or image.missing or cut):
                    raise failure
                warnings.append(f"{failure}; kept what arrived")
            if lost:  # holes in the spool: left out, named
                cut_out(image, lost)
                image.missing[:] = sorted({*image.missing, *lost})
                spool_warnings = [w for w in spool_warnings if "INCOMPLETE" not in w]
            if cut is not None:
                # The rebuilt kdump file cannot say that its stream was cut: its reader names
                # the pages it lacks (image.missing), and the image says incomplete besides.
                image.incomplete = True
                warnings.append(cut)
            if fixes:
                meta["fixes"] = fixes  # QEMU's known header mistakes: expected, not warnings
            snap = Snapshot(image, target, pause_seconds=pause, meta=meta,
                            warnings=warnings + spool_warnings)
        self._snapshot = snap
        return snap

    def _dump_failure_kept(self, err: KdumplingError) -> bool:
        """QEMU failed the dump after its stream ended short: what arrived was written and the
        rest is named missing, so the failure becomes a warning (True) instead of an error."""
        if self._snapshot is None or not self._stream_cut():
            return False
        self._snapshot.warnings.append(f"{err}; kept what arrived")
        return True

    def _stream_cut(self) -> bool:
        """The stream ended before the data it promised; what arrived was kept, the rest
        named."""
        reader = self._reader
        if reader is not None:
            return reader.ended_at is not None and bool(reader.image.missing)
        return self._spool_cut

    def _note_short_stream(self) -> None:
        """Stream mode: name what the stream did not deliver (the writer has finished)."""
        reader, snap = self._reader, self._snapshot
        if reader is not None and reader.ended_at is not None and snap is not None \
                and snap.image.missing:
            snap.warnings.append(short_stream_warning(reader.ended_at, snap.image.missing))

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
