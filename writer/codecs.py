"""Per-page compression and decompression for the kdump-compressed format.

Byte formats readers accept (dump-formats.md §3.8; makedumpfile compress_mdf, crash cache_page,
libkdumpfile diskdump_read_page): zlib = a zlib-wrapped deflate stream (any compressor that emits
one is fine, so ISA-L is used when installed: ~8x stock zlib on 4 KiB pages); LZO = raw LZO1X
without python-lzo's 5-byte header; snappy = a raw snappy block (not the framed format);
zstd = one standard frame. A missing module is an error naming the extra, never a fallback.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable
from enum import IntEnum
from itertools import repeat
from types import ModuleType

from .errors import CodecUnavailableError, UsageError
from .layout import (
    DUMP_DH_COMPRESSED_LZO,
    DUMP_DH_COMPRESSED_SNAPPY,
    DUMP_DH_COMPRESSED_ZLIB,
    DUMP_DH_COMPRESSED_ZSTD,
)


class CompressionType(IntEnum):
    """Codec of a kdump-compressed file (seed API values kept)."""

    NONE = 0
    ZLIB = 1
    LZO = 2
    SNAPPY = 4
    ZSTD = 8


# The one codec <-> page_desc.flags / disk_dump_header.status mapping (bits: layout.py).
CODEC_FLAG = {
    CompressionType.NONE: 0,
    CompressionType.ZLIB: DUMP_DH_COMPRESSED_ZLIB,
    CompressionType.LZO: DUMP_DH_COMPRESSED_LZO,
    CompressionType.SNAPPY: DUMP_DH_COMPRESSED_SNAPPY,
    CompressionType.ZSTD: DUMP_DH_COMPRESSED_ZSTD,
}

CODEC_NAMES = {
    "none": CompressionType.NONE,
    "zlib": CompressionType.ZLIB,
    "lzo": CompressionType.LZO,
    "snappy": CompressionType.SNAPPY,
    "zstd": CompressionType.ZSTD,
}

# Compresses a list of pages. Built from C-level calls (map over the codec's function) so that
# no Python frame runs per page: per-page Python holds the GIL and stops threads overlapping.
BatchCompressor = Callable[[list[bytes]], list[bytes]]

def repeats_at_stride4(page: bytes) -> int:
    """How many bytes equal the byte four places before them (one C-level XOR, no byte loop)."""
    value = int.from_bytes(page, "little")
    # Byte i of the XOR is page[i] ^ page[i + 4]; the last four bytes have no partner.
    return (value ^ (value >> 32)).to_bytes(len(page), "little").count(0, 0, len(page) - 4)


def isal_zlib_batch(compress: Callable[[bytes, int], bytes], level: int,
                    page_size: int) -> BatchCompressor:
    """ISA-L zlib streams, with zlib level 1 redoing the pages ISA-L is known to do badly.

    ISA-L only emits matches of four bytes or more; arrays of 32-bit values that share their
    upper three bytes (pointer and PFN tables in kernel memory) need zlib's 3-byte matches and came
    out about twice as large. Those pages compress to 9/16..13/16 of a page with ISA-L and repeat
    their bytes at a stride of four: measured on guest memory (bench_writer.py), redoing just them
    (~3% of pages) brought the total from +2.3% to within 0.4% of makedumpfile's zlib level 1.
    """
    low, high = page_size * 9 // 16, page_size * 13 // 16
    min_repeats = page_size * 7 // 32

    def batch(pages: list[bytes]) -> list[bytes]:
        packed = list(map(compress, pages, repeat(level)))
        for i, n in enumerate(map(len, packed)):
            if low <= n < high and repeats_at_stride4(pages[i]) >= min_repeats:
                redo = zlib.compress(pages[i], 1)
                if len(redo) < n:
                    packed[i] = redo
        return packed

    return batch


def zlib_batch(level: int) -> BatchCompressor:
    return lambda pages: list(map(zlib.compress, pages, repeat(level)))


def zlib_levels(level: int) -> tuple[int, ...]:
    """zlib levels tried for a seed level >= 2, besides the fast path. Up to 6 zlib shrinks
    pages at every step; from 7 on the gains are bytes and not always positive, so 7-9 also try
    every level from 6 up: the sets nest, and a higher level can only be smaller."""
    return (level,) if level <= 6 else tuple(range(6, level + 1))


def smaller_of(first: list[bytes], second: list[bytes]) -> list[bytes]:
    """Per page, the shorter of two encodings of the same pages (the first on a tie)."""
    return [x if len(x) <= len(y) else y for x, y in zip(first, second, strict=True)]


def import_codec_module(codec: str, module: str, extra: str) -> ModuleType:
    """The module behind a codec, or the error that names the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise CodecUnavailableError(codec, module, extra) from None


