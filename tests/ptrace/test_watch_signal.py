"""Signal watch (``collectors/process/signal_watch.py``) on real processes: the core is taken at
the signal's delivery stop and records it (gdb, pyelftools), the signal then reaches the handler
with its sender's siginfo, SIGSEGV/SIGABRT still end the process with the kernel's own core,
other signals and job control pass untouched, and the target is released whatever happens to
the watcher (SIGTERM, SIGKILL, the target exiting). Tier: ptrace.

The watcher runs in its own process (``WATCHER`` below), as the agent would: the tests kill it."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kdumpling.collectors.process.signal_watch import parse_signal
from kdumpling.errors import UsageError

from tests import proctools as pt
from tests import tiers
from tests import watchtools as wt

elftools = tiers.module("ptrace", "elftools.elf.elffile", "pip install pyelftools")

# argv: PID SIGNALS(comma) CORE [hold SECONDS]. Prints one JSON object per step on stdout.
WATCHER = textwrap.dedent("""
    import json, sys, time
    from kdumpling import write_dump
    from kdumpling.collectors.process import ProcessCollector
    from kdumpling.collectors.process.signal_watch import (
        SignalWatch, TargetExitedError, parse_signal)
    from kdumpling.errors import KdumplingError

    pid, sigs, core = int(sys.argv[1]), sys.argv[2].split(","), sys.argv[3]
    hold = float(sys.argv[5]) if len(sys.argv) > 5 and sys.argv[4] == "hold" else 0.0
    def say(**kw):
        print(json.dumps(kw), flush=True)
    try:
        with SignalWatch(pid, [parse_signal(s) for s in sigs]) as watch:
            say(step="watching")
            caught = watch.wait()
            say(step="caught", tid=caught.tid, signal=caught.name, code=caught.code,
                sender=caught.sender_pid, passed=watch.passed)
            if hold:
                time.sleep(hold)
            with ProcessCollector(pid, caught=caught) as snap:
                write_dump(snap.image, core)
            say(step="written", threads=snap.meta["threads"],
                annotations=snap.annotations)
    except TargetExitedError as err:
        say(step="exited", message=str(err), status=err.exit_status)
        sys.exit(err.exit_code)
    except KdumplingError as err:
        say(step="error", message=str(err))
        sys.exit(err.exit_code)
