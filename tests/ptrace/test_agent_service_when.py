"""The service's conditional targets (``when = {...}``) for real: the service waits for a process
named in the config, catches it at a signal (the handler still runs), follows it across a restart
with a fresh budget, fires a polled trigger on the new PID, says what it watches in STATUS=, and
``list`` names each snapshot's trigger. Tier: ptrace."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kdumpling.agent.config import parse_config
from kdumpling.errors import ConfigError

from tests import proctools as pt
from tests import watchtools as wt
from tests.agenttools import NotifyListener, run_agent, wait_for
from tests.test_agent_service import _start


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[NotifyListener]:
    lst = NotifyListener(tmp_path / "notify.sock")
    yield lst
    lst.close()


def _records(store: Path) -> list[dict[str, object]]:
    out = []
    for p in sorted(store.glob("*.json")):
        data = json.loads(p.read_text())
        if data.get("state") == "complete":
            out.append(data)
    return out


def _status_has(listener: NotifyListener, text: str) -> bool:
    return any(text in m.get("STATUS", "") for m in list(listener.messages))


def test_service_waits_catches_a_signal_and_follows_a_restart(
        tmp_path: Path, listener: NotifyListener) -> None:
    exe = wt.compile_watch_target(tmp_path)
    name = f"ws{uuid.uuid4().hex[:10]}"
    shutil.copy(exe, tmp_path / name)
    store = tmp_path / "store"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[output]\ndirectory = "{store}"\n'
                   "[retention]\nkeep = 0\nmax_use = 0\nkeep_free = 0\n"
                   f'[targets.w]\ntype = "process"\nprocess = "{name}"\n'
                   'when = { threads = 6, signal = ["USR1"] }\n'
                   'count = 1\ncooldown = "0"\npoll = "0.2s"\n')
    proc, err_path = _start(tmp_path, cfg, listener)
    first = second = None
    try:
        wait_for(lambda: listener.has("READY", "1"), 60, "READY=1")
        wait_for(lambda: _status_has(listener, f"w: waiting for w (process {name})"), 30,
                 "STATUS= waiting")
        first = wt.start_watch_target(tmp_path / name)
        wait_for(lambda: _status_has(listener, f"w: watching process {first.pid}: "), 30,
                 "STATUS= watching")
        wait_for(lambda: pt.proc_status(first.pid)["TracerPid"] != "0", 30, "traced")
        os.kill(first.pid, signal.SIGUSR1)
        assert first.handled(timeout=60) == \
            f"handled {int(signal.SIGUSR1)} si_pid={os.getpid()} si_code=0"
        wait_for(lambda: len(_records(store)) == 1, 60, "the signal's snapshot")
        wait_for(lambda: _status_has(listener, f"process {first.pid}: 1/1 taken, done"), 30,
                 "budget spent")
        pt.assert_released(first.pid)  # done with this PID: not traced any more
        first.stop()

        second = wt.start_watch_target(tmp_path / name)  # the restart: a new PID
        wait_for(lambda: _status_has(listener, f"w: watching process {second.pid}: "), 30,
                 "following the restart")
        second.ask("threads 5", "threads")
        wait_for(lambda: len(_records(store)) == 2, 60, "the threads snapshot")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, err_path.read_text()
        pt.assert_released(second.pid)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for t in (first, second):
            if t is not None:
                t.stop()
    records = _records(store)
    triggers = [r["trigger"] for r in records]
    assert [t["kind"] for t in triggers] == ["signal", "threads"]  # type: ignore[index]
    assert triggers[0]["value"] == "SIGUSR1"  # type: ignore[index]
    assert triggers[1] == {"kind": "threads", "value": 6, "threshold": 6}
    assert [r["pid"] for r in records] == [first.pid, second.pid]
    assert records[0]["annotations"]["trigger"] == "signal SIGUSR1"  # type: ignore[index]
    listed = run_agent(["list", "-D", str(store)], tmp_path)
    assert "signal=SIGUSR1" in listed.stdout and "threads=6>=6" in listed.stdout, listed.stdout
    journal = err_path.read_text()
    assert "trigger=signal" in journal and "trigger=threads" in journal, journal


def test_a_process_traced_by_a_debugger_does_not_stop_the_service(
        tmp_path: Path, listener: NotifyListener) -> None:
    exe = wt.compile_watch_target(tmp_path)
    target = wt.start_watch_target(exe)
    gdb = subprocess.Popen([pt.need("gdb"), "-nx", "-batch", "-p", str(target.pid), "-ex",
                            "shell sleep 30"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[output]\ndirectory = "{tmp_path / "store"}"\n'
                   f'[targets.w]\ntype = "process"\npid = {target.pid}\n'
                   'when = { signal = ["USR1"] }\npoll = "0.2s"\n')
    wait_for(lambda: pt.proc_status(target.pid)["TracerPid"] == str(gdb.pid), 30,
             "gdb attached")
    proc, err_path = _start(tmp_path, cfg, listener)
    try:
        wait_for(lambda: _status_has(listener, "already traced by process"), 30,
                 "STATUS= names the other tracer")
        assert proc.poll() is None, err_path.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, err_path.read_text()
    finally:
        for p in (proc, gdb):
            if p.poll() is None:
                p.kill()
                p.wait()
        target.stop()
    assert err_path.read_text().count("already traced") == 1  # logged once, not every turn


def test_when_is_for_process_targets_only() -> None:
    with pytest.raises(ConfigError, match=r"targets\.vm\.when: conditional snapshots work on "
                                          r"process targets only, not libvirt") as err:
        parse_config({"targets": {"vm": {"type": "libvirt", "interval": "1h",
                                         "when": {"cpu": 90}}}}, "agent.toml")
    assert err.value.exit_code == 78
    with pytest.raises(ConfigError, match=r"targets\.web\.count: only applies with when"):
        parse_config({"targets": {"web": {"type": "process", "process": "x",
                                          "interval": "1h", "count": 3}}}, "agent.toml")
    with pytest.raises(ConfigError, match=r"targets\.web\.when: memory: not a size"):
        parse_config({"targets": {"web": {"type": "process", "process": "x",
                                          "when": {"memory": "big"}}}}, "agent.toml")
    cfg = parse_config({"targets": {"web": {"type": "process", "process": "x",
                                            "when": {"cpu": 90, "for": "30s"},
                                            "cooldown": "1min", "count": 2}}}, "agent.toml")
    (t,) = cfg.targets
    assert t.when is not None and (t.when.count, t.when.cooldown) == (2, 60.0)
    assert t.schedule.next_after(None, 0.0) is None  # no periodic snapshots
