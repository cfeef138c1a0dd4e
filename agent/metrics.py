"""Prometheus metrics in node_exporter's textfile-collector format (``[metrics] textfile = PATH``).

The service, ``service --once`` and a CLI ``capture`` are separate processes that all report into
one file, so the file itself is the state: every snapshot attempt takes a lock next to it, reads
the previous values back with prometheus_client's parser, updates the target's series and writes
the whole file again through prometheus_client's exposition (``generate_latest``). Not through
``write_to_textfile``: that creates the file with the process umask, and the units' ``UMask=0077``
would leave it unreadable to node_exporter's own user; here the temporary file is made 0644, fsynced
and renamed over PATH (atomic, so a scrape never sees half a file).

Per target: ``kdumpling_snapshot_{last_success,last_attempt}_timestamp_seconds``,
``kdumpling_snapshot_{duration,pause}_seconds`` and ``kdumpling_snapshot_bytes`` (of the last
attempt / the last snapshot written), ``kdumpling_snapshots_total{result=ok|incomplete|failed}``
(incomplete: written, but with warnings or truncated; exit code 1). Store-wide:
``kdumpling_store_bytes`` and ``kdumpling_store_snapshots``. A capture abandoned because the agent
was asked to stop is no result and counts nowhere.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kdumpling.errors import CaptureInterrupted, ConfigError, KdumplingError

from .log import get_logger

if TYPE_CHECKING:  # the config imports this module: no import of it at run time
    from .config import AgentConfig
    from .record import CaptureResult, SnapshotRecord
    from .store import SnapshotStore
    from .targets import Target

RESULTS = ("ok", "incomplete", "failed")
PREFIX = "kdumpling_"
# name (without the prefix) -> help text, for the per-target gauges
GAUGES = {
    "snapshot_last_success_timestamp_seconds":
        "When the last snapshot of the target that was written (ok or incomplete) started "
        "(Unix time).",
    "snapshot_last_attempt_timestamp_seconds":
        "When the last snapshot attempt of the target started (Unix time).",
    "snapshot_duration_seconds": "How long the last snapshot attempt of the target took.",
    "snapshot_pause_seconds": "How long the target was stopped or paused for its last snapshot.",
    "snapshot_bytes": "Size of the last snapshot of the target written to the store.",
}
TOTAL = "snapshots"
TOTAL_HELP = "Snapshot attempts of the target by result (ok, incomplete, failed)."
STORE = {
    "store_bytes": "Bytes the snapshots in the store occupy on disk (allocated, as du counts).",
    "store_snapshots": "Complete snapshots in the store.",
}


@dataclass(frozen=True)
class MetricsConfig:
    """The ``[metrics]`` table."""

    textfile: str | None = None  # node_exporter textfile collector file (*.prom)


def parse_metrics_table(table: Any, where: str) -> MetricsConfig:
    """Validate ``[metrics]`` (ConfigError naming the key, exit 78)."""
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: metrics: expected a table")
    unknown = sorted(set(table) - {"textfile"})
    if unknown:
        raise ConfigError(f"{where}: metrics.{unknown[0]}: unknown key")
    path = table.get("textfile")
    if path is None:
        return MetricsConfig()
    if not isinstance(path, str) or not os.path.isabs(path) or not path.endswith(".prom"):
        # node_exporter's textfile collector reads only *.prom files
        raise ConfigError(f"{where}: metrics.textfile: expected an absolute path ending in "
                          f".prom, got {path!r}")
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise ConfigError(f"{where}: metrics.textfile: needs the Python module "
                          "'prometheus_client': pip install 'kdumpling[metrics]'") from None
    return MetricsConfig(textfile=path)


@dataclass(frozen=True)
class Attempt:
    """One snapshot attempt of a target."""

    target: str
    result: str  # one of RESULTS
    started: float  # Unix time
    duration: float
    pause: float | None = None  # of a snapshot that was written
    bytes: int | None = None


def result_of(exit_code: int) -> str:
    """The ``result`` label of a capture's exit code (0 ok, 1 written with warnings)."""
    return {0: "ok", 1: "incomplete"}.get(exit_code, "failed")


@dataclass
class _Series:
    gauges: dict[str, float] = field(default_factory=dict)  # GAUGES name -> value
    totals: dict[str, float] = field(default_factory=dict)  # result -> count


@dataclass
class State:
    """Everything the file holds."""

    targets: dict[str, _Series] = field(default_factory=dict)
    store: dict[str, float] = field(default_factory=dict)

    def apply(self, a: Attempt) -> None:
        s = self.targets.setdefault(a.target, _Series())
        s.gauges["snapshot_last_attempt_timestamp_seconds"] = a.started
        s.gauges["snapshot_duration_seconds"] = a.duration
        if a.result != "failed":
            s.gauges["snapshot_last_success_timestamp_seconds"] = a.started
            if a.pause is not None:
                s.gauges["snapshot_pause_seconds"] = a.pause
            if a.bytes is not None:
                s.gauges["snapshot_bytes"] = float(a.bytes)
        s.totals[a.result] = s.totals.get(a.result, 0.0) + 1


