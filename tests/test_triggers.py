"""Triggers of conditional snapshots (``agent/triggers.py``): every trigger against a real process
that really spikes, grows, spawns threads or opens descriptors (the watch fixture), the
``--for`` streaks, count and cooldown with a mocked clock, and psutil's errors (mocked where a
real process cannot show them: AccessDenied as root)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from unittest.mock import Mock

import psutil
import pytest
from kdumpling.agent.triggers import (
    Probe,
    Sample,
    Trigger,
    TriggerSet,
    polls_for,
    triggers_from_options,
    when_from_config,
)
from kdumpling.errors import ConfigError, PermissionDeniedError, TargetGoneError, UsageError

from tests import tiers
from tests import watchtools as wt

POLL = 0.2

if TYPE_CHECKING:
    from pytest_mock import MockerFixture
else:  # the mocker fixture comes with the plugin
    MockerFixture = tiers.module("extras", "pytest_mock", "pip install pytest-mock").MockerFixture


@pytest.fixture(scope="module")
def exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return wt.compile_watch_target(tmp_path_factory.mktemp("trigger_fixture"))


@pytest.fixture
def target(exe: Path) -> Iterator[wt.WatchTarget]:
    t = wt.start_watch_target(exe)
    yield t
    t.stop()


def _watch(probe: Probe, ts: TriggerSet, polls: int) -> tuple[int, object]:
    """Poll like the watch command does; (poll number, Fired) or (polls, None)."""
    for n in range(1, polls + 1):
        time.sleep(ts.poll)
        fired = ts.check(probe.sample(ts.metrics))
        if fired is not None:
            return n, fired
    return polls, None


def _set(*triggers: Trigger, **kw: object) -> TriggerSet:
    return TriggerSet(tuple(triggers), poll=POLL, **kw)  # type: ignore[arg-type]


# --- real processes -----------------------------------------------------------------------------
def test_cpu_fires_only_after_the_spike_held_for_every_poll(target: wt.WatchTarget) -> None:
    # 25%: a spinning thread gets more than that of a core even on a busy shared machine
    (cpu,) = triggers_from_options(cpu=25, for_=f"{3 * POLL}s", poll=POLL)
    assert cpu.polls == 3
    probe = Probe(target.pid)
    ts = _set(cpu)
    assert _watch(probe, ts, 5) == (5, None)  # idle: never
    target.ask("spin", "spinning")
    n, fired = _watch(probe, ts, 40)
    assert fired is not None, "a spinning process never reached 25% for 3 polls"
    assert n >= 3 and fired.value >= 25  # type: ignore[attr-defined]
    record = fired.to_json()  # type: ignore[attr-defined]
    assert record.pop("value") >= 25
    assert record == {"kind": "cpu", "threshold": 25, "for": 3 * POLL}


def test_cpu_below_fires_when_the_spin_stops(target: wt.WatchTarget) -> None:
    target.ask("spin", "spinning")
    (below,) = triggers_from_options(cpu_below=5, for_=f"{2 * POLL}s", poll=POLL)
    probe = Probe(target.pid)
    ts = _set(below)
    assert _watch(probe, ts, 5) == (5, None)  # busy: a stall trigger stays quiet
    target.ask("idle", "idle")
    _n, fired = _watch(probe, ts, 20)
    assert fired is not None and fired.value < 5  # type: ignore[attr-defined]


def test_memory_fires_when_the_resident_set_grows(target: wt.WatchTarget) -> None:
    base = psutil.Process(target.pid).memory_info().rss
    (mem,) = triggers_from_options(memory=f"{(base >> 20) + 32}M")
    probe = Probe(target.pid)
    ts = _set(mem)
    assert _watch(probe, ts, 3) == (3, None)
    target.ask("grow 64", "grown")
    _n, fired = _watch(probe, ts, 10)
    assert fired is not None and fired.value >= mem.threshold  # type: ignore[attr-defined]
    assert fired.annotation().startswith("memory ")  # type: ignore[attr-defined]


def test_memory_below_fires_only_under_the_mark(exe: Path) -> None:
    small = wt.start_watch_target(exe)
    big = wt.start_watch_target(exe)
    try:
        big.ask("grow 64", "grown")
        (below,) = triggers_from_options(memory_below="40M")
        assert _watch(Probe(big.pid), _set(below), 3) == (3, None)
        _n, fired = _watch(Probe(small.pid), _set(below), 3)
        assert fired is not None and fired.value < 40 << 20  # type: ignore[attr-defined]
    finally:
        small.stop()
        big.stop()


def test_threads_fire_when_the_process_spawns(target: wt.WatchTarget) -> None:
    now = psutil.Process(target.pid).num_threads()
    (threads,) = triggers_from_options(threads=now + 3)
    probe = Probe(target.pid)
    ts = _set(threads)
    assert _watch(probe, ts, 2) == (2, None)
    target.ask("threads 3", "threads")
    _n, fired = _watch(probe, ts, 10)
    assert fired is not None and fired.value == now + 3  # type: ignore[attr-defined]


def test_fds_fire_when_descriptors_pile_up(target: wt.WatchTarget) -> None:
    now = psutil.Process(target.pid).num_fds()
    (fds,) = triggers_from_options(fds=now + 10)
    probe = Probe(target.pid)
    ts = _set(fds)
    assert _watch(probe, ts, 2) == (2, None)
    target.ask("fds 10", "fds")
    _n, fired = _watch(probe, ts, 10)
    assert fired is not None and fired.value == now + 10  # type: ignore[attr-defined]


def test_a_process_that_exits_is_gone(target: wt.WatchTarget) -> None:
    probe = Probe(target.pid)
    target.send("exit 3")
    target.proc.wait(timeout=10)  # reaped: no /proc entry left
    with pytest.raises(TargetGoneError):
        probe.sample({"cpu", "rss", "threads", "fds"})
    with pytest.raises(TargetGoneError):
        Probe(target.pid)


def test_a_zombie_is_gone(target: wt.WatchTarget) -> None:
    probe = Probe(target.pid)
    target.send("exit 0")
    wt.wait_for(lambda: psutil.Process(target.pid).status() == psutil.STATUS_ZOMBIE,
                what="zombie")
    with pytest.raises(TargetGoneError, match="exited"):
        probe.sample({"rss"})


# --- psutil errors a real process cannot show here (we are root) --------------------------------
def test_access_denied_is_a_permission_error(target: wt.WatchTarget,
                                             mocker: MockerFixture) -> None:
    probe = Probe(target.pid)
    mocker.patch.object(psutil.Process, "num_fds",
                        side_effect=psutil.AccessDenied(target.pid))
    with pytest.raises(PermissionDeniedError) as err:
        probe.sample({"fds"})
    assert err.value.exit_code == 77 and str(target.pid) in str(err.value)
    mocker.patch.object(psutil.Process, "cpu_percent",
                        side_effect=psutil.AccessDenied(target.pid))
    with pytest.raises(PermissionDeniedError):
        Probe(target.pid)


# --- streaks, count and cooldown with a mocked clock --------------------------------------------
def _sample(cpu: float = 0.0, rss: int = 0, threads: int = 1, fds: int = 3) -> Sample:
    return Sample(cpu, rss, threads, fds)


def test_for_counts_consecutive_polls() -> None:
    t = Trigger("cpu", 50, 3.0, polls_for(3.0, 1.0))
    ts = TriggerSet((t,), cooldown=0)
    seq = [90, 90, 10, 90, 90]
    assert [ts.check(_sample(cpu=c)) for c in seq] == [None] * 5  # the dip restarts the streak
    fired = ts.check(_sample(cpu=95))
    assert fired is not None and fired.value == 95
    assert polls_for(None, 1.0) == 1 and polls_for(2.5, 1.0) == 3 and polls_for(2.0, 1.0) == 2


def test_count_and_cooldown_follow_the_clock(mocker: MockerFixture) -> None:
    clock = mocker.Mock(return_value=1000.0)
    ts = TriggerSet((Trigger("threads", 10),), count=2, cooldown=10.0, clock=clock)
    hot = _sample(threads=12)
    assert ts.check(hot) is not None
    ts.taken_now()
    clock.return_value = 1009.9
    assert ts.check(hot) is None and ts.cooling() == pytest.approx(0.1)
    clock.return_value = 1010.0
    assert ts.check(hot) is not None
    ts.taken_now()
    assert ts.done
    clock.return_value = 5000.0
    assert ts.check(hot) is None  # the budget is spent
    assert clock.call_count >= 4


def test_a_fired_streak_starts_over(mocker: MockerFixture) -> None:
    clock = Mock(return_value=0.0)
    t = Trigger("cpu", 50, 2.0, 2)
    ts = TriggerSet((t,), count=5, cooldown=0.0, clock=clock)
    assert ts.check(_sample(cpu=80)) is None
    assert ts.check(_sample(cpu=80)) is not None
    ts.taken_now()
    assert ts.check(_sample(cpu=80)) is None  # must hold for its whole --for again
    assert ts.check(_sample(cpu=80)) is not None


# --- parsing ----------------------------------------------------------------------------------
def test_options_are_checked() -> None:
    with pytest.raises(UsageError, match="for"):
        triggers_from_options(memory="1G", for_="5s")
    with pytest.raises(UsageError, match="memory"):
        triggers_from_options(memory="lots")
    with pytest.raises(UsageError, match="threads"):
        triggers_from_options(threads=0)
    with pytest.raises(UsageError, match="KILL"):
        triggers_from_options(signals=["KILL"])
    with pytest.raises(UsageError, match="at least one trigger"):
        TriggerSet(())
    sig = triggers_from_options(signals=["USR1", "SIGUSR1", "HUP"])
    assert [t.show() for t in sig] == ["signal SIGUSR1", "signal SIGHUP"]


def test_when_table() -> None:
    ts = when_from_config({"cpu": 90, "for": "30s", "memory": "2G", "threads": 500,
                           "fds": 1000, "signal": ["USR1"]}, "agent.toml: targets.web.when",
                          count=3, cooldown=60.0).start()
    assert [t.kind for t in ts.triggers] == ["cpu", "memory", "threads", "fds", "signal"]
    assert ts.triggers[0].polls == 30 and ts.triggers[1].threshold == 2 << 30
    assert (ts.count, ts.cooldown, ts.signals) == (3, 60.0, (10,))
    with pytest.raises(ConfigError, match=r"targets\.web\.when\.cpus: unknown key") as err:
        when_from_config({"cpus": 90}, "agent.toml: targets.web.when")
    assert err.value.exit_code == 78
    with pytest.raises(ConfigError, match="memory: not a size"):
        when_from_config({"memory": "2 parsecs"}, "agent.toml: targets.web.when")
    with pytest.raises(ConfigError, match="at least one trigger"):
        when_from_config({}, "agent.toml: targets.web.when")
