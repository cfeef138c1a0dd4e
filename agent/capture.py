"""One capture, end to end: collector -> write_dump -> sha256 -> record -> retention.

Shared by ``capture``/``convert`` on the command line and by the service, so both write, name,
record and prune snapshots the same way. Cancellation is cooperative (agent/cancel.py): nothing
half-written is left, and the target is released on every path.

The steps, in order (``_capture_once``): open the target's collector; reserve the store name
before the collector stops the target (the record's fsyncs stay out of the pause); enter the
collector and write the dump; leave it (the target runs again); hash the dump; build the record;
commit it and apply retention.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import BinaryIO, cast

from kdumpling import OutputFormat, WriteResult, write_dump
from kdumpling.collectors.base import Snapshot
from kdumpling.errors import DumpWriteError, FormatError, KdumplingError, UsageError
from kdumpling.image import CoreImage, DumpKind
from kdumpling.notes import (
    DEFAULT_NOTE_VENDOR,
    CustomNoteType,
    Note,
    annotations_text,
    parse_annotations,
)
from kdumpling.sinks import Sink

from .log import get_logger
from .record import CaptureResult, SnapshotRecord, UnreadableRange, iso_time
from .settings import CaptureSettings, Destination
from .store import Reservation, SnapshotStore
from .targets import Opened, Target


class TargetBusyError(KdumplingError):
    """Another capture of the same target is still running (EX_TEMPFAIL)."""

    exit_code = 75


EXTENSIONS = {("elf", DumpKind.PROCESS): "core", ("elf", DumpKind.KERNEL): "vmcore",
              ("kdump", DumpKind.PROCESS): "kdump", ("kdump", DumpKind.KERNEL): "kdump",
              ("kdump-flat", DumpKind.PROCESS): "kdump-flat",
              ("kdump-flat", DumpKind.KERNEL): "kdump-flat"}


def with_annotations(image: CoreImage, extra: dict[str, str]) -> tuple[CoreImage, dict[str, str]]:
    """Merge ``extra`` into the image's KDUMPLING annotations note (one note, appended last)."""
    merged: dict[str, str] = {}
    notes: list[Note] = []
    for note in image.notes:
        if note.name == DEFAULT_NOTE_VENDOR and note.type == CustomNoteType.ANNOTATIONS:
            merged.update(parse_annotations(note.desc))
        else:
            notes.append(note)
    merged.update(extra)
    if not merged:
        return image, merged
    for key in merged:
        if not key or "=" in key or "\n" in key or "\n" in merged[key]:
            raise UsageError(f"annotation key {key!r} must be non-empty, without '=' or newlines")
    notes.append(Note(DEFAULT_NOTE_VENDOR, int(CustomNoteType.ANNOTATIONS),
                      annotations_text(merged)))
    return dataclasses.replace(image, notes=notes), merged


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(4 << 20)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


