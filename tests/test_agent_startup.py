"""The agent's start-up imports only what a command uses (issue 12): ``capture process`` is timed
against gcore, so building the parser must not load the reader, S3, metrics, TOML, triggers'
psutil or the service. No timings here: which modules are loaded is what the tests check."""

from __future__ import annotations

import json
import subprocess
import sys

# Not needed to parse a command line (every command loads its own when it runs).
NOT_AT_START = (
    "boto3", "botocore", "prometheus_client", "psutil", "tomllib", "tempfile", "shlex",
    "kdumpling.reader", "kdumpling.agent.calendar", "kdumpling.agent.capture",
    "kdumpling.agent.config", "kdumpling.agent.install", "kdumpling.agent.metrics",
    "kdumpling.agent.processes", "kdumpling.agent.s3_commands", "kdumpling.agent.s3_units",
    "kdumpling.agent.service", "kdumpling.agent.service_when", "kdumpling.agent.settings",
    "kdumpling.agent.store_dir", "kdumpling.agent.store_s3",
)

PARSE_ONLY = """
import json, sys
from kdumpling.agent.cli import build_parser
args = build_parser().parse_args(["capture", "process", "1", "-o", "/tmp/x/"])
assert args.kind == "process" and args.output == "/tmp/x/", args
print(json.dumps(sorted(sys.modules)))
"""


def _loaded(code: str) -> set[str]:
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=False)
    assert res.returncode == 0, res.stderr
    return set(json.loads(res.stdout))


def test_parsing_capture_process_loads_no_heavy_module() -> None:
    loaded = _loaded(PARSE_ONLY)
    assert "kdumpling.agent.cli" in loaded
    assert sorted(m for m in NOT_AT_START if m in loaded) == []


def test_version() -> None:
    res = subprocess.run([sys.executable, "-m", "kdumpling.agent.cli", "--version"],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    from kdumpling import __version__
    assert res.stdout.strip() == f"kdumpling-agent {__version__}"
