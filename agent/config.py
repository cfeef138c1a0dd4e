"""The agent's TOML configuration: ``/etc/kdumpling/agent.toml`` plus ``agent.toml.d/*.toml``.

Drop-ins are read in lexical order after the main file and merged table by table (a later file
wins key by key), as systemd does with its ``*.conf.d`` directories. ``--config PATH`` replaces the
main file and its drop-in directory becomes ``PATH.d``. A missing default file means "defaults, no
targets"; a missing ``--config`` file is an error. Every error names the file, the dotted key and
the reason, and raises ConfigError (exit 78), so a broken config is refused at start.

Example (see systemd/agent.toml.example)::

    [output]
    directory = "/var/lib/kdumpling"
    format = "auto"          # auto | elf | kdump | kdump-flat
    compression = "auto"     # auto | none | zlib | lzo | snappy | zstd
    compression_level = 1    # 1-9 (lzo and snappy have no levels)
    [retention]
    keep = 5                 # per target
    max_use = "10%"
    keep_free = "15%"
    [targets.web]
    type = "process"
    process = "nginx"        # or pid, pid_file, unit
    interval = "15min"       # or calendar = "hourly"
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdumpling.errors import ConfigError

from .checker import Checker
from .metrics import MetricsConfig, parse_metrics_table
from .options import (
    COMPRESSION_CHOICES,
    FORMAT_CHOICES,
    LEVEL_MAX,
    LEVEL_MIN,
    WriteOptions,
    parse_codec,
    parse_format,
)
from .store import DEFAULT_STORE
from .targets import CONFIG_TYPES, TARGET_TYPES, Target
from .units import SizeLimit, parse_duration

# Start-up time (issue 12): calendars, triggers and TOML are imported where they are used.
if TYPE_CHECKING:
    from .calendar import CalendarSpec
    from .triggers import WhenSpec

DEFAULT_CONFIG = "/etc/kdumpling/agent.toml"
__all__ = ["DEFAULT_CONFIG", "DEFAULT_STORE", "AgentConfig", "OutputConfig", "RetentionConfig",
           "Schedule", "TargetConfig", "load_config", "parse_config"]


@dataclass(frozen=True)
class OutputConfig:
    directory: str | None = None  # None: /var/lib/kdumpling for root, else XDG state dir
    options: WriteOptions = field(default_factory=WriteOptions)
    spool: bool = False  # s3:// directory: dump locally first, then upload (issue 15)


_MAX_USE = SizeLimit(percent=10.0)  # coredump.conf's defaults
_KEEP_FREE = SizeLimit(percent=15.0)


@dataclass(frozen=True)
class RetentionConfig:
    keep: int = 10  # per target, 0 = unlimited
    max_use: SizeLimit | None = _MAX_USE
    keep_free: SizeLimit | None = _KEEP_FREE


@dataclass(frozen=True)
class Schedule:
    interval: float | None = None
    calendar: CalendarSpec | None = None

    def next_after(self, last_start: float | None, now: float) -> float | None:
        """When the next run is due; the first run of an interval target is immediate."""
        if self.interval is not None:
            if last_start is None:
                return now
            return max(last_start + self.interval, now)
        if self.calendar is not None:
            return self.calendar.next_after(now if last_start is None else max(now, last_start))
        return None

    def __str__(self) -> str:
        if self.interval is not None:
            return f"every {self.interval:g}s"
        return self.calendar.text if self.calendar else "on demand"


@dataclass(frozen=True)
class TargetConfig:
    """One ``[targets.NAME]`` table: what to capture, when, and how to write it."""

    name: str
    target: Target  # of the type the table names (agent/targets.py)
    schedule: Schedule
    options: WriteOptions = field(default_factory=WriteOptions)  # overrides of [output]
    keep: int | None = None
    annotations: Mapping[str, str] = field(default_factory=dict)
    enabled: bool = True
    when: WhenSpec | None = None  # conditional snapshots (when = {...}, process targets only)

    @property
    def type(self) -> str:
        return self.target.type_name


@dataclass(frozen=True)
class AgentConfig:
    output: OutputConfig = OutputConfig()
    retention: RetentionConfig = RetentionConfig()
    targets: tuple[TargetConfig, ...] = ()
    files: tuple[str, ...] = ()  # what was read, in order
    metrics: MetricsConfig = field(default_factory=MetricsConfig)  # [metrics]: agent/metrics.py

    def keep_for(self, target_key: str) -> int:
        """How many snapshots of a target retention keeps (its own ``keep``, else the default)."""
        for t in self.targets:
            if t.name == target_key and t.keep is not None:
                return t.keep
        return self.retention.keep


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _write_options(c: Checker, threads: bool) -> WriteOptions:
    """format, compression, compression_level, dump_level (and threads in [output])."""
    # the choices are the writer's own names; its parsers turn them into its enums
    fmt = c.string("format", "auto", FORMAT_CHOICES) or "auto"
    codec = c.string("compression", "auto", COMPRESSION_CHOICES) or "auto"
    return WriteOptions(
        format=parse_format(fmt), compression=parse_codec(codec),
        compression_level=c.integer("compression_level", LEVEL_MIN, LEVEL_MAX),
        dump_level=c.integer("dump_level", 0, 31),
        threads=c.integer("threads", 1, 1024) if threads else None)


def _output(table: Any, where: str) -> OutputConfig:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: output: expected a table")
    c = Checker(table, "output.", where)
    directory = c.string("directory")
    if directory is not None and not (os.path.isabs(directory)
                                      or directory.startswith("s3://")):
        raise c.fail("directory", f"must be an absolute path or s3://BUCKET/PREFIX, got "
                                  f"{directory!r}")
    out = OutputConfig(directory=directory, options=_write_options(c, threads=True),
                       spool=bool(c.boolean("spool", False)))
    c.finish()
    return out


def _retention(table: Any, where: str) -> RetentionConfig:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: retention: expected a table")
    c = Checker(table, "retention.", where)
    defaults = RetentionConfig()
    out = RetentionConfig(
        keep=c.integer("keep", 0, 1_000_000, defaults.keep) or 0,
        max_use=c.size_limit("max_use", defaults.max_use),
        keep_free=c.size_limit("keep_free", defaults.keep_free),
    )
    c.finish()
    return out


def _schedule(c: Checker) -> Schedule:
    has_interval, has_calendar = c.has("interval"), c.has("calendar")
    if has_interval and has_calendar:
        raise c.fail("interval", "set either interval or calendar, not both")
    if has_interval:
        try:
            seconds = parse_duration(c.get("interval"))
        except (ValueError, TypeError) as err:
            raise c.fail("interval", str(err)) from None
        if seconds < 1:
            raise c.fail("interval", "must be at least 1s")
        return Schedule(interval=seconds)
    if has_calendar:
        text = c.get("calendar")
        if not isinstance(text, str):
            raise c.fail("calendar", f"expected a calendar expression string, got {text!r}")
        from .calendar import parse_calendar  # imported here: start-up time (issue 12)
        try:
            return Schedule(calendar=parse_calendar(text))
        except ValueError as err:
            raise c.fail("calendar", str(err)) from None
    c.used.update(("interval", "calendar"))
    if c.has("when"):
        return Schedule()  # conditional snapshots only
    raise c.fail("interval", "a target needs a schedule: interval = \"15min\" or calendar = ... "
                             "(or when = {...} for conditional snapshots)")


def _duration_key(c: Checker, key: str, default: float) -> float:
    if not c.has(key):
        return default
    try:
        return parse_duration(c.get(key))
    except (ValueError, TypeError) as err:
        raise c.fail(key, str(err)) from None


def _when(c: Checker, kind: str) -> WhenSpec | None:
    """``when = { cpu = 90, for = "30s", ... }`` with ``count``, ``cooldown`` and ``poll``."""
    if not c.has("when"):
        for key in ("count", "cooldown", "poll"):
            if c.has(key):
                raise c.fail(key, "only applies with when = {...}")
        return None
    table = c.get("when")
    if kind != "process":
        raise c.fail("when", f"conditional snapshots work on process targets only, not {kind}")
    if not isinstance(table, Mapping):
        raise c.fail("when", "expected a table: when = { cpu = 90, for = \"30s\" }")
    from .triggers import (  # imported here: start-up time (issue 12)
        DEFAULT_COOLDOWN,
        DEFAULT_COUNT,
        DEFAULT_POLL,
        when_from_config,
    )
    count = c.integer("count", 1, 1_000_000, DEFAULT_COUNT) or DEFAULT_COUNT
    cooldown = _duration_key(c, "cooldown", DEFAULT_COOLDOWN)
    poll = _duration_key(c, "poll", DEFAULT_POLL)
    if poll <= 0:
        raise c.fail("poll", "must be more than 0")
    return when_from_config(table, f"{c.where}: {c.prefix}when", count=count,
                            cooldown=cooldown, poll=poll)


def _target(name: str, table: Any, where: str) -> TargetConfig:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: targets.{name}: expected a table")
    c = Checker(table, f"targets.{name}.", where)
    kind = c.string("type", None, CONFIG_TYPES)
    if kind is None:
        raise c.fail("type", f"missing; one of {', '.join(CONFIG_TYPES)}")
    enabled = c.boolean("enabled", True)
    schedule = _schedule(c)
    when = _when(c, kind)
    target = TARGET_TYPES[kind].from_config(name, c)
    out = TargetConfig(name=name, target=target, schedule=schedule,
                       options=_write_options(c, threads=False),
                       keep=c.integer("keep", 0, 1_000_000),
                       annotations=c.table_of_strings("annotations"), enabled=enabled,
                       when=when)
    c.finish()
    return out


def parse_config(data: Mapping[str, Any], where: str = "config",
                 files: tuple[str, ...] = ()) -> AgentConfig:
    """Validate merged TOML data into an AgentConfig (ConfigError naming the key on failure)."""
    known = {"output", "retention", "targets", "metrics"}
    for key in data:
        if key not in known:
            raise ConfigError(f"{where}: {key}: unknown key")
    targets_table = data.get("targets", {})
    if not isinstance(targets_table, Mapping):
        raise ConfigError(f"{where}: targets: expected tables like [targets.NAME]")
    targets = []
    for name, table in targets_table.items():
        if not name or not all(ch.isalnum() or ch in "-_." for ch in name) or name[0] == ".":
            raise ConfigError(f"{where}: targets.{name}: names may use letters, digits, - _ .")
        target = _target(name, table, where)
        if target.enabled:
            targets.append(target)
    return AgentConfig(
        output=_output(data.get("output", {}), where),
        retention=_retention(data.get("retention", {}), where),
        metrics=parse_metrics_table(data.get("metrics", {}), where),
        targets=tuple(targets),
        files=files,
    )


def _read_toml(path: Path) -> dict[str, Any]:
    import tomllib  # imported here: start-up time (issue 12)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory") from None


def load_config(path: str | None = None) -> AgentConfig:
    """Read the main file and its drop-ins; ``path`` None means the default location."""
    main = Path(path or os.environ.get("KDUMPLING_AGENT_CONFIG") or DEFAULT_CONFIG)
    explicit = path is not None
    files: list[Path] = []
    if main.exists():
        files.append(main)
    elif explicit:
        raise ConfigError(f"{main}: no such config file")
    dropins = Path(str(main) + ".d")
    if dropins.is_dir():
        files.extend(sorted(p for p in dropins.iterdir() if p.suffix == ".toml" and p.is_file()))
    data: dict[str, Any] = {}
    for f in files:
        part = _read_toml(f)
        # Validate each file on its own too, so the error names the file that holds the key.
        parse_config(_merge(data, part), str(f))
        data = _merge(data, part)
    where = str(files[-1]) if files else str(main)
    return parse_config(data, where, tuple(str(f) for f in files))