""")


@pytest.fixture(scope="module")
def exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return wt.compile_watch_target(tmp_path_factory.mktemp("watch_fixture"))


@pytest.fixture
def target(exe: Path) -> Iterator[wt.WatchTarget]:
    t = wt.start_watch_target(exe, "--threads", "2")
    yield t
    t.stop()


class Watcher:
    def __init__(self, pid: int, signals: str, core: Path, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WATCHER, str(pid), signals, str(core), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def step(self, name: str, timeout: float = 20.0) -> dict[str, object]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            obj: dict[str, object] = json.loads(line)
            if obj["step"] == name:
                return obj
        err = self.proc.stderr.read() if self.proc.stderr else ""
        raise AssertionError(f"watcher never reached {name!r}: {err}")

    def finish(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def _notes(core: Path) -> list[dict[str, object]]:
    with open(core, "rb") as f:
        elf = elftools.ELFFile(f)
        seg = next(s for s in elf.iter_segments() if s["p_type"] == "PT_NOTE")
        return list(seg.iter_notes())


def _released(pid: int) -> None:
    wt.wait_for(lambda: all(pt.proc_status(pid, t)["TracerPid"] == "0"
                            for t in os.listdir(f"/proc/{pid}/task")), what="detached")
    pt.assert_released(pid)


def _gdb(exe: Path, core: Path, *commands: str) -> str:
    gdb = pt.need("gdb")
    args = [gdb, "-nx", "-batch"]
    for c in commands:
        args += ["-ex", c]
    res = subprocess.run([*args, str(exe), str(core)], capture_output=True, text=True,
                         timeout=120)
    return res.stdout + res.stderr


# --- the signal path ---------------------------------------------------------------------------
def test_core_records_the_signal_and_the_handler_runs_afterwards(
        exe: Path, target: wt.WatchTarget, tmp_path: Path) -> None:
    core = tmp_path / "usr1.core"
    tids = target.tids()
    w = Watcher(target.pid, "USR1", core)
    try:
        w.step("watching")
        os.kill(target.pid, signal.SIGUSR2)  # not watched: straight to the handler
        assert target.handled() == f"handled {signal.SIGUSR2} si_pid={os.getpid()} si_code=0"
        os.kill(target.pid, signal.SIGUSR1)
        caught = w.step("caught")
        assert caught["signal"] == "SIGUSR1" and caught["sender"] == os.getpid()
        assert caught["passed"] == {str(int(signal.SIGUSR2)): 1}
        written = w.step("written")
        assert w.finish() == 0
    finally:
        w.kill()
    # delivered after the capture, with the sender's own siginfo (SI_USER from this process)
    assert target.handled() == f"handled {signal.SIGUSR1} si_pid={os.getpid()} si_code=0"
    _released(target.pid)
    assert target.ask("ping", "pong").startswith("pong")
    assert set(written["threads"]) == tids  # type: ignore[arg-type]
    assert written["annotations"]["signal"] == "SIGUSR1"  # type: ignore[index]

    notes = _notes(core)
    prstatus = [n for n in notes if n["n_type"] == "NT_PRSTATUS"]
    assert len(prstatus) == len(tids)
    for n in prstatus:  # pr_info.si_signo @0 and pr_cursig @12, as the kernel writes them
        desc = n["n_descdata"]
        assert struct.unpack_from("<i", desc, 0)[0] == signal.SIGUSR1  # type: ignore[arg-type]
        assert struct.unpack_from("<h", desc, 12)[0] == signal.SIGUSR1  # type: ignore[arg-type]
    first_tid = struct.unpack_from("<i", prstatus[0]["n_descdata"], 32)[0]  # type: ignore[arg-type]
    assert first_tid == caught["tid"]
    (siginfo,) = [n for n in notes if n["n_type"] == "NT_SIGINFO"]
    signo, _errno, code, _pad, si_pid = struct.unpack_from(
        "<iiiii", siginfo["n_descdata"])  # type: ignore[arg-type]
    assert (signo, code, si_pid) == (signal.SIGUSR1, 0, os.getpid())

    out = _gdb(exe, core, "p $_siginfo.si_signo", "p $_siginfo._sifields._kill.si_pid",
               "info threads")
    assert "Program terminated with signal SIGUSR1" in out, out
    assert f"$1 = {int(signal.SIGUSR1)}" in out and f"$2 = {os.getpid()}" in out, out
    for tid in tids:
        assert f"LWP {tid}" in out, out


@pytest.mark.parametrize(("command", "sig", "si_code"), [
    ("segv", signal.SIGSEGV, 1),  # SEGV_MAPERR: a real fault at address 0
    ("abort", signal.SIGABRT, -6),  # SI_TKILL: glibc's abort() raises it with tgkill
])
def test_fatal_signal_still_ends_the_process_with_the_kernels_core(
        exe: Path, tmp_path: Path, command: str, sig: signal.Signals, si_code: int) -> None:
    pattern = Path("/proc/sys/kernel/core_pattern").read_text().strip()
    if pattern.startswith("|"):
        # Deliberate: a piped core_pattern (systemd-coredump, apport) hands the kernel's core
        # to a program, so there is no file to compare with; REQUIRE_ALL accepts it.
        tiers.not_applicable(f"core_pattern pipes to {pattern}: the kernel's core is not a "
                             "file here")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    target = wt.start_watch_target(exe, cwd=cwd, core_dumps=True)
    core = tmp_path / "ours.core"
    w = Watcher(target.pid, sig.name, core)
    try:
        w.step("watching")
        target.send(command)
        caught = w.step("caught")
        assert caught["signal"] == sig.name and caught["code"] == si_code
        w.step("written")
        assert w.finish() == 0
        _pid, status = os.waitpid(target.pid, 0)
        target.proc.returncode = -sig
    finally:
        w.kill()
        target.stop()
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == sig
    assert os.WCOREDUMP(status), "the kernel wrote no core: the signal was not delivered as is"
    kernel_cores = [p for p in cwd.iterdir() if p.name.startswith(pattern.split("%")[0])]
    assert kernel_cores, f"no kernel core in {cwd}"
    (siginfo,) = [n for n in _notes(core) if n["n_type"] == "NT_SIGINFO"]
    assert struct.unpack_from("<iii", siginfo["n_descdata"]) == (  # type: ignore[arg-type]
        sig, 0, si_code)
    out = _gdb(target.proc.args[0], core, "bt")  # type: ignore[index]
    assert f"Program terminated with signal {sig.name}" in out, out


def test_job_control_and_other_signals_pass_while_watched(
        target: wt.WatchTarget, tmp_path: Path) -> None:
    w = Watcher(target.pid, "USR1", tmp_path / "never.core")
    try:
        w.step("watching")
        os.kill(target.pid, signal.SIGSTOP)
        wt.wait_for(lambda: wt.thread_state(target.pid, target.pid) == "t"
                    or wt.thread_state(target.pid, target.pid) == "T", what="stopped")
        time.sleep(0.3)  # a watcher that resumed it would show here
        assert all(wt.thread_state(target.pid, t) in ("t", "T") for t in target.tids())
        os.kill(target.pid, signal.SIGCONT)
        assert target.ask("ping", "pong", timeout=5).startswith("pong")
        os.kill(target.pid, signal.SIGHUP)
        assert target.handled().startswith(f"handled {int(signal.SIGHUP)} ")
        assert w.proc.poll() is None, "the watcher stopped on a signal it does not watch"
        w.proc.send_signal(signal.SIGTERM)
        assert w.finish() == 128 + signal.SIGTERM
    finally:
        w.kill()
    _released(target.pid)
    assert not (tmp_path / "never.core").exists()


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_watcher_killed_while_holding_the_signal_still_delivers_it(
        target: wt.WatchTarget, tmp_path: Path, how: signal.Signals) -> None:
    core = tmp_path / "held.core"
    w = Watcher(target.pid, "USR1", core, "hold", "30")
    try:
        w.step("watching")
        os.kill(target.pid, signal.SIGUSR1)
        w.step("caught")
        held = [t for t in target.tids() if wt.thread_state(target.pid, t) == "t"]
        assert held, "no thread held at the signal's delivery stop"
        w.proc.send_signal(how)
        code = w.finish()
        assert code == (128 + how if how == signal.SIGTERM else -how)
    finally:
        w.kill()
    assert target.handled() == f"handled {signal.SIGUSR1} si_pid={os.getpid()} si_code=0"
    _released(target.pid)
    assert target.ask("ping", "pong").startswith("pong")
    assert not core.exists() and not Path(f"{core}.incomplete").exists()


def test_watcher_killed_while_waiting_leaves_the_target_running(
        target: wt.WatchTarget, tmp_path: Path) -> None:
    for how in (signal.SIGKILL, signal.SIGINT):
        w = Watcher(target.pid, "USR1,USR2", tmp_path / "x.core")
        try:
            w.step("watching")
            w.proc.send_signal(how)
            w.finish()
        finally:
            w.kill()
        _released(target.pid)
        os.kill(target.pid, signal.SIGUSR1)
        assert target.handled().startswith(f"handled {int(signal.SIGUSR1)} ")


def test_a_thread_born_while_watched_is_caught_and_captured(
        target: wt.WatchTarget, tmp_path: Path) -> None:
    core = tmp_path / "clone.core"
    w = Watcher(target.pid, "USR2", core)
    try:
        w.step("watching")
        before = target.tids()
        assert target.ask("threads 2", "threads") == "threads 2"
        born = target.tids() - before
        assert len(born) == 2
        newest = max(born)
        # tgkill(2): the signal goes to that one thread, so only its tracing shows it
        assert ctypes.CDLL(None, use_errno=True).tgkill(target.pid, newest, signal.SIGUSR2) == 0
        caught = w.step("caught")
        written = w.step("written")
        assert w.finish() == 0
    finally:
        w.kill()
    assert set(written["threads"]) == before | born  # type: ignore[arg-type]
    assert caught["tid"] == newest
    assert target.handled().startswith(f"handled {int(signal.SIGUSR2)} ")
    _released(target.pid)


def test_target_exit_is_reported_with_its_code(target: wt.WatchTarget, tmp_path: Path) -> None:
    w = Watcher(target.pid, "USR1", tmp_path / "x.core")
    try:
        w.step("watching")
        target.send("exit 7")
        exited = w.step("exited")
        assert w.finish() == 69
    finally:
        w.kill()
    assert exited["status"] == 7 and "exited with code 7" in str(exited["message"])
    assert target.proc.wait(timeout=10) == 7  # the real parent still gets its status


def test_signal_names() -> None:
    assert parse_signal("usr1") == signal.SIGUSR1
    assert parse_signal("SIGSEGV") == signal.SIGSEGV
    assert parse_signal("15") == signal.SIGTERM
    for bad in ("KILL", "SIGSTOP", "NOPE", "0"):
        with pytest.raises(UsageError):
            parse_signal(bad)
