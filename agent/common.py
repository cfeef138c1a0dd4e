"""What the subcommands share: the parser type and common options, config and store access,
running a capture and reporting it, and finding a snapshot by ID or path. Subcommands import
this module, never each other."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

from kdumpling import CompressionType, OutputFormat
from kdumpling.errors import KdumplingError, UsageError

from .cancel import Cancel
from .options import (
    LEVEL_MAX,
    LEVEL_MIN,
    WriteOptions,
    argparse_codec,
    argparse_level,
)
from .progress import ProgressBar
from .record import CaptureResult, SnapshotRecord
from .s3_client import is_s3_url
from .store import SIDECAR_SUFFIX, Record, SnapshotStore, default_store_dir, open_store
from .targets import FeatureUnavailableError, Target
from .units import format_duration, format_size

# Start-up time (issue 12): what only some commands use is imported where it is used.
if TYPE_CHECKING:
    from .config import AgentConfig
    from .settings import Destination

PROG = "kdumpling-agent"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit 2), as the CLI promises one line on stderr."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(UsageError.exit_code)


@dataclass
class Context:
    """Lazily loaded state for one invocation."""

    args: argparse.Namespace
    cancel: Cancel = field(default_factory=Cancel)
    capturing: bool = False
    _config: AgentConfig | None = None

    @property
    def config(self) -> AgentConfig:
        if self._config is None:
            from .config import load_config  # imported here: start-up time (issue 12)
            self._config = load_config(getattr(self.args, "config", None))
        return self._config

    @property
    def json(self) -> bool:
        return bool(getattr(self.args, "json", False))

    @property
    def quiet(self) -> bool:
        return bool(getattr(self.args, "quiet", False))

    def store_dir(self) -> str:
        explicit = getattr(self.args, "directory", None)
        where = explicit or default_store_dir(self.config.output.directory)
        return where if is_s3_url(where) else os.path.abspath(where)

    def open_store(self, create: bool = False) -> SnapshotStore | None:
        """The snapshot store; None when it does not exist and ``create`` is false."""
        path = self.store_dir()
        if not create and not is_s3_url(path) and not os.path.lexists(path):
            return None
        return open_store(path, create=create, spool=self.spool, cancel=self.cancel)

    @property
    def spool(self) -> bool:
        """--spool or [output] spool: an object store gets the dump once it is local."""
        return bool(getattr(self.args, "spool", False) or self.config.output.spool)

    def keep_for(self) -> Callable[[str], int]:
        return self.config.keep_for

    def emit(self, obj: Any) -> None:
        """One JSON document on stdout."""
        import json  # imported here: start-up time (issue 12)
        sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
        sys.stdout.flush()

    def say(self, text: str) -> None:
        if not self.quiet:
            sys.stdout.write(text + "\n")


Handler = Callable[[Context], int]

# -- options ------------------------------------------------------------------------------------


def add_common(p: argparse.ArgumentParser, json_help: str = "print one JSON object on stdout") \
        -> None:
    g = p.add_argument_group("common options")
    g.add_argument("--config", metavar="PATH",
                   help="config file (default /etc/kdumpling/agent.toml; drop-ins in PATH.d/)")
    g.add_argument("--json", action="store_true", help=json_help)
    g.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    g.add_argument("-v", "--verbose", action="count", default=0,
                   help="more detail; tracebacks on errors")


def add_directory(p: argparse.ArgumentParser) -> None:
    p.add_argument("-D", "--directory", metavar="DIR",
                   help="snapshot directory (default: output.directory, /var/lib/kdumpling)")


def _argparse_format(text: str) -> OutputFormat:
    try:
        return OutputFormat.parse(text)
    except UsageError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_write_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output (makedumpfile-style)")
    g.add_argument("-o", "--output", metavar="FILE|DIR|-",
                   help="a file, a snapshot directory, or - for the flattened stream on stdout "
                        "(default: the snapshot directory)")
    g.add_argument("--format", type=_argparse_format, metavar="{elf,kdump,kdump-flat}",
                   help="dump format (default: elf for processes, kdump for kernels)")
    c = g.add_mutually_exclusive_group()
    c.add_argument("-c", dest="compression", action="store_const", const=CompressionType.ZLIB,
                   help="compress pages with zlib (kdump formats)")
    c.add_argument("-l", dest="compression", action="store_const", const=CompressionType.LZO,
                   help="... lzo")
    c.add_argument("-p", dest="compression", action="store_const",
                   const=CompressionType.SNAPPY, help="... snappy")
    c.add_argument("-z", dest="compression", action="store_const", const=CompressionType.ZSTD,
                   help="... zstd")
    c.add_argument("--compression", type=argparse_codec,
                   metavar="{none,zlib,lzo,snappy,zstd}", help="the codec by name")
    g.add_argument("--compression-level", type=argparse_level, metavar="N",
                   help=f"codec level {LEVEL_MIN}-{LEVEL_MAX} (default 1, the fastest, as "
                        "makedumpfile -c; zstd maps it onto its own levels; lzo and snappy "
                        "have none and ignore it)")
    g.add_argument("-d", "--dump-level", type=_dump_level, metavar="LEVEL",
                   help="makedumpfile dump level 0-31; bit 1 drops zero pages (default 1)")
    g.add_argument("--threads", type=_positive, metavar="N", help="compression threads")
    g.add_argument("--annotate", action="append", default=[], metavar="KEY=VALUE",
                   type=_annotation, help="store KEY=VALUE in the dump (repeatable)")
    g.add_argument("-f", "--force", action="store_true", help="replace an existing output file")
    if "--spool" not in p._option_string_actions:  # guests have theirs, with the same promise
        g.add_argument("--spool", action="store_true",
                       help="s3:// output: write the dump locally first (the target is released "
                            "as soon as it is), then upload it and remove the local copy")


def _dump_level(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a dump level: {text!r}") from None
    if not 0 <= value <= 31:
        raise argparse.ArgumentTypeError(f"dump level must be 0-31, got {value}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _annotation(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or "\n" in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def cli_write_options(args: argparse.Namespace) -> WriteOptions:
    """What the command line sets of ``add_write_options`` (None: not given)."""
    return WriteOptions(format=args.format, compression=args.compression,
                        compression_level=args.compression_level, dump_level=args.dump_level,
                        threads=args.threads)


# -- running a capture --------------------------------------------------------------------------

def destination(ctx: Context, output: str | None) -> Destination:
    """``-o``: '-' = stdout, an existing directory or 'DIR/' = a store, else one file."""
    from .settings import Destination  # imported here: start-up time (issue 12)
    force = bool(getattr(ctx.args, "force", False))
    if output == "-":
        if ctx.json:
            raise UsageError("--json cannot share stdout with -o -")
        if sys.stdout.isatty():
            raise UsageError("refusing to write a dump to a terminal; redirect stdout")
        return Destination(stream=sys.stdout.buffer)
    if output is not None and is_s3_url(output):
        from .s3_client import S3Url
        from .store_s3 import SingleObjectStore
        if not S3Url.parse(output).is_prefix:  # s3://BUCKET/KEY: one object, as -o FILE
            return Destination(store=SingleObjectStore(output, force=force, spool=ctx.spool,
                                                       cancel=ctx.cancel))
        return Destination(store=open_store(output, create=True, spool=ctx.spool,
                                            cancel=ctx.cancel))
    if output and not (os.path.isdir(output) or output.endswith("/")):
        return Destination(path=os.path.abspath(output), force=force)
    directory = os.path.abspath(output) if output else ctx.store_dir()
    return Destination(store=open_store(directory, create=True))


def run_capture(ctx: Context, target: Target, output: str | None) -> int:
    """``capture``/``convert``: one capture with the config's and the command line's options."""
    from . import metrics  # imported here (and below): start-up time (issue 12)
    from .capture import capture
    from .settings import CaptureSettings
    dest = destination(ctx, output)
    bar = None
    if not ctx.json and not ctx.quiet and sys.stderr.isatty():
        bar = ProgressBar(target.label)
    settings = CaptureSettings.from_config(
        ctx.config, options=cli_write_options(ctx.args),
        annotations=dict(getattr(ctx.args, "annotate", []) or []), progress=bar,
        cancel=ctx.cancel)
    ctx.capturing, started = True, time.time()
    result: CaptureResult | None = None
    try:
        result = capture(target, dest, settings)
    finally:
        ctx.capturing = False
        if bar:
            bar.close()
        if dest.store is not None:
            dest.store.close()
        metrics.observe_cli(ctx.config, target, started, result, dest.store, sys.exc_info()[1])
    report(ctx, result)
    return result.exit_code


def report(ctx: Context, result: CaptureResult) -> None:
    if ctx.json:
        ctx.emit(result.to_json())
        return
    record = result.record
    for w in record.warnings or []:
        sys.stderr.write(f"{PROG}: warning: {w}\n")
    for u in record.unreadable or []:
        if u.expected and not ctx.args.verbose:
            continue
        sys.stderr.write(f"{PROG}: warning: unreadable {u.start:#x}-{u.end:#x}: {u.reason}\n")
    if record.truncated:
        sys.stderr.write(f"{PROG}: warning: the dump is truncated (size cap)\n")
    path = result.path
    if ctx.quiet or path is None:
        return
    pause = record.pause_seconds
    lines = [
        f"{record.target} -> {path}",
        f"  {record.format}"
        + (f"/{record.codec}" if record.codec != "none" else "")
        + f", {format_size(record.bytes_in or 0)} of memory in "
          f"{format_size(record.bytes_out or 0)}"
        + (f", paused {pause:.3f}s" if pause is not None else "")
        + f", {format_duration(record.total_seconds or 0.0)} in all",
        f"  sha256 {record.sha256}",
    ]
    if result.pruned:
        lines.append(f"  pruned {', '.join(result.pruned)}")
    lines.append("  open it: " + how_to_open(record, path))
    ctx.say("\n".join(lines))


def how_to_open(record: SnapshotRecord, path: str) -> str:
    if is_s3_url(path):  # debuggers need a file: debug downloads the object first
        return f"{PROG} debug {path}"
    if record.kind == "process":
        cmd = f"gdb {record.exe} {path}" if record.exe else f"gdb -c {path}"
    else:
        cmd = f"drgn -c {path}   (or: crash VMLINUX {path})"
    if record.id:
        return f"{PROG} debug {record.id}   ({cmd})"
    return cmd


# -- finding a snapshot -------------------------------------------------------------------------

@dataclass
class Located:
    """A dump by path or ID, with its record and store when it has them."""

    path: str
    record: Record | None
    store: SnapshotStore | None

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


def _looks_like_path(text: str) -> bool:
    return "/" in text or os.path.lexists(text)


def locate(ctx: Context, what: str) -> Located:
    """A snapshot ID (or unique prefix) in the store, or a path to any dump file."""
    if is_s3_url(what):
        from .store_s3 import locate_object  # imported here: start-up time (issue 12)
        record, bucket = locate_object(what)
        return Located(bucket.path_of(record.file) if record else what, record, bucket)
    if _looks_like_path(what):
        path = os.path.abspath(what)
        if not os.path.exists(path):
            raise UsageError(f"no such file: {what}")
        directory, name = os.path.split(path)
        ident = name.rsplit(".", 1)[0]
        import json  # imported here (and below): start-up time (issue 12)

        from .store_dir import record_from_json
        with contextlib.suppress(OSError, ValueError, KdumplingError):
            with open(os.path.join(directory, ident + SIDECAR_SUFFIX), "rb") as f:
                rec = record_from_json(json.loads(f.read(1 << 20)), ident + SIDECAR_SUFFIX)
            if rec is not None and rec.file == name:
                return Located(path, rec, open_store(directory, create=False))
        return Located(path, None, None)
    store = ctx.open_store(create=False)
    if store is None:
        raise KdumplingError(f"no snapshot {what!r}: {ctx.store_dir()} does not exist")
    try:
        found = store.find(what)
    except BaseException:
        store.close()
        raise
    return Located(store.path_of(found.file), found, store)


def dump_facts(path: str) -> dict[str, Any]:
    """What our reader sees in the file."""
    from kdumpling.reader import open_dump  # imported here: start-up time (issue 12)
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


__all__ = ["PROG", "ArgumentParser", "Context", "FeatureUnavailableError", "Handler",
           "Located", "add_common", "add_directory", "add_write_options", "cli_write_options",
           "destination", "dump_facts", "how_to_open", "locate", "report", "run_capture"]
