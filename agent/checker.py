"""Typed reads from one TOML table, naming the file and the dotted key on every error.

Shared by the config's own tables and by every target type's ``from_config`` (agent/targets), so
each part of the config validates its keys the same way and an unknown key is always refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kdumpling.errors import ConfigError

from .units import SizeLimit, parse_size, parse_size_limit


class Checker:
    """Pulls typed values out of a TOML table; ``finish()`` refuses the keys nobody asked for."""

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
