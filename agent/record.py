"""The snapshot record: what a capture wrote and how, as stored beside the dump (``ID.json``).

One dataclass for the sidecar a store keeps, the ``--json`` result of ``capture``/``convert`` and
what ``list``, ``info``, ``verify`` and ``debug`` read back. The JSON is the one records have
always had (schema ``kdumpling-snapshot/1``): keys with no value are left out, except the few a
finished capture always writes (``null`` where a format has no such thing, e.g. ``pages`` of an
ELF core); keys this version does not know are kept and written back unchanged, so older and
newer records load.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

SCHEMA = "kdumpling-snapshot/1"
_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def slug(text: str) -> str:
    """A file-name-safe version of a target name (snapshot IDs start with it)."""
    out = _SAFE.sub("_", text).strip("._-")
    return out[:64] or "target"


def utc_stamp(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y%m%dT%H%M%SZ")


def iso_time(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class UnreadableRange:
    start: int
    end: int
    reason: str
    # [vvar], [vsyscall]: the kernel's own cores leave them out too; not a reason to exit 1
    expected: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "reason": self.reason,
                "expected": self.expected}

    @classmethod
    def from_json(cls, data: Any) -> UnreadableRange | None:
        if not isinstance(data, dict):
            return None
        start, end = data.get("start"), data.get("end")
        if not isinstance(start, int) or not isinstance(end, int):
            return None
        return cls(start, end, str(data.get("reason", "")), bool(data.get("expected", False)))


# Written as null by a finished capture when they do not apply (kept so --json has a fixed shape).
_NULLABLE = frozenset({"compression_level", "pages", "zero_pages", "pause_seconds"})


@dataclass
class SnapshotRecord:
    # where it is (set by the store; None for a file or stream output)
    schema: str | None = None
    id: str | None = None
    file: str | None = None  # the dump's name within the store
    state: str | None = None  # capturing | complete
    agent_pid: int | None = None  # the capturing process, while state is capturing
    host: str | None = None
    time: str | None = None
    time_unix: float | None = None
    # what was captured
    target: str | None = None
    target_key: str | None = None
    type: str | None = None
    kind: str | None = None  # process | kernel
    arch: str | None = None
    pid: int | None = None
    exe: str | None = None
    # how it was written
    format: str | None = None
    codec: str | None = None
    compression_level: int | None = None
    dump_level: int | None = None
    bytes_in: int | None = None
    bytes_out: int | None = None
    pages: int | None = None
    zero_pages: int | None = None
    sha256: str | None = None
    pause_seconds: float | None = None
    write_seconds: float | None = None
    total_seconds: float | None = None
    # what went wrong or was added
    warnings: list[str] | None = None
    unreadable: list[UnreadableRange] | None = None
    truncated: bool | None = None
    # [{start, end}] memory the source promised but could not deliver (output incomplete)
    missing: list[dict[str, int]] | None = None
    annotations: dict[str, str] | None = None
    meta: dict[str, Any] | None = None
    trigger: dict[str, Any] | None = None  # what made a conditional snapshot (issue 13)
    # the dump's identity when written: what makes it ours to delete
    dev: int | None = None
    inode: int | None = None
    size: int | None = None
    mtime_ns: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know

    # -- reading ------------------------------------------------------------------------------

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SnapshotRecord:
        """Any record ever written; a value of the wrong type reads as missing."""
        known: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in data.items():
            kind = _FIELD_KINDS.get(key)
            if kind is None:
                extra[key] = value
            elif value is not None:
                known[key] = _coerce(kind, value)
        if "unreadable" in known:
            ranges = [UnreadableRange.from_json(u) for u in known["unreadable"]]
            known["unreadable"] = [u for u in ranges if u is not None]
        return cls(**known, extra=extra)

    # -- writing ------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        finished = self.format is not None
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if value is None and not (finished and f.name in _NULLABLE):
                continue
            if f.name == "unreadable" and value is not None:
                value = [u.to_json() for u in value]
            out[f.name] = value
        return {**self.extra, **out}

    # -- facts --------------------------------------------------------------------------------

    @property
    def unexpected_unreadable(self) -> list[UnreadableRange]:
        return [u for u in self.unreadable or [] if not u.expected]

    @property
    def has_warnings(self) -> bool:
        """Written, but not whole: warnings, unreadable ranges (not the expected ones)."""
        return bool(self.warnings or self.unexpected_unreadable)

    @property
    def time_or_zero(self) -> float:
        return self.time_unix if self.time_unix is not None else 0.0


_FIELD_KINDS: dict[str, str] = {
    f.name: str(f.type).split(" | ")[0] for f in dataclasses.fields(SnapshotRecord)
    if f.name != "extra"
}


def _coerce(kind: str, value: Any) -> Any:
    if kind == "int":
        return value if isinstance(value, int) and not isinstance(value, bool) else None
    if kind == "float":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return value if ok else None
    if kind == "str":
        return value if isinstance(value, str) else None
    if kind == "bool":
        return value if isinstance(value, bool) else None
    if kind.startswith("list"):
        return value if isinstance(value, list) else None
    if kind.startswith("dict"):
        return value if isinstance(value, dict) else None
    return value


@dataclass
class CaptureResult:
    """What ``capture``/``convert --json`` print: the record, where the dump went, what retention
    removed, and the exit code."""

    record: SnapshotRecord
    path: str | None
    exit_code: int
    pruned: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out = self.record.to_json()
        out.pop("dev", None)
        out.pop("inode", None)
        out.update(id=self.record.id, path=self.path, pruned=list(self.pruned),
                   exit_code=self.exit_code)
        return out
