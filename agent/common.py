"""What every subcommand shares: the parser type, common options, config and store access."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

from kdumpling.errors import UsageError

from .capture import Cancel, WriteOptions
from .config import AgentConfig, load_config
from .store import Store, default_store_dir

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
        return os.path.abspath(explicit or default_store_dir(self.config.output.directory))

    def open_store(self, create: bool = False) -> Store | None:
        """The snapshot store; None when it does not exist and ``create`` is false."""
        path = self.store_dir()
        if not create and not os.path.lexists(path):
            return None
        return Store(path, create=create)

    def keep_for(self) -> Callable[[str], int]:
        per = {t.name: t.keep for t in self.config.targets if t.keep is not None}
        default = self.config.retention.keep
        return lambda key: per.get(key, default)

    def emit(self, obj: Any) -> None:
        """One JSON document on stdout."""
        sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
        sys.stdout.flush()

    def say(self, text: str) -> None:
        if not self.quiet:
            sys.stdout.write(text + "\n")


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


def add_write_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output (makedumpfile-style)")
    g.add_argument("-o", "--output", metavar="FILE|DIR|-",
                   help="a file, a snapshot directory, or - for the flattened stream on stdout "
                        "(default: the snapshot directory)")
    g.add_argument("--format", choices=("elf", "kdump", "kdump-flat"),
                   help="dump format (default: elf for processes, kdump for kernels)")
    c = g.add_mutually_exclusive_group()
    c.add_argument("-c", dest="compression", action="store_const", const="zlib",
                   help="compress pages with zlib (kdump formats)")
    c.add_argument("-l", dest="compression", action="store_const", const="lzo", help="... lzo")
    c.add_argument("-p", dest="compression", action="store_const", const="snappy",
                   help="... snappy")
    c.add_argument("-z", dest="compression", action="store_const", const="zstd", help="... zstd")
    c.add_argument("--compression", choices=("none", "zlib", "lzo", "snappy", "zstd"))
    g.add_argument("--compression-level", type=int, metavar="N", help="codec level (default 1)")
    g.add_argument("-d", "--dump-level", type=_dump_level, metavar="LEVEL",
                   help="makedumpfile dump level 0-31; bit 1 drops zero pages (default 1)")
    g.add_argument("--threads", type=_positive, metavar="N", help="compression threads")
    g.add_argument("--annotate", action="append", default=[], metavar="KEY=VALUE",
                   type=_annotation, help="store KEY=VALUE in the dump (repeatable)")
    g.add_argument("-f", "--force", action="store_true", help="replace an existing output file")


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


def write_options(ctx: Context, fmt: str | None = None, compression: str | None = None,
                  compression_level: int | None = None, dump_level: int | None = None) \
        -> WriteOptions:
    """Config [output] defaults, then a target's overrides, then the command line."""
    out = ctx.config.output
    opts = WriteOptions(out.format, out.compression, out.compression_level, out.dump_level,
                        out.threads)
    opts = opts.merged(format=fmt, compression=compression, compression_level=compression_level,
                       dump_level=dump_level)
    a = ctx.args
    return opts.merged(format=getattr(a, "format", None),
                       compression=getattr(a, "compression", None),
                       compression_level=getattr(a, "compression_level", None),
                       dump_level=getattr(a, "dump_level", None),
                       threads=getattr(a, "threads", None))


Handler = Callable[[Context], int]
