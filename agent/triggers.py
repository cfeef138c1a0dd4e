"""Conditional snapshots: what fires them (CPU, memory, threads, fds, a signal), how the process
is measured (psutil), and how many snapshots are taken how far apart.

- ``Trigger``: one condition. ``cpu``/``cpu-below`` compare the CPU use between two polls
  (psutil's ``cpu_percent``: 100 = one full core, as top shows it) and must hold at ``polls``
  consecutive polls (``--for`` divided by the poll interval, at least one). ``memory`` /
  ``memory-below`` compare the resident set (RSS), ``threads`` and ``fds`` the counts; a
  ``signal`` trigger is the ptrace signal watch (``kdumpling.collectors.process.signal_watch``)
  and is never polled.
- ``Probe``: one psutil.Process, sampled once per poll inside ``oneshot()`` (one read of
  /proc/PID/stat and status for all the numbers).
- ``TriggerSet``: the conditions, their streaks and the snapshot budget: ``count`` snapshots at
  least ``cooldown`` apart. Time comes from an injectable clock, so the cooldown is testable.
- ``when_from_config`` / ``triggers_from_options``: the service's ``when = {...}`` table and the
  ``watch`` command's options, parsed into one ``TriggerSet`` (``WhenSpec`` for the service).
- ``Firing``: a trigger that fired, for ``capture()``: it opens the collector on the PID that fired
  and, for a signal, on the thread held at its delivery stop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kdumpling.errors import ConfigError, PermissionDeniedError, TargetGoneError, UsageError

from .targets import OpenContext, Opened, Opener, ProcessTarget, Target, import_collector
from .units import format_duration, format_size, parse_duration, parse_size

if TYPE_CHECKING:
    import psutil

DEFAULT_POLL = 1.0
DEFAULT_COOLDOWN = 10.0
DEFAULT_COUNT = 1

# kind -> what it measures, and whether it fires at/above (True) or below (False) the threshold
METRICS: dict[str, tuple[str, bool]] = {
    "cpu": ("cpu", True), "cpu-below": ("cpu", False),
    "memory": ("rss", True), "memory-below": ("rss", False),
    "threads": ("threads", True), "fds": ("fds", True),
}
KINDS = (*METRICS, "signal")


@dataclass(frozen=True)
class Sample:
    """One poll of the process: CPU % since the previous poll (None on the first), RSS bytes,
    thread and open-descriptor counts."""

    cpu: float | None
    rss: int
    threads: int
    fds: int

    def get(self, metric: str) -> float | None:
        value: float | None = getattr(self, metric)
        return value


@dataclass(frozen=True)
class Trigger:
    kind: str
    threshold: float  # percent, bytes or a count; the signal number for kind "signal"
    for_seconds: float | None = None  # cpu / cpu-below: how long it must hold
    polls: int = 1  # consecutive polls that must meet it (from for_seconds and the poll)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UsageError(f"unknown trigger {self.kind!r}; use one of: {', '.join(KINDS)}")

    @property
    def metric(self) -> str | None:
        return METRICS[self.kind][0] if self.kind in METRICS else None

    def met(self, value: float) -> bool:
        above = METRICS[self.kind][1]
        return value >= self.threshold if above else value < self.threshold

    def show(self, value: float | None = None) -> str:
        """``cpu 97% >= 50% for 2s`` (with a value) or ``cpu >= 50% for 2s``."""
        fmt = _formatter(self.kind)
        op = ">=" if self.kind not in METRICS or METRICS[self.kind][1] else "<"
        name = self.kind.replace("-below", "")
        if self.kind == "signal":
            from kdumpling.collectors.process.signal_watch import signal_name
            return f"signal {signal_name(int(self.threshold))}"
        now = f" {fmt(value)}" if value is not None else ""
        for_ = f" for {format_duration(self.for_seconds)}" if self.for_seconds else ""
        return f"{name}{now} {op} {fmt(self.threshold)}{for_}"

    def to_json(self, value: float | str | None) -> dict[str, Any]:
        """What a snapshot's record, ``--json`` and the dump's annotation say fired it."""
        out: dict[str, Any] = {"kind": self.kind, "value": value,
                               "threshold": _plain(self.threshold)}
        if self.kind == "signal":
            from kdumpling.collectors.process.signal_watch import signal_name
            out["threshold"] = signal_name(int(self.threshold))
        if self.for_seconds is not None:
            out["for"] = self.for_seconds
        return out


def _plain(v: float) -> float | int:
    return int(v) if float(v).is_integer() else round(v, 1)


def _formatter(kind: str) -> Callable[[float], str]:
    if kind.startswith("cpu"):
        return lambda v: f"{v:.0f}%"
    if kind.startswith("memory"):
        return format_size
    return lambda v: f"{int(v)}"


@dataclass(frozen=True)
class Fired:
    trigger: Trigger
    value: float | str  # the measured value (or the signal's name)
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        value = self.value if isinstance(self.value, str) else _plain(self.value)
        return {**self.trigger.to_json(value), **self.extra}

    def annotation(self) -> str:
        """One line for the dump's ``trigger`` annotation."""
        if self.trigger.kind == "signal":
            return self.trigger.show()
        assert not isinstance(self.value, str)
        return self.trigger.show(self.value)


