"""zlib files at every level, read back by libkdumpfile (from test_writer_codecs.py)."""

from __future__ import annotations

import pytest

from tests.readers import lkf_open, lkf_read_phys
from tests.test_writer_codecs import kdump_size, memory


@pytest.mark.parametrize("kind", ["compressible", "mixed"])
def test_zlib_files_never_grow_with_the_level(tmp_path: str, kind: str) -> None:
    """Seed contract: compression_level 1-9 is honoured. Every level is at most the size of the
    one below it on the same memory; level 9 is clearly smaller than level 1 on text; the files
    read back byte for byte in libkdumpfile (stock zlib)."""
    mem = memory(kind)
    sizes = [kdump_size(str(tmp_path), mem, "zlib", level) for level in range(1, 10)]
    for level in range(2, 10):
        assert sizes[level - 1] <= sizes[level - 2], (level, sizes)
    if kind == "compressible":
        assert sizes[8] < sizes[0] * 0.97, sizes  # measured: 0.95
    for level in (1, 6, 9):
        ctx = lkf_open(f"{tmp_path}/zlib-{level}.kdump")
        assert lkf_read_phys(ctx, 0x100000, len(mem)) == mem
