"""Stopping and releasing every thread of a process with seize-based ptrace(2).

The ctypes layer first: only the seize-based requests are used (PTRACE_SEIZE does not send
SIGSTOP, so the target's parent and job control never see a stop): SEIZE, INTERRUPT, GETREGSET,
GETEVENTMSG, GETSIGMASK, DETACH. Request numbers are the generic ones from
include/uapi/linux/ptrace.h, the same on every architecture we support; errors come back as
plain ``OSError`` with the C errno. Then ``Tracer``, which stops every thread (rescanning
/proc/PID/task until stable) and always releases them, and ``SignalGuard``, which keeps
SIGINT/SIGTERM from interrupting that bookkeeping half-way.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType

from kdumpling.errors import (
    CaptureInterrupted,
    KdumplingError,
    SourceReadError,
    TargetGoneError,
)

from .._procfs import ProcFS
from ._libc import IoVec, libc

# --- the ptrace(2) layer -----------------------------------------------------------------------
PTRACE_CONT = 7
PTRACE_DETACH = 17
PTRACE_GETEVENTMSG = 0x4201
PTRACE_GETSIGINFO = 0x4202
PTRACE_GETREGSET = 0x4204
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208
PTRACE_GETSIGMASK = 0x420A
SIGINFO_SIZE = 128  # siginfo_t is 128 bytes on every Linux ABI (include/uapi/asm-generic/siginfo.h)

PTRACE_O_TRACECLONE = 0x08
PTRACE_O_TRACEEXEC = 0x10

PTRACE_EVENT_CLONE = 3
PTRACE_EVENT_EXEC = 4
PTRACE_EVENT_STOP = 128

# waitpid flag: wait for clone children (threads) too (include/uapi/linux/wait.h)
WALL = 0x40000000

_ptrace = libc.ptrace
_ptrace.restype = ctypes.c_long
_ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]


def _call(request: int, tid: int, addr: int | None, data: int | None) -> int:
    ctypes.set_errno(0)
    res: int = _ptrace(request, tid, addr, data)
    if res == -1:
        err = ctypes.get_errno()
        if err:
            raise OSError(err, os.strerror(err))
    return res


def seize(tid: int, options: int = 0) -> None:
    _call(PTRACE_SEIZE, tid, None, options)


def interrupt(tid: int) -> None:
    _call(PTRACE_INTERRUPT, tid, None, None)


def detach(tid: int, signal: int = 0) -> None:
    """Detach a stopped tracee, delivering ``signal`` (a signal-delivery-stop's signal) or 0."""
    _call(PTRACE_DETACH, tid, None, signal)


def cont(tid: int, signal: int = 0) -> None:
    """Resume a stopped tracee; at a signal-delivery-stop ``signal`` is what gets delivered
    (the stop's own signal: as if never traced; 0: suppressed)."""
    _call(PTRACE_CONT, tid, None, signal)


def listen(tid: int) -> None:
    """Leave a seized tracee in its group-stop (job control) while still hearing of SIGCONT."""
    _call(PTRACE_LISTEN, tid, None, None)


def getsiginfo(tid: int) -> bytes:
    """The siginfo_t of the signal a tracee is stopped on, exactly as the kernel holds it."""
    buf = ctypes.create_string_buffer(SIGINFO_SIZE)
    _call(PTRACE_GETSIGINFO, tid, None, ctypes.addressof(buf))
    return buf.raw


def geteventmsg(tid: int) -> int:
    msg = ctypes.c_ulong(0)
    _call(PTRACE_GETEVENTMSG, tid, None, ctypes.addressof(msg))
    return msg.value


def getsigmask(tid: int) -> int:
    mask = ctypes.c_uint64(0)
    _call(PTRACE_GETSIGMASK, tid, ctypes.sizeof(mask), ctypes.addressof(mask))
    return mask.value


class RegsetReader:
    """PTRACE_GETREGSET into one reused buffer; the kernel shortens iov_len to the real size."""

    def __init__(self, size: int = 1 << 16) -> None:
        self._buf = ctypes.create_string_buffer(size)
        self._iov = IoVec(ctypes.addressof(self._buf), size)
        self._size = size

    def get(self, tid: int, note_type: int) -> bytes:
        self._iov.iov_len = self._size
        _call(PTRACE_GETREGSET, tid, note_type, ctypes.addressof(self._iov))
        return self._buf.raw[: self._iov.iov_len]


# --- stopping threads --------------------------------------------------------------------------
class TargetNotStoppedError(KdumplingError):
    """A thread did not reach a ptrace stop in time (uninterruptible sleep, frozen cgroup)."""

    exit_code = 69


@dataclass
class _Thread:
    tid: int
    stopped: bool = False
    gone: bool = False
    signal: int = 0  # signal-delivery-stop: re-inject on detach
    group_stop: bool = False  # reported a group-stop (job control stopped the process)


# Stop signals (default action "stop"): a seized tracee reports a group-stop as
# PTRACE_EVENT_STOP with one of these, a plain PTRACE_INTERRUPT trap as SIGTRAP.
_STOP_SIGNALS = frozenset((signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU))
SETTLE_TIMEOUT = 1.0


class SignalGuard:
    """SIGINT/SIGTERM become CaptureInterrupted, except inside ``deferred()`` sections (ptrace
    bookkeeping) where they are remembered and raised when the section ends."""

    def __init__(self) -> None:
        self.pending: int | None = None
        self._defer = 0
        self._old: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers; the caller's own apply
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handler)

    def restore(self) -> None:
        for sig, old in self._old.items():
            # None: the old handler was not set from Python; the default is the best guess
            signal.signal(sig, signal.SIG_DFL if old is None else old)  # type: ignore[arg-type]
        self._old.clear()

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        del frame
        if self.pending is None:
            self.pending = signum
        if not self._defer:
            raise self.error()

    def error(self) -> CaptureInterrupted:
        signum = self.pending or signal.SIGINT
        err = CaptureInterrupted(
            f"capture interrupted by {signal.Signals(signum).name}; the target was released")
        err.exit_code = 128 + signum
        return err

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self._defer += 1
        try:
            yield
        finally:
            self._defer -= 1
        if not self._defer and self.pending is not None:
            raise self.error()

    def hold(self) -> None:
        """Defer from now on (cleanup): a signal then only marks the capture interrupted."""
        self._defer += 1

    def unhold(self) -> None:
        """End a ``hold``; a signal that came meanwhile stays pending (``error()``)."""
        self._defer -= 1


