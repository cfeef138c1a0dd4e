"""How a dump is written: format, codec, codec level, dump level, threads.

Each choice is parsed once, where it enters (an argparse ``type=`` or a config key), with the
writer's own parsers (``OutputFormat.parse``, ``kdumpling.codecs.parse_compression``); from
then on it travels as the writer's enum, and ``None`` means "auto" (decided per dump kind).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

from kdumpling import CompressionType, OutputFormat
from kdumpling.codecs import parse_compression
from kdumpling.errors import UsageError
from kdumpling.image import DumpKind

FORMAT_CHOICES = ("auto", *(f.value for f in OutputFormat))
COMPRESSION_CHOICES = ("auto", *(c.name.lower() for c in CompressionType))
# The seed's range (zlib's 1-9; zstd maps it onto its own levels, lzo and snappy have none).
# The agent's default stays 1: makedumpfile -c's zlib level, the fast path the bench compares.
LEVEL_MIN, LEVEL_MAX = 1, 9
DEFAULT_LEVEL = 1
DEFAULT_DUMP_LEVEL = 1  # makedumpfile -d 1: zero pages left out


def parse_format(text: str) -> OutputFormat | None:
    """``auto`` -> None; anything else through the writer's parser (UsageError if unknown)."""
    return None if text == "auto" else OutputFormat.parse(text)


def parse_codec(text: str) -> CompressionType | None:
    return None if text == "auto" else parse_compression(text)


def check_level(level: int) -> int:
    if not LEVEL_MIN <= level <= LEVEL_MAX:
        raise UsageError(f"compression level must be {LEVEL_MIN}-{LEVEL_MAX}, got {level}")
    return level


def argparse_codec(text: str) -> CompressionType:
    """``--compression NAME``: the writer's parser, as an argparse type."""
    try:
        return parse_compression(text)
    except UsageError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def argparse_level(text: str) -> int:
    try:
        level = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    try:
        return check_level(level)
    except UsageError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


@dataclass(frozen=True)
class WriteOptions:
    format: OutputFormat | None = None  # None: auto
    compression: CompressionType | None = None  # None: auto (zlib)
    compression_level: int | None = None
    dump_level: int | None = None
    threads: int | None = None

    def merged(self, **over: Any) -> WriteOptions:
        """These options with every given (not None) value of ``over`` in place."""
        return dataclasses.replace(self, **{k: v for k, v in over.items() if v is not None})

    def format_for(self, kind: DumpKind, streaming: bool) -> OutputFormat:
        if self.format is not None:
            return self.format
        if kind is DumpKind.PROCESS:
            return OutputFormat.ELF  # gdb and eu-stack read ELF process cores only
        return OutputFormat.KDUMP_FLATTENED if streaming else OutputFormat.KDUMP_COMPRESSED

    def codec_for(self, fmt: OutputFormat) -> CompressionType:
        if fmt is OutputFormat.ELF:
            return CompressionType.NONE
        # every reader (crash, drgn, libkdumpfile) decodes zlib
        return self.compression if self.compression is not None else CompressionType.ZLIB

    @property
    def level(self) -> int:
        return self.compression_level if self.compression_level is not None else DEFAULT_LEVEL

    @property
    def dump_level_or_default(self) -> int:
        return self.dump_level if self.dump_level is not None else DEFAULT_DUMP_LEVEL

    def over(self, other: WriteOptions) -> WriteOptions:
        """These options with every value ``other`` sets in place (a target over [output])."""
        return self.merged(**{f.name: getattr(other, f.name) for f in dataclasses.fields(other)})