def parse_compression(value: str | int | CompressionType) -> CompressionType:
    if isinstance(value, str):
        try:
            return CODEC_NAMES[value.lower()]
        except KeyError:
            raise UsageError(
                f"unknown compression {value!r}; choose one of {', '.join(CODEC_NAMES)}"
            ) from None
    try:
        return CompressionType(value)
    except ValueError:
        raise UsageError(f"unknown compression type {value!r}") from None


# The seed's compression_level range (zlib's own 1-9) and its default.
LEVEL_MIN, LEVEL_MAX, DEFAULT_LEVEL = 1, 9, 6
# zstd's levels (1-22) for the seed's 1-9: 1-5 as they are, then spread to 19. Sizes fall with
# the level on kernel memory, but not strictly at every step (zstd 9 came out a hair larger than
# 7 on /usr file pages), hence no 8 or 9 in the table.
ZSTD_LEVELS = (1, 2, 3, 4, 5, 7, 11, 15, 19)


def check_level(level: int) -> int:
    """The level, or a ValueError naming the range (every codec takes 1-9; see PageCodec)."""
    if isinstance(level, bool) or not isinstance(level, int) \
            or not LEVEL_MIN <= level <= LEVEL_MAX:
        raise UsageError(f"compression level must be {LEVEL_MIN}-{LEVEL_MAX}, got {level!r}")
    return level


class PageCodec:
    """Compresses single pages for one codec; ``compressor()`` is per worker thread.

    ``level`` (1-9, anything else is a ValueError):
      * zlib: 1 is the fast path, ISA-L level 1 with the pages it does badly redone by zlib
        level 1 (the size of makedumpfile -c within 1%); 2-9 keep per page the smallest of that
        and zlib's own level (7-9: zlib levels 6 up to it, see ``zlib_levels``), so a higher
        level has not given a larger file on any memory tried (tests/test_writer_codecs.py).
      * zstd: 1-9 map to zstd levels 1, 2, 3, 4, 5, 7, 11, 15, 19 (ZSTD_LEVELS).
      * lzo, snappy: no levels; always LZO1X-1 (what makedumpfile -l writes) and snappy.
    """

    def __init__(self, ctype: CompressionType, level: int = DEFAULT_LEVEL,
                 page_size: int = 4096) -> None:
        self.type = ctype
        self.flag = CODEC_FLAG[ctype]
        self.level = check_level(level)
        self.page_size = page_size
        self._local = threading.local()
        self._factory = self._make_factory()

    def _make_factory(self) -> Callable[[], BatchCompressor | None]:
        level = self.level
        if self.type == CompressionType.NONE:
            return lambda: None
        if self.type == CompressionType.ZLIB:
            try:
                from isal import isal_zlib  # type: ignore[import-untyped,unused-ignore]
                fast = isal_zlib_batch(isal_zlib.compress, 1, self.page_size)
            except ImportError:
                fast = zlib_batch(1)
            if level == 1:
                return lambda: fast
            # Each page keeps its smallest encoding among the fast path and zlib_levels(level):
            # on text ISA-L level 1 beat zlib levels 2 and 3, and zlib 8 came out a few bytes
            # larger than 7 (tests/test_writer_codecs.py), so neither alone grows monotonically.
            # zlib.compress releases the GIL, so threads still overlap.
            batches = [fast] + [zlib_batch(z) for z in zlib_levels(level)]

            def smallest(pages: list[bytes]) -> list[bytes]:
                best = batches[0](pages)
                for batch in batches[1:]:
                    best = smaller_of(best, batch(pages))
                return best

            return lambda: smallest
        if self.type == CompressionType.LZO:
            lzo = import_codec_module("lzo", "lzo", "lzo")
            # header=False: readers call lzo1x_decompress_safe on the bare stream. Always
            # LZO1X-1, what makedumpfile writes: the seed's levels do not apply to LZO.
            return lambda: (lambda pages: list(
                map(lzo.compress, pages, repeat(1), repeat(False))))
        if self.type == CompressionType.SNAPPY:
            cramjam = import_codec_module("snappy", "cramjam", "snappy")
            raw = cramjam.snappy.compress_raw  # raw block, not the framed format
            return lambda: (lambda pages: list(map(raw, pages)))
        if self.type == CompressionType.ZSTD:
            zstandard = import_codec_module("zstd", "zstandard", "zstd")

            def make() -> BatchCompressor:
                # One compressor per thread: sharing one crashed the process (codec-speed.md).
                compress = zstandard.ZstdCompressor(level=ZSTD_LEVELS[level - 1]).compress
                return lambda pages: list(map(compress, pages))

            return make
        raise UsageError(f"unknown compression {self.type!r}")

    def compressor(self) -> BatchCompressor | None:
        comp: BatchCompressor | None = getattr(self._local, "comp", None)
        if comp is None and self.type != CompressionType.NONE:
            comp = self._factory()
            self._local.comp = comp
        return comp


