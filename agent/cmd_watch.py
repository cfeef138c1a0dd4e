"""``watch PID|NAME``: snapshot a process when it misbehaves (ProcDump for Linux's triggers).

The loop: find the process (``--wait``: until it starts), then every ``--poll`` sample its
metrics with psutil and feed the ``TriggerSet``; with ``--signal`` the process is traced
meanwhile and a watched signal ends the wait at once (``SignalWatch``, which holds the signal
while the capture runs and delivers it after). A firing trigger takes one snapshot through the
same ``capture()`` as the ``capture`` command, with the trigger in its record, its ``--json``
line and the dump's annotations; after ``-n COUNT`` snapshots (at least ``--cooldown`` apart)
the command exits 0. During a cooldown the process is not traced: its signals pass untouched.

If the process ends first, one line says how many of COUNT were taken and how it ended (its
exit code when the signal watch saw it), and the exit code is 69; a capture cut short by its
exit leaves nothing behind (the store abandons the reservation, ``write_dump`` removes its
``.incomplete`` file).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING, Any

from kdumpling.errors import TargetGoneError, UsageError

from .common import (
    Context,
    add_common,
    add_write_options,
    cli_write_options,
    destination,
    report,
)
from .progress import ProgressBar
from .targets import ProcessTarget, import_collector
from .triggers import (
    DEFAULT_COOLDOWN,
    DEFAULT_COUNT,
    DEFAULT_POLL,
    Fired,
    Firing,
    Probe,
    Sample,
    TriggerSet,
    triggers_from_options,
)
from .units import format_duration, parse_duration

# Start-up time (issue 12): psutil and the capture are imported where they are used.
if TYPE_CHECKING:
    from .settings import Destination


def register(sub: argparse._SubParsersAction[Any]) -> None:
    # "resolve": the trigger --threads N takes the option string that the write options give
    # to the compression threads, which become --compress-threads here
    p = sub.add_parser(
        "watch", help="snapshot a process when a trigger fires", conflict_handler="resolve",
        description="Watch a live process and snapshot it when its CPU use stays high (or "
                    "low), its memory, threads or file descriptors pass a mark, or it receives "
                    "a signal (caught before its handler runs, then delivered). Takes -n COUNT "
                    "snapshots at least --cooldown apart, then exits 0; exits 69 if the process "
                    "ends first.")
    ProcessTarget.add_arguments(p)
    add_write_options(p)
    p.add_argument("--compress-threads", dest="threads", type=_positive, metavar="N",
                   help="compression threads (capture's --threads)")
    t = p.add_argument_group("triggers (any that fires takes a snapshot; give at least one)")
    t.add_argument("--cpu", metavar="PCT", help="CPU use at or above PCT (100 = one core)")
    t.add_argument("--cpu-below", metavar="PCT", help="CPU use below PCT (a stall)")
    t.add_argument("--for", dest="for_", metavar="DURATION",
                   help="--cpu/--cpu-below must hold at every poll for this long "
                        "(default: one poll)")
    t.add_argument("--memory", metavar="SIZE", help="resident set at or above SIZE (512M, 2G)")
    t.add_argument("--memory-below", metavar="SIZE", help="resident set below SIZE")
    t.add_argument("--threads", dest="thread_count", metavar="N",
                   help="at least N threads")
    t.add_argument("--fds", metavar="N", help="at least N open file descriptors")
    t.add_argument("--signal", dest="signals", action="append", default=[], metavar="SIG",
                   help="when SIG (USR1, SIGSEGV, 10) is delivered, before its handler runs; "
                        "repeatable")
    w = p.add_argument_group("watching")
    w.add_argument("-n", "--count", type=int, default=DEFAULT_COUNT, metavar="COUNT",
                   help=f"snapshots to take, then exit (default {DEFAULT_COUNT})")
    w.add_argument("--cooldown", default=f"{DEFAULT_COOLDOWN:g}s", metavar="DURATION",
                   help=f"at least this long between snapshots (default {DEFAULT_COOLDOWN:g}s)")
    w.add_argument("--poll", default=f"{DEFAULT_POLL:g}s", metavar="DURATION",
                   help=f"how often the metrics are read (default {DEFAULT_POLL:g}s)")
    w.add_argument("--wait", action="store_true",
                   help="NAME need not exist yet: wait for it to start")
    add_common(p, "print one JSON object per snapshot, per line, with its \"trigger\"")
    p.set_defaults(func=run)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a positive number: {text!r}")
    return int(text)


def _duration(text: str, what: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as err:
        raise UsageError(f"{what}: {err}") from None


def trigger_set(args: argparse.Namespace) -> TriggerSet:
    poll = _duration(args.poll, "--poll")
    if poll <= 0:
        raise UsageError("--poll must be more than 0")
    try:
        triggers = triggers_from_options(
            cpu=args.cpu, cpu_below=args.cpu_below, for_=args.for_, memory=args.memory,
            memory_below=args.memory_below, threads=args.thread_count, fds=args.fds,
            signals=args.signals, poll=poll)
    except UsageError as err:
        raise UsageError(f"--{err}") from None
    return TriggerSet(triggers, count=args.count, cooldown=_duration(args.cooldown, "--cooldown"),
                      poll=poll)


class Status:
    """The progress line on a terminal: what is watched, values against thresholds."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._shown = False

    def show(self, text: str) -> None:
        if self.enabled:
            sys.stderr.write("\r" + text[:200] + "\x1b[K")
            sys.stderr.flush()
            self._shown = True

    def clear(self) -> None:
        if self._shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self._shown = False


