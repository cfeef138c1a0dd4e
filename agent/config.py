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
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdumpling.collectors.base import GUEST_DUMP_FORMATS
from kdumpling.errors import ConfigError

from .calendar import CalendarSpec, parse_calendar
from .units import SizeLimit, parse_duration, parse_size, parse_size_limit

DEFAULT_CONFIG = "/etc/kdumpling/agent.toml"
DEFAULT_STORE = "/var/lib/kdumpling"
FORMATS = ("auto", "elf", "kdump", "kdump-flat")
COMPRESSIONS = ("auto", "none", "zlib", "lzo", "snappy", "zstd")
TARGET_TYPES = ("process", "libvirt", "qmp")
PROCESS_SELECTORS = ("pid", "pid_file", "process", "unit")


@dataclass(frozen=True)
class OutputConfig:
    directory: str | None = None  # None: /var/lib/kdumpling for root, else XDG state dir
    format: str = "auto"
    compression: str = "auto"
    compression_level: int | None = None
    dump_level: int | None = None
    threads: int | None = None


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
    name: str
    type: str
    schedule: Schedule
    params: Mapping[str, Any] = field(default_factory=dict)  # type-specific, validated
    format: str | None = None
    compression: str | None = None
    compression_level: int | None = None
    dump_level: int | None = None
    keep: int | None = None
    annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AgentConfig:
    output: OutputConfig = OutputConfig()
    retention: RetentionConfig = RetentionConfig()
    targets: tuple[TargetConfig, ...] = ()
    files: tuple[str, ...] = ()  # what was read, in order


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


