"""``debug ID|PATH``: open a snapshot in a debugger, like ``coredumpctl debug``.

Process cores open in gdb (with the executable recorded at capture); kernel dumps in drgn, or in
crash when ``--vmlinux`` is given (crash needs the kernel's debug info, drgn finds it itself).
``--debugger`` and ``-A/--debugger-arguments`` (or ``$KDUMPLING_DEBUGGER``) override, as
coredumpctl's ``--debugger``/``-A`` and ``$SYSTEMD_DEBUGGER`` do.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from kdumpling.errors import UsageError

from .common import Context, Located, add_common, add_directory, dump_facts, locate
from .s3_client import is_s3_url
from .targets import FeatureUnavailableError


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("debug", help="open a snapshot in gdb, drgn or crash",
                       description="Start a debugger on a snapshot: gdb for process cores, drgn "
                                   "(or crash with --vmlinux) for kernel dumps.")
    p.add_argument("what", metavar="ID|PATH")
    p.add_argument("--debugger", metavar="CMD", help="debugger to run (gdb, drgn, crash, ...)")
    p.add_argument("-A", "--debugger-arguments", metavar="ARGS", default="",
                   help="extra arguments, shell-quoted, put before the dump")
    p.add_argument("--vmlinux", metavar="FILE", help="kernel with debug info (for crash)")
    add_directory(p)
    add_common(p)
    p.set_defaults(func=run)


def _which(name: str) -> str | None:
    import shutil  # imported here: start-up time (issue 12)
    return shutil.which(name)


def command_for(kind: str, path: str, exe: str | None, debugger: str | None,
                extra: list[str], vmlinux: str | None) -> list[str]:
    if debugger is None:
        if kind == "process":
            debugger = "gdb"
        elif vmlinux or not _which("drgn"):
            debugger = "crash"
        else:
            debugger = "drgn"
    name = os.path.basename(debugger)
    if name == "gdb":
        return [debugger, *extra, exe, path] if exe else [debugger, *extra, "-c", path]
    if name == "drgn":
        return [debugger, *extra, "-c", path]
    if name == "crash":
        if not vmlinux:
            raise UsageError("crash needs the kernel's debug info: --vmlinux FILE "
                             "(or use --debugger drgn)")
        return [debugger, *extra, vmlinux, path]
    return [debugger, *extra, path]


def run(ctx: Context) -> int:
    a = ctx.args
    loc = locate(ctx, a.what)
    loc.close()
    if is_s3_url(loc.path):  # debuggers need a file: a temporary download (issue 15)
        from .s3_commands import downloaded  # imported here: start-up time (issue 12)
        with downloaded(loc.path) as local:
            loc.path = local
            return _debug(ctx, loc)
    return _debug(ctx, loc)


def _debug(ctx: Context, loc: Located) -> int:
    a = ctx.args
    kind = exe = None
    if loc.record is not None:
        kind, exe = loc.record.snapshot.kind, loc.record.snapshot.exe
    import shlex  # imported here (and below): start-up time (issue 12)
    import subprocess
    if kind is None:
        kind = dump_facts(loc.path)["kind"]
    if exe and not os.path.exists(str(exe)):
        exe = None  # the binary was upgraded or removed: gdb still reads the core alone
    debugger = a.debugger or os.environ.get("KDUMPLING_DEBUGGER") or None
    argv = command_for(str(kind), loc.path, str(exe) if exe else None, debugger,
                       shlex.split(a.debugger_arguments), a.vmlinux)
    if not _which(argv[0]):
        raise FeatureUnavailableError(f"{argv[0]} is not installed")
    if ctx.args.verbose:
        ctx.say("running: " + shlex.join(argv))
    return subprocess.run(argv, check=False).returncode
