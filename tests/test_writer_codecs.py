"""Per-page codecs: every output is a stream stock decoders read, and the zlib redo path works."""

from __future__ import annotations

import os
import random
import struct
import zlib

import pytest
from kdumpling import KdumpBuilder
from kdumpling.codecs import ZSTD_LEVELS, CompressionType, PageCodec, repeats_at_stride4

from tests import tiers

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
    isal_zlib = tiers.module("extras", "isal.isal_zlib", "pip install -e '.[zlib]'")
    comp = PageCodec(CompressionType.ZLIB, 1, PAGE).compressor()
    assert comp is not None
    table = u32_table_page(1)
    isal_size = len(isal_zlib.compress(table, 1))
    zlib_size = len(zlib.compress(table, 1))
    assert zlib_size < isal_size * 0.7  # the weakness the redo exists for
    (out,) = comp([table])
    assert zlib.decompress(out) == table
    assert len(out) <= zlib_size


@pytest.mark.parametrize("level", [1, 2, 6, 9])
def test_zlib_levels_emit_streams_stock_zlib_decodes(level: int) -> None:
    rng = random.Random(level)
    pages = [u32_table_page(level), rng.randbytes(PAGE), bytes(PAGE),
             b"kdumpling " * (PAGE // 10) + b"...!!!", struct.pack("<Q", 7) * (PAGE // 8)]
    comp = PageCodec(CompressionType.ZLIB, level, PAGE).compressor()
    assert comp is not None
    for page, out in zip(pages, comp(pages), strict=True):
        assert zlib.decompress(out) == page


def test_zlib_redo_scales_with_the_page_size() -> None:
    tiers.module("extras", "isal.isal_zlib", "pip install -e '.[zlib]'")
    big = 65536
    table = u32_table_page(3, big)
    comp = PageCodec(CompressionType.ZLIB, 1, big).compressor()
    assert comp is not None
    (out,) = comp([table])
    assert zlib.decompress(out) == table
    assert len(out) <= len(zlib.compress(table, 1))


VMCI = "OSRELEASE=6.1.0-levels\nPAGESIZE=4096\nSYMBOL(swapper_pg_dir)=ffffffff82000000\n"
WORDS = ("kernel", "page", "mapping", "inode", "dentry", "task", "sched", "irq", "rcu", "slab",
         "kmalloc", "vmalloc", "netdev", "skb", "tcp", "ext4", "block", "bio", "request")


def text_page(rng: random.Random) -> bytes:
    """A page of log-like text: what zlib's higher levels gain most on."""
    lines, size = [], 0
    while size < PAGE:
        line = (f"[{rng.randrange(100000):6d}.{rng.randrange(10**6):06d}] {rng.choice(WORDS)}: "
                f"{rng.choice(WORDS)} {rng.choice(WORDS)} at {rng.randrange(1 << 32):#010x} "
                f"state={rng.randrange(8)}\n")
        lines.append(line)
        size += len(line)
    return "".join(lines).encode()[:PAGE]


def memory(kind: str, pages: int = 384, seed: int = 1) -> bytes:
    """"compressible": text only; "mixed": text, random, 32-bit tables, zero and repeated
    pages."""
    rng = random.Random(seed)
    out = []
    for i in range(pages):
        r = 0.0 if kind == "compressible" else rng.random()
        if r < 0.4:
            out.append(text_page(rng))
        elif r < 0.6:
            out.append(rng.randbytes(PAGE))
        elif r < 0.8:
            out.append(u32_table_page(i))
        elif r < 0.9:
            out.append(bytes(PAGE))
        else:
            out.append(struct.pack("<Q", rng.randrange(1 << 64)) * (PAGE // 8))
    return b"".join(out)


def kdump_size(tmp_path: str, mem: bytes, codec: str, level: int) -> int:
    out = f"{tmp_path}/{codec}-{level}.kdump"
    b = KdumpBuilder().set_vmcoreinfo(VMCI).add_memory_segment(0x100000, mem)
    return b.write(out, format="kdump", compression=codec, compression_level=level).bytes_out


def test_zstd_maps_the_seed_levels_onto_its_own(tmp_path: str) -> None:
    zstandard = tiers.module("extras", "zstandard", "pip install -e '.[zstd]'")
    assert len(ZSTD_LEVELS) == 9 and list(ZSTD_LEVELS) == sorted(set(ZSTD_LEVELS))
    mem = memory("compressible")
    assert kdump_size(str(tmp_path), mem, "zstd", 9) < kdump_size(str(tmp_path), mem, "zstd", 1)
    comp = PageCodec(CompressionType.ZSTD, 9, PAGE).compressor()
    assert comp is not None
    page = mem[:PAGE]
    (out,) = comp([page])
    assert out == zstandard.ZstdCompressor(level=19).compress(page)
    assert zstandard.ZstdDecompressor().decompress(out) == page


@pytest.mark.parametrize("codec", ["lzo", "snappy"])
def test_lzo_and_snappy_have_no_levels(tmp_path: str, codec: str) -> None:
    tiers.module("extras", {"lzo": "lzo", "snappy": "cramjam"}[codec], "pip install -e '.[all]'")
    mem = memory("mixed", 64)
    paths = []
    for level in (1, 9):
        kdump_size(str(tmp_path), mem, codec, level)
        paths.append(f"{tmp_path}/{codec}-{level}.kdump")
    with open(paths[0], "rb") as a, open(paths[1], "rb") as b:
        assert a.read() == b.read()


@pytest.mark.parametrize("codec", ["none", "zlib", "lzo", "snappy", "zstd"])
@pytest.mark.parametrize("level", [0, 10, -1, 22])
def test_levels_out_of_range_name_the_range(tmp_path: str, codec: str, level: int) -> None:
    b = KdumpBuilder().set_vmcoreinfo(VMCI).add_memory_segment(0, b"a" * PAGE)
    out = f"{tmp_path}/bad"
    with pytest.raises(ValueError, match=r"compression level must be 1-9, got"):
        b.write(out, format="kdump", compression=codec, compression_level=level)
    with pytest.raises(ValueError, match=r"1-9"):
        PageCodec(CompressionType.ZLIB, level, PAGE)
    assert not os.path.exists(out)