class Watch:
    """One ``watch`` run: the target, its triggers, where snapshots go, and the tally."""

    def __init__(self, ctx: Context, target: ProcessTarget, ts: TriggerSet,
                 dest: Destination) -> None:
        self.ctx, self.target, self.ts, self.dest = ctx, target, ts, dest
        self.pid = 0
        self.label = target.label
        self.worst = 0
        self._watch: Any = None  # SignalWatch while the process is traced
        interactive = not ctx.json and not ctx.quiet and sys.stderr.isatty()
        self.status = Status(interactive)
        self.interactive = interactive

    # -- finding the process ---------------------------------------------------------------
    def find(self, wait: bool) -> int:
        while True:
            try:
                return self.target.resolve()
            except TargetGoneError:
                if not wait:
                    raise
            self.status.show(f"waiting for {self.target.label} to start")
            time.sleep(self.ts.poll)

    # -- the loop ----------------------------------------------------------------------------
    def run(self, wait: bool) -> int:
        from . import processes  # imported here (psutil): start-up time (issue 12)
        self.pid = self.find(wait)
        self.label = f"process {self.pid} ({processes.comm(self.pid) or '?'})"
        if not self.ctx.json and not self.interactive:
            self.ctx.say(f"watching {self.label}: {self.ts.describe()}; {self.ts.count} "
                         f"snapshot(s), cooldown {format_duration(self.ts.cooldown)}")
        try:
            self._loop()
        except TargetGoneError as err:  # the process ended (or vanished mid-capture)
            raise TargetGoneError(
                f"{err}; {self.ts.taken} of {self.ts.count} snapshot(s) taken") from None
        finally:
            self.status.clear()
        return self.worst

    def _loop(self) -> None:
        ts = self.ts
        probe = Probe(self.pid) if ts.polled else None
        sample: Sample | None = None
        next_poll = time.monotonic() + ts.poll
        while not ts.done:
            cooling = ts.cooling()
            if ts.signals and cooling == 0:
                fired = self._wait_signal_or_poll(next_poll)
            else:
                self._sleep_until(next_poll if cooling == 0 else
                                  min(next_poll, time.monotonic() + cooling))
                fired = None
            if fired is None and probe is not None and time.monotonic() >= next_poll:
                next_poll = time.monotonic() + ts.poll
                sample = probe.sample(ts.metrics)
                fired = ts.check(sample)
                if fired is None:
                    self.status.show(self._line(sample))
            elif fired is None and probe is None:
                if not self._alive():
                    raise TargetGoneError(f"process {self.pid} exited")
                next_poll = time.monotonic() + ts.poll
                self.status.show(self._line(None))
            if fired is not None:
                self._snapshot(fired)

    def _line(self, sample: Sample | None) -> str:
        cool = self.ts.cooling()
        tail = f" | cooldown {format_duration(cool)}" if cool else ""
        return (f"watching {self.label}: {self.ts.status(sample)} | "
                f"{self.ts.taken}/{self.ts.count} taken{tail}")

    def _alive(self) -> bool:
        import psutil  # imported here: start-up time (issue 12)
        try:
            return psutil.Process(self.pid).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def _sleep_until(self, when: float) -> None:
        left = when - time.monotonic()
        if left > 0:
            time.sleep(left)

    # -- signals ---------------------------------------------------------------------------
    def _wait_signal_or_poll(self, next_poll: float) -> Fired | None:
        """Trace the process until a watched signal or the next poll; a signal's snapshot is
        taken here, while the signal is held, and None comes back."""
        sw = import_collector("process", "kdumpling.collectors.process.signal_watch")
        if self._watch is None:
            self._watch = sw.SignalWatch(self.pid, self.ts.signals)
            self._watch.__enter__()
        try:
            caught = self._watch.wait(timeout=max(0.0, next_poll - time.monotonic()))
        except TargetGoneError:  # TargetExitedError: says how the process ended
            self._close_watch()
            raise
        if caught is None:
            if not self.ts.polled:
                self.status.show(self._line(None))
            return None
        trigger = self.ts.signal_trigger(caught.signo)
        fired = Fired(trigger, caught.name, {"thread": caught.tid, "code": caught.code,
                                              "sender_pid": caught.sender_pid})
        try:
            self._snapshot(fired, caught)
        finally:
            # the collector detached (delivering the signal); the cooldown runs untraced
            self._close_watch()
        return None

    def _close_watch(self) -> None:
        if self._watch is not None:
            watch, self._watch = self._watch, None
            watch.__exit__(None, None, None)

    def close(self) -> None:
        self._close_watch()

    # -- one snapshot ----------------------------------------------------------------------
    def _snapshot(self, fired: Fired, caught: Any = None) -> None:
        from .capture import capture  # imported here (and below): start-up time (issue 12)
        from .settings import CaptureSettings
        self.status.clear()
        if caught is None:
            self._close_watch()  # the collector seizes the threads itself
        t = self.target
        opener = Firing(fired, caught, self.pid).opener(t)  # this PID, and the held signal

        bar = ProgressBar(t.label) if self.interactive else None
        annotations = dict(getattr(self.ctx.args, "annotate", []) or [])
        annotations["trigger"] = fired.annotation()
        settings = CaptureSettings.from_config(
            self.ctx.config, options=cli_write_options(self.ctx.args), annotations=annotations,
            progress=bar, cancel=self.ctx.cancel)
        settings.opener = opener
        settings.trigger = fired.to_json()
        self.ctx.capturing = True
        try:
            result = capture(t, self.dest, settings)
        finally:
            self.ctx.capturing = False
            if bar:
                bar.close()
        self.ts.taken_now()
        self.worst = max(self.worst, result.exit_code)
        report(self.ctx, result)
        if not self.ctx.json:
            self.ctx.say(f"  trigger: {fired.annotation()} "
                         f"({self.ts.taken} of {self.ts.count})")


def run(ctx: Context) -> int:
    a = ctx.args
    ts = trigger_set(a)
    a.select = a.select or "only"
    target = ProcessTarget.from_args(a)
    if a.wait and target.pid is not None:
        raise UsageError("--wait needs a process NAME, not a PID")
    dest = destination(ctx, a.output)
    if ts.count > 1 and (dest.path is not None or dest.stream is not None):
        raise UsageError(f"-n {ts.count} needs a snapshot directory for -o, not one file")
    watch = Watch(ctx, target, ts, dest)
    try:
        return watch.run(a.wait)
    finally:
        watch.close()
        if dest.store is not None:
            dest.store.close()


__all__ = ["Watch", "register", "run", "trigger_set"]
