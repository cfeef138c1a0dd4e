"""The service loop on live processes: sd_notify, SIGTERM mid-capture, --once, a target by
unit (from test_agent_service.py)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests import tiers
from tests.agenttools import (
    NotifyListener,
    fixture_process,
    kill_quietly,
    run_agent,
    wait_for,
)
from tests.test_agent_service import _cgroup_root, _records, _start


@pytest.mark.ptrace
@pytest.mark.slow
def test_service_loop_with_sd_notify(tmp_path: Path, listener: NotifyListener) -> None:
    store = tmp_path / "store"
    with fixture_process(mb=4) as fx:
        pid_file = tmp_path / "fixture.pid"
        pid_file.write_text(f"{fx.pid}\n")
        cfg = tmp_path / "agent.toml"
        base = (f'[output]\ndirectory = "{store}"\n'
                "[retention]\nkeep = 0\nmax_use = 0\nkeep_free = 0\n"
                f'[targets.good]\ntype = "process"\npid_file = "{pid_file}"\ninterval = "1s"\n')
        bad = '[targets.bad]\ntype = "process"\nprocess = "kdl-no-such-proc"\ninterval = "1s"\n'
        cfg.write_text(base + bad)
        proc, err_path = _start(tmp_path, cfg, listener)
        try:
            wait_for(lambda: listener.has("READY", "1"), 60, "READY=1")
            wait_for(lambda: len(_records(store, "good")) >= 3, 60, "three snapshots")
            assert proc.poll() is None, "the failing target stopped the service"

            # SIGHUP: the new config (an annotation on the good target) is used from then on
            cfg.write_text(base + 'annotations = { reloaded = "yes" }\n' + bad)
            before = len(listener.messages)
            proc.send_signal(signal.SIGHUP)
            wait_for(lambda: any("RELOADING" in m for m in listener.messages[before:]), 30,
                     "RELOADING=1")
            wait_for(lambda: any(r["annotations"].get("reloaded") == "yes"  # type: ignore[union-attr]
                                 for r in _records(store, "good")), 60, "a reloaded capture")
            wait_for(lambda: listener.has("WATCHDOG", "1"), 30, "WATCHDOG=1")

            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
        finally:
            kill_quietly(proc)
        wait_for(lambda: listener.has("STOPPING", "1"), 5, "STOPPING=1")
        msgs = listener.messages
        assert listener.index("READY") < listener.index("STOPPING")
        statuses = [m["STATUS"] for m in msgs if "STATUS" in m]
        assert any(s.startswith("capturing good: ") and s.split(": ")[1].split("%")[0].isdigit()
                   for s in statuses), statuses
        assert any(s.startswith("idle:") for s in statuses)
        assert "STOPPING" in msgs[-1] or any("STOPPING" in m for m in msgs[-3:])

        # every snapshot is whole and verifies; nothing half-written is left
        good = _records(store, "good")
        assert len(good) >= 4
        assert not list(store.glob("*.incomplete")) and not list(store.glob("*.tmp"))
        assert not _records(store, "bad")
        for rec in good:
            v = run_agent(["verify", str(rec["id"]), "-D", str(store)], tmp_path)
            assert v.returncode == 0, v.stderr
        # one journald-prefixed log line per capture, failures at error priority
        log = err_path.read_text()
        ok_lines = [ln for ln in log.splitlines() if ln.startswith("<6>capture target=good ")]
        assert len(ok_lines) == len(good), log
        assert all("result=ok" in ln and "sha256=" in ln and "bytes_out=" in ln
                   for ln in ok_lines)
        bad_lines = [ln for ln in log.splitlines() if ln.startswith("<3>capture target=bad ")]
        assert bad_lines and all("exit_code=69" in ln for ln in bad_lines)
        assert all(ln[:3] in ("<3>", "<4>", "<6>", "<7>") for ln in log.splitlines() if ln)
        fx.assert_untouched()


@pytest.mark.ptrace
@pytest.mark.slow
def test_service_sigterm_abandons_the_running_capture(tmp_path: Path,
                                                     listener: NotifyListener) -> None:
    store = tmp_path / "store"
    with fixture_process(mb=1536) as fx:
        cfg = tmp_path / "agent.toml"
        cfg.write_text(f'[output]\ndirectory = "{store}"\n'
                       "[retention]\nkeep = 0\nmax_use = 0\nkeep_free = 0\n"
                       f'[targets.big]\ntype = "process"\npid = {fx.pid}\ninterval = "1h"\n')
        proc, err_path = _start(tmp_path, cfg, listener)
        try:
            wait_for(lambda: any(p.stat().st_size > (16 << 20)
                                 for p in store.glob("*.incomplete")), 60,
                     "the capture to be under way", step=0.005)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
        finally:
            kill_quietly(proc)
        assert sorted(p.name for p in store.iterdir()) == [".locks"]
        assert "result=abandoned" in err_path.read_text()
        wait_for(lambda: listener.has("STOPPING", "1"), 5, "STOPPING=1")
        fx.assert_untouched()


@pytest.mark.ptrace
def test_service_once(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with fixture_process(mb=2) as fx:
        cfg = tmp_path / "agent.toml"
        cfg.write_text(f'[output]\ndirectory = "{store}"\n'
                       f'[targets.a]\ntype = "process"\npid = {fx.pid}\ncalendar = "yearly"\n'
                       '[targets.b]\ntype = "process"\nprocess = "kdl-no-such"\n'
                       'interval = "1h"\n')
        proc = run_agent(["service", "--once", "--config", str(cfg)], tmp_path)
        assert proc.returncode == 69, proc.stderr
        assert len(_records(store, "a")) == 1
        fx.assert_untouched()


@pytest.mark.ptrace
def test_service_target_by_unit(tmp_path: Path) -> None:
    if os.path.isdir("/run/systemd/system"):
        # Deliberate: under a running systemd the agent asks systemctl, which knows no unit of
        # a test's making; tests/systemd covers that path in a container.
        tiers.not_applicable("systemd is running: units resolve through systemctl, "
                             "not a test cgroup (tests/systemd covers it)")
    root = _cgroup_root()
    if root is None or os.geteuid() != 0:
        tiers.missing("ptrace", "needs root and a writable cgroup hierarchy")
    unit = f"kdl-test-{os.getpid()}.service"
    cg = root / unit
    store = tmp_path / "store"
    try:
        cg.mkdir()
    except OSError as err:
        tiers.missing("ptrace", f"cannot create a cgroup: {err}")
    try:
        with fixture_process(mb=2) as fx:
            try:
                (cg / "cgroup.procs").write_text(str(fx.pid))
            except OSError as err:
                tiers.missing("ptrace", f"cannot move a process into a cgroup: {err}")
            cfg = tmp_path / "agent.toml"
            cfg.write_text(f'[output]\ndirectory = "{store}"\n'
                           f'[targets.svc]\ntype = "process"\nunit = "{unit}"\n'
                           'interval = "1h"\n')
            proc = run_agent(["service", "--once", "--config", str(cfg)], tmp_path)
            assert proc.returncode == 0, proc.stderr
            (rec,) = _records(store, "svc")
            assert rec["pid"] == fx.pid
            fx.assert_untouched()
            # the unit has no process any more: the target is gone (69)
            fx.stop()
            gone = run_agent(["service", "--once", "--config", str(cfg)], tmp_path)
            assert gone.returncode == 69
            assert f"unit {unit} has no running process" in gone.stderr
    finally:
        for _ in range(50):
            try:
                cg.rmdir()
                break
            except OSError:
                time.sleep(0.1)
