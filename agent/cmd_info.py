"""``info ID|PATH``: what a snapshot is, from its sidecar and, if readable, the dump itself."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from dataclasses import dataclass
from typing import Any

from kdumpling.errors import KdumplingError, UsageError

from .common import Context, add_common, add_directory
from .store import SCHEMA, SIDECAR_SUFFIX, Record, Store
from .targets import FeatureUnavailableError
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


@dataclass
class Located:
    path: str
    record: Record | None
    store: Store | None

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


def _looks_like_path(text: str) -> bool:
    return "/" in text or os.path.lexists(text)


def locate(ctx: Context, what: str) -> Located:
    """A snapshot ID (or unique prefix) in the store, or a path to any dump file."""
    if _looks_like_path(what):
        path = os.path.abspath(what)
        if not os.path.exists(path):
            raise UsageError(f"no such file: {what}")
        directory, name = os.path.split(path)
        ident = name.rsplit(".", 1)[0]
        sidecar = os.path.join(directory, ident + SIDECAR_SUFFIX)
        with contextlib.suppress(OSError, ValueError, KdumplingError):
            with open(sidecar, "rb") as f:
                data = json.loads(f.read(1 << 20))
            if isinstance(data, dict) and data.get("schema") == SCHEMA and data.get("file") == name:
                side = Store(directory, create=False)
                return Located(path, Record(ident, data, ident + SIDECAR_SUFFIX), side)
        return Located(path, None, None)
    store = ctx.open_store(create=False)
    if store is None:
        raise KdumplingError(f"no snapshot {what!r}: {ctx.store_dir()} does not exist")
    try:
        rec = store.find(what)
    except BaseException:
        store.close()
        raise
    return Located(store.path_of(rec.file), rec, store)


def dump_facts(path: str) -> dict[str, Any]:
    """What our reader sees in the file (FeatureUnavailableError if the reader is missing)."""
    try:
        from kdumpling.reader import open_dump
    except ImportError:
        raise FeatureUnavailableError("this kdumpling install has no dump reader") from None
    with open_dump(path) as d:
        fields = d.vmcoreinfo_fields
        notes: dict[str, int] = {}
        for n in d.notes:
            key = f"{n.name.decode('ascii', 'replace')}/{n.type:#x}"
            notes[key] = notes.get(key, 0) + 1
        return {
            "format": d.format, "arch": d.arch.name, "kind": d.kind.value,
            "page_size": d.page_size, "segments": len(d.segments),
            "memory_bytes": d.memory_size, "file_bytes": os.path.getsize(path),
            "cpus_or_threads": len(d.cpus), "notes": notes,
            "osrelease": fields.get("OSRELEASE"), "annotations": d.annotations,
            "reader_warnings": list(d.warnings),
        }


def run(ctx: Context) -> int:
    loc = locate(ctx, ctx.args.what)
    try:
        out: dict[str, Any] = {"path": loc.path}
        if loc.record is not None and loc.store is not None:
            data = dict(loc.record.data)
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
