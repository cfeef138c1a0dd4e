"""Our units under a real systemd (one container boot for the whole file, tests in order).

The agent is installed the way a user installs it: a wheel built from this checkout into a venv
in /opt, then the README's three commands (``service install``, edit the config, ``systemctl
enable --now``). Then: Type=notify readiness and STATUS=, snapshots of a ``systemd-run`` sleep
found by ``unit =`` under the full hardening, the journal lines, the metrics textfile,
``systemctl reload`` adding a target, WatchdogSec not firing during a long capture, ``systemctl
stop`` in the middle of a capture (Result=success, the target running and untraced), the oneshot
service from a timer, and ``service uninstall``.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import tiers

from .conftest import REPO, TEST_VENV, Container, wait_until

pytestmark = pytest.mark.systemd

VENV = "/opt/kdumpling"
AGENT = f"{VENV}/bin/kdumpling-agent"
STORE = "/var/lib/kdumpling"
PROM_DIR = "/var/lib/prometheus/node-exporter"
TEXTFILE = f"{PROM_DIR}/kdumpling.prom"
CONFIG = "/etc/kdumpling/agent.toml"
UNIT = "kdumpling-agent.service"
# A target with a lot of memory (every page different, none zero): a capture that takes seconds.
BIG_MB = 1024
WATCHDOG_MS = 200
BIG = f"""
import mmap, signal
buf = mmap.mmap(-1, {BIG_MB} << 20)
for off in range(0, len(buf), 4096):
    buf[off:off + 16] = off.to_bytes(8, "little") * 2
signal.pause()
"""
# The hardening that must hold in the running service (systemd.exec(5), proc(5)).
CAP_DAC_READ_SEARCH, CAP_SYS_PTRACE = 2, 19

text_string_to_metric_families = tiers.module(
    "systemd", "prometheus_client.parser", "pip install -e '.[metrics]'"
).text_string_to_metric_families


def _wheel(tmp: Path) -> Path:
    """A wheel of this checkout (the units must come with the package, not the checkout)."""
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        (src / name).write_bytes((REPO / name).read_bytes())
    for folder in ("writer", "collectors", "agent", "systemd"):
        subprocess.run(["cp", "-r", str(REPO / folder), str(src / folder)], check=True)
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                          str(tmp / "wheel"), str(src)], capture_output=True, text=True,
                         timeout=600, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    (wheel,) = (tmp / "wheel").glob("kdumpling-*.whl")
    return wheel


@pytest.fixture(scope="module")
def agent(container: Container, tmp_path_factory: pytest.TempPathFactory) -> str:
    """kdumpling installed from a wheel into a venv in /opt inside the container."""
    wheel = _wheel(tmp_path_factory.mktemp("wheel"))
    inside = f"/opt/kdumpling-dist/{wheel.name}"
    container.put(wheel, inside)
    base = getattr(sys, "_base_executable", sys.executable)
    container.run(base, "-m", "venv", "--without-pip", VENV)
    # Dependencies (prometheus_client, the codecs) from the test venv, as the container sees it
    # (bound at TEST_VENV); kdumpling from the wheel.
    deps = next(p for p in sys.path if p.endswith("site-packages") and
                os.path.isdir(os.path.join(p, "prometheus_client")))
    deps = TEST_VENV + deps[len(sys.prefix):] if deps.startswith(sys.prefix + "/") else deps
    site = container.run(f"{VENV}/bin/python", "-c",
                         "import sysconfig; print(sysconfig.get_path('purelib'))").stdout.strip()
    container.run(f"{TEST_VENV}/bin/python", "-m", "pip", "--python", f"{VENV}/bin/python",
                  "install", "-q", "--no-deps", "--no-index", inside, timeout=300)
    # After the install: with the test venv on its path, pip would see the checkout's editable
    # kdumpling there and try to uninstall it (a read-only bind).
    container.write(f"{site}/kdumpling-test-deps.pth", deps + "\n")
    where = container.run(f"{VENV}/bin/python", "-c",
                          "import kdumpling.agent; print(kdumpling.agent.__file__)").stdout
    assert where.startswith(VENV), where  # the wheel's copy, not the checkout
    return AGENT


def _victim(box: Container, unit: str, *argv: str) -> int:
    box.run("systemd-run", f"--unit={unit}", "--property=Type=exec", "--", *argv)
    pid = int(box.show(unit, "MainPID")["MainPID"])
    assert pid > 0
    return pid


@pytest.fixture(scope="module")
def victim(container: Container) -> int:
    return _victim(container, "kdl-victim.service", "/usr/bin/sleep", "infinity")


def _config(targets: dict[str, tuple[str, str]]) -> str:
    text = (f'[output]\ndirectory = "{STORE}"\n[retention]\nkeep = 0\n'
            f'[metrics]\ntextfile = "{TEXTFILE}"\n')
    for name, (unit, interval) in targets.items():
        text += f'[targets.{name}]\ntype = "process"\nunit = "{unit}"\ninterval = "{interval}"\n'
    return text


def _records(box: Container, target: str) -> list[dict[str, Any]]:
    out = box.run("python3", "-c", (
        "import glob, json, sys; json.dump([json.load(open(p)) for p in "
        f"sorted(glob.glob('{STORE}/{target}-*.json'))], sys.stdout)")).stdout
    return [r for r in json.loads(out) if r.get("state") == "complete"]


def _proc_status(box: Container, pid: int) -> dict[str, str]:
    text = box.read(f"/proc/{pid}/status")
    return {k: v.strip() for k, _, v in (ln.partition(":") for ln in text.splitlines())}


def _assert_running_untraced(box: Container, pid: int) -> None:
    st = _proc_status(box, pid)
    assert st["TracerPid"] == "0", st
    assert not st["State"].startswith(("T", "t")), st["State"]


def _metrics(box: Container) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(box.read(TEXTFILE)):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture(scope="module")
def installed(container: Container, agent: str, victim: int) -> Iterator[dict[str, Any]]:
    """The README's three commands: install, edit the config, enable --now."""
    res = container.run(agent, "service", "install", "--json")
    report = json.loads(res.stdout)
    container.run("mkdir", "-p", PROM_DIR)
    container.write(CONFIG, _config({"victim": ("kdl-victim.service", "2s")}))
    started = time.time()
    container.run("systemctl", "enable", "--now", "kdumpling-agent")
    yield {"report": report, "started": started}