class Tracer:
    """Stops and releases every thread of one process with seize-based ptrace."""

    def __init__(self, pid: int, procfs: ProcFS, timeout: float) -> None:
        self.pid, self.procfs, self.timeout = pid, procfs, timeout
        self.threads: dict[int, _Thread] = {}
        self.dropped: list[int] = []
        self.first_stop: float | None = None
        self.released_at: float | None = None

    def stop_all(self) -> None:
        """Seize and interrupt every thread, and wait until each is in a ptrace stop.

        Threads this tracer holds already (a signal watch seized them and one of them stopped at
        a signal) are interrupted in place, not seized again."""
        options = PTRACE_O_TRACECLONE | PTRACE_O_TRACEEXEC
        deadline = time.monotonic() + self.timeout
        me = threading.get_native_id()  # ptrace's tracer is a thread, TracerPid names it
        for th in self.threads.values():
            if not th.stopped and not th.gone:
                if self.first_stop is None:
                    self.first_stop = time.monotonic()
                with contextlib.suppress(OSError):  # it died: the wait below sees the exit
                    interrupt(th.tid)
        while True:
            tids = self.procfs.tasks(self.pid)
            new = [t for t in tids if t not in self.threads and t not in self.dropped]
            for tid in new:
                th = _Thread(tid)
                try:
                    seize(tid, options)
                except OSError as err:
                    state = self.procfs.thread_state(self.pid, tid)
                    if err.errno == errno.ESRCH or state is None or state in "ZX":
                        self.dropped.append(tid)  # exited between listing and seizing
                        continue
                    if err.errno != errno.EPERM:
                        raise SourceReadError(f"cannot trace thread {tid}: {err.strerror}") \
                            from err
                    tracer = self._tracer_of(tid)
                    if tracer != me:
                        raise self.procfs.permission_error(self.pid, "trace threads") from err
                    # Auto-attached by TRACECLONE before we saw its clone event.
                    self.threads[tid] = th
                    continue
                self.threads[tid] = th
                if self.first_stop is None:
                    self.first_stop = time.monotonic()
                with contextlib.suppress(OSError):  # it died: the wait below sees the exit
                    interrupt(tid)
            self._wait_all(deadline)
            if not new:
                break
        live = [t for t in self.threads.values() if not t.gone]
        if not live:
            raise TargetGoneError(f"process {self.pid} exited while being stopped")

    def _tracer_of(self, tid: int) -> int:
        try:
            return int(self.procfs.status(self.pid, tid).get("TracerPid", "0"))
        except (OSError, ValueError):
            return 0

    def _wait_all(self, deadline: float) -> None:
        delay = 0.0
        while True:
            waiting = [t for t in self.threads.values() if not t.stopped and not t.gone]
            if not waiting:
                return
            progressed = False
            for th in waiting:
                if self._poll(th):
                    progressed = True
            if progressed:
                delay = 0.0
                continue
            if time.monotonic() > deadline:
                stuck = [t for t in self.threads.values() if not t.stopped and not t.gone]
                states = ", ".join(
                    f"{t.tid} ({self.procfs.thread_state(self.pid, t.tid) or '?'})"
                    for t in stuck[:5])
                raise TargetNotStoppedError(
                    f"process {self.pid}: {len(stuck)} thread(s) did not stop within "
                    f"{self.timeout:g} s: {states} (uninterruptible sleep or a frozen cgroup?)")
            time.sleep(delay)
            delay = min(0.002, delay * 2 or 0.00002)

    def _poll(self, th: _Thread) -> bool:
        """One non-blocking wait for ``th``; True when it reported something."""
        try:
            wpid, status = os.waitpid(th.tid, WALL | os.WNOHANG)
        except ChildProcessError:
            th.gone = True  # not our tracee any more: it exited and was released
            self.drop(th.tid)
            return True
        if wpid == 0:
            return False
        if os.WIFSTOPPED(status):
            th.stopped = True
            event = status >> 16
            sig = os.WSTOPSIG(status)
            if event == PTRACE_EVENT_CLONE:
                with contextlib.suppress(OSError):
                    child = geteventmsg(th.tid)
                    self.threads.setdefault(child, _Thread(child))
            elif event == PTRACE_EVENT_EXEC:
                raise TargetGoneError(
                    f"process {self.pid} called exec while being stopped; capture it again")
            elif event == PTRACE_EVENT_STOP and sig in _STOP_SIGNALS:
                th.group_stop = True
            elif event == 0:
                th.signal = sig  # a signal was on its way in: hand it back on detach
            return True
        # WIFEXITED / WIFSIGNALED: the thread died before it stopped.
        th.gone = True
        self.drop(th.tid)
        return True

    def drop(self, tid: int) -> None:
        if tid not in self.dropped:
            self.dropped.append(tid)

    def live_tids(self) -> list[int]:
        tids = [t.tid for t in self.threads.values() if t.stopped and not t.gone]
        return sorted(tids, key=lambda t: (t != self.pid, t))  # leader first, as gdb expects

    def release_all(self) -> list[str]:
        """Detach every thread; never raises. Returns problems worth a warning."""
        problems: list[str] = []
        pending: list[_Thread] = []
        restopping: list[int] = []
        for th in self.threads.values():
            if th.gone:
                continue
            try:
                detach(th.tid, th.signal if th.stopped else 0)
                th.gone = True
                if th.group_stop:
                    restopping.append(th.tid)
            except OSError:
                pending.append(th)  # not in a ptrace stop yet, or dead
        # Threads that were seized but not yet stopped must stop before they can be detached;
        # dead ones must be reaped so they do not linger as ptrace zombies.
        deadline = time.monotonic() + max(1.0, self.timeout)
        delay = 0.0
        while pending and time.monotonic() < deadline:
            still: list[_Thread] = []
            for th in pending:
                state = self.procfs.thread_state(self.pid, th.tid)
                if (th.tid == self.pid and (state is None or state in "ZX")
                        and self._is_our_child()):
                    continue  # our own child: its parent (the caller) reaps it
                try:
                    wpid, status = os.waitpid(th.tid, WALL | os.WNOHANG)
                except ChildProcessError:
                    continue  # released already
                if wpid and os.WIFSTOPPED(status):
                    sig = os.WSTOPSIG(status) if status >> 16 == 0 else 0
                    if status >> 16 == PTRACE_EVENT_CLONE:
                        # auto-attached (TRACECLONE) after it ran: detach it too, or it would
                        # wait in its first stop for as long as this process lives
                        with contextlib.suppress(OSError):
                            child = geteventmsg(th.tid)
                            if child not in self.threads:
                                self.threads[child] = _Thread(child)
                                still.append(self.threads[child])
                    try:
                        detach(th.tid, sig or th.signal)
                        if th.group_stop or (status >> 16 == PTRACE_EVENT_STOP
                                             and os.WSTOPSIG(status) in _STOP_SIGNALS):
                            restopping.append(th.tid)
                        continue
                    except OSError:
                        pass
                elif wpid:
                    continue  # exited and reaped
                still.append(th)
            pending = still
            if pending:
                time.sleep(delay)
                delay = min(0.01, delay * 2 or 0.0001)
        for th in pending:
            problems.append(f"thread {th.tid} could not be detached")
        self.released_at = time.monotonic()
        self._settle(restopping)
        return problems

    def _settle(self, tids: list[int]) -> None:
        """Wait until threads detached out of a group-stop are stopped again.

        PTRACE_DETACH wakes a tracee even when job control still holds its process stopped
        (kernel/ptrace.c __ptrace_unlink re-arms JOBCTL_STOP_PENDING, then kicks the task):
        it runs in the kernel (state R) until do_signal_stop() puts it back in T, and never
        returns to user space. Returning only then means nobody (a supervisor, the caller)
        sees a job-stopped process "running" after we are done. Only R is the transition: a
        thread in S/D was resumed by a SIGCONT meanwhile; the deadline covers a spinning one.
        """
        deadline = time.monotonic() + SETTLE_TIMEOUT
        delay = 0.0
        while tids and time.monotonic() < deadline:
            tids = [t for t in tids if self.procfs.thread_state(self.pid, t) == "R"]
            if tids:
                time.sleep(delay)
                delay = min(0.005, delay * 2 or 0.00005)

    def _is_our_child(self) -> bool:
        try:
            return self.procfs.stat(self.pid).ppid == os.getpid()
        except KdumplingError:
            return False