def parse(text: str) -> State:
    """Read our own metrics back (prometheus_client's parser); foreign series are dropped."""
    from prometheus_client.parser import text_string_to_metric_families

    state = State()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name.removeprefix(PREFIX)
            target = sample.labels.get("target")
            if name in STORE:
                state.store[name] = sample.value
            elif target is None:
                continue
            elif name in GAUGES:
                state.targets.setdefault(target, _Series()).gauges[name] = sample.value
            elif name == f"{TOTAL}_total" and sample.labels.get("result") in RESULTS:
                state.targets.setdefault(target, _Series()).totals[
                    sample.labels["result"]] = sample.value
    return state


def render(state: State) -> bytes:
    """The exposition text, with HELP and TYPE for every family."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector

    class _Snapshot(Collector):
        def collect(self) -> Iterator[Metric]:
            names = sorted(state.targets)
            for name, text in GAUGES.items():
                g = GaugeMetricFamily(PREFIX + name, text, labels=["target"])
                for t in names:
                    if name in state.targets[t].gauges:
                        g.add_metric([t], state.targets[t].gauges[name])
                yield g
            # created=None: no _created series, which the textfile format does not need
            c = CounterMetricFamily(PREFIX + TOTAL, TOTAL_HELP, labels=["target", "result"])
            for t in names:
                for result in RESULTS:  # every result present, so rate() sees the first one
                    c.add_metric([t, result], state.targets[t].totals.get(result, 0.0))
            yield c
            for name, text in STORE.items():
                s = GaugeMetricFamily(PREFIX + name, text)
                if name in state.store:
                    s.add_metric([], state.store[name])
                yield s

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot())
    data: bytes = generate_latest(registry)
    return data


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    directory, base = os.path.split(path)
    fd = os.open(os.path.join(directory, f".{base}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _replace(path: str, data: bytes) -> None:
    directory, base = os.path.split(path)
    import tempfile  # imported here: start-up time (issue 12)
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, 0o644)  # node_exporter runs as its own user
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def store_totals(store: SnapshotStore) -> tuple[int, int]:
    """(bytes, complete snapshots) of a store."""
    count = sum(1 for r in store.records() if r.state == "complete")
    return store.usage(), count


def update(path: str, attempt: Attempt | None = None,
           store: SnapshotStore | None = None) -> None:
    """Add an attempt (and the store's totals) to the textfile at ``path``."""
    with _locked(path):
        try:
            with open(path, encoding="utf-8") as f:
                state = parse(f.read())
        except FileNotFoundError:
            state = State()
        except ValueError as err:  # not ours or damaged: start over rather than stop reporting
            get_logger().warning("metrics: %s is not readable as metrics (%s); rewriting it",
                                 path, err)
            state = State()
        if attempt is not None:
            state.apply(attempt)
        if store is not None:
            size, count = store_totals(store)
            state.store["store_bytes"] = float(size)
            state.store["store_snapshots"] = float(count)
        _replace(path, render(state))


def observe(config: AgentConfig, target: str, started: float, exit_code: int,
            record: SnapshotRecord | None = None, *, abandoned: bool = False,
            store: str | None = None) -> None:
    """After one snapshot attempt (service, ``service --once``, ``capture``): update the textfile
    when the config names one. ``record`` is the written snapshot's; ``store`` the location it
    went to (the store-wide series follow the configured store only). Metrics never fail a
    capture: a problem is logged as a warning."""
    path = config.metrics.textfile
    if not path:
        return
    from .store import default_store_dir, open_store

    attempt = None
    if not abandoned:  # asked to stop: no result
        pause = record.pause_seconds if record is not None else None
        # the file's size (a sparse ELF is larger than the bytes written); bytes_out without one
        size = None if record is None else record.size if record.size is not None \
            else record.bytes_out
        attempt = Attempt(target, result_of(exit_code) if record is not None else "failed",
                          started, max(0.0, time.time() - started), pause, size)
    try:
        configured = os.path.abspath(default_store_dir(config.output.directory))
        if store is not None and os.path.abspath(store) == configured:
            with open_store(store) as opened:
                update(path, attempt, opened)
        else:
            update(path, attempt)
    except Exception as err:  # metrics never stop a capture or the service
        get_logger().warning("metrics: cannot write %s: %s", path, err)


def observe_cli(config: AgentConfig, target: Target, started: float,
                result: CaptureResult | None, store: SnapshotStore | None,
                error: BaseException | None) -> None:
    """``capture``'s hook (run_capture also converts, which is no snapshot attempt)."""
    if target.type_name == "convert":
        return
    if result is not None:
        observe(config, target.key, started, result.exit_code, result.record,
                store=store.location if store is not None else None)
        return
    code = error.exit_code if isinstance(error, KdumplingError) else 70
    observe(config, target.key, started, code,
            abandoned=isinstance(error, CaptureInterrupted | KeyboardInterrupt))


__all__ = ["Attempt", "MetricsConfig", "observe", "observe_cli", "parse", "parse_metrics_table",
           "render", "result_of", "update"]
