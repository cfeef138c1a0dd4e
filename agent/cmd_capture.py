"""``capture process|libvirt|qmp|raw``: one snapshot now."""

from __future__ import annotations

import argparse
from typing import Any

from .common import Context, add_common, add_write_options, run_capture
from .targets import CAPTURE_TYPES, TARGET_TYPES, Target


def register(sub: argparse._SubParsersAction[Any]) -> None:
    cap = sub.add_parser("capture", help="take one snapshot now",
                         description="Take one snapshot of a process, a guest or a memory image.")
    kinds = cap.add_subparsers(dest="kind", metavar="KIND", required=True,
                               parser_class=type(cap))
    for name in CAPTURE_TYPES:
        cls = TARGET_TYPES[name]
        p = kinds.add_parser(name, help=cls.help, description=cls.description)
        cls.add_arguments(p)
        add_write_options(p)
        add_common(p, "print the result as one JSON object on stdout")
        p.set_defaults(func=run, target_type=cls)


def run(ctx: Context) -> int:
    cls: type[Target] = ctx.args.target_type
    return run_capture(ctx, cls.from_args(ctx.args), ctx.args.output)
