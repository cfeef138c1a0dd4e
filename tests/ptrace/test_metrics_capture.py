"""Metrics reported by a real capture of a live process (from test_metrics.py)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.agenttools import fixture_process, run_agent
from tests.test_metrics import _read, _t


@pytest.mark.ptrace
def test_service_once_and_capture_report(tmp_path: Path) -> None:
    store, prom = tmp_path / "store", tmp_path / "metrics" / "kdumpling.prom"
    prom.parent.mkdir()
    with fixture_process(mb=2) as fx:
        cfg = tmp_path / "agent.toml"
        cfg.write_text(f'[output]\ndirectory = "{store}"\n[metrics]\ntextfile = "{prom}"\n'
                       f'[targets.a]\ntype = "process"\npid = {fx.pid}\ninterval = "1h"\n'
                       '[targets.gone]\ntype = "process"\nprocess = "kdl-no-such"\n'
                       'interval = "1h"\n')
        before = time.time()
        proc = run_agent(["service", "--once", "--config", str(cfg)], tmp_path)
        assert proc.returncode == 69, proc.stderr
        samples, _ = _read(prom)
        assert samples[_t("kdumpling_snapshots_total", target="a", result="ok")] == 1
        assert samples[_t("kdumpling_snapshots_total", target="gone", result="failed")] == 1
        assert _t("kdumpling_snapshot_last_success_timestamp_seconds", target="gone") \
            not in samples
        assert before <= samples[_t("kdumpling_snapshot_last_success_timestamp_seconds",
                                    target="a")] <= time.time()
        (dump,) = [p for p in store.iterdir() if p.suffix == ".core"]
        assert samples[_t("kdumpling_snapshot_bytes", target="a")] == dump.stat().st_size
        assert samples[_t("kdumpling_store_snapshots")] == 1
        assert samples[_t("kdumpling_store_bytes")] == dump.stat().st_blocks * 512  # as du

        # a CLI capture into the configured store reports under its target key
        cap = run_agent(["capture", "process", str(fx.pid), "--config", str(cfg), "--json"],
                        tmp_path)
        assert cap.returncode == 0, cap.stderr
        samples, _ = _read(prom)
        keys = {dict(labels).get("target") for (name, labels) in samples
                if name == "kdumpling_snapshots_total"}
        assert len(keys - {"a", "gone"}) == 1, keys
        assert samples[_t("kdumpling_store_snapshots")] == 2
        fx.assert_untouched()
    assert not [p for p in prom.parent.iterdir() if p.name.endswith(".tmp")]
    assert os.stat(prom).st_mode & 0o777 == 0o644
