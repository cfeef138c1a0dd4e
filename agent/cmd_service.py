"""``service``: run the scheduler (the systemd unit's ExecStart), or every target once."""

from __future__ import annotations

import argparse
from typing import Any

from .common import Context, add_common


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("service", help="take scheduled snapshots (systemd Type=notify service)",
                       description="Capture the configured targets on their schedules until "
                                   "SIGTERM; SIGHUP reloads the config. Speaks sd_notify "
                                   "(READY, STATUS, WATCHDOG, STOPPING) when $NOTIFY_SOCKET is "
                                   "set.")
    p.add_argument("--once", action="store_true",
                   help="capture every target once and exit (for a .timer)")
    add_common(p)
    p.set_defaults(func=run, own_signals=True)


def run(ctx: Context) -> int:
    from .service import Service

    return Service(ctx.args.config, once=ctx.args.once).run()
