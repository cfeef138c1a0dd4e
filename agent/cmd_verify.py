"""``verify ID|PATH``: read every page back, and check the sha256 recorded at capture.

Works on any dump our reader opens, ours or not. Exit 0 only when every page decodes and, where a
sidecar recorded a sha256 (and size), the file still matches it; a corrupt or altered dump exits
65 (EX_DATAERR, the code of FormatError).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from kdumpling.errors import FormatError, KdumplingError

from .common import Context, add_common, add_directory, locate
from .s3_client import is_s3_url
from .units import format_size


class VerifyFailed(FormatError):
    """The dump does not read back or does not match its capture record."""


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("verify", help="read a dump back and check its recorded sha256",
                       description="Decode every page of a dump (any dump our reader opens) and, "
                                   "when a snapshot record exists, compare the file's sha256 and "
                                   "size with what was recorded at capture. Exit 0 only if all "
                                   "of it holds.")
    p.add_argument("what", metavar="PATH|ID")
    add_directory(p)
    add_common(p, "print one JSON object")
    p.set_defaults(func=run)


def read_all_pages(path: str) -> dict[str, Any]:
    pages = 0
    nbytes = 0
    from kdumpling.reader import open_dump  # imported here: start-up time (issue 12)
    with open_dump(path) as d:
        expect = d.page_size
        for _pfn, data in d.iter_pages():
            pages += 1
            nbytes += len(data)
            if len(data) != expect:
                raise FormatError(f"page {_pfn:#x} decodes to {len(data)} bytes, not {expect}",
                                  None, path)
        return {"format": d.format, "kind": d.kind.value, "pages": pages, "bytes": nbytes,
                "reader_warnings": list(d.warnings), "incomplete": d.incomplete,
                "missing": [{"start": a, "end": b} for a, b in d.missing]}


def _incomplete_problem(missing: list[dict[str, int]]) -> str:
    """One line for the reader's incomplete flag, naming what is missing."""
    if not missing:
        return "incomplete dump: its writer marked it cut short"
    size = sum(m["end"] - m["start"] for m in missing)
    first = ", ".join(f"{m['start']:#x}-{m['end']:#x}" for m in missing[:3])
    more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
    return (f"incomplete dump: {format_size(size)} in {len(missing)} range(s) have no data "
            f"({first}{more})")


def run(ctx: Context) -> int:
    t0 = time.monotonic()
    loc = locate(ctx, ctx.args.what)
    # an object is streamed back (size, sha256, magic), not decoded page by page (issue 15)
    from .capture import sha256_file  # imported here (and below): start-up time (issue 12)
    from .s3_commands import object_facts
    facts = object_facts(loc.path) if is_s3_url(loc.path) else None
    out: dict[str, Any] = {"path": loc.path, "ok": False, "checks": {}}
    problems: list[str] = []
    try:
        try:
            out.update(facts if facts is not None else read_all_pages(loc.path))
            out["checks"]["pages"] = "ok"
        except KdumplingError as err:
            out["checks"]["pages"] = "failed"
            # The line names the path once (reader errors start with it too).
            problems.append(str(err).removeprefix(f"{loc.path}: "))
        rec = loc.record
        capped = bool(rec is not None and rec.snapshot.truncated)
        if out.get("incomplete") and not capped:  # a size-capped snapshot is cut by design
            out["checks"]["pages"] = "failed"
            problems.append(_incomplete_problem(out.get("missing", [])))
        if rec is not None and loc.store is not None:
            out["id"] = rec.id
            want = rec.snapshot.sha256
            size = rec.snapshot.size
            if size is not None:
                actual = facts["object_bytes"] if facts is not None else \
                    os.path.getsize(loc.path)
                if actual != size:
                    problems.append(f"size is {actual}, the capture recorded {size}")
                    out["checks"]["size"] = "failed"
                else:
                    out["checks"]["size"] = "ok"
            if want is not None:
                got = facts["object_sha256"] if facts is not None else sha256_file(loc.path)
                out["sha256"] = got
                if got != want:
                    problems.append(f"sha256 {got} differs from the recorded {want}")
                    out["checks"]["sha256"] = "failed"
                else:
                    out["checks"]["sha256"] = "ok"
        else:
            out["checks"]["sha256"] = "no record"
    finally:
        loc.close()
    out["problems"] = problems
    out["ok"] = not problems
    out["seconds"] = round(time.monotonic() - t0, 3)
    if ctx.json:
        ctx.emit(out)
    elif not problems:
        how = ("sha256 matches the capture record" if out["checks"].get("sha256") == "ok"
               else "no capture record to compare")
        pages = f"{out['pages']} pages " if out.get("pages") is not None else ""
        ctx.say(f"OK {loc.path}: {pages}({format_size(out['bytes'])}) read back; {how}")
    if problems:
        raise VerifyFailed(f"{loc.path}: " + "; ".join(problems))
    return 0