def test_install_enable_now_gives_a_ready_hardened_service(container: Container,
                                                          installed: dict[str, Any],
                                                          victim: int) -> None:
    report = installed["report"]
    assert report["exec_start"] == AGENT
    assert report["config_created"] is True
    assert ["systemctl", "daemon-reload"] in report["systemctl"]  # systemd runs here, root /
    props = container.show(UNIT, "ActiveState", "SubState", "Type", "StatusText", "ExecStart",
                           "MainPID", "ProtectSystem", "NRestarts")
    # Type=notify: "systemctl start" returns once READY=1 arrived, so active/running right away
    assert (props["Type"], props["ActiveState"], props["SubState"]) == \
        ("notify", "active", "running")
    assert props["StatusText"].startswith(("idle: 1 target(s)", "capturing victim")), props
    assert f"path={AGENT} ; argv[]={AGENT} service" in props["ExecStart"]
    assert props["ProtectSystem"] == "strict"
    st = _proc_status(container, int(props["MainPID"]))
    assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2", st
    assert int(st["CapBnd"], 16) == (1 << CAP_SYS_PTRACE) | (1 << CAP_DAC_READ_SEARCH), st

    wait_until(lambda: len(_records(container, "victim")) >= 2, 60, "two snapshots")
    recs = _records(container, "victim")
    assert all(r["pid"] == victim for r in recs)
    dump = f"{STORE}/{recs[-1]['file']}"
    header = container.run("readelf", "-h", dump).stdout
    assert "CORE (Core file)" in header, header
    mode = container.run("stat", "-c", "%a", dump).stdout.strip()
    assert mode == "600"  # UMask=0077
    _assert_running_untraced(container, victim)

    journal = container.journal(UNIT)
    assert "started: 1 target(s)" in journal
    ok_lines = [ln for ln in journal.splitlines()
                if ln.startswith("capture target=victim result=ok")]
    assert len(ok_lines) >= 2, journal[-2000:]
    assert f"id={recs[0]['id']}" in journal


def test_metrics_textfile_from_the_service(container: Container,
                                           installed: dict[str, Any]) -> None:
    wait_until(lambda: container.run("test", "-e", TEXTFILE, check=False).returncode == 0, 30,
               "the metrics textfile")
    assert container.run("stat", "-c", "%a", TEXTFILE).stdout.strip() == "644"
    m = _metrics(container)
    ok = m[("kdumpling_snapshots_total", (("result", "ok"), ("target", "victim")))]
    assert ok >= 1
    assert m[("kdumpling_snapshots_total", (("result", "failed"), ("target", "victim")))] == 0
    last = m[("kdumpling_snapshot_last_success_timestamp_seconds", (("target", "victim"),))]
    assert installed["started"] - 5 <= last <= time.time()
    assert m[("kdumpling_snapshot_bytes", (("target", "victim"),))] > 0
    assert m[("kdumpling_store_snapshots", ())] >= 1
    assert m[("kdumpling_store_bytes", ())] > 0


