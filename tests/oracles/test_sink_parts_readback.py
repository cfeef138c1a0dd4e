"""A kdump joined from object-storage parts, read back by libkdumpfile (from test_sink_parts.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from kdumpling import write_dump
from kdumpling.sink_parts import MIN_PART_SIZE, PartsSink

from tests.readers import lkf_open, lkf_read_phys
from tests.test_sink_parts import Collector, kernel_builder


@pytest.mark.readers
def test_a_joined_kdump_reads_back_in_libkdumpfile(tmp_path: Path) -> None:
    builder, ranges = kernel_builder(12)
    got = Collector()
    write_dump(builder.to_image(), PartsSink("t", got, part_size=MIN_PART_SIZE),
               format="kdump", compression="zlib", dump_level=1)
    path = tmp_path / "joined.kdump"
    path.write_bytes(got.joined())
    ctx = lkf_open(str(path))
    for phys, data in ranges:
        assert lkf_read_phys(ctx, phys, len(data)) == data
