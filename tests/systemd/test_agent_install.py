"""``kdumpling-agent service install|uninstall --root DIR``: the units it writes point at this
installation, systemd-analyze verify accepts them, the config is never overwritten, enabling works
offline, uninstall keeps the config. (Against a running systemd: tests/systemd/.)"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from kdumpling.agent.install import render_unit, systemd_escape_arg, template

from tests import tiers
from tests.agenttools import agent_argv, json_out, run_agent

UNITS = ("kdumpling-agent.service", "kdumpling-agent-once.service", "kdumpling-agent-once.timer")


def _analyze() -> str:
    return tiers.tool("systemd", "systemd-analyze")


def _verify(unit_dir: Path, names: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_analyze(), "verify", "--man=no", *[f"./{n}" for n in names]],
                          cwd=unit_dir, capture_output=True, text=True, timeout=120,
                          check=False)


def _exec_start(unit: Path) -> str:
    (line,) = [ln for ln in unit.read_text().splitlines() if ln.startswith("ExecStart=")]
    return line.removeprefix("ExecStart=")


def test_install_writes_units_that_verify(tmp_path: Path) -> None:
    root = tmp_path / "root"
    proc = run_agent(["service", "install", "--root", str(root), "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json_out(proc)
    unit_dir = root / "etc/systemd/system"
    assert sorted(report["units"]) == sorted(str(unit_dir / u) for u in UNITS)
    assert report["systemctl"] == []  # not this system's root: nothing asked of systemd
    # ExecStart is this installation's console script, not /usr/bin
    script = agent_argv()[0]
    assert _exec_start(unit_dir / "kdumpling-agent.service") == f"{script} service"
    assert _exec_start(unit_dir / "kdumpling-agent-once.service") == f"{script} service --once"
    # the rest of each unit is the shipped template
    for name in UNITS:
        body = [ln for ln in (unit_dir / name).read_text().splitlines()
                if not ln.startswith(("#", "ExecStart="))]
        shipped = [ln for ln in template(name).splitlines()
                   if not ln.startswith(("#", "ExecStart="))]
        assert body == shipped, name
        assert (unit_dir / name).stat().st_mode & 0o777 == 0o644
    res = _verify(unit_dir, list(UNITS))
    assert res.returncode == 0 and res.stderr.strip() == "", res.stderr
    # the example config arrives with the package
    config = root / "etc/kdumpling/agent.toml"
    assert report["config"] == str(config) and report["config_created"] is True
    assert config.read_text() == template("agent.toml.example")


def test_install_never_overwrites_the_config(tmp_path: Path) -> None:
    tiers.tool("systemd", "systemctl")  # uninstall disables the units through it
    root = tmp_path / "root"
    config = root / "etc/kdumpling/agent.toml"
    config.parent.mkdir(parents=True)
    mine = ('[output]\ndirectory = "/srv/dumps"\n'
            '[metrics]\ntextfile = "/srv/metrics/kdumpling.prom"\n')
    config.write_text(mine)
    proc = run_agent(["service", "install", "--root", str(root)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert config.read_text() == mine
    assert f"kept {config}" in proc.stdout
    # ProtectSystem=strict: a snapshot directory outside StateDirectory= and the metrics
    # directory become writable, in both services
    for name in ("kdumpling-agent.service", "kdumpling-agent-once.service"):
        lines = (root / "etc/systemd/system" / name).read_text().splitlines()
        assert "ReadWritePaths=-/srv/dumps" in lines
        assert "ReadWritePaths=-/srv/metrics" in lines
    res = _verify(root / "etc/systemd/system", list(UNITS))
    assert res.returncode == 0 and res.stderr.strip() == "", res.stderr


def test_enable_offline_then_uninstall_keeps_the_config(tmp_path: Path) -> None:
    tiers.tool("systemd", "systemctl")
    root = tmp_path / "root"
    proc = run_agent(["service", "install", "--root", str(root), "--enable"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    link = root / "etc/systemd/system/multi-user.target.wants/kdumpling-agent.service"
    assert os.readlink(link) == "/etc/systemd/system/kdumpling-agent.service"
    assert f"ran systemctl --root={root} enable kdumpling-agent.service" in proc.stdout
    timer = run_agent(["service", "install", "--root", str(root), "--enable", "--timer"],
                      tmp_path)
    assert timer.returncode == 0, timer.stderr
    assert (root / "etc/systemd/system/timers.target.wants/kdumpling-agent-once.timer").is_symlink()

    gone = run_agent(["service", "uninstall", "--root", str(root), "--json"], tmp_path)
    assert gone.returncode == 0, gone.stderr
    report = json_out(gone)
    assert len(report["units"]) == 3
    assert not [p for p in (root / "etc/systemd/system").rglob("kdumpling-agent*")]
    assert (root / "etc/kdumpling/agent.toml").is_file()
    again = run_agent(["service", "uninstall", "--root", str(root)], tmp_path)
    assert again.returncode == 0 and "no kdumpling units" in again.stdout


def test_plain_service_still_runs_the_scheduler(tmp_path: Path) -> None:
    # "service" and "service --once" are the units' ExecStart: the new actions must not eat them
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[output]\ndirectory = "{tmp_path / "store"}"\n')
    proc = run_agent(["service", "--once", "--config", str(cfg)], tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "store").is_dir()


def test_exec_start_quoting_survives_systemd(tmp_path: Path) -> None:
    # A venv path with a space and a '%' (a systemd specifier) must still name the script.
    venv = tmp_path / "my venv%h"
    script = venv / "kdumpling-agent"
    venv.mkdir()
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    assert systemd_escape_arg(str(script)) == f'"{str(script).replace("%", "%%")}"'
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    for name in UNITS:
        (unit_dir / name).write_text(render_unit(template(name), [str(script)], []))
    res = _verify(unit_dir, list(UNITS))
    assert res.returncode == 0 and res.stderr.strip() == "", res.stderr
    # and without the escapes systemd would look elsewhere
    (unit_dir / "kdumpling-agent.service").write_text(
        template("kdumpling-agent.service").replace("/usr/bin/kdumpling-agent", str(script)))
    bad = _verify(unit_dir, ["kdumpling-agent.service"])
    assert bad.returncode != 0 or bad.stderr.strip() != ""
