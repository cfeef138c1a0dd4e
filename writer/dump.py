"""``write_dump``: the one entry point that turns a CoreImage into a file or a stream."""

from __future__ import annotations

import contextlib
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import BinaryIO

from .codecs import DEFAULT_LEVEL, CompressionType, check_level, parse_compression
from .diskdump import write_kdump
from .elf import write_elf
from .errors import DumpWriteError, EmptyDumpWarning, UsageError, warn
from .image import CoreImage
from .sinks import FileSink, FlattenedSink, Sink, StreamSink

INCOMPLETE_SUFFIX = ".incomplete"


class OutputFormat(Enum):
    """Output file formats (seed API names kept)."""

    ELF = "elf"
    KDUMP_COMPRESSED = "kdump"
    KDUMP_FLATTENED = "kdump-flat"  # makedumpfile -F: for pipes and stdout

    @classmethod
    def parse(cls, value: str | OutputFormat) -> OutputFormat:
        if isinstance(value, OutputFormat):
            return value
        for member in cls:
            if value.lower() in (member.value, member.name.lower()):
                return member
        names = ", ".join(m.value for m in cls)
        raise UsageError(f"unknown format {value!r}; choose one of {names}")


@dataclass
class WriteResult:
    path: str | None
    format: OutputFormat
    compression: CompressionType
    bytes_in: int  # memory bytes described by the dump
    bytes_out: int  # size of the file or stream written
    elapsed: float
    pages: int = 0
    zero_pages: int = 0
    compressed_pages: int = 0
    raw_pages: int = 0
    # CoreImage.missing as it stood when the dump was finished: non-empty means the output is
    # marked incomplete (kdump status DUMP_DH_COMPRESSED_INCOMPLETE, ELF e_flags bit 0x1).
    missing: list[tuple[int, int]] = field(default_factory=list)
    # write_dump(sha256=True): the sha256 (hex) of every byte written (a flattened stream's
    # bytes as sent), hashed while writing; None when not asked for or not computable.
    sha256: str | None = None
    # The output is marked incomplete: ``missing`` is not empty, or the image said its source
    # lacks data it cannot name (CoreImage.incomplete).
    incomplete: bool = False


ProgressCallback = Callable[[int, int], None]


