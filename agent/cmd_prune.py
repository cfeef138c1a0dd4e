"""``prune``: apply retention (keep per target, max_use, keep_free) to the store now."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from kdumpling.errors import UsageError

from .common import Context, add_common, add_directory
from .units import parse_size_limit


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("prune", help="delete old snapshots by the retention rules",
                       description="Apply retention now: keep the newest N per target, then "
                                   "remove the oldest until max_use and keep_free hold. Only "
                                   "files the agent wrote (and that are unchanged) are deleted; "
                                   "records of missing or abandoned captures are cleaned up.")
    p.add_argument("--keep", type=int, metavar="N", help="keep N per target (0: no count limit)")
    p.add_argument("--max-use", metavar="SIZE|PCT", help="e.g. 10G or 10%% (0: off)")
    p.add_argument("--keep-free", metavar="SIZE|PCT", help="e.g. 2G or 15%% (0: off)")
    p.add_argument("--target", metavar="NAME", help="prune this target first / only its keep")
    p.add_argument("-n", "--dry-run", action="store_true", help="only say what would go")
    add_directory(p)
    add_common(p, "print a JSON object with what was removed")
    p.set_defaults(func=run)


def _limit(text: str | None, name: str) -> Any:
    if text is None:
        return dataclasses.MISSING
    if text.strip() in ("0", "off"):
        return None
    try:
        return parse_size_limit(text)
    except ValueError as err:
        raise UsageError(f"{name}: {err}") from None


def run(ctx: Context) -> int:
    a = ctx.args
    retention = ctx.config.retention
    changes: dict[str, Any] = {}
    for key, text in (("max_use", a.max_use), ("keep_free", a.keep_free)):
        value = _limit(text, "--" + key.replace("_", "-"))
        if value is not dataclasses.MISSING:
            changes[key] = value
    if a.keep is not None:
        if a.keep < 0:
            raise UsageError("--keep must not be negative")
        changes["keep"] = a.keep
    retention = dataclasses.replace(retention, **changes)
    keep_for = ctx.keep_for() if a.keep is None else (lambda _key: a.keep)
    if a.keep is None:
        base = keep_for

        def keep_for(key: str) -> int:
            return base(key) if a.target is None or key == a.target else retention.keep

    store = ctx.open_store(create=False)
    removed_ids: list[str] = []
    cleaned: list[str] = []
    if store is not None:
        try:
            if not a.dry_run:
                for rec in store.records():
                    if store.status(rec) in ("missing", "abandoned"):
                        store.remove(rec)
                        cleaned.append(rec.id)
            removed = store.enforce(retention, a.target, keep_for, dry_run=a.dry_run)
            removed_ids = [r.id for r in removed]
            used = store.usage()
        finally:
            store.close()
    else:
        used = 0
    if ctx.json:
        ctx.emit({"removed": removed_ids, "cleaned": cleaned, "dry_run": a.dry_run,
                  "bytes_used": used})
        return 0
    verb = "would remove" if a.dry_run else "removed"
    for ident in removed_ids:
        ctx.say(f"{verb} {ident}")
    for ident in cleaned:
        ctx.say(f"cleaned up the record of {ident} (dump missing or capture abandoned)")
    if not removed_ids and not cleaned:
        ctx.say("nothing to prune")
    return 0
