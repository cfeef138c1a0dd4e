"""Per-page codecs: every output is a stream stock decoders read, and the zlib redo path works."""

from __future__ import annotations

import random
import struct
import zlib

import pytest
from kdumpling.codecs import CompressionType, PageCodec, repeats_at_stride4

PAGE = 4096


def u32_table_page(seed: int, page: int = PAGE) -> bytes:
    """Ascending 32-bit addresses that share their upper bytes, like the kernel tables where ISA-L
    (matches of 4+ bytes only) came out twice as large as zlib level 1."""
    rng = random.Random(seed)
    value, values = 0x82C35380, []
    for _ in range(page // 4):
        values.append(value)
        value += 8 * rng.choice((1, 1, 1, 2, 3, 5))
    return struct.pack(f"<{page // 4}I", *values)


def test_repeats_at_stride4_counts_bytes_equal_to_the_one_four_before() -> None:
    assert repeats_at_stride4(bytes(range(4)) * (PAGE // 4)) == PAGE - 4
    assert repeats_at_stride4(bytes(range(256)) * (PAGE // 256)) == 0
    page = bytearray(bytes(range(256)) * (PAGE // 256))
    page[100] = page[96]
    assert repeats_at_stride4(bytes(page)) == 1


def test_zlib_redoes_pages_isal_compresses_badly() -> None:
    isal_zlib = pytest.importorskip("isal.isal_zlib")
    comp = PageCodec(CompressionType.ZLIB, 1, PAGE).compressor()
    assert comp is not None
    table = u32_table_page(1)
    isal_size = len(isal_zlib.compress(table, 1))
    zlib_size = len(zlib.compress(table, 1))
    assert zlib_size < isal_size * 0.7  # the weakness the redo exists for
    (out,) = comp([table])
    assert zlib.decompress(out) == table
    assert len(out) <= zlib_size


@pytest.mark.parametrize("level", [0, 1, 2, 9])
def test_zlib_levels_emit_streams_stock_zlib_decodes(level: int) -> None:
    rng = random.Random(level)
    pages = [u32_table_page(level), rng.randbytes(PAGE), bytes(PAGE),
             b"kdumpling " * (PAGE // 10) + b"...!!!", struct.pack("<Q", 7) * (PAGE // 8)]
    comp = PageCodec(CompressionType.ZLIB, level, PAGE).compressor()
    assert comp is not None
    for page, out in zip(pages, comp(pages), strict=True):
        assert zlib.decompress(out) == page


def test_zlib_redo_scales_with_the_page_size() -> None:
    pytest.importorskip("isal.isal_zlib")
    big = 65536
    table = u32_table_page(3, big)
    comp = PageCodec(CompressionType.ZLIB, 1, big).compressor()
    assert comp is not None
    (out,) = comp([table])
    assert zlib.decompress(out) == table
    assert len(out) <= len(zlib.compress(table, 1))