class _Checker:
    """Pulls typed values out of a TOML table, naming the key on every error."""

    def __init__(self, table: Mapping[str, Any], prefix: str, where: str) -> None:
        self.table, self.prefix, self.where = table, prefix, where
        self.used: set[str] = set()

    def fail(self, key: str, reason: str) -> ConfigError:
        return ConfigError(f"{self.where}: {self.prefix}{key}: {reason}")

    def get(self, key: str) -> Any:
        self.used.add(key)
        return self.table.get(key)

    def has(self, key: str) -> bool:
        return key in self.table

    def string(self, key: str, default: str | None = None,
               choices: tuple[str, ...] | None = None) -> str | None:
        value = self.get(key)
        if value is None:
            return default
        if not isinstance(value, str) or not value:
            raise self.fail(key, f"expected a non-empty string, got {value!r}")
        if choices and value not in choices:
            raise self.fail(key, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def integer(self, key: str, lo: int, hi: int, default: int | None = None) -> int | None:
        value = self.get(key)
        if value is None:
            return default
        if isinstance(value, str):
            try:
                value = int(value, 0)
            except ValueError:
                raise self.fail(key, f"expected an integer, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"expected an integer, got {value!r}")
        if not lo <= value <= hi:
            raise self.fail(key, f"must be between {lo} and {hi}, got {value}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(key, f"expected true or false, got {value!r}")
        return value

    def size_limit(self, key: str, default: SizeLimit | None) -> SizeLimit | None:
        if not self.has(key):
            self.used.add(key)
            return default
        value = self.get(key)
        if value in (0, "0", "off", "infinity"):
            return None  # coredump.conf: 0 turns the limit off
        try:
            return parse_size_limit(value)
        except (ValueError, TypeError) as err:
            raise self.fail(key, str(err)) from None

    def size(self, key: str) -> int | None:
        value = self.get(key)
        if value is None:
            return None
        try:
            return parse_size(value)
        except (ValueError, TypeError) as err:
            raise self.fail(key, str(err)) from None

    def table_of_strings(self, key: str) -> dict[str, str]:
        value = self.get(key)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.fail(key, "expected a table of KEY = \"value\" strings")
        out: dict[str, str] = {}
        for k, v in value.items():
            if not isinstance(v, str | int | float) or isinstance(v, bool):
                raise self.fail(f"{key}.{k}", f"expected a string, got {v!r}")
            if "=" in k or "\n" in k or "\n" in str(v):
                raise self.fail(f"{key}.{k}", "keys must not contain '=' or newlines")
            out[k] = str(v)
        return out

    def finish(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise self.fail(unknown[0], "unknown key")


def _output(table: Any, where: str) -> OutputConfig:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: output: expected a table")
    c = _Checker(table, "output.", where)
    directory = c.string("directory")
    if directory is not None and not os.path.isabs(directory):
        raise c.fail("directory", f"must be an absolute path, got {directory!r}")
    out = OutputConfig(
        directory=directory,
        format=c.string("format", "auto", FORMATS) or "auto",
        compression=c.string("compression", "auto", COMPRESSIONS) or "auto",
        compression_level=c.integer("compression_level", 0, 22),
        dump_level=c.integer("dump_level", 0, 31),
        threads=c.integer("threads", 1, 1024),
    )
    c.finish()
    return out


def _retention(table: Any, where: str) -> RetentionConfig:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: retention: expected a table")
    c = _Checker(table, "retention.", where)
    defaults = RetentionConfig()
    out = RetentionConfig(
        keep=c.integer("keep", 0, 1_000_000, defaults.keep) or 0,
        max_use=c.size_limit("max_use", defaults.max_use),
        keep_free=c.size_limit("keep_free", defaults.keep_free),
    )
    c.finish()
    return out


def _schedule(c: _Checker) -> Schedule:
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
        try:
            return Schedule(calendar=parse_calendar(text))
        except ValueError as err:
            raise c.fail("calendar", str(err)) from None
    c.used.update(("interval", "calendar"))
    raise c.fail("interval", "a target needs a schedule: interval = \"15min\" or calendar = ...")


def _target(name: str, table: Any, where: str) -> TargetConfig:
    prefix = f"targets.{name}."
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: targets.{name}: expected a table")
    c = _Checker(table, prefix, where)
    kind = c.string("type", None, TARGET_TYPES)
    if kind is None:
        raise c.fail("type", f"missing; one of {', '.join(TARGET_TYPES)}")
    enabled = c.boolean("enabled", True)
    schedule = _schedule(c)
    params: dict[str, Any] = {"enabled": enabled}
    if kind == "process":
        given = [k for k in PROCESS_SELECTORS if c.has(k)]
        if len(given) != 1:
            key = given[1] if len(given) > 1 else "process"
            raise c.fail(key, "set exactly one of pid, pid_file, process, unit")
        sel = given[0]
        if sel == "pid":
            params["pid"] = c.integer("pid", 1, 2**22)
        else:
            value = c.string(sel)
            if sel == "pid_file" and value and not os.path.isabs(value):
                raise c.fail(sel, f"must be an absolute path, got {value!r}")
            params[sel] = value
        params["select"] = c.string("select", "oldest", ("oldest", "newest"))
        params["mode"] = c.string("mode", None, ("consistent", "low-pause"))
        params["filter"] = c.integer("filter", 0, 0x1FF)
        params["size_cap"] = c.size("size_cap")
    else:
        if kind == "libvirt":
            params["domain"] = c.string("domain", name)
            params["uri"] = c.string("uri", "qemu:///system")
        else:
            sock = c.string("socket")
            if not sock:
                raise c.fail("socket", "missing; the QMP socket path of the guest")
            params["socket"] = sock
        # Guests: spool into the store's file system first (shorter pause), and what QEMU
        # writes (kdump-zlib implies the spool), as the CLI's --spool and --qemu-format.
        params["dump_format"] = c.string("qemu_format", "elf", GUEST_DUMP_FORMATS)
        params["spool"] = c.boolean("spool", False) or params["dump_format"] != "elf"
    keep = c.integer("keep", 0, 1_000_000)
    target = TargetConfig(
        name=name, type=kind, schedule=schedule, params=params,
        format=c.string("format", None, FORMATS),
        compression=c.string("compression", None, COMPRESSIONS),
        compression_level=c.integer("compression_level", 0, 22),
        dump_level=c.integer("dump_level", 0, 31),
        keep=keep, annotations=c.table_of_strings("annotations"),
    )
    c.finish()
    return target


def parse_config(data: Mapping[str, Any], where: str = "config",
                 files: tuple[str, ...] = ()) -> AgentConfig:
    """Validate merged TOML data into an AgentConfig (ConfigError naming the key on failure)."""
    known = {"output", "retention", "targets"}
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
        if target.params.get("enabled", True):
            targets.append(target)
    return AgentConfig(
        output=_output(data.get("output", {}), where),
        retention=_retention(data.get("retention", {}), where),
        targets=tuple(targets),
        files=files,
    )


def _read_toml(path: Path) -> dict[str, Any]:
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
