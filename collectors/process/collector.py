"""Snapshot a live process into an ELF core that gdb and eu-stack open, without killing it.

Sequence (facts measured in the project's process-cores notes):

1. Before stopping anything: parse /proc/PID/smaps (it walks page tables, ~18 ms per GiB of RSS),
   coredump_filter, stat/status, cmdline, auxv, and open /proc/PID/mem and pagemap.
2. Stop every thread: PTRACE_SEIZE (+TRACECLONE so threads born meanwhile are caught) and
   PTRACE_INTERRUPT, waitpid(__WALL) with a deadline, rescanning /proc/PID/task until stable.
3. While stopped: PTRACE_GETREGSET for every regset of the architecture, re-read /proc/PID/maps,
   decide per mapping what the kernel would dump (fs/coredump.c vma_dump_size), build the notes.
4. ``consistent`` mode copies a small process (EAGER_LIMIT) now and detaches; a bigger one
   returns still stopped, the writer reads memory lazily in its own read-ahead thread
   (process_vm_readv; /proc/PID/mem for what that cannot read), and the process is detached as
   soon as the writer closes the memory sources (before its fsync and rename; or in
   ``__exit__``). ``low-pause`` mode copies the live part of the thread stacks now, detaches,
   and lets the writer read the rest while the process runs.

Whatever happens (read errors, the target exiting or exec'ing, SIGINT/SIGTERM), every thread is
detached before the error leaves this module; if this process dies, the kernel detaches them.

/proc is read by hand here (collectors/_procfs.py), not through psutil as the agent's lookup and
metrics are: psutil has no mapping offsets and device/inode pairs, smaps per mapping with
VmFlags, auxv, coredump_filter, pagemap, or the ptrace stop states of threads.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, BinaryIO, Literal

from kdumpling.arch import DEFAULT_REGSETS, REGSETS, get_arch
from kdumpling.errors import SourceReadError, TargetGoneError, UsageError
from kdumpling.image import CoreImage, DumpKind
from kdumpling.segments import PF_R, PF_W, PF_X, MemorySegment, SegmentSource

from .._procfs import FileInfo, MapEntry, ProcFS, ProcStat, SmapsEntry
from ..base import Snapshot, UnreadableRange
from .corenotes import ThreadState, build_notes, read_thread_state
from .memory import LazyMemory, LiveProbe, MemoryReader, SparseCopy, copy_all
from .policy import (
    DEFAULT_FILTER,
    FILTER_BITS,
    MappingPlan,
    apply_size_cap,
    mark_stacks,
    plan_mappings,
)
from .tracer import RegsetReader, SignalGuard, Tracer

if TYPE_CHECKING:
    from kdumpling.dump import WriteResult

    from .signal_watch import CaughtSignal

Mode = Literal["consistent", "low-pause"]
MODES: tuple[str, ...] = ("consistent", "low-pause")

DEFAULT_STOP_TIMEOUT = 5.0
# Consistent mode copies a process whose dump is at most this big while it is stopped and
# resumes it before the writer runs (the file's creation, writes and fsync are then outside the
# pause); bigger ones stay stopped until the writer has read the last byte.
EAGER_LIMIT = 32 << 20


def _segment_flags(entry: MapEntry) -> int:
    return ((PF_R if entry.readable else 0) | (PF_W if entry.writable else 0)
            | (PF_X if entry.executable else 0))


def _hex_range(start: int, end: int) -> str:
    return f"{start:#x}-{end:#x}"


@dataclass
class _PreStop:
    """What is read before the target is stopped."""

    stat: ProcStat
    status: dict[str, str]
    cmdline: bytes
    auxv: bytes
    smaps: list[SmapsEntry]
    mask: int
    files: dict[tuple[str, int], FileInfo | None] = field(default_factory=dict)


class ProcessCollector:
    """Capture a live process as a ``CoreImage(kind=PROCESS)``; use it as a context manager.

    ``mode``: "consistent" keeps every thread stopped until the ``with`` block ends (the writer
    reads inside it); "low-pause" stops only to read registers and thread stacks.
    ``filter_mask``: coredump_filter bits (None: the target's own /proc/PID/coredump_filter).
    ``size_cap``: at most this many bytes of memory data; past it the core is marked truncated.
    ``copy_limit``: in "consistent" mode, a dump of at most this many bytes is copied while
    stopped and the target resumes before ``__enter__`` returns; a bigger one resumes when the
    writer closes the memory sources (its last read), before its fsync.
    ``pause_seconds`` (also on the snapshot) is the time from the first stop to the last detach.
    ptrace ties the target to the tracing thread: leave the ``with`` block in the thread that
    entered it. SIGINT/SIGTERM raise ``CaptureInterrupted`` meanwhile (main thread only).
    """

    def __init__(self, pid: int, *, mode: Mode | str = "consistent",
                 filter_mask: int | None = None, size_cap: int | None = None,
                 procfs: str | os.PathLike[str] = "/proc",
                 stop_timeout: float = DEFAULT_STOP_TIMEOUT,
                 copy_limit: int = EAGER_LIMIT, caught: CaughtSignal | None = None) -> None:
        if mode not in MODES:
            raise UsageError(f"unknown capture mode {mode!r}; use one of: {', '.join(MODES)}")
        if filter_mask is not None and not 0 <= filter_mask <= FILTER_BITS:
            raise UsageError(f"filter mask must be 0..{FILTER_BITS:#x}, got {filter_mask:#x}")
        if size_cap is not None and size_cap < 0:
            raise UsageError("size cap must not be negative")
        if pid <= 0:
            raise UsageError(f"invalid process id {pid}")
        if pid == os.getpid():
            raise UsageError("a process cannot capture itself with ptrace")
        self.pid = pid
        self.mode = mode
        self.filter_mask = filter_mask
        self.size_cap = size_cap
        self.procfs = ProcFS(procfs)
        self.stop_timeout = stop_timeout
        self.copy_limit = copy_limit
        # A signal watch's catch: its tracer holds the target (one thread at the signal's
        # delivery stop); the core records that signal and releasing delivers it.
        self.caught = caught
        self.pause_seconds: float | None = None
        self.snapshot: Snapshot | None = None
        self._tracer: Tracer | None = None
        self._guard = SignalGuard()
        self._fds: list[int] = []
        self._lazy: LazyMemory | None = None
        self._reader: MemoryReader | None = None
        self._owner = 0  # ident of the thread that stopped the target (ptrace's tracer)
        self._problems: list[str] = []
        self._predicted = 0  # unreadable ranges known before writing (listed in the notes)
        self._arch = get_arch(os.uname().machine)
        self._regsets = REGSETS.get(self._arch.name, DEFAULT_REGSETS)
        self._page = os.sysconf("SC_PAGE_SIZE")

    # context manager ---------------------------------------------------------------------------
    def __enter__(self) -> Snapshot:
        self._owner = threading.get_ident()
        self._guard.install()
        try:
            self.snapshot = self._capture()
            return self.snapshot
        except BaseException:
            self._guard.hold()
            try:
                self._release()
            finally:
                self._guard.restore()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._guard.hold()
        try:
            problems = self._release()
        finally:
            self._guard.restore()
        if self.snapshot is not None:
            self.snapshot.pause_seconds = self.pause_seconds
            self.snapshot.warnings.extend(problems)
            # Ranges found unreadable while the writer ran came after the notes were written:
            # the snapshot (and the agent's report) is where they are listed.
            late = self.snapshot.unreadable[self._predicted:]
            if late:
                shown = ", ".join(f"{_hex_range(r.start, r.end)} ({r.reason})" for r in late[:5])
                more = f" and {len(late) - 5} more" if len(late) > 5 else ""
                self.snapshot.warnings.append(
                    f"{len(late)} range(s) could not be read and were written as zeros: "
                    f"{shown}{more}")
            self.snapshot.meta["pause_seconds"] = self.pause_seconds
        if exc is None and self._guard.pending is not None:
            raise self._guard.error()

    def _release(self) -> list[str]:
        if self._lazy is not None:
            self._lazy.close()  # no read may run once the target is released
        self._resume()
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        return self._problems

    def _resume(self) -> None:
        """Detach every thread (once) and note the pause; signals wait until it is done."""
        tracer = self._tracer
        if tracer is None or tracer.released_at is not None:
            return
        if self._reader is not None:
            self._reader.stopped = False  # from now on the pid may exec: reads are confirmed
        with self._guard.deferred():
            self._problems.extend(tracer.release_all())
            if tracer.first_stop is not None and tracer.released_at is not None:
                self.pause_seconds = tracer.released_at - tracer.first_stop

    def _reads_done(self) -> None:
        """The writer closed the memory sources: it will not read again, so what it does next
        (flush, fsync, rename) and what the caller does need not keep the target stopped.
        Only the tracing thread may detach; from any other, ``__exit__`` does it."""
        if threading.get_ident() == self._owner:
            self._resume()

    # capture -------------------------------------------------------------------------------
    def _check_target(self) -> None:
        pid, procfs = self.pid, self.procfs
        if not procfs.exists(pid):
            raise TargetGoneError(f"process {pid} does not exist")
        stat = procfs.stat(pid)
        if stat.state in "ZX":
            raise TargetGoneError(f"process {pid} has exited (zombie)")

    def _pre_stop(self) -> _PreStop:
        pid, procfs = self.pid, self.procfs
        with procfs.errors(pid, "read process status"):
            status = procfs.status(pid)
        if status.get("Tgid") and int(status["Tgid"]) != pid:
            raise UsageError(f"{pid} is a thread of process {status['Tgid']}; capture that")
        stat = procfs.stat(pid)
        auxv = procfs.auxv(pid)
        smaps = procfs.smaps(pid)
        if not smaps and not auxv:
            raise UsageError(f"process {pid} is a kernel thread: it has no user memory")
        mask = self.filter_mask
        if mask is None:
            try:
                mask = procfs.coredump_filter(pid)
            except SourceReadError:
                mask = DEFAULT_FILTER
        pre = _PreStop(stat, status, procfs.cmdline(pid), auxv, smaps, mask & FILTER_BITS)
        # stat() the mapped files now (cheap, and it keeps the stopped phase short)
        for s in smaps:
            e = s.map
            if e.is_file and (e.dev, e.inode) not in pre.files:
                pre.files[(e.dev, e.inode)] = procfs.file_info(pid, e)
        return pre

    def _capture(self) -> Snapshot:
        pid, procfs, page = self.pid, self.procfs, self._page
        self._check_target()
        pre = self._pre_stop()
        mem_fd = procfs.open_mem(pid)
        self._fds.append(mem_fd)
        pagemap_fd = procfs.open_pagemap(pid)
        if pagemap_fd is not None:
            self._fds.append(pagemap_fd)
        unreadable: list[UnreadableRange] = []
        low_pause = self.mode == "low-pause"
        reader = self._reader = MemoryReader(pid, procfs, mem_fd, pagemap_fd, page, unreadable,
                                             " while the process ran" if low_pause else "")

        caught = self.caught
        tracer = self._tracer = (caught.tracer if caught is not None
                                 else Tracer(pid, procfs, self.stop_timeout))
        with self._guard.deferred():
            tracer.stop_all()
        stopped_at = time.monotonic()
        reader.stopped = True

        # --- stopped ---
        regset_reader = RegsetReader()
        threads: list[ThreadState] = []
        tids = tracer.live_tids()
        if caught is not None and caught.tid in tids:
            # the thread that took the signal comes first, as in the kernel's own core
            # (fs/binfmt_elf.c fill_note_info starts with the dumping thread)
            tids.remove(caught.tid)
            tids.insert(0, caught.tid)
        for tid in tids:
            try:
                threads.append(read_thread_state(tid, self._arch, self._regsets, regset_reader))
            except OSError as err:
                if err.errno != errno.ESRCH:
                    raise SourceReadError(f"thread {tid}: cannot read registers: "
                                          f"{err.strerror}") from err
                tracer.drop(tid)  # killed while stopped
        if not threads:
            raise TargetGoneError(f"process {pid} exited during the capture")
        entries = procfs.maps(pid)
        probe = LiveProbe(pid, procfs, reader, pre.files)
        plans = plan_mappings(entries, pre.smaps, pre.mask, page, probe)
        mark_stacks(plans, [t.sp(self._arch, self._regsets.sp_register) for t in threads])
        omitted = apply_size_cap(plans, self.size_cap, page) if self.size_cap is not None else 0

        stack_copies: dict[int, SparseCopy] = {}
        eager = not low_pause and _eager_bytes(plans, pre.smaps) <= self.copy_limit
        if low_pause:
            for plan in plans:
                if plan.priority == 0 and plan.dump:
                    stack_copies[plan.entry.start] = self._copy_now(reader, plan)
        elif eager:
            for plan in plans:
                if plan.dump > plan.skip_head:
                    stack_copies[plan.entry.start] = copy_all(reader, plan)
        if low_pause or eager:
            self._resume()

        for plan in plans:  # predicted holes are known now: list them in the annotations
            if plan.unreadable_reason:
                lo = plan.entry.start + plan.readable
                hi = plan.entry.start + (plan.dump or plan.entry.size)
                if hi > lo:
                    reader.record(lo, hi, plan.unreadable_reason, plan.unreadable_expected)
        predicted = list(unreadable)
        self._predicted = len(predicted)
        self._lazy = LazyMemory(reader, self._reads_done)
        segments = self._segments(plans, self._lazy, stack_copies)

        comm = pre.stat.comm.decode("utf-8", "replace")
        annotations = self._annotations(pre, threads, tracer, predicted, omitted)
        files = [(p.entry.start, p.entry.end, p.entry.offset, p.entry.path)
                 for p in plans if p.entry.is_file]
        notes = build_notes(self._arch, threads, pre.stat, pre.status, pre.cmdline, pre.auxv,
                            files, page, annotations,
                            cursig=caught.signo if caught is not None else 0,
                            siginfo=caught.siginfo if caught is not None else None)
        image = CoreImage(arch=self._arch, kind=DumpKind.PROCESS, segments=segments, notes=notes,
                          page_size=page, crash_time=int(time.time()))
        snap = Snapshot(
            image=image, target=f"process {pid} ({comm})", pause_seconds=self.pause_seconds,
            unreadable=unreadable, annotations=annotations, truncated=omitted > 0,
        )
        if tracer.dropped:
            snap.warnings.append(
                f"{len(tracer.dropped)} thread(s) exited during the capture and were left out: "
                + ", ".join(map(str, tracer.dropped)))
        if low_pause:
            snap.warnings.append("low-pause mode: memory other than the thread stacks was read "
                                 "while the process ran and may be inconsistent")
        if omitted:
            snap.warnings.append(f"size cap of {self.size_cap} bytes reached: {omitted} bytes "
                                 "of memory left out; the core is marked truncated")
        snap.meta.update({
            "pid": pid, "comm": comm, "mode": self.mode, "threads": [t.tid for t in threads],
            "dropped_threads": list(tracer.dropped), "coredump_filter": pre.mask,
            "stop_seconds": stopped_at - (tracer.first_stop or stopped_at),
            "segments": len(segments), "dump_bytes": image.memory_size,
            "omitted_bytes": omitted, "pause_seconds": self.pause_seconds,
            "copied_while_stopped": sum(c.stored for c in stack_copies.values()) if eager else 0,
        })
        return snap

    def _copy_now(self, reader: MemoryReader, plan: MappingPlan) -> SparseCopy:
        """Copy the live part of a stack VMA (from the lowest stack pointer in it, less the
        red zone, to its end: the frames, and TLS and struct pthread for glibc threads) while
        the process is stopped; the dead part below is read later, like the heap."""
        e = plan.entry
        lo, hi = e.start + plan.skip_head, e.start + plan.readable
        if plan.stack_sp is not None:
            lo = max(lo, min(hi, (plan.stack_sp - 128) // self._page * self._page))
        pieces: list[tuple[int, bytes]] = []
        base = e.start + plan.skip_head
        if hi > lo:
            runs = reader.present_runs(lo, hi - lo) if plan.sparse else None
            for a, b in runs if runs is not None else [(lo, hi)]:
                pieces.append((a - base, reader.read_raw(a, b - a)))

        def below_sp(offset: int, length: int) -> bytes:
            return reader.read(base + offset, length, sparse=plan.sparse)

        return SparseCopy(plan.dump - plan.skip_head, pieces, lo - base, below_sp)

    def _segments(self, plans: Sequence[MappingPlan], lazy: LazyMemory,
                  copies: Mapping[int, SparseCopy]) -> list[MemorySegment]:
        segments: list[MemorySegment] = []
        for plan in plans:
            e = plan.entry
            flags = _segment_flags(e)
            start = e.start
            if plan.skip_head:
                segments.append(MemorySegment(0, None, virt_addr=start, mem_size=plan.skip_head,
                                              flags=flags))
                start += plan.skip_head
            size = plan.dump - plan.skip_head
            mem_size = e.end - start
            if size <= 0:
                segments.append(MemorySegment(0, None, virt_addr=start, mem_size=mem_size,
                                              flags=flags))
                continue
            src: SegmentSource | None = copies.get(e.start)
            if src is None:
                src = lazy.add(start, size, plan.readable - plan.skip_head, plan.sparse)
            segments.append(MemorySegment(0, src, virt_addr=start, mem_size=mem_size,
                                          flags=flags))
        return segments

    def _annotations(self, pre: _PreStop, threads: Sequence[ThreadState], tracer: Tracer,
                     predicted: Sequence[UnreadableRange], omitted: int) -> dict[str, str]:
        ann: dict[str, str] = {
            "collector": "process",
            "pid": str(self.pid),
            "comm": pre.stat.comm.decode("utf-8", "replace"),
            "mode": self.mode,
            "coredump_filter": f"{pre.mask:#x}",
            "threads": str(len(threads)),
        }
        if tracer.dropped:
            ann["dropped_threads"] = ",".join(map(str, tracer.dropped))
        if self.caught is not None:
            ann["signal"] = self.caught.name
            ann["signal_thread"] = str(self.caught.tid)
        if self.mode == "low-pause":
            ann["consistency"] = ("heap may be inconsistent: registers and thread stacks were "
                                  "read while stopped, the rest while the process ran")
        if self.pause_seconds is not None:  # known here when the target resumed already
            ann["pause_seconds"] = f"{self.pause_seconds:.6f}"
        ann["unreadable_count"] = str(len(predicted))
        for i, r in enumerate(predicted):
            ann[f"unreadable.{i}"] = f"{_hex_range(r.start, r.end)} {r.reason}"
        if self.size_cap is not None:
            ann["size_cap"] = str(self.size_cap)
        if omitted:
            ann["truncated"] = "yes"
            ann["omitted_bytes"] = str(omitted)
        return ann


def _eager_bytes(plans: Sequence[MappingPlan], smaps: Sequence[SmapsEntry]) -> int:
    """Bytes a full copy of the plans would hold: resident + swapped pages (smaps, read
    before the stop) for private anonymous mappings, the readable size for the others."""
    held = {s.map.key: s.counter("Rss") + s.counter("Swap") for s in smaps}
    total = 0
    for plan in plans:
        size = max(0, plan.readable - plan.skip_head)
        if plan.sparse and plan.entry.key in held:
            size = min(size, held[plan.entry.key])
        total += size
    return total



def capture_process(
    pid: int, output: str | os.PathLike[str] | BinaryIO, *, mode: Mode | str = "consistent",
    filter_mask: int | None = None, size_cap: int | None = None,
    procfs: str | os.PathLike[str] = "/proc", stop_timeout: float = DEFAULT_STOP_TIMEOUT,
    copy_limit: int = EAGER_LIMIT, **writer_options: object,
) -> tuple[Snapshot, WriteResult]:
    """Capture ``pid`` and write its core to ``output`` (path or binary stream); the writer
    options (format, progress, ...) go to ``kdumpling.write_dump``."""
    from kdumpling.dump import write_dump

    with ProcessCollector(pid, mode=mode, filter_mask=filter_mask, size_cap=size_cap,
                          procfs=procfs, stop_timeout=stop_timeout,
                          copy_limit=copy_limit) as snap:
        result = write_dump(snap.image, output, **writer_options)  # type: ignore[arg-type]
    return snap, result
