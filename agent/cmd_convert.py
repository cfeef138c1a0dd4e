"""``convert IN OUT``: rewrite a dump in another format or codec (makedumpfile -R and more)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from .cmd_capture import run_capture
from .common import Context, add_common, add_write_options
from .store import slug
from .targets import TargetSpec


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("convert", help="rewrite a dump in another format or codec",
                       description="Read any dump our reader opens (ELF, kdump, flattened kdump) "
                                   "and write it again: OUT is a file, a directory, or - for the "
                                   "flattened stream on stdout.")
    p.add_argument("input", metavar="IN")
    p.add_argument("out", metavar="OUT")
    add_write_options(p)
    add_common(p, "print the result as one JSON object on stdout")
    p.set_defaults(func=run)


def run(ctx: Context) -> int:
    a = ctx.args
    if a.output and a.output != a.out:
        from kdumpling.errors import UsageError
        raise UsageError("give the output once: as OUT or with -o")
    path = os.path.abspath(a.input)
    base = os.path.basename(path).split(".")[0] or "dump"
    spec = TargetSpec("convert", slug(base), f"dump {a.input}", {"path": path})
    return run_capture(ctx, spec, a.out)
