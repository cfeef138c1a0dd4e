"""Entry point of ``kdumpling-agent``: a thin argparse front over one module per subcommand.

Exit codes (sysexits-style, carried by the error classes in kdumpling.errors): 0 ok, 1 finished
with warnings, 2 usage, 65 a dump that does not verify, 69 target gone, 74 I/O error (disk full),
75 the target is being captured already, 77 permission denied, 78 bad config, 128+N interrupted by
signal N, 70 internal error. Errors print one line on stderr; ``-v`` adds the traceback.
"""

from __future__ import annotations

import errno
import signal
import sys
import traceback
import warnings
from types import FrameType

from kdumpling import __version__
from kdumpling.errors import (
    DumpWriteError,
    KdumplingError,
    PermissionDeniedError,
    TargetGoneError,
)

from . import (
    cmd_capture,
    cmd_convert,
    cmd_debug,
    cmd_info,
    cmd_list,
    cmd_prune,
    cmd_service,
    cmd_verify,
    cmd_watch,
)
from .cancel import interrupted
from .common import PROG, ArgumentParser, Context
from .log import get_logger, setup_logging

EX_SOFTWARE = 70


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="Capture crash dumps of live processes, QEMU/libvirt guests and memory "
                    "images, on demand or on a schedule.",
        epilog="Run 'kdumpling-agent COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=ArgumentParser)
    for mod in (cmd_capture, cmd_convert, cmd_list, cmd_info, cmd_verify, cmd_prune, cmd_debug,
                cmd_service, cmd_watch):
        mod.register(sub)
    return parser


def _oserror_code(err: OSError) -> int:
    if err.errno in (errno.EACCES, errno.EPERM):
        return PermissionDeniedError.exit_code
    if err.errno in (errno.ESRCH, errno.ENOENT):
        return TargetGoneError.exit_code
    return DumpWriteError.exit_code


def _one_line(text: str) -> str:
    return " ".join(str(text).split()) or "unknown error"


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: object = None, line: str | None = None) -> None:
    """The library's warnings (e.g. a dump without memory) as one log line, not Python's two."""
    get_logger().warning("%s", _one_line(str(message)))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = int(getattr(args, "verbose", 0) or 0)
    setup_logging(-1 if getattr(args, "quiet", False) else verbose)
    warnings.showwarning = _show_warning
    ctx = Context(args)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        # First signal during a capture: abandon it at the next progress step (clean). Outside a
        # capture, or a second signal: stop right here.
        if ctx.capturing and not ctx.cancel.is_set:
            ctx.cancel.set(signum)
            return
        raise interrupted(signum)

    if not getattr(args, "own_signals", False):
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # a hangup must clean up too
            signal.signal(sig, on_signal)
    try:
        code: int = args.func(ctx)
        sys.stdout.flush()
        return code
    except KdumplingError as err:
        _report(err, verbose)
        return err.exit_code
    except BrokenPipeError:
        sys.stderr.write(f"{PROG}: error: output pipe closed\n")
        return DumpWriteError.exit_code
    except OSError as err:
        _report(err, verbose)
        return _oserror_code(err)
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except Exception as err:
        _report(err, verbose, internal=True)
        return EX_SOFTWARE


def _report(err: BaseException, verbose: int, internal: bool = False) -> None:
    if verbose:
        traceback.print_exception(err, file=sys.stderr)
    text = _one_line(str(err))
    if internal:
        text = f"internal error: {type(err).__name__}: {text}"
        if not verbose:
            text += " (run with -v for the traceback)"
    sys.stderr.write(f"{PROG}: error: {text}\n")
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["build_parser", "main"]
