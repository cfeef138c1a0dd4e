"""``list``: the snapshots in the store, from their sidecars (no dump is opened)."""

from __future__ import annotations

import argparse
import time
from typing import Any

from .common import Context, add_common, add_directory
from .store import Record, SnapshotStore
from .units import format_size


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("list", help="list snapshots",
                       description="List snapshots, oldest first, like coredumpctl list. STATE "
                                   "is present, missing, modified (not the file we wrote), "
                                   "capturing or abandoned.")
    p.add_argument("match", nargs="?", metavar="TARGET", help="only snapshots of this target")
    p.add_argument("-n", type=int, metavar="N", help="only the N most recent")
    p.add_argument("-r", "--reverse", action="store_true", help="newest first")
    add_directory(p)
    add_common(p, "print a JSON array of snapshot records")
    p.set_defaults(func=run)


def listing(store: SnapshotStore, rec: Record) -> dict[str, Any]:
    out = rec.snapshot.to_json()
    out.pop("dev", None)
    out.pop("inode", None)
    out.pop("mtime_ns", None)
    out["status"] = store.status(rec)
    out["path"] = store.path_of(rec.file)
    return out


def _trigger_text(trigger: dict[str, Any] | None) -> str:
    """``cpu=97>=50`` / ``signal=SIGUSR1``; ``-`` for a scheduled snapshot."""
    if not trigger:
        return "-"
    kind, value = trigger.get("kind", "?"), trigger.get("value")
    if kind == "signal":
        return f"signal={value}"
    op = "<" if str(kind).endswith("-below") else ">="
    limit = trigger.get("threshold")
    if str(kind).startswith("memory") and isinstance(value, int) and isinstance(limit, int):
        value, limit = format_size(value).replace(" ", ""), format_size(limit).replace(" ", "")
    return f"{kind}={value}{op}{limit}"


def run(ctx: Context) -> int:
    a = ctx.args
    store = ctx.open_store(create=False)
    if store is None:
        records: list[Record] = []
        listed: list[dict[str, Any]] = []
    else:
        with store:
            records = store.records()
            if a.match:
                records = [r for r in records
                           if r.target_key == a.match or r.id.startswith(a.match)]
            if a.n is not None:
                records = records[-a.n:] if a.n > 0 else []
            if a.reverse:
                records.reverse()
            listed = [listing(store, r) for r in records]
    if ctx.json:
        ctx.emit(listed)
        return 0
    rows = [(r.snapshot, str(row["status"])) for r, row in zip(records, listed, strict=True)]
    if not rows:
        ctx.say(f"No snapshots in {ctx.store_dir()}.")
        return 0
    header: tuple[str, ...] = ("TIME", "TARGET", "KIND", "FORMAT", "SIZE", "STATE", "ID")
    # conditional snapshots (watch, the service's when): which trigger took each one
    triggered = any(snap.trigger for snap, _status in rows)
    if triggered:
        header += ("TRIGGER",)
    table = [header]
    for snap, status in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snap.time_or_zero))
        fmt = snap.format or "?"
        if snap.codec not in (None, "none"):
            fmt += f"/{snap.codec}"
        size = format_size(snap.bytes_out) if snap.bytes_out is not None else "-"
        state = status
        if snap.truncated:
            state += ",truncated"
        elif snap.has_warnings:
            state += ",warnings"
        row: tuple[str, ...] = (when, snap.target_key or "", snap.kind or "-", fmt, size, state,
                                snap.id or "")
        if triggered:
            row += (_trigger_text(snap.trigger),)
        table.append(row)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        ctx.say("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    if not ctx.quiet:
        ctx.say(f"{len(rows)} snapshot(s) in {ctx.store_dir()}")
    return 0