def test_reload_reads_an_added_target(container: Container, installed: dict[str, Any]) -> None:
    del installed
    pid_before = container.show(UNIT, "MainPID")["MainPID"]
    second = _victim(container, "kdl-victim2.service", "/usr/bin/sleep", "infinity")
    container.write(CONFIG, _config({"victim": ("kdl-victim.service", "2s"),
                                     "second": ("kdl-victim2.service", "1h")}))
    container.run("systemctl", "reload", UNIT)
    wait_until(lambda: len(_records(container, "second")) == 1, 60, "the added target's snapshot")
    assert _records(container, "second")[0]["pid"] == second
    props = container.show(UNIT, "MainPID", "ActiveState", "NRestarts")
    assert props["MainPID"] == pid_before and props["ActiveState"] == "active", props
    assert "config reloaded: 2 target(s)" in container.journal(UNIT)
    _assert_running_untraced(container, second)
    container.run("systemctl", "stop", "kdl-victim2.service")


@pytest.fixture
def big(container: Container) -> Iterator[int]:
    container.write("/opt/kdl-big.py", BIG)
    try:
        pid = _victim(container, "kdl-big.service", "/usr/bin/python3", "/opt/kdl-big.py")
        wait_until(lambda: int(_proc_status(container, pid)["VmRSS"].split()[0])
                   >= BIG_MB * 1024 * 0.9, 60, "the big target's memory")
        yield pid
    finally:
        container.run("systemctl", "stop", "kdl-big.service", check=False)
        container.run("systemctl", "reset-failed", "kdl-big.service", check=False)
        container.sh(f"rm -f {STORE}/big-*", check=False)  # the overlay's upper layer is RAM


def test_watchdog_stays_quiet_during_a_long_capture(container: Container,
                                                    installed: dict[str, Any],
                                                    big: int) -> None:
    del installed
    dropin = f"/etc/systemd/system/{UNIT}.d/test-watchdog.conf"
    # Short enough that the 1 GiB capture (1.0-1.7 s here since the digest is taken while writing)
    # spans several periods; the agent pings at half the period (sd_watchdog_enabled(3)).
    container.write(dropin, f"[Service]\nWatchdogSec={WATCHDOG_MS}ms\n")
    container.write(CONFIG, _config({"big": ("kdl-big.service", "1h")}))
    try:
        container.run("systemctl", "daemon-reload")
        container.run("systemctl", "restart", UNIT)
        props = container.show(UNIT, "WatchdogUSec", "MainPID")
        assert props["WatchdogUSec"] == f"{WATCHDOG_MS}ms"
        wait_until(lambda: len(_records(container, "big")) == 1, 300, "the big snapshot", 0.5)
        (rec,) = _records(container, "big")
        # the capture outlasted several watchdog periods, else this test proves nothing
        assert rec["total_seconds"] >= 3 * WATCHDOG_MS / 1000, rec["total_seconds"]
        after = container.show(UNIT, "MainPID", "ActiveState", "NRestarts", "Result")
        assert after == {"MainPID": props["MainPID"], "ActiveState": "active",
                         "NRestarts": "0", "Result": "success"}, after
        assert "Watchdog timeout" not in container.run(
            "journalctl", "-b", "--no-pager", "-u", UNIT).stdout
        _assert_running_untraced(container, big)
    finally:
        container.run("rm", "-f", dropin)
        container.run("systemctl", "daemon-reload")


def test_stop_during_a_capture_succeeds_and_releases_the_target(container: Container,
                                                                installed: dict[str, Any],
                                                                big: int) -> None:
    del installed
    container.write(CONFIG, _config({"big": ("kdl-big.service", "1h")}))
    container.run("systemctl", "restart", UNIT)
    wait_until(lambda: container.show(UNIT, "StatusText")["StatusText"].startswith(
        "capturing big"), 60, "the capture to start", 0.05)
    container.run("systemctl", "stop", UNIT)
    props = container.show(UNIT, "ActiveState", "Result", "ExecMainStatus")
    assert props == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
    _assert_running_untraced(container, big)
    assert container.show("kdl-big.service", "ActiveState")["ActiveState"] == "active"
    left = container.sh(f"ls -A {STORE} | grep -c incomplete || true").stdout.strip()
    assert left == "0"
    assert "result=abandoned" in container.journal(UNIT)


