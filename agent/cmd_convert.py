"""``convert IN OUT``: rewrite a dump in another format or codec (makedumpfile -R and more)."""

from __future__ import annotations

import argparse
from typing import Any

from kdumpling.errors import UsageError

from .common import Context, add_common, add_write_options, run_capture
from .targets import ConvertTarget


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("convert", help=ConvertTarget.help, description=ConvertTarget.description)
    ConvertTarget.add_arguments(p)
    p.add_argument("out", metavar="OUT")
    add_write_options(p)
    add_common(p, "print the result as one JSON object on stdout")
    p.set_defaults(func=run)


def run(ctx: Context) -> int:
    a = ctx.args
    if a.output and a.output != a.out:
        raise UsageError("give the output once: as OUT or with -o")
    return run_capture(ctx, ConvertTarget.from_args(a), a.out)
