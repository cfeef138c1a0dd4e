"""``info ID|PATH``: what a snapshot is, from its sidecar and, if readable, the dump itself."""

from __future__ import annotations

import argparse
import os
from typing import Any

from .common import Context, add_common, add_directory, dump_facts, locate
from .units import format_size


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("info", help="show one snapshot or dump file",
                       description="Show a snapshot's recorded metadata (by ID or path) and "
                                   "what the dump itself says (format, arch, notes, VMCOREINFO).")
    p.add_argument("what", metavar="ID|PATH")
    p.add_argument("--no-open", action="store_true", help="do not open the dump, sidecar only")
    add_directory(p)
    add_common(p, "print one JSON object")
    p.set_defaults(func=run)


def run(ctx: Context) -> int:
    loc = locate(ctx, ctx.args.what)
    try:
        out: dict[str, Any] = {"path": loc.path}
        if loc.record is not None and loc.store is not None:
            data = loc.record.snapshot.to_json()
            data.pop("dev", None)
            data.pop("inode", None)
            out["snapshot"] = data
            out["status"] = loc.store.status(loc.record)
        if not ctx.args.no_open and os.path.exists(loc.path):
            out["dump"] = dump_facts(loc.path)
    finally:
        loc.close()
    if ctx.json:
        ctx.emit(out)
        return 0
    lines = [f"path: {out['path']}"]
    snap = out.get("snapshot")
    if snap:
        lines.append(f"status: {out['status']}")
        for key in ("id", "target", "time", "kind", "format", "codec", "dump_level", "pid", "exe",
                    "sha256", "pause_seconds", "total_seconds", "host"):
            if snap.get(key) is not None:
                lines.append(f"{key}: {snap[key]}")
        for key in ("bytes_in", "bytes_out"):
            if isinstance(snap.get(key), int):
                lines.append(f"{key}: {snap[key]} ({format_size(snap[key])})")
        for w in snap.get("warnings", []):
            lines.append(f"warning: {w}")
    dump = out.get("dump")
    if dump:
        lines.append(f"dump: {dump['format']} {dump['arch']} {dump['kind']}, "
                     f"{dump['segments']} segments, {format_size(dump['memory_bytes'])} of memory, "
                     f"page size {dump['page_size']}, {dump['cpus_or_threads']} "
                     f"{'threads' if dump['kind'] == 'process' else 'CPUs'}")
        if dump.get("osrelease"):
            lines.append(f"kernel: {dump['osrelease']}")
        for k, v in (dump.get("annotations") or {}).items():
            lines.append(f"annotation: {k}={v}")
        for w in dump.get("reader_warnings", []):
            lines.append(f"reader warning: {w}")
    ctx.say("\n".join(lines))
    return 0