class Probe:
    """The watched process's metrics through psutil; the first ``sample`` primes the CPU use."""

    def __init__(self, pid: int) -> None:
        import psutil  # imported here: start-up time (issue 12)
        self.pid = pid
        try:
            self.process = psutil.Process(pid)
            self.process.cpu_percent(None)  # primes the counter: the next call measures from here
        except psutil.Error as err:
            raise _translate(err, pid) from None

    def sample(self, metrics: set[str]) -> Sample:
        import psutil  # imported here: start-up time (issue 12)
        p = self.process
        try:
            with p.oneshot():
                cpu = p.cpu_percent(None) if "cpu" in metrics else None
                rss = p.memory_info().rss if "rss" in metrics else 0
                threads = p.num_threads() if "threads" in metrics else 0
                fds = p.num_fds() if "fds" in metrics else 0
                if p.status() == psutil.STATUS_ZOMBIE:
                    raise psutil.ZombieProcess(self.pid)
        except psutil.Error as err:
            raise _translate(err, self.pid) from None
        return Sample(cpu, rss, threads, fds)


def _translate(err: psutil.Error, pid: int) -> Exception:
    import psutil  # imported here: start-up time (issue 12)
    if isinstance(err, psutil.ZombieProcess):
        return TargetGoneError(f"process {pid} has exited (zombie)")
    if isinstance(err, psutil.NoSuchProcess):
        return TargetGoneError(f"process {pid} has exited")
    if isinstance(err, psutil.AccessDenied):
        return PermissionDeniedError(
            f"process {pid}: permission denied reading its metrics (run as its user or root)")
    return TargetGoneError(f"process {pid}: {err}")


