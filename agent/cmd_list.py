"""``list``: the snapshots in the store, from their sidecars (no dump is opened)."""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from .common import Context, add_common, add_directory
from .store import Record, Store
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


def listing(store: Store, rec: Record) -> dict[str, Any]:
    out = dict(rec.data)
    out.pop("dev", None)
    out.pop("inode", None)
    out.pop("mtime_ns", None)
    out["status"] = store.status(rec)
    out["path"] = store.path_of(rec.file)
    return out


def run(ctx: Context) -> int:
    a = ctx.args
    store = ctx.open_store(create=False)
    records = store.records() if store else []
    if a.match:
        records = [r for r in records if r.target_key == a.match or r.id.startswith(a.match)]
    if a.n is not None:
        records = records[-a.n:] if a.n > 0 else []
    if a.reverse:
        records.reverse()
    rows = [listing(store, r) for r in records] if store else []
    if store:
        store.close()
    if ctx.json:
        ctx.emit(rows)
        return 0
    if not rows:
        ctx.say(f"No snapshots in {ctx.store_dir()}.")
        return 0
    header = ("TIME", "TARGET", "KIND", "FORMAT", "SIZE", "STATE", "ID")
    table = [header]
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(r.get("time_unix", 0))))
        fmt = str(r.get("format", "?"))
        if r.get("codec") not in (None, "none"):
            fmt += f"/{r['codec']}"
        size = format_size(r["bytes_out"]) if isinstance(r.get("bytes_out"), int) else "-"
        state = r["status"]
        if r.get("truncated"):
            state += ",truncated"
        elif r.get("warnings") or any(not u.get("expected") for u in r.get("unreadable", [])):
            state += ",warnings"
        table.append((when, str(r.get("target_key", "")), str(r.get("kind", "-")), fmt, size,
                      state, str(r.get("id", ""))))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        ctx.say("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    if not ctx.quiet:
        ctx.say(f"{len(rows)} snapshot(s) in {os.path.abspath(ctx.store_dir())}")
    return 0
