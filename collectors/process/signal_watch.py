"""Catch a process at a signal: snapshot it when one of the watched signals is delivered, before
its handler runs, then deliver the signal as the kernel would have (ProcDump's ``-sig``).

How (ptrace(2), "Signal-delivery-stop" and "Group-stop"; every thread is seized, none stopped):

1. PTRACE_SEIZE every thread with TRACECLONE (threads born later are traced from their first
   instruction) and TRACEEXEC, rescanning /proc/PID/task until no new thread shows up. SEIZE
   stops nothing and sends nothing: the process runs on, and its parent sees no stop.
2. Every signal the kernel is about to deliver to a traced thread stops that thread first (its
   signal-delivery-stop) and shows up in waitpid. A signal not watched is handed straight back
   with PTRACE_CONT(sig): delivered unchanged, same siginfo. A group-stop (SIGSTOP, SIGTSTP ...)
   is left in place with PTRACE_LISTEN, so job control works as without us.
3. A watched signal: the thread stays at its stop, ``wait`` returns a ``CaughtSignal`` with the
   siginfo_t from PTRACE_GETSIGINFO, and ``ProcessCollector(pid, caught=...)`` interrupts the
   other threads, captures, and records the signal in the core (pr_cursig, NT_SIGINFO).
4. Releasing detaches every thread with PTRACE_DETACH(sig) for a thread at a signal-delivery-stop,
   so the handler runs, or the default action (a SIGSEGV/SIGABRT still ends the process with the
   kernel's own core dump), or the signal stays ignored, exactly as without the watch.

Every exit path releases the threads: ``release`` (the ``with`` block's end, an error, SIGINT or
SIGTERM) interrupts the running ones and detaches each with its pending signal; if this process
dies (SIGKILL), the kernel detaches them and delivers the signal a stopped thread was held on
(kernel/ptrace.c exit_ptrace; the stop was never reaped, so its exit_code still holds the signal).

Events are peeked at with ``waitid(P_ALL, __WALL | __WNOTHREAD | WNOHANG | WNOWAIT)``: one call
for all threads, and only this thread's tracees and children; all but a watched signal's stop are
then reaped (``_drain`` says why that one is not). So the watching thread must not have
children of its own that something else waits for (the agent's CLI and service have none).
Between empty peeks it sleeps until SIGCHLD (the kernel sends it to the tracer at every stop)
when it runs alone in the main thread (the CLI), else for at most ``MAX_POLL_SLEEP``: that is
how long a signal may wait at its stop for us to hand it back, and what an idle watch costs
(bench/bench_watch.py).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import struct
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import NoReturn

from kdumpling.errors import SourceReadError, TargetGoneError, UsageError

from .._procfs import ProcFS
from .collector import DEFAULT_STOP_TIMEOUT
from .tracer import (
    _STOP_SIGNALS,
    PTRACE_EVENT_CLONE,
    PTRACE_EVENT_EXEC,
    PTRACE_EVENT_STOP,
    PTRACE_O_TRACECLONE,
    PTRACE_O_TRACEEXEC,
    WALL,
    SignalGuard,
    Tracer,
    _Thread,
    cont,
    geteventmsg,
    getsiginfo,
    interrupt,
    listen,
    seize,
)

WNOTHREAD = 0x20000000  # include/uapi/linux/wait.h __WNOTHREAD: only this thread's tracees
MAX_POLL_SLEEP = 0.01  # seconds between empty polls, at most (when SIGCHLD cannot wake us)
SIGCHLD_WAIT = 1.0  # the longest wait for a SIGCHLD before peeking anyway
# Signals a watch cannot catch: SIGKILL never stops at a delivery stop, SIGSTOP is job control.
UNWATCHABLE = frozenset((signal.SIGKILL, signal.SIGSTOP))


def parse_signal(text: str | int) -> int:
    """A signal by number or name, with or without SIG: ``USR1``, ``SIGSEGV``, ``10``."""
    if isinstance(text, int) or text.strip().isdigit():
        num = int(text)
    else:
        name = text.strip().upper()
        name = name if name.startswith("SIG") else "SIG" + name
        try:
            num = int(signal.Signals[name])
        except KeyError:
            raise UsageError(f"unknown signal {text!r}") from None
    if num in UNWATCHABLE:
        raise UsageError(f"{signal_name(num)} cannot be watched: it never reaches a "
                         "signal-delivery-stop that a tracer could hand back")
    if not 1 <= num < signal.NSIG:
        raise UsageError(f"no signal number {num}")
    return num


def signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"SIG{num}"


class TargetExitedError(TargetGoneError):
    """The watched process ended; ``status`` is its wait status when the watch saw it end."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    @property
    def exit_status(self) -> int | None:
        """The process's own exit code, or -N when signal N killed it (Popen's convention)."""
        if self.status is None:
            return None
        if os.WIFEXITED(self.status):
            return os.WEXITSTATUS(self.status)
        return -os.WTERMSIG(self.status)