@dataclass
class TriggerSet:
    """The conditions of one watch and its budget: ``count`` snapshots ``cooldown`` apart."""

    triggers: tuple[Trigger, ...]
    count: int = DEFAULT_COUNT
    cooldown: float = DEFAULT_COOLDOWN
    poll: float = DEFAULT_POLL
    clock: Callable[[], float] = time.monotonic
    taken: int = 0
    last_taken: float | None = None
    streaks: dict[Trigger, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.triggers:
            raise UsageError("give at least one trigger: --cpu, --cpu-below, --memory, "
                             "--memory-below, --threads, --fds or --signal")
        if self.count < 1:
            raise UsageError(f"count must be at least 1, got {self.count}")
        if self.cooldown < 0:
            raise UsageError("cooldown must not be negative")
        if self.poll <= 0:
            raise UsageError("the poll interval must be positive")

    @property
    def polled(self) -> tuple[Trigger, ...]:
        return tuple(t for t in self.triggers if t.kind != "signal")

    @property
    def signals(self) -> tuple[int, ...]:
        return tuple(int(t.threshold) for t in self.triggers if t.kind == "signal")

    def signal_trigger(self, signo: int) -> Trigger:
        return next(t for t in self.triggers if t.kind == "signal" and t.threshold == signo)

    @property
    def metrics(self) -> set[str]:
        return {t.metric for t in self.polled if t.metric}

    @property
    def done(self) -> bool:
        return self.taken >= self.count

    def cooling(self) -> float:
        """Seconds until the cooldown since the last snapshot is over (0: ready)."""
        if self.last_taken is None:
            return 0.0
        return max(0.0, self.cooldown - (self.clock() - self.last_taken))

    def check(self, sample: Sample) -> Fired | None:
        """Feed one poll; the first trigger whose streak is complete fires, if the budget and
        the cooldown allow a snapshot now. Streaks keep counting during the cooldown."""
        fired: Fired | None = None
        for t in self.polled:
            value = sample.get(t.metric or "")
            if value is not None and t.met(value):
                self.streaks[t] = self.streaks.get(t, 0) + 1
                if fired is None and self.streaks[t] >= t.polls:
                    fired = Fired(t, value)
            else:
                self.streaks[t] = 0
        if fired is None or self.done or self.cooling() > 0:
            return None
        return fired

    def taken_now(self) -> None:
        """A snapshot was taken: count it, start the cooldown, and make every streak start over
        (a condition that persists must hold for its whole ``--for`` again)."""
        self.taken += 1
        self.last_taken = self.clock()
        self.streaks.clear()

    def describe(self) -> str:
        return ", ".join(t.show() for t in self.triggers)

    def status(self, sample: Sample | None) -> str:
        """Current values against the thresholds, for progress lines and STATUS=."""
        if sample is None:
            return self.describe()
        parts = []
        for t in self.triggers:
            if t.kind == "signal":
                parts.append(t.show())
                continue
            value = sample.get(t.metric or "")
            if value is None:
                parts.append(t.show())
                continue
            streak = f" [{self.streaks.get(t, 0)}/{t.polls}]" if t.polls > 1 else ""
            parts.append(t.show(value) + streak)
        return ", ".join(parts)


@dataclass
class Firing:
    """A trigger that fired, and the signal held for it (None for a polled trigger)."""

    fired: Fired
    caught: Any = None  # kdumpling.collectors.process.signal_watch.CaughtSignal
    pid: int = 0
    watch: Any = None  # the SignalWatch holding ``caught``

    def opener(self, target: ProcessTarget) -> Opener:
        """The capture's collector: the PID that fired (not a fresh lookup by name) and, for a
        signal, the held thread (releasing it delivers the signal)."""
        kwargs = {k: v for k, v in (("mode", target.mode), ("filter_mask", target.filter),
                                    ("size_cap", target.size_cap)) if v is not None}
        pid, caught = self.pid, self.caught

        def open_it(_target: Target, _ctx: OpenContext) -> Opened:
            from . import processes  # imported here (psutil): start-up time (issue 12)
            mod = import_collector("process", "kdumpling.collectors.process")
            return Opened(mod.ProcessCollector(pid, caught=caught, **kwargs), pid=pid,
                          exe=processes.exe(pid))

        return open_it


def polls_for(for_seconds: float | None, poll: float) -> int:
    """Consecutive polls that cover ``for_seconds`` (at least one)."""
    if not for_seconds:
        return 1
    return max(1, math.ceil(for_seconds / poll - 1e-9))


def _pct(value: object, what: str) -> float:
    try:
        pct = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise UsageError(f"{what}: not a percentage: {value!r}") from None
    if not 0 <= pct <= 100 * 4096 or math.isnan(pct):
        raise UsageError(f"{what}: {pct} is not a CPU percentage (100 = one core)")
    return pct


def _duration(value: object, what: str) -> float:
    try:
        return parse_duration(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as err:
        raise UsageError(f"{what}: {err}") from None


def _size(value: object, what: str) -> float:
    try:
        return float(parse_size(value))  # type: ignore[arg-type]
    except (TypeError, ValueError) as err:
        raise UsageError(f"{what}: {err}") from None


def _count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise UsageError(f"{what}: not a count: {value!r}")
    try:
        n = int(value)
    except ValueError:
        raise UsageError(f"{what}: not a count: {value!r}") from None
    if n < 1:
        raise UsageError(f"{what}: must be at least 1")
    return n


def triggers_from_options(*, cpu: object = None, cpu_below: object = None,
                          for_: object = None, memory: object = None,
                          memory_below: object = None, threads: object = None,
                          fds: object = None, signals: Sequence[object] = (),
                          poll: float = DEFAULT_POLL) -> tuple[Trigger, ...]:
    """Triggers from option values (CLI strings or config values); UsageError names the option."""
    from kdumpling.collectors.process.signal_watch import parse_signal

    for_seconds = _duration(for_, "for") if for_ not in (None, "") else None
    if for_seconds is not None and cpu is None and cpu_below is None:
        raise UsageError("for: only applies to cpu and cpu-below")
    out: list[Trigger] = []
    polls = polls_for(for_seconds, poll)
    if cpu is not None:
        out.append(Trigger("cpu", _pct(cpu, "cpu"), for_seconds, polls))
    if cpu_below is not None:
        out.append(Trigger("cpu-below", _pct(cpu_below, "cpu-below"), for_seconds, polls))
    if memory is not None:
        out.append(Trigger("memory", _size(memory, "memory")))
    if memory_below is not None:
        out.append(Trigger("memory-below", _size(memory_below, "memory-below")))
    if threads is not None:
        out.append(Trigger("threads", float(_count(threads, "threads"))))
    if fds is not None:
        out.append(Trigger("fds", float(_count(fds, "fds"))))
    seen: set[int] = set()
    for s in signals:
        num = parse_signal(s)  # type: ignore[arg-type]
        if num not in seen:
            seen.add(num)
            out.append(Trigger("signal", float(num)))
    return tuple(out)


WHEN_KEYS = ("cpu", "cpu_below", "for", "memory", "memory_below", "threads", "fds", "signal")


@dataclass(frozen=True)
class WhenSpec:
    """A configured ``when``: the triggers and budget; ``start`` makes the live state for one
    process (the service starts a fresh one when the process restarts)."""

    triggers: tuple[Trigger, ...]
    count: int = DEFAULT_COUNT
    cooldown: float = DEFAULT_COOLDOWN
    poll: float = DEFAULT_POLL

    def start(self, clock: Callable[[], float] = time.monotonic) -> TriggerSet:
        return TriggerSet(self.triggers, count=self.count, cooldown=self.cooldown,
                          poll=self.poll, clock=clock)

    def describe(self) -> str:
        return ", ".join(t.show() for t in self.triggers)


def when_from_config(table: Mapping[str, Any], where: str, *, count: int = DEFAULT_COUNT,
                     cooldown: float = DEFAULT_COOLDOWN,
                     poll: float = DEFAULT_POLL) -> WhenSpec:
    """The service's ``when = { cpu = 90, for = "30s", memory = "2G", signal = ["USR1"] }``;
    ``where`` (``FILE: targets.NAME.when``) prefixes every error."""
    unknown = sorted(set(table) - set(WHEN_KEYS))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key; use: {', '.join(WHEN_KEYS)}")
    signals = table.get("signal", [])
    if isinstance(signals, str | int):
        signals = [signals]
    if not isinstance(signals, list):
        raise ConfigError(f"{where}.signal: a signal name or a list of them")
    try:
        triggers = triggers_from_options(
            cpu=table.get("cpu"), cpu_below=table.get("cpu_below"), for_=table.get("for"),
            memory=table.get("memory"), memory_below=table.get("memory_below"),
            threads=table.get("threads"), fds=table.get("fds"), signals=signals, poll=poll)
        return WhenSpec(TriggerSet(triggers, count=count, cooldown=cooldown, poll=poll).triggers,
                        count, cooldown, poll)
    except (UsageError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from None


__all__ = ["DEFAULT_COOLDOWN", "DEFAULT_COUNT", "DEFAULT_POLL", "KINDS", "WHEN_KEYS", "Fired",
           "Firing", "Probe", "Sample", "Trigger", "TriggerSet", "WhenSpec", "polls_for",
           "triggers_from_options", "when_from_config"]
