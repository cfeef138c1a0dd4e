"""One capture, end to end: collector -> write_dump -> sha256 -> sidecar -> retention.

Shared by ``capture``/``convert`` on the command line and by the service, so both write, name,
record and prune snapshots the same way. Cancellation is cooperative: a signal handler sets
``Cancel``, and the next progress callback inside ``write_dump`` raises CaptureInterrupted, which
``write_dump`` answers by removing its ``.incomplete`` file and the collector answers by releasing
the target (resuming the process). Nothing half-written is left, and a process is never left
stopped by an exception thrown at a random point of the ptrace code.
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from kdumpling import CompressionType, OutputFormat, write_dump
from kdumpling.collectors.base import Snapshot
from kdumpling.errors import CaptureInterrupted, DumpWriteError, KdumplingError, UsageError
from kdumpling.image import CoreImage, DumpKind
from kdumpling.notes import (
    DEFAULT_NOTE_VENDOR,
    CustomNoteType,
    Note,
    annotations_text,
    parse_annotations,
)

from .config import RetentionConfig
from .log import get_logger
from .store import Record, Reservation, Store, iso_time
from .targets import Opener, TargetSpec, open_collector

Progress = Callable[[int, int], None]


class TargetBusyError(KdumplingError):
    """Another capture of the same target is still running (EX_TEMPFAIL)."""

    exit_code = 75


class Cancel:
    """Set by signal handlers; checked at every progress step of a capture."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum = 0

    def set(self, signum: int) -> None:
        self.signum = signum
        self.event.set()

    @property
    def is_set(self) -> bool:
        return self.event.is_set()

    def check(self) -> None:
        if self.event.is_set():
            raise interrupted(self.signum)


def interrupted(signum: int) -> CaptureInterrupted:
    name = signal.Signals(signum).name if signum else "a signal"
    err = CaptureInterrupted(f"interrupted by {name}; the partial dump was removed")
    if signum:
        err.exit_code = 128 + signum
    return err


@dataclass
class WriteOptions:
    format: str = "auto"  # auto | elf | kdump | kdump-flat
    compression: str = "auto"  # auto | none | zlib | lzo | snappy | zstd
    compression_level: int | None = None
    dump_level: int | None = None
    threads: int | None = None

    def merged(self, **over: Any) -> WriteOptions:
        return dataclasses.replace(self, **{k: v for k, v in over.items()
                                            if v is not None and v != "auto"})


@dataclass
class Destination:
    """Where a capture goes: a store, one file, or a stream (stdout)."""

    store: Store | None = None
    path: str | None = None
    stream: BinaryIO | None = None
    force: bool = False


@dataclass
class CaptureSettings:
    options: WriteOptions = field(default_factory=WriteOptions)
    annotations: dict[str, str] = field(default_factory=dict)
    retention: RetentionConfig | None = None  # None: no retention (file/stream output)
    keep_for: Callable[[str], int] | None = None
    progress: Progress | None = None
    cancel: Cancel | None = None
    opener: Opener = open_collector
    retry_on_full: bool = True


EXTENSIONS = {("elf", DumpKind.PROCESS): "core", ("elf", DumpKind.KERNEL): "vmcore",
              ("kdump", DumpKind.PROCESS): "kdump", ("kdump", DumpKind.KERNEL): "kdump",
              ("kdump-flat", DumpKind.PROCESS): "kdump-flat",
              ("kdump-flat", DumpKind.KERNEL): "kdump-flat"}


# What a target type captures, known before the collector runs (a converted file can be either).
KIND_OF_TYPE = {"process": DumpKind.PROCESS, "libvirt": DumpKind.KERNEL, "qmp": DumpKind.KERNEL,
                "raw": DumpKind.KERNEL}


def choose_format(opts: WriteOptions, kind: DumpKind, streaming: bool) -> OutputFormat:
    if opts.format != "auto":
        return OutputFormat.parse(opts.format)
    if kind is DumpKind.PROCESS:
        return OutputFormat.ELF  # gdb and eu-stack read ELF process cores only
    return OutputFormat.KDUMP_FLATTENED if streaming else OutputFormat.KDUMP_COMPRESSED


def choose_compression(opts: WriteOptions, fmt: OutputFormat) -> CompressionType:
    if fmt is OutputFormat.ELF:
        return CompressionType.NONE
    if opts.compression == "auto":
        return CompressionType.ZLIB  # every reader (crash, drgn, libkdumpfile) decodes it
    return CompressionType[opts.compression.upper()]


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


