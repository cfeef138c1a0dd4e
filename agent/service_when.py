"""The service's conditional targets (``when = {...}``): one ``WhenWatch`` per target.

Each service loop turn calls ``tick()``: it finds the process (``process = NAME``, a PID file or a
unit: until it appears, the target is "waiting"), notices when it went away and came back as a
new PID (a restart: the watch follows it with a fresh budget of ``count`` snapshots), reads its
metrics every ``poll`` (psutil) and, with ``signal = [...]``, keeps it traced between turns
(``SignalWatch``; untraced during a cooldown). A firing trigger comes back to the service, which
captures it through the same ``capture()`` as every other target, with the trigger in the record.

The service runs its captures one at a time in one thread, so a watched process's signals wait
at their delivery stop while another target is being captured; they are delivered as soon as
the loop comes back (every signal still reaches the process, in order).
"""

from __future__ import annotations

import time
from typing import Any

import psutil
from kdumpling.errors import KdumplingError, TargetGoneError

from .log import get_logger
from .targets import ProcessTarget, import_collector
from .triggers import Fired, Firing, Probe, Sample, TriggerSet, WhenSpec
from .units import format_duration

# The loop's longest sleep while a process is traced for signals: how long a signal may wait
# at its stop for the service to hand it back (the service has other threads, so SIGCHLD cannot
# wake it reliably; see signal_watch.py); 0.05 s keeps an idle service near 0.5% of a core
# (bench/bench_watch.py, case "service").
SIGNAL_TURN = 0.05


class WhenWatch:
    def __init__(self, name: str, target: ProcessTarget, spec: WhenSpec) -> None:
        self.name, self.target, self.spec = name, target, spec
        self.pid: int | None = None
        self.ts: TriggerSet | None = None
        self.probe: Probe | None = None
        self.sample: Sample | None = None
        self.next_poll = 0.0
        self.next_look = 0.0
        self.blocked_until = 0.0
        self.error: str | None = None
        self._watch: Any = None  # SignalWatch while traced

    # -- the process ---------------------------------------------------------------------------
    def _alive(self) -> bool:
        try:
            return self.pid is not None and \
                psutil.Process(self.pid).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def _lost(self) -> None:
        self.release()
        self.pid, self.ts, self.probe, self.sample = None, None, None, None

    def _find(self, now: float) -> bool:
        try:
            pid = self.target.resolve()
            probe = Probe(pid) if any(t.kind != "signal" for t in self.spec.triggers) else None
        except TargetGoneError:
            return False
        except KdumplingError as err:  # several processes of that name, no permission, ...
            self.error = str(err)
            return False
        self.error = None
        self.pid, self.ts, self.probe = pid, self.spec.start(), probe
        self.next_poll = now + self.spec.poll
        return True

    # -- one turn ------------------------------------------------------------------------------
    def tick(self) -> Firing | None:
        """Look once (never blocks); a Firing means: capture now."""
        now = time.monotonic()
        if now >= self.next_look:  # /proc is scanned once a poll, not at every turn
            self.next_look = now + self.spec.poll
            if self.pid is None or not self._alive():
                self._lost()  # gone (or never seen): look for it, maybe restarted as a new PID
                self._find(now)
        if self.pid is None:
            return None
        ts = self.ts
        assert ts is not None and self.pid is not None
        if ts.done or now < self.blocked_until:
            self.release()
            return None
        try:
            if ts.signals:
                firing = self._signals(ts)
                if firing is not None:
                    return firing
            if self.probe is not None and now >= self.next_poll:
                self.next_poll = now + ts.poll
                self.sample = self.probe.sample(ts.metrics)
                fired = ts.check(self.sample)
                if fired is not None:
                    self.release()  # the collector seizes the threads itself
                    return Firing(fired, None, self.pid)
        except TargetGoneError:
            self._lost()
        except KdumplingError as err:  # 77: not ours to trace or read, traced by gdb, ...
            self.release()
            if str(err) != self.error:
                get_logger().warning("%s: %s; trying again every %s", self.name, err,
                                     format_duration(self.spec.poll))
            self.error = str(err)
            self.blocked_until = now + self.spec.poll
        return None

    def _signals(self, ts: TriggerSet) -> Firing | None:
        if ts.cooling() > 0:
            self.release()  # untraced during the cooldown: signals pass as without us
            return None
        sw = import_collector("process", "kdumpling.collectors.process.signal_watch")
        if self._watch is None:
            self._watch = sw.SignalWatch(self.pid, ts.signals)
        caught = self._watch.wait(timeout=0)
        if caught is None:
            return None
        watch, self._watch = self._watch, None  # the capture's collector releases it
        fired = Fired(ts.signal_trigger(caught.signo), caught.name,
                      {"thread": caught.tid, "code": caught.code,
                       "sender_pid": caught.sender_pid})
        return Firing(fired, caught, self.pid or 0, watch)

    def taken(self) -> None:
        if self.ts is not None:
            self.ts.taken_now()

    @staticmethod
    def settle(firing: Firing) -> None:
        """After the capture, whatever happened: a signal still held is delivered now (a no-op
        when the collector released the process, as it does on every path it entered)."""
        if firing.watch is not None:
            firing.watch.release()

    def release(self) -> None:
        if self._watch is not None:
            watch, self._watch = self._watch, None
            watch.release()

    # -- for the loop and STATUS= ----------------------------------------------------------
    def wake_in(self) -> float:
        """How soon the loop must come back for this target."""
        if self._watch is not None:
            return SIGNAL_TURN
        blocked = self.blocked_until - time.monotonic()
        if blocked > 0:
            return blocked
        if self.pid is None or self.ts is None:
            return self.spec.poll
        if self.ts.done:
            return self.spec.poll  # only to notice a restart
        if self.ts.signals and self.ts.cooling() == 0:
            return SIGNAL_TURN
        left = self.next_poll - time.monotonic() if self.probe is not None else self.spec.poll
        return max(0.0, min(left, self.ts.cooling() or left))

    def status(self) -> str:
        if self.pid is None or self.ts is None:
            why = f" ({self.error})" if self.error else ""
            return f"{self.name}: waiting for {self.target.label}{why}"
        ts = self.ts
        if ts.done:
            return f"{self.name}: process {self.pid}: {ts.taken}/{ts.count} taken, done"
        if self.error and time.monotonic() < self.blocked_until:
            return f"{self.name}: process {self.pid}: {self.error}"
        cool = ts.cooling()
        tail = f", cooldown {format_duration(cool)}" if cool else ""
        return (f"{self.name}: watching process {self.pid}: {ts.status(self.sample)} "
                f"({ts.taken}/{ts.count} taken{tail})")


__all__ = ["SIGNAL_TURN", "WhenWatch"]
