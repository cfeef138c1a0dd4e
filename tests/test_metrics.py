"""``[metrics] textfile = PATH``: node_exporter's textfile format, read back with
prometheus_client's own parser; atomic 0644 replacement; concurrent writers lose no attempt; the
service, ``service --once`` and ``capture`` all report. (Under a real systemd: tests/systemd/.)"""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
from kdumpling.agent.config import parse_config
from kdumpling.agent.metrics import Attempt, update
from kdumpling.errors import ConfigError

from tests import tiers

FAMILIES = {
    "kdumpling_snapshot_last_success_timestamp_seconds": "gauge",
    "kdumpling_snapshot_last_attempt_timestamp_seconds": "gauge",
    "kdumpling_snapshot_duration_seconds": "gauge",
    "kdumpling_snapshot_pause_seconds": "gauge",
    "kdumpling_snapshot_bytes": "gauge",
    "kdumpling_snapshots": "counter",
    "kdumpling_store_bytes": "gauge",
    "kdumpling_store_snapshots": "gauge",
}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

text_string_to_metric_families = tiers.module(
    "extras", "prometheus_client.parser", "pip install -e '.[metrics]'"
).text_string_to_metric_families


def _read(path: Path) -> tuple[Samples, dict[str, tuple[str, str]]]:
    samples: Samples = {}
    families = {}
    for fam in text_string_to_metric_families(path.read_text()):
        families[fam.name] = (fam.type, fam.documentation)
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, families


def _t(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


def test_every_family_has_help_and_type_and_labels(tmp_path: Path) -> None:
    path = tmp_path / "kdumpling.prom"
    update(str(path), Attempt("web", "ok", 1000.0, 2.5, pause=0.04, bytes=4096))
    update(str(path), Attempt("web", "failed", 2000.0, 0.5))
    update(str(path), Attempt("db", "incomplete", 3000.0, 1.0, pause=0.2, bytes=8192))
    samples, families = _read(path)
    assert {n: t for n, (t, _) in families.items()} == FAMILIES
    assert all(doc for _, doc in families.values())
    text = path.read_text()
    for name, kind in FAMILIES.items():
        full = name + ("_total" if kind == "counter" else "")
        assert f"# TYPE {full} {kind}" in text and f"# HELP {full} " in text
    # a failure moves the attempt time and counts, but keeps the last success and its size
    assert samples[_t("kdumpling_snapshot_last_success_timestamp_seconds", target="web")] == 1000
    assert samples[_t("kdumpling_snapshot_last_attempt_timestamp_seconds", target="web")] == 2000
    assert samples[_t("kdumpling_snapshot_duration_seconds", target="web")] == 0.5
    assert samples[_t("kdumpling_snapshot_pause_seconds", target="web")] == 0.04
    assert samples[_t("kdumpling_snapshot_bytes", target="web")] == 4096
    assert samples[_t("kdumpling_snapshots_total", target="web", result="ok")] == 1
    assert samples[_t("kdumpling_snapshots_total", target="web", result="failed")] == 1
    assert samples[_t("kdumpling_snapshots_total", target="web", result="incomplete")] == 0
    # written with warnings (exit 1) is still a snapshot: it counts as the last success
    assert samples[_t("kdumpling_snapshots_total", target="db", result="incomplete")] == 1
    assert samples[_t("kdumpling_snapshot_last_success_timestamp_seconds", target="db")] == 3000
    # readable by node_exporter's user; no temporary file left for the collector to trip on
    assert path.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == [".kdumpling.prom.lock",
                                                          "kdumpling.prom"]


def _hammer(path: str, target: str, n: int) -> None:
    for i in range(n):
        update(path, Attempt(target, "ok", float(i), 0.1))


def test_concurrent_writers_lose_no_attempt(tmp_path: Path) -> None:
    path = str(tmp_path / "kdumpling.prom")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_hammer, args=(path, f"t{i % 2}", 25)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    samples, _ = _read(Path(path))
    assert samples[_t("kdumpling_snapshots_total", target="t0", result="ok")] == 50
    assert samples[_t("kdumpling_snapshots_total", target="t1", result="ok")] == 50


def test_a_damaged_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "kdumpling.prom"
    path.write_text("this is { not metrics\n")
    update(str(path), Attempt("web", "ok", 5.0, 1.0))
    samples, _ = _read(path)
    assert samples[_t("kdumpling_snapshots_total", target="web", result="ok")] == 1


@pytest.mark.parametrize("table, message", [
    ({"textfile": "relative.prom"}, "metrics.textfile: expected an absolute path"),
    ({"textfile": "/var/lib/x/kdumpling.txt"}, "ending in .prom"),
    ({"texfile": "/a.prom"}, "metrics.texfile: unknown key"),
])
def test_config_refuses_a_bad_metrics_table(table: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"metrics": table})


def test_config_reads_the_metrics_table() -> None:
    assert parse_config({"metrics": {"textfile": "/m/k.prom"}}).metrics.textfile == "/m/k.prom"
    assert parse_config({}).metrics.textfile is None