def _process_exe(spec: TargetSpec) -> str | None:
    """The executable of a process target, so ``debug`` can hand it to gdb."""
    pid = spec.params.get("resolved_pid")
    if spec.type != "process" or not pid:
        return None
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def _nospace(err: BaseException) -> bool:
    return isinstance(err, DumpWriteError) and err.errno in (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Block SIGTERM/SIGINT/SIGHUP while a sidecar is written (it must land whole)."""
    sigs = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _snapshot_facts(snap: Snapshot) -> dict[str, Any]:
    return {
        "warnings": list(snap.warnings),
        # expected holes ([vvar], [vsyscall]: the kernel's own cores have them too) are
        # recorded but are not a reason to exit 1
        "unreadable": [{"start": u.start, "end": u.end, "reason": u.reason,
                        "expected": u.expected} for u in snap.unreadable],
        "truncated": bool(snap.truncated),
        "pause_seconds": None if snap.pause_seconds is None else round(snap.pause_seconds, 6),
        "meta": {k: v for k, v in snap.meta.items()
                 if isinstance(v, str | int | float | bool | list | dict) or v is None},
    }


def capture(spec: TargetSpec, dest: Destination, settings: CaptureSettings) -> dict[str, Any]:
    """Capture ``spec`` into ``dest``; returns the result record (what ``--json`` prints).

    Raises KdumplingError subclasses; the record's ``exit_code`` is 1 when the dump was written
    with warnings (unreadable ranges, truncated), else 0.
    """
    if dest.store is not None:
        with dest.store.lock_target(spec.key) as locked:
            if not locked:
                raise TargetBusyError(f"a capture of {spec.label} is already running")
            attempts = 2 if settings.retry_on_full else 1
            pruned: list[str] = []
            for attempt in range(attempts):
                try:
                    result = _capture_once(spec, dest, settings)
                except DumpWriteError as err:
                    if attempt + 1 < attempts and _nospace(err):
                        victim = dest.store.prune_oldest_of(spec.key)
                        if victim is not None:
                            pruned.append(victim.id)
                            get_logger().warning(
                                "%s: disk full; removed the oldest snapshot of this target (%s) "
                                "and retrying", spec.label, victim.id)
                            continue
                    if _nospace(err):
                        extra = f"; removed {', '.join(pruned)}" if pruned else ""
                        raise DumpWriteError(f"{err}{extra}", err.path, err.errno) from err
                    raise
                result["pruned"] = pruned + result.get("pruned", [])
                return result
    return _capture_once(spec, dest, settings)


def _capture_once(spec: TargetSpec, dest: Destination, settings: CaptureSettings) \
        -> dict[str, Any]:
    opts = settings.options
    cancel = settings.cancel
    started = time.time()
    t0 = time.monotonic()

    def progress(done: int, total: int) -> None:
        if cancel is not None:
            cancel.check()
        if settings.progress is not None:
            settings.progress(done, total)

    if cancel is not None:
        cancel.check()
    collector = settings.opener(spec)
    exe = _process_exe(spec)
    store = dest.store
    res = None
    hasher: HashingWriter | None = None

    def reserve(kind: DumpKind) -> Reservation:
        assert store is not None
        ext = EXTENSIONS[(choose_format(opts, kind, False).value, kind)]
        return store.reserve(spec.key, ext, {"target": spec.label, "type": spec.type},
                             when=started)

    try:
        kind_hint = KIND_OF_TYPE.get(spec.type)
        if store is not None and kind_hint is not None:
            # Reserved before the collector stops the target: the sidecar's fsyncs stay out of
            # the target's pause.
            res = reserve(kind_hint)
        with collector as snap:
            image, annotations = with_annotations(snap.image, settings.annotations)
            streaming = dest.stream is not None
            fmt = choose_format(opts, image.kind, streaming)
            ctype = choose_compression(opts, fmt)
            level = opts.compression_level if opts.compression_level is not None else 1
            dump_level = opts.dump_level if opts.dump_level is not None else 1
            output: str | BinaryIO
            if store is not None:
                if res is None or kind_hint is not image.kind:
                    if res is not None:
                        store.abandon(res)
                    res = reserve(image.kind)
                output = res.path
            elif dest.path is not None:
                if os.path.lexists(dest.path) and not dest.force:
                    raise UsageError(f"{dest.path} exists; use --force to replace it")
                output = dest.path
            else:
                assert dest.stream is not None
                hasher = HashingWriter(dest.stream)
                output = hasher  # type: ignore[assignment]
            w0 = time.monotonic()
            wr = write_dump(image, output, format=fmt, compression=ctype,
                            compression_level=level, dump_level=dump_level,
                            threads=opts.threads, progress=progress)
            write_seconds = time.monotonic() - w0
    except BaseException:
        if res is not None and store is not None:
            store.abandon(res)
        raise
    # The target is released here (collectors know the pause only now); hashing the file does
    # not keep it paused.
    facts = _snapshot_facts(snap)
    try:
        sha = hasher.sha.hexdigest() if hasher is not None else sha256_file(wr.path or "")
    except BaseException:
        if res is not None and store is not None:
            store.abandon(res)
        raise
    warnings_ = facts["warnings"]
    unexpected = [u for u in facts["unreadable"] if not u["expected"]]
    exit_code = 1 if (warnings_ or unexpected or facts["truncated"]) else 0
    record: dict[str, Any] = {
        "target": spec.label,
        "target_key": spec.key,
        "type": spec.type,
        "kind": image.kind.value,
        "arch": image.arch.name,
        "format": fmt.value,
        "codec": wr.compression.name.lower(),
        "compression_level": level if fmt is not OutputFormat.ELF else None,
        "dump_level": dump_level,
        "bytes_in": wr.bytes_in,
        "bytes_out": wr.bytes_out,
        "pages": wr.pages if fmt is not OutputFormat.ELF else None,
        "zero_pages": wr.zero_pages if fmt is not OutputFormat.ELF else None,
        "sha256": sha,
        "write_seconds": round(write_seconds, 6),
        "total_seconds": round(time.monotonic() - t0, 6),
        "annotations": annotations,
        **facts,
    }
    if spec.params.get("resolved_pid"):
        record["pid"] = spec.params["resolved_pid"]
    if exe:
        record["exe"] = exe
    if store is not None and res is not None:
        with _signals_deferred():
            full = store.commit(res, record)
        record = {**full, "path": res.path}
        record.pop("dev", None)
        record.pop("inode", None)
        record["pruned"] = []
        if settings.retention is not None:
            removed: list[Record] = store.enforce(settings.retention, spec.key, settings.keep_for,
                                                  protect=frozenset({res.id}))
            record["pruned"] = [r.id for r in removed]
    else:
        record.update({"id": None, "path": wr.path, "time": iso_time(started),
                       "time_unix": round(started, 3), "pruned": []})
    record["exit_code"] = exit_code
    return record
