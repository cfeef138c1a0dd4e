"""The service for real: ``kdumpling-agent service`` with NOTIFY_SOCKET pointing at a socket this
test reads, a short interval, a failing target next to a good one, SIGHUP reload and SIGTERM;
plus the shipped systemd units through ``systemd-analyze verify`` and ``security``."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests import tiers
from tests.agenttools import NotifyListener, agent_argv, clean_env

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "systemd"


def _records(store: Path, target: str) -> list[dict[str, object]]:
    out = []
    for p in sorted(store.glob(f"{target}-*.json")):
        data = json.loads(p.read_text())
        if data.get("state") == "complete":
            out.append(data)
    return out


def _start(tmp_path: Path, cfg: Path, listener: NotifyListener,
           extra: list[str] | None = None) -> tuple[subprocess.Popen[bytes], Path]:
    err_path = tmp_path / "service.stderr"
    err = open(err_path, "wb")  # noqa: SIM115 - handed to the child, closed below
    st = os.fstat(err.fileno())
    env = clean_env(tmp_path, NOTIFY_SOCKET=str(listener.path), WATCHDOG_USEC="1000000",
                    JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
    proc = subprocess.Popen([*agent_argv(), "service", "--config", str(cfg), *(extra or [])],
                            env=env, stdout=subprocess.DEVNULL, stderr=err)
    err.close()
    return proc, err_path


def test_service_refuses_a_bad_config(tmp_path: Path, listener: NotifyListener) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[targets.web]\ntype = "process"\nprocess = "x"\ninterval = "1min"\n'
                   'retries = 3\n')
    proc, err_path = _start(tmp_path, cfg, listener)
    assert proc.wait(60) == 78
    lines = err_path.read_text().splitlines()
    assert len(lines) == 1 and "targets.web.retries: unknown key" in lines[0]
    assert not listener.has("READY")


def _units_dir(tmp_path: Path) -> Path:
    """The shipped units with ExecStart pointing at this install (verify checks it exists)."""
    exe = agent_argv()[0]
    if not os.path.isabs(exe) or exe.endswith("python3"):
        tiers.missing("agent", "no kdumpling-agent console script installed (pip install -e .)")
    out = tmp_path / "units"
    out.mkdir()
    for unit in UNITS.glob("kdumpling-agent*"):
        text = unit.read_text().replace("/usr/bin/kdumpling-agent", exe)
        (out / unit.name).write_text(text)
    return out


def _cgroup_root() -> Path | None:
    """Where a test may create a unit-like cgroup: systemd's named v1 hierarchy or cgroup2."""
    for root in (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified"),
                 Path("/sys/fs/cgroup")):
        if (root / "cgroup.procs").exists() and os.access(root, os.W_OK):
            return root
    return None