def write_dump(
    image: CoreImage,
    output: str | os.PathLike[str] | BinaryIO | Sink,
    *,
    format: OutputFormat | str = OutputFormat.ELF,
    compression: CompressionType | str | int = CompressionType.ZLIB,
    compression_level: int = DEFAULT_LEVEL,
    dump_level: int = 0,
    threads: int | None = None,
    progress: ProgressCallback | None = None,
    fsync: bool = True,
    mode: int = 0o600,
    sha256: bool = False,
) -> WriteResult:
    """Write ``image`` to ``output``.

    A path is written as ``PATH.incomplete`` (created 0600, never through a symlink), flushed
    and renamed into place; on any failure, interruption included, the partial file is removed,
    so a path either holds a whole dump or nothing. A binary stream receives ELF or flattened
    kdump sequentially (stdout, a pipe, a socket); KDUMP_COMPRESSED needs a seekable file.
    ``compression`` and ``compression_level`` apply to the kdump formats only; the level is
    1-9 whatever the format (a ValueError otherwise), default 6 as in the seed. zlib level 1 is
    the fast path (makedumpfile -c's size); 2-9 are zlib's own levels; zstd maps 1-9 onto its
    levels; lzo and snappy have none (see ``PageCodec``). ``dump_level`` bit 1 (makedumpfile -d 1)
    stores every zero page as one shared page (kdump) or as holes (ELF). ``sha256``: hash the
    output while it is written (``WriteResult.sha256``; kdumpling.digest), on a second thread.
    """
    fmt = OutputFormat.parse(format)
    ctype = parse_compression(compression)
    check_level(compression_level)
    if fmt is OutputFormat.ELF:
        ctype = CompressionType.NONE
    if dump_level not in (0, 1):
        # Bits 2..16 need the dumped kernel's struct page array (makedumpfile
        # __exclude_unnecessary_pages); recording them without excluding would mislead readers.
        raise UsageError(
            f"dump level {dump_level} is not supported: only 0 and 1 (exclude zero pages); "
            "use makedumpfile on the result for page-cache, user or free page filtering"
        )
    if threads is not None and threads < 1:
        raise UsageError("threads must be at least 1")
    if not image.segments:
        # Valid in every format (the seed wrote such files), but almost always a mistake.
        what = "notes only" if image.notes else "nothing at all"
        warn(f"writing a {image.kind.value} dump without memory ({what}): readers will find "
             "no pages", EmptyDumpWarning)

    total = image.memory_size
    done = 0

    def step(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(min(done, total), total)

    started = time.monotonic()
    if isinstance(output, str | os.PathLike):
        path = os.fspath(output)
        result = _write_path(image, path, fmt, ctype, compression_level, dump_level, threads,
                             step, fsync, mode, sha256)
    else:
        path = None
        # A Sink given by the caller (e.g. sink_parts.PartsSink for object storage) is used as
        # it is: positioned writes, finished here, closed on errors.
        sink = output if isinstance(output, Sink) else _stream_sink(output, fmt)
        try:
            if sha256:
                sink.start_digest()
            result = _run(image, sink, fmt, ctype, compression_level, dump_level, threads, step)
            sink.finish()
            result.sha256 = sink.finish_digest()
            if isinstance(sink, FileSink) and not isinstance(output, Sink):
                output.seek(0, os.SEEK_END)
        finally:
            sink.close()
            sink.stop_digest()
    result.path = path
    result.elapsed = time.monotonic() - started
    return result


def _stream_sink(stream: BinaryIO, fmt: OutputFormat) -> Sink:
    name = getattr(stream, "name", "<stream>")
    name = name if isinstance(name, str) else "<stream>"
    if fmt is OutputFormat.KDUMP_FLATTENED:
        return FlattenedSink(stream, name)
    try:
        seekable = stream.seekable()
        fd = stream.fileno()
        # Holes and positioned writes only in an empty regular file: anywhere else a hole would
        # leave old data behind (a block device, a file opened without truncation).
        st = os.fstat(fd)
        at_start = (seekable and stream.tell() == 0 and stat.S_ISREG(st.st_mode)
                    and st.st_size == 0)
    except (OSError, AttributeError, ValueError):
        seekable = at_start = False
    if fmt is OutputFormat.ELF:
        if at_start:
            # As for a path: positioned writes, zero pages as holes, copy_file_range. The
            # stream's position is moved to the end after.
            stream.flush()
            return FileSink(fd, name)
        return StreamSink(stream, name)
    if not seekable:
        raise UsageError("the kdump format needs a seekable file; use kdump-flat for streams")
    stream.flush()
    return FileSink(fd, name)


def _run(image: CoreImage, sink: Sink, fmt: OutputFormat, ctype: CompressionType, level: int,
         dump_level: int, threads: int | None, step: Callable[[int], None]) -> WriteResult:
    try:
        if fmt is OutputFormat.ELF:
            write_elf(image, sink, zero_holes=True if dump_level & 1 and sink.supports_holes
                      else None, progress=step)
            result = WriteResult(None, fmt, ctype, image.memory_size, sink.size, 0.0)
        else:
            stats = write_kdump(image, sink, compression=ctype, level=level,
                                dump_level=dump_level, threads=threads, progress=step)
            result = WriteResult(None, fmt, ctype, image.memory_size, sink.size, 0.0,
                                 stats.pages, stats.zero_pages, stats.compressed_pages,
                                 stats.raw_pages)
    finally:
        for seg in image.segments:
            seg.source.close()
    result.missing = list(image.missing)
    result.incomplete = bool(image.missing) or image.incomplete
    if fmt is OutputFormat.KDUMP_FLATTENED:
        # The stream also carries the 4 KiB header, 16 bytes per record and the end marker.
        result.bytes_out = sink.bytes_written
    return result


def _write_path(image: CoreImage, path: str, fmt: OutputFormat, ctype: CompressionType,
                level: int, dump_level: int, threads: int | None, step: Callable[[int], None],
                fsync: bool, mode: int, sha256: bool) -> WriteResult:
    sink: Sink | None = None
    try:
        with atomic_output(path, mode, fsync=fsync) as fd:
            try:
                if fmt is OutputFormat.KDUMP_FLATTENED:
                    stream = os.fdopen(os.dup(fd), "wb", buffering=1 << 20)
                    try:
                        sink = FlattenedSink(stream, path + INCOMPLETE_SUFFIX)
                        if sha256:
                            sink.start_digest()
                        result = _run(image, sink, fmt, ctype, level, dump_level, threads, step)
                        sink.finish()
                    finally:
                        stream.close()
                else:
                    # writeback: the kernel writes the file out behind us, the fsync waits
                    # less. Not with a digest: it hashes after the writing, while the fsync
                    # runs, and takes longer than it, so early writeback only took CPU from the
                    # writing (a 1 GiB process's pause +0.12 s, bench_process.py).
                    sink = FileSink(fd, path + INCOMPLETE_SUFFIX,
                                    writeback=fsync and not sha256)
                    if sha256:
                        sink.start_digest()
                    result = _run(image, sink, fmt, ctype, level, dump_level, threads, step)
                    sink.finish()
                result.bytes_out = os.fstat(fd).st_size
            except BaseException:
                if sink is not None:
                    sink.close()  # no write-behind thread may touch fd after it is closed
                raise
        # After the fsync, which the digest thread overlapped (it reads its own descriptor).
        assert sink is not None
        result.sha256 = sink.finish_digest()
    finally:
        if sink is not None:
            sink.stop_digest()
    return result


@contextlib.contextmanager
def atomic_output(path: str, mode: int = 0o600, *, fsync: bool = True) -> Iterator[int]:
    """A descriptor on ``PATH.incomplete`` (created with ``mode``, never through a symlink);
    when the block ends it is fsynced, renamed to ``path`` and the directory fsynced, and when
    the block raises it is removed. Every file writer goes through here."""
    tmp = path + INCOMPLETE_SUFFIX
    # read-write: the writer's digest reads back what it could not hash as it went
    flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, mode)
    except OSError as err:
        raise DumpWriteError.from_oserror(err, tmp) from err
    try:
        yield fd
        if fsync:
            os.fsync(fd)
        os.close(fd)
        fd = -1
        os.rename(tmp, path)
        if fsync:
            _fsync_dir(os.path.dirname(os.path.abspath(path)))
    except BaseException as exc:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise DumpWriteError.from_oserror(exc, path) from exc
        raise


def _fsync_dir(path: str) -> None:
    try:
        dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
