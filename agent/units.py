"""Durations and sizes as people write them in systemd units and coredump.conf.

Durations follow systemd.time(7) (``30s``, ``5min``, ``1h 30min``, a bare number is seconds);
sizes follow coredump.conf(5) (``512M``, ``1.5G``, base 1024, a bare number is bytes) and may
also be a percentage of the file system (``15%``) where the key allows it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_DURATION_UNITS = {
    "us": 1e-6, "usec": 1e-6,
    "ms": 1e-3, "msec": 1e-3,
    "s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0,
    "m": 60.0, "min": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hour": 3600.0, "hours": 3600.0,
    "d": 86400.0, "day": 86400.0, "days": 86400.0,
    "w": 604800.0, "week": 604800.0, "weeks": 604800.0,
}
_DURATION_PART = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)")

_SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40,
               "P": 1 << 50, "E": 1 << 60}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTPE]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_duration(text: str | int | float) -> float:
    """Seconds in a systemd-style time span; ValueError with the reason when it is not one."""
    if isinstance(text, bool):
        raise ValueError("not a duration")
    if isinstance(text, int | float):
        if text < 0:
            raise ValueError("must not be negative")
        return float(text)
    s = text.strip().lower()
    if not s:
        raise ValueError("empty duration")
    total, pos = 0.0, 0
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if not m or m.end() == pos:
            raise ValueError(f"not a duration: {text!r}")
        value, unit = float(m.group(1)), m.group(2) or "s"
        if unit not in _DURATION_UNITS:
            raise ValueError(f"unknown time unit {unit!r} in {text!r}")
        total += value * _DURATION_UNITS[unit]
        pos = m.end()
        while pos < len(s) and s[pos] == " ":
            pos += 1
    return total


@dataclass(frozen=True)
class SizeLimit:
    """An absolute byte count or a percentage of the file system that holds the store."""

    bytes: int | None = None
    percent: float | None = None

    def resolve(self, fs_size: int) -> int:
        if self.bytes is not None:
            return self.bytes
        return int(fs_size * (self.percent or 0.0) / 100)

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent is not None else format_size(self.bytes or 0)


def parse_size(text: str | int) -> int:
    """Bytes in ``512M``/``1.5G``/``4096`` (base 1024, like coredump.conf)."""
    if isinstance(text, bool):
        raise ValueError("not a size")
    if isinstance(text, int):
        if text < 0:
            raise ValueError("must not be negative")
        return text
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r}")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])


def parse_size_limit(text: str | int) -> SizeLimit:
    """A size or a percentage (``15%``)."""
    if isinstance(text, str) and text.strip().endswith("%"):
        try:
            pct = float(text.strip()[:-1])
        except ValueError:
            raise ValueError(f"not a percentage: {text!r}") from None
        if not 0 <= pct <= 100:
            raise ValueError(f"percentage out of range: {text!r}")
        return SizeLimit(percent=pct)
    return SizeLimit(bytes=parse_size(text))


def format_size(n: float) -> str:
    """``1.5 GiB`` style, for humans."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover - loop always returns


def format_duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    minutes, sec = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{sec:02d}" if hours else f"{minutes}:{sec:02d}"