def describe_exit(pid: int, status: int | None) -> str:
    if status is None:
        return f"process {pid} exited"
    if os.WIFEXITED(status):
        return f"process {pid} exited with code {os.WEXITSTATUS(status)}"
    sig = os.WTERMSIG(status)
    core = " (core dumped)" if os.WCOREDUMP(status) else ""
    return f"process {pid} was killed by {signal_name(sig)}{core}"


@dataclass
class CaughtSignal:
    """A watched signal holding one thread at its signal-delivery-stop."""

    tracer: Tracer  # holds every thread of the process; the collector stops the others
    tid: int
    signo: int
    siginfo: bytes  # siginfo_t as PTRACE_GETSIGINFO returned it (128 bytes)
    at: float  # time.time() of the catch

    @property
    def name(self) -> str:
        return signal_name(self.signo)

    @property
    def code(self) -> int:
        return int(struct.unpack_from("=iii", self.siginfo)[2])

    @property
    def sender_pid(self) -> int:
        # si_pid follows the three ints (and, on 64-bit, 4 bytes of padding) for SI_USER,
        # SI_QUEUE and SI_TKILL (include/uapi/asm-generic/siginfo.h _kill)
        return int(struct.unpack_from("=i", self.siginfo, 16)[0])


class SignalWatch:
    """Trace every thread of ``pid`` until one of ``signals`` is about to be delivered.

    Use it as a context manager; ``wait()`` returns a ``CaughtSignal``, capture it with
    ``ProcessCollector(pid, caught=...)`` (whose release detaches everything and delivers the
    signal), and the next ``wait()`` seizes the process again. Only the thread that entered may
    call ``wait``: ptrace ties tracees to their tracer thread."""

    def __init__(self, pid: int, signals: Iterable[int], *,
                 procfs: str | os.PathLike[str] = "/proc",
                 stop_timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        self.signals = frozenset(signals)
        if not self.signals:
            raise UsageError("a signal watch needs at least one signal")
        bad = self.signals & UNWATCHABLE
        if bad:
            raise UsageError(f"{', '.join(map(signal_name, sorted(bad)))} cannot be watched")
        if pid == os.getpid():
            raise UsageError("a process cannot watch itself with ptrace")
        self.pid = pid
        self.procfs = ProcFS(procfs)
        self.stop_timeout = stop_timeout
        self.passed: dict[int, int] = {}  # signals handed back untouched, by number
        self.exit_status: int | None = None
        self._tracer: Tracer | None = None
        self._guard = SignalGuard()

    # context manager ---------------------------------------------------------------------------
    def __enter__(self) -> SignalWatch:
        self._guard.install()
        try:
            self.attach()
        except BaseException:
            self.release()
            self._guard.restore()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.release()
        finally:
            self._guard.restore()

    @property
    def attached(self) -> bool:
        t = self._tracer
        return t is not None and t.released_at is None

    # seizing ---------------------------------------------------------------------------------
    def attach(self) -> None:
        """Seize every thread without stopping any (a no-op while attached)."""
        if self.attached:
            return
        if not self.procfs.exists(self.pid):
            raise TargetExitedError(f"process {self.pid} does not exist")
        tracer = self._tracer = Tracer(self.pid, self.procfs, self.stop_timeout)
        me = threading.get_native_id()
        options = PTRACE_O_TRACECLONE | PTRACE_O_TRACEEXEC
        with self._guard.deferred():
            while True:
                new = [t for t in self.procfs.tasks(self.pid)
                       if t not in tracer.threads and t not in tracer.dropped]
                for tid in new:
                    try:
                        seize(tid, options)
                    except OSError as err:
                        state = self.procfs.thread_state(self.pid, tid)
                        if err.errno == errno.ESRCH or state is None or state in "ZX":
                            tracer.drop(tid)
                            continue
                        if err.errno != errno.EPERM:
                            raise SourceReadError(
                                f"cannot trace thread {tid}: {err.strerror}") from err
                        if tracer._tracer_of(tid) != me:  # not auto-attached by TRACECLONE
                            raise self.procfs.permission_error(self.pid, "trace threads") \
                                from err
                    tracer.threads[tid] = _Thread(tid)
                if not new:
                    break
        if not any(not t.gone for t in tracer.threads.values()):
            raise TargetExitedError(f"process {self.pid} exited while being seized")

    # waiting ---------------------------------------------------------------------------------
    def wait(self, timeout: float | None = None) -> CaughtSignal | None:
        """Hand back every other signal until a watched one arrives; None after ``timeout``.

        Raises ``TargetExitedError`` when the process ends (its wait status in ``status``)."""
        self.attach()
        tracer = self._tracer
        assert tracer is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        # Alone in the main thread, SIGCHLD (sent to a tracer at every tracee stop and exit,
        # kernel/signal.c do_notify_parent_cldstop) wakes us: blocked, it waits in the queue
        # for sigtimedwait, so none is lost between a peek and the wait. With other threads it
        # could be delivered to one of them instead: poll then.
        by_sigchld = (timeout != 0 and threading.active_count() == 1
                      and threading.current_thread() is threading.main_thread())
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD}) if by_sigchld else None
        try:
            delay = 0.0
            while True:
                with self._guard.deferred():
                    caught = self._drain(tracer)
                if caught is not None:
                    return caught
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    return None
                left = SIGCHLD_WAIT if deadline is None else min(SIGCHLD_WAIT, deadline - now)
                if by_sigchld:
                    signal.sigtimedwait({signal.SIGCHLD}, max(0.0, left))
                    continue
                # busy target: poll again soon; quiet one: back off to MAX_POLL_SLEEP
                delay = min(MAX_POLL_SLEEP, delay * 2 or 0.0005)
                time.sleep(max(0.0, min(delay, left)))
        finally:
            if old is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def _drain(self, tracer: Tracer) -> CaughtSignal | None:
        """Handle every event waiting now; the first watched signal ends the drain.

        Events are peeked at with WNOWAIT first: a watched signal's stop is left unreaped,
        because reaping a ptrace stop zeroes the tracee's exit_code, the signal it resumes
        with (kernel/exit.c wait_task_stopped). Unreaped, a tracer that dies (SIGKILL) before
        it detaches still lets the kernel deliver the signal (kernel/signal.c ptrace_stop
        returns exit_code when the tracer unlinks)."""
        while True:
            try:
                peek = os.waitid(os.P_ALL, 0, os.WEXITED | os.WSTOPPED | os.WNOHANG
                                 | os.WNOWAIT | WALL | WNOTHREAD)
            except ChildProcessError:
                self._gone(tracer, None)  # no tracee left, and we missed the leader's status
            if peek is None or peek.si_pid == 0:
                return None
            tid = peek.si_pid
            th = tracer.threads.get(tid)
            if (th is not None and peek.si_code == os.CLD_TRAPPED
                    and peek.si_status in self.signals):  # events carry bits above 0xff
                return self._catch(tracer, th, peek.si_status)
            wpid, status = os.waitpid(tid, WALL | os.WNOHANG)
            if wpid:
                self._event(tracer, wpid, status)

    def _catch(self, tracer: Tracer, th: _Thread, sig: int) -> CaughtSignal:
        th.stopped, th.signal = True, sig  # held here; delivered when released
        tracer.first_stop = time.monotonic()
        try:
            info = getsiginfo(th.tid)
        except OSError:
            info = struct.pack("=iii", sig, 0, 0).ljust(128, b"\0")
        return CaughtSignal(tracer, th.tid, sig, info, time.time())

    def _event(self, tracer: Tracer, tid: int, status: int) -> None:
        th = tracer.threads.get(tid)
        if th is None:
            if not os.WIFSTOPPED(status):
                return  # a thread that vanished with an exec, reaped now: nothing to do
            # a new thread's first stop arrived before its parent's clone event
            th = tracer.threads[tid] = _Thread(tid)
        if not os.WIFSTOPPED(status):  # exited or killed
            th.gone = True
            tracer.drop(tid)
            if tid == self.pid:  # the leader is reported last, with the process's status
                self._gone(tracer, status)
            return
        event, sig = status >> 16, os.WSTOPSIG(status)
        try:
            if event == 0:
                self.passed[sig] = self.passed.get(sig, 0) + 1
                cont(tid, sig)  # not watched: delivered unchanged
            elif event == PTRACE_EVENT_STOP and sig in _STOP_SIGNALS:
                listen(tid)  # group-stop: stay stopped for job control, hear SIGCONT
            else:
                if event == PTRACE_EVENT_CLONE:
                    child = geteventmsg(tid)
                    tracer.threads.setdefault(child, _Thread(child))
                elif event == PTRACE_EVENT_EXEC:
                    # every other thread is gone (ptrace(2) "execve under ptrace"); they are
                    # reaped as unknown pids above
                    for other in list(tracer.threads):
                        if other != self.pid:
                            del tracer.threads[other]
                    tracer.threads.setdefault(self.pid, _Thread(self.pid))
                cont(tid, 0)  # a new thread's first stop, SIGCONT after LISTEN, clone, exec
        except OSError as err:
            if err.errno != errno.ESRCH:
                raise

    def _gone(self, tracer: Tracer, status: int | None) -> NoReturn:
        self.exit_status = status
        tracer.released_at = time.monotonic()
        raise TargetExitedError(describe_exit(self.pid, status), status)

    # releasing -------------------------------------------------------------------------------
    def release(self) -> list[str]:
        """Detach every thread, each with the signal it is held on; never raises."""
        tracer = self._tracer
        if tracer is None or tracer.released_at is not None:
            return []
        self._guard.hold()
        try:
            for th in tracer.threads.values():
                if not th.stopped and not th.gone:
                    with contextlib.suppress(OSError):
                        interrupt(th.tid)  # a running tracee can only be detached from a stop
            return tracer.release_all()
        finally:
            self._guard.unhold()


__all__ = ["MAX_POLL_SLEEP", "UNWATCHABLE", "CaughtSignal", "SignalWatch", "TargetExitedError",
           "describe_exit", "parse_signal", "signal_name"]
