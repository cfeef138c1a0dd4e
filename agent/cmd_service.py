"""``service``: run the scheduler (the systemd unit's ExecStart), or every target once;
``service install`` / ``service uninstall`` put the units in place for this installation."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from .common import Context, add_common

if TYPE_CHECKING:  # start-up time (issue 12): the service and installer load when they run
    from .install import Report


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("service", help="take scheduled snapshots (systemd Type=notify service)",
                       description="Capture the configured targets on their schedules until "
                                   "SIGTERM; SIGHUP reloads the config. Speaks sd_notify "
                                   "(READY, STATUS, WATCHDOG, STOPPING) when $NOTIFY_SOCKET is "
                                   "set. 'service install' writes the systemd units.")
    p.add_argument("--once", action="store_true",
                   help="capture every target once and exit (for a .timer)")
    add_common(p)
    p.set_defaults(func=run, own_signals=True)
    # Optional: plain "service" and "service --once" stay the units' ExecStart.
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=False,
                               parser_class=type(p))

    inst = actions.add_parser(
        "install", help="write the systemd units for this installation",
        description="Write kdumpling-agent.service, kdumpling-agent-once.service and "
                    "kdumpling-agent-once.timer into ROOT/etc/systemd/system with ExecStart= "
                    "naming this installation's kdumpling-agent, and the example config to "
                    "ROOT/etc/kdumpling/agent.toml unless one exists. With systemd running and "
                    "ROOT /, runs systemctl daemon-reload (and enable/restart for the flags).")
    inst.add_argument("--root", default="/", metavar="DIR",
                      help="install below DIR (an image or a chroot; default /)")
    inst.add_argument("--enable", action="store_true",
                      help="enable the unit (offline with systemctl --root when not live)")
    inst.add_argument("--now", action="store_true",
                      help="(re)start the unit now (systemd running and ROOT / only)")
    inst.add_argument("--timer", action="store_true",
                      help="--enable/--now act on kdumpling-agent-once.timer instead of the "
                           "service")
    _output_options(inst)
    inst.set_defaults(func=run_install)

    rm = actions.add_parser(
        "uninstall", help="stop, disable and remove the units (config and snapshots stay)",
        description="Stop and disable the kdumpling units, remove them from "
                    "ROOT/etc/systemd/system and reload systemd. The config and the snapshots "
                    "stay.")
    rm.add_argument("--root", default="/", metavar="DIR", help="below DIR (default /)")
    _output_options(rm)
    rm.set_defaults(func=run_uninstall)


def _output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="print errors only")


def run(ctx: Context) -> int:
    from .service import Service  # imported here: start-up time (issue 12)
    return Service(ctx.args.config, once=ctx.args.once).run()


def run_install(ctx: Context) -> int:
    a = ctx.args
    from .install import install  # imported here: start-up time (issue 12)
    report = install(a.root, enable=a.enable, now=a.now, timer=a.timer)
    return _show(ctx, report)


def run_uninstall(ctx: Context) -> int:
    from .install import uninstall  # imported here: start-up time (issue 12)
    return _show(ctx, uninstall(ctx.args.root))


def _show(ctx: Context, report: Report) -> int:
    if ctx.json:
        ctx.emit(report.as_json())
    else:
        for line in report.lines():
            ctx.say(line)
    return 0