class HashingWriter:
    """A write-only binary stream that hashes what passes through (for ``-o -``)."""

    name = "<stdout>"

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.sha = hashlib.sha256()
        self.count = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.sha.update(data)
        self.count += len(data)
        self.raw.write(data)
        return len(data)

    def flush(self) -> None:
        self.raw.flush()

    def seekable(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.raw.fileno()


def _nospace(err: BaseException) -> bool:
    return isinstance(err, DumpWriteError) and err.errno in (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Block SIGTERM/SIGINT/SIGHUP while a record is written (it must land whole)."""
    sigs = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def capture(target: Target, dest: Destination, settings: CaptureSettings) -> CaptureResult:
    """Capture ``target`` into ``dest``; the result is what ``--json`` prints.

    Raises KdumplingError subclasses; the result's ``exit_code`` is 1 when the dump was written
    with warnings (unreadable ranges, truncated), else 0. Into a store, the target is locked
    against overlapping captures, and a full disk costs the target's oldest snapshot and one
    retry.
    """
    if dest.store is None:
        return _capture_once(target, dest, settings)
    store = dest.store
    with store.lock_target(target.key) as locked:
        if not locked:
            raise TargetBusyError(f"a capture of {target.label} is already running")
        pruned: list[str] = []
        attempts = 2 if settings.retry_on_full else 1
        for attempt in range(attempts):
            try:
                result = _capture_once(target, dest, settings)
            except DumpWriteError as err:
                if not _nospace(err):
                    raise
                if attempt + 1 < attempts:
                    victim = store.prune_oldest_of(target.key)
                    if victim is not None:
                        pruned.append(victim.id)
                        get_logger().warning(
                            "%s: disk full; removed the oldest snapshot of this target (%s) "
                            "and retrying", target.label, victim.id)
                        continue
                extra = f"; removed {', '.join(pruned)}" if pruned else ""
                raise DumpWriteError(f"{err}{extra}", err.path, err.errno) from err
            result.pruned = pruned + result.pruned
            return result
    raise AssertionError("unreachable: the last attempt returns or raises")


class _Output:
    """Where one capture's dump goes: a reserved store name, a file, or a hashed stream."""

    def __init__(self, target: Target, dest: Destination, settings: CaptureSettings,
                 started: float) -> None:
        self.target, self.dest, self.settings, self.started = target, dest, settings, started
        self.res: Reservation | None = None
        self.hasher: HashingWriter | None = None

    @property
    def store(self) -> SnapshotStore | None:
        return self.dest.store

    def _reserve(self, kind: DumpKind) -> None:
        assert self.store is not None
        ext = EXTENSIONS[(self.settings.options.format_for(kind, False).value, kind)]
        self.res = self.store.reserve(
            self.target.key, ext,
            SnapshotRecord(target=self.target.label, type=self.target.type_name),
            when=self.started)

    def reserve_early(self) -> None:
        """Before the collector stops the target, when its kind is known already."""
        if self.store is not None and self.target.kind is not None:
            self._reserve(self.target.kind)

    def open(self, kind: DumpKind) -> str | BinaryIO | Sink:
        """What write_dump writes to, for a dump of ``kind``."""
        if self.store is not None:
            if self.res is None or self.target.kind is not kind:
                self.abandon()
                self._reserve(kind)
            assert self.res is not None
            # an object store streams the dump into its upload; a directory takes a file
            return self.res.sink if self.res.sink is not None else self.res.path
        if self.dest.path is not None:
            if os.path.lexists(self.dest.path) and not self.dest.force:
                raise UsageError(f"{self.dest.path} exists; use --force to replace it")
            return self.dest.path
        assert self.dest.stream is not None
        self.hasher = HashingWriter(self.dest.stream)
        # write_dump uses only write, flush, seekable and fileno of a stream
        return cast(BinaryIO, self.hasher)

    def sha256(self, wr: WriteResult) -> str:
        if wr.sha256 is not None:
            return wr.sha256  # hashed by the writer as it wrote (no second read)
        if self.res is not None and self.res.sha256 is not None:
            return self.res.sha256()  # the stored object's bytes, read back
        return self.hasher.sha.hexdigest() if self.hasher is not None else \
            sha256_file(wr.path or "")

    def abandon(self) -> None:
        if self.res is not None and self.store is not None:
            self.store.abandon(self.res)
            self.res = None


@dataclasses.dataclass
class _Written:
    """What came out of the collector and the writer, before the record is made."""

    snap: Snapshot
    image: CoreImage
    annotations: dict[str, str]
    fmt: OutputFormat
    result: WriteResult
    write_seconds: float


def _write(opened: Opened, out: _Output, dest: Destination, settings: CaptureSettings) \
        -> _Written:
    """Enter the collector (the target stops), write the dump, leave it (the target runs)."""
    opts = settings.options
    cancel = settings.cancel

    def progress(done: int, total: int) -> None:
        if cancel is not None:
            cancel.check()
        if settings.progress is not None:
            settings.progress(done, total)

    with opened.collector as snap:
        image, annotations = with_annotations(snap.image, settings.annotations)
        fmt = opts.format_for(image.kind, dest.stream is not None)
        output = out.open(image.kind)
        w0 = time.monotonic()
        wr = write_dump(image, output, format=fmt, compression=opts.codec_for(fmt),
                        compression_level=opts.level, dump_level=opts.dump_level_or_default,
                        threads=opts.threads, progress=progress, sha256=True)
        return _Written(snap, image, annotations, fmt, wr, time.monotonic() - w0)


def _record(target: Target, opened: Opened, w: _Written, settings: CaptureSettings, sha: str,
            t0: float) -> SnapshotRecord:
    snap, wr, elf = w.snap, w.result, w.fmt is OutputFormat.ELF
    return SnapshotRecord(
        target=target.label, target_key=target.key, type=target.type_name,
        kind=w.image.kind.value, arch=w.image.arch.name, pid=opened.pid or None,
        exe=opened.exe or None, format=w.fmt.value, codec=wr.compression.name.lower(),
        compression_level=None if elf else settings.options.level,
        dump_level=settings.options.dump_level_or_default,
        bytes_in=wr.bytes_in, bytes_out=wr.bytes_out,
        pages=None if elf else wr.pages, zero_pages=None if elf else wr.zero_pages,
        sha256=sha, write_seconds=round(w.write_seconds, 6),
        total_seconds=round(time.monotonic() - t0, 6), annotations=w.annotations,
        warnings=list(snap.warnings),
        unreadable=[UnreadableRange(u.start, u.end, u.reason, u.expected)
                    for u in snap.unreadable],
        truncated=bool(snap.truncated),
        # memory the source could not deliver: the output is marked incomplete (issue 10)
        missing=[{"start": a, "end": b} for a, b in wr.missing] or None,
        pause_seconds=None if snap.pause_seconds is None else round(snap.pause_seconds, 6),
        trigger=settings.trigger,
        meta={k: v for k, v in snap.meta.items()
              if isinstance(v, str | int | float | bool | list | dict) or v is None})


def _exit_code(record: SnapshotRecord, wr: WriteResult) -> int:
    """65 (verify's code for a dump that does not read back whole): written with memory the
    source could not deliver, or from a source marked incomplete without naming where
    (WriteResult.incomplete), marked incomplete; 1: written with warnings (unreadable ranges,
    truncated); 0: whole."""
    if record.missing or wr.incomplete:
        return FormatError.exit_code
    return 1 if (record.has_warnings or record.truncated) else 0


def _finish(target: Target, out: _Output, record: SnapshotRecord, wr: WriteResult,
            settings: CaptureSettings, started: float) -> CaptureResult:
    """Commit the record in the store and apply retention (or stamp a file's record)."""
    code = _exit_code(record, wr)
    if out.store is None or out.res is None:
        record.time, record.time_unix = iso_time(started), round(started, 3)
        return CaptureResult(record, wr.path, code)
    res, store = out.res, out.store
    with _signals_deferred():
        record = store.commit(res, record)
    result = CaptureResult(record, res.path, code)
    if settings.retention is not None:
        removed = store.enforce(settings.retention, target.key, settings.keep_for,
                                protect=frozenset({res.id}))
        result.pruned = [r.id for r in removed]
    return result


def _capture_once(target: Target, dest: Destination, settings: CaptureSettings) \
        -> CaptureResult:
    started, t0 = time.time(), time.monotonic()
    if settings.cancel is not None:
        settings.cancel.check()
    opened = settings.opener(target, dest.open_context)
    out = _Output(target, dest, settings, started)
    try:
        out.reserve_early()
        written = _write(opened, out, dest, settings)
        # The target is released here (collectors know the pause only now); hashing the file
        # does not keep it paused.
        sha = out.sha256(written.result)
    except BaseException:
        out.abandon()
        raise
    record = _record(target, opened, written, settings, sha, t0)
    return _finish(target, out, record, written.result, settings, started)
