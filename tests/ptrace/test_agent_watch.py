"""``kdumpling-agent watch`` end to end on real processes (the watch fixture): a trigger fires a
snapshot whose ``--json`` line, record, ``list`` row and dump annotation name it; a watched
signal is captured and still handled; ``--wait`` for a name that starts later; the process
ending first; usage errors; the status line on a terminal. Tier: ptrace."""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kdumpling.reader import open_dump

from tests import proctools as pt
from tests import watchtools as wt
from tests.agenttools import agent_argv, assert_one_error_line, clean_env, run_agent


@pytest.fixture(scope="module")
def exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return wt.compile_watch_target(tmp_path_factory.mktemp("agent_watch_fixture"))


@pytest.fixture
def target(exe: Path) -> Iterator[wt.WatchTarget]:
    t = wt.start_watch_target(exe)
    yield t
    t.stop()


def _watch(args: list[str], tmp: Path, **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen([*agent_argv(), "watch", *args], env=clean_env(tmp),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kw)  # type: ignore[call-overload]


def _lines(proc: subprocess.Popen[str],
           timeout: float = 60) -> tuple[int, list[dict[str, object]], str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, [json.loads(ln) for ln in out.splitlines() if ln.strip()], err


def _no_leftovers(store: Path) -> None:
    left = [p.name for p in store.iterdir() if p.name.endswith(".incomplete")]
    assert not left, f"half-written files left: {left}"


def test_cpu_trigger_names_itself_in_json_record_list_and_dump(
        target: wt.WatchTarget, tmp_path: Path) -> None:
    store = tmp_path / "store"
    proc = _watch([str(target.pid), "--cpu", "25", "--for", "0.6s", "--poll", "0.2s",
                   "-o", f"{store}/", "--json"], tmp_path)
    time.sleep(1.0)
    assert proc.poll() is None, "fired while the process was idle"
    target.ask("spin", "spinning")
    code, lines, err = _lines(proc)
    assert code == 0, err
    (snap,) = lines
    trigger = snap["trigger"]
    assert isinstance(trigger, dict)
    assert trigger["kind"] == "cpu" and trigger["threshold"] == 25 and trigger["for"] == 0.6
    assert trigger["value"] >= 25  # type: ignore[operator]
    assert snap["pid"] == target.pid and snap["exit_code"] == 0
    with open_dump(str(snap["path"])) as dump:
        assert dump.annotations["trigger"].startswith("cpu ")
        assert ">= 25% for 0.6s" in dump.annotations["trigger"]
    sidecars = list(store.glob("*.json"))
    (record,) = [json.loads(p.read_text()) for p in sidecars if "trigger" in p.read_text()]
    assert record["trigger"] == trigger
    listed = run_agent(["list", "-D", str(store)], tmp_path)
    assert "TRIGGER" in listed.stdout and f"cpu={trigger['value']}>=25" in listed.stdout
    _no_leftovers(store)
    target.ask("idle", "idle")
    pt.assert_released(target.pid)


def test_signal_snapshots_respect_count_and_cooldown(target: wt.WatchTarget,
                                                     tmp_path: Path) -> None:
    store = tmp_path / "store"
    proc = _watch([str(target.pid), "--signal", "USR1", "-n", "2", "--cooldown", "1.5s",
                   "-o", f"{store}/", "--json"], tmp_path)
    assert proc.stdout is not None
    wt.wait_for(lambda: pt.proc_status(target.pid)["TracerPid"] != "0", what="traced")
    os.kill(target.pid, signal.SIGUSR1)
    first = json.loads(proc.stdout.readline())
    assert target.handled().startswith(f"handled {int(signal.SIGUSR1)} ")
    os.kill(target.pid, signal.SIGUSR1)  # in the cooldown: handled, no snapshot
    assert target.handled().startswith(f"handled {int(signal.SIGUSR1)} ")
    time.sleep(1.6)
    wt.wait_for(lambda: pt.proc_status(target.pid)["TracerPid"] != "0", what="traced again")
    os.kill(target.pid, signal.SIGUSR1)
    code, rest, err = _lines(proc)
    assert code == 0, err
    assert target.handled().startswith(f"handled {int(signal.SIGUSR1)} ")
    snaps = [first, *rest]
    assert len(snaps) == 2
    for snap in snaps:
        trigger = snap["trigger"]
        assert isinstance(trigger, dict) and trigger["kind"] == "signal"
        assert trigger["value"] == "SIGUSR1" and trigger["sender_pid"] == os.getpid()
    exe = str(target.proc.args[0])  # type: ignore[index]
    out = subprocess.run([pt.need("gdb"), "-nx", "-batch", exe, str(snaps[1]["path"])],
                         capture_output=True, text=True, timeout=120)
    assert "Program terminated with signal SIGUSR1" in out.stdout + out.stderr
    pt.assert_released(target.pid)
    _no_leftovers(store)


def test_wait_for_a_name_that_starts_later(exe: Path, tmp_path: Path) -> None:
    name = f"wt{uuid.uuid4().hex[:10]}"
    named = tmp_path / name
    shutil.copy(exe, named)
    missing = run_agent(["watch", name, "--threads", "3", "-o", str(tmp_path / "x.core")],
                        tmp_path, timeout=60)
    assert missing.returncode == 69 and "no process named" in assert_one_error_line(missing)
    store = tmp_path / "store"
    proc = _watch([name, "--wait", "--threads", "5", "--poll", "0.2s", "-o", f"{store}/",
                   "--json"], tmp_path)
    time.sleep(1.0)
    assert proc.poll() is None, "gave up instead of waiting"
    target = wt.start_watch_target(named)
    try:
        target.ask("threads 5", "threads")
        code, lines, err = _lines(proc)
        assert code == 0, err
        (snap,) = lines
        assert snap["pid"] == target.pid
        assert snap["trigger"] == {"kind": "threads", "value": 6, "threshold": 5}
    finally:
        target.stop()


def test_target_exiting_first_says_how_many_were_taken(target: wt.WatchTarget,
                                                       tmp_path: Path) -> None:
    store = tmp_path / "store"
    proc = _watch([str(target.pid), "--signal", "USR2", "--memory", "100G", "-n", "3",
                   "--cooldown", "0", "-o", f"{store}/", "--json"], tmp_path)
    assert proc.stdout is not None
    wt.wait_for(lambda: pt.proc_status(target.pid)["TracerPid"] != "0", what="traced")
    os.kill(target.pid, signal.SIGUSR2)
    json.loads(proc.stdout.readline())
    target.handled()
    wt.wait_for(lambda: pt.proc_status(target.pid)["TracerPid"] != "0", what="traced again")
    target.send("exit 7")
    code, lines, err = _lines(proc)
    assert code == 69 and lines == []
    line = err.strip().splitlines()
    assert len(line) == 1 and "Traceback" not in err, err
    assert "exited with code 7" in line[0] and "1 of 3 snapshot(s) taken" in line[0], line
    assert target.proc.wait(timeout=10) == 7
    _no_leftovers(store)
    assert len(list(store.glob("*.core"))) == 1


def test_polled_target_exiting_first(target: wt.WatchTarget, tmp_path: Path) -> None:
    proc = _watch([str(target.pid), "--fds", "5000", "--poll", "0.2s", "-o",
                   str(tmp_path / "never.core")], tmp_path)
    time.sleep(0.6)
    target.send("exit 3")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 69, err
    assert out.startswith(f"watching process {target.pid} (watch_target): fds >= 5000")
    assert "0 of 1 snapshot(s) taken" in err and "Traceback" not in err
    assert not (tmp_path / "never.core").exists()


@pytest.mark.parametrize(("args", "says"), [
    (["--poll", "1s"], "at least one trigger"),
    (["--memory", "1G", "--for", "2s"], "for"),
    (["--signal", "KILL"], "SIGKILL cannot be watched"),
    (["--cpu", "50", "-n", "2", "-o", "one.core"], "needs a snapshot directory"),
    (["--cpu", "lots"], "cpu"),
])
def test_usage_errors(target: wt.WatchTarget, tmp_path: Path, args: list[str],
                      says: str) -> None:
    r = run_agent(["watch", str(target.pid), *args], tmp_path, timeout=60)
    assert r.returncode == 2, r.stderr
    assert says in assert_one_error_line(r)


def test_terminal_shows_values_against_thresholds(target: wt.WatchTarget,
                                                  tmp_path: Path) -> None:
    master, slave = pty.openpty()
    proc = subprocess.Popen([*agent_argv(), "watch", str(target.pid), "--memory", "100G",
                             "--threads", "999", "--poll", "0.1s", "-o", str(tmp_path / "x")],
                            env=clean_env(tmp_path), stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 20
    try:
        while time.monotonic() < deadline and b"threads" not in seen:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                seen += os.read(master, 4096)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    text = seen.decode(errors="replace")
    assert f"watching process {target.pid}" in text, text
    assert "memory " in text and ">= 100.0 GiB" in text and "threads 1 >= 999" in text, text
    assert "0/1 taken" in text
    pt.assert_released(target.pid)


def test_a_failing_capture_still_delivers_the_held_signal(target: wt.WatchTarget,
                                                          tmp_path: Path) -> None:
    taken = tmp_path / "taken.core"
    taken.write_bytes(b"not ours")  # without -f the capture refuses to replace it
    proc = _watch([str(target.pid), "--signal", "USR1", "-o", str(taken)], tmp_path)
    wt.wait_for(lambda: pt.proc_status(target.pid)["TracerPid"] != "0", what="traced")
    os.kill(target.pid, signal.SIGUSR1)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "exists; use --force" in err, err
    assert target.handled() == f"handled {int(signal.SIGUSR1)} si_pid={os.getpid()} si_code=0"
    pt.assert_released(target.pid)
    assert taken.read_bytes() == b"not ours"