def test_oneshot_service_from_a_timer(container: Container, installed: dict[str, Any],
                                      victim: int) -> None:
    del installed
    container.run("systemctl", "stop", UNIT)
    container.write(CONFIG, _config({"victim": ("kdl-victim.service", "1h")}))
    before = len(_records(container, "victim"))
    container.write("/etc/systemd/system/kdl-test-once.timer",
                    "[Timer]\nUnit=kdumpling-agent-once.service\nOnActiveSec=1s\n"
                    "AccuracySec=100ms\n")
    container.run("systemctl", "daemon-reload")
    container.run("systemctl", "start", "kdl-test-once.timer")

    def ran() -> bool:
        p = container.show("kdumpling-agent-once.service", "ActiveState",
                           "ExecMainExitTimestampMonotonic")
        return p["ActiveState"] == "inactive" and p["ExecMainExitTimestampMonotonic"] != "0"

    wait_until(ran, 60, "the oneshot service to run and finish")
    props = container.show("kdumpling-agent-once.service", "Result", "ExecMainStatus")
    assert props == {"Result": "success", "ExecMainStatus": "0"}, props
    assert len(_records(container, "victim")) == before + 1
    assert "capture target=victim result=ok" in container.journal("kdumpling-agent-once.service")
    _assert_running_untraced(container, victim)
    # the shipped timer loads and has its next elapse planned
    container.run("systemctl", "start", "kdumpling-agent-once.timer")
    nxt = container.show("kdumpling-agent-once.timer", "NextElapseUSecRealtime")
    assert nxt["NextElapseUSecRealtime"] not in ("", "0", "n/a"), nxt


def test_uninstall_removes_the_units_and_keeps_config_and_snapshots(
        container: Container, installed: dict[str, Any], agent: str) -> None:
    del installed
    container.run("systemctl", "start", UNIT)
    res = container.run(agent, "service", "uninstall")
    assert "ran systemctl disable --now" in res.stdout, res.stdout
    for unit in (UNIT, "kdumpling-agent-once.service", "kdumpling-agent-once.timer"):
        props = container.show(unit, "LoadState", "ActiveState")
        assert props == {"LoadState": "not-found", "ActiveState": "inactive"}, (unit, props)
        assert container.run("test", "-e", f"/etc/systemd/system/{unit}",
                             check=False).returncode == 1
    assert container.run("test", "-f", CONFIG, check=False).returncode == 0
    assert _records(container, "victim")
    listed = container.run("ls", "/etc/systemd/system/multi-user.target.wants").stdout
    assert "kdumpling" not in listed, shlex.quote(listed)


def test_the_checkouts_own_venv_works_the_same(container: Container, victim: int) -> None:
    """The README as written: ./setup.sh's .venv in the checkout, install --enable --now."""
    script = Path(sys.executable).parent / "kdumpling-agent"
    if not script.exists():
        tiers.missing("systemd", "the tests do not run from a venv with the console script "
                      "(./setup.sh makes one)")
    if str(script).startswith(("/tmp/", "/var/tmp/")):
        # Where the checkout sits, not a missing tool: the unit's PrivateTmp=yes hides /tmp
        # from the service (`service install` warns), so this case cannot run from there.
        tiers.not_applicable(f"this checkout's venv is under /tmp ({script})")
    container.write(CONFIG, _config({"victim": ("kdl-victim.service", "1h")}))
    before = len(_records(container, "victim"))
    res = container.run(str(script), "service", "install", "--enable", "--now", "--json")
    report = json.loads(res.stdout)
    try:
        assert report["exec_start"] == str(script)
        assert ["systemctl", "restart", UNIT] in report["systemctl"]
        props = container.show(UNIT, "ActiveState", "SubState", "ExecStart", "UnitFileState")
        assert (props["ActiveState"], props["SubState"], props["UnitFileState"]) == \
            ("active", "running", "enabled"), props
        assert f"path={script} " in props["ExecStart"]
        wait_until(lambda: len(_records(container, "victim")) == before + 1, 60,
                   "a snapshot from the checkout's venv")
        _assert_running_untraced(container, victim)
    finally:
        container.run(str(script), "service", "uninstall")