def codec_of_flags(flags: int) -> CompressionType:
    """The codec of a page_desc.flags or header status value: the first set bit in the order
    zlib, lzo, snappy, zstd wins, none set = raw (makedumpfile readpage_kdump_compressed,
    libkdumpfile diskdump_read_page)."""
    for ctype, bit in CODEC_FLAG.items():
        if bit and flags & bit:
            return ctype
    return CompressionType.NONE


class PageDecoder:
    """Decodes one stored page of a kdump file; output is bounded to one page before anything
    is allocated, and anything that does not decode to exactly one page is a ValueError."""

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self._local = threading.local()

    def decode(self, flags: int, data: bytes) -> bytes:
        """The page, or ValueError saying why the stored bytes are not one."""
        size = self.page_size
        ctype = codec_of_flags(flags)
        name = ctype.name.lower()
        if ctype == CompressionType.NONE:
            if len(data) != size:
                raise ValueError(f"raw page of {len(data)} bytes, expected {size}")
            return data
        if ctype == CompressionType.ZLIB:
            obj = zlib.decompressobj()
            try:
                out = obj.decompress(data, size + 1)
            except zlib.error as err:
                raise ValueError(f"zlib: {err}") from None
            if not obj.eof and len(out) <= size:
                raise ValueError("zlib: truncated stream")
        elif ctype == CompressionType.LZO:
            lzo = import_codec_module("lzo", "lzo", "lzo")
            try:
                out = lzo.decompress(data, False, size)
            except lzo.error as err:
                raise ValueError(f"lzo: {err}") from None
        elif ctype == CompressionType.SNAPPY:
            snappy = import_codec_module("snappy", "cramjam", "snappy").snappy
            try:
                claimed = snappy.decompress_raw_len(data)
                if claimed != size:
                    raise ValueError(f"snappy: block holds {claimed} bytes, expected {size}")
                out = bytes(snappy.decompress_raw(data))
            except ValueError:
                raise
            except Exception as err:  # cramjam.DecompressionError has no stable import path
                raise ValueError(f"snappy: {err}") from None
        else:
            zstandard = import_codec_module("zstd", "zstandard", "zstd")
            dctx = getattr(self._local, "zstd", None)
            if dctx is None:  # one per thread, as for compression (codec-speed.md)
                dctx = self._local.zstd = zstandard.ZstdDecompressor()
            try:
                claimed = zstandard.frame_content_size(data)
                if claimed > size:
                    raise ValueError(f"zstd: frame holds {claimed} bytes, expected {size}")
                out = dctx.decompress(data, max_output_size=size)
            except zstandard.ZstdError as err:
                raise ValueError(f"zstd: {err}") from None
        if len(out) != size:
            raise ValueError(f"{name}: page decompressed to {len(out)} bytes, expected {size}")
        return bytes(out)
