"""The shipped units through systemd-analyze verify and security (from test_agent_service.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests import tiers
from tests.test_agent_service import _units_dir


def test_units_verify(tmp_path: Path) -> None:
    tool = tiers.tool("systemd", "systemd-analyze")
    units = _units_dir(tmp_path)
    names = sorted(p.name for p in units.iterdir())
    assert {"kdumpling-agent.service", "kdumpling-agent-once.service",
            "kdumpling-agent-once.timer"} <= set(names)
    res = subprocess.run([tool, "verify", "--man=no", *[f"./{n}" for n in names]], cwd=units,
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0 and res.stderr.strip() == "", res.stderr


@pytest.mark.parametrize("unit", ["kdumpling-agent.service", "kdumpling-agent-once.service"])
def test_units_security_score(tmp_path: Path, unit: str) -> None:
    tool = tiers.tool("systemd", "systemd-analyze")
    units = _units_dir(tmp_path)
    res = subprocess.run([tool, "security", "--offline=true", "--json=short", f"./{unit}"],
                         cwd=units, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    checks = {c["name"]: c for c in json.loads(res.stdout)}
    # the points the conventions ask for hold ...
    for name in ("UMask=", "NoNewPrivileges=", "ProtectSystem=", "PrivateTmp=",
                 "RestrictSUIDSGID=", "CapabilityBoundingSet=~CAP_SYS_ADMIN",
                 "MemoryDenyWriteExecute=", "RestrictNamespaces=~user"):
        assert checks[name]["set"], name
    # ... and the overall exposure systemd computes stays in its "OK" band (below 4.0)
    text = subprocess.run([tool, "security", "--offline=true", f"./{unit}"], cwd=units,
                          capture_output=True, text=True, timeout=120, check=False).stdout
    level = float(text.rsplit("exposure level for", 1)[1].split(":")[1].split()[0])
    assert level < 4.0, text[-400:]
    strict = subprocess.run([tool, "security", "--offline=true", "--threshold=39", f"./{unit}"],
                            cwd=units, capture_output=True, text=True, timeout=120, check=False)
    assert strict.returncode == 0
