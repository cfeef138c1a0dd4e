"""The reader on broken input: truncations, random byte flips and hostile headers give a
FormatError (or open with warnings), never another exception, a hang or a huge allocation.

Seed files are small real ones: an ELF vmcore from the test-only packer, makedumpfile's -c and
-F output of it, and our writer's lzo/snappy/zstd kdump of it (for the other page codecs).
"""

from __future__ import annotations

import contextlib
import random
import resource
import struct
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import pytest
from kdumpling import write_dump
from kdumpling.errors import FormatError
from kdumpling.reader import PageNotDumpedError, open_dump, reassemble_flattened

from tests import testdumps as td
from tests import tiers

hypothesis = tiers.module("readers", "hypothesis", "pip install hypothesis")
st = tiers.module("readers", "hypothesis.strategies", "pip install hypothesis")
given, settings, HealthCheck = hypothesis.given, hypothesis.settings, hypothesis.HealthCheck

SEEDS: dict[str, bytes] = {}


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    if SEEDS:
        return SEEDS
    d = tmp_path_factory.mktemp("fuzzseed")
    m = td.x86_64_machine(small=True)
    elf = d / "small.elf"
    td.pack_elf_vmcore(elf, m)
    SEEDS["elf"] = elf.read_bytes()
    td.makedumpfile(["-c", "-d", "1", str(elf), str(d / "z.kdump")])
    SEEDS["kdump-zlib"] = (d / "z.kdump").read_bytes()
    td.makedumpfile(["-F", "-c", "-d", "1", str(elf)], stdout=d / "z.flat")
    SEEDS["flat"] = (d / "z.flat").read_bytes()
    with open_dump(elf) as dump:
        for codec in ("lzo", "snappy", "zstd"):
            out = d / f"{codec}.kdump"
            write_dump(dump.to_image(), out, format="kdump", compression=codec)
            SEEDS[f"kdump-{codec}"] = out.read_bytes()
    return SEEDS


def exercise(path: Path) -> None:
    """Everything a caller can do with a dump; only FormatError may come out."""
    try:
        dump = open_dump(path)
    except FormatError:
        return
    with dump:
        _ = (dump.notes, dump.cpus, dump.vmcoreinfo_fields, dump.annotations, dump.header)
        for _pfn, page in dump.iter_pages():
            assert len(page) == dump.page_size
        for seg in dump.segments[:4]:
            with contextlib.suppress(PageNotDumpedError):
                dump.read_phys(seg.phys_addr, min(seg.mem_size, 3 * dump.page_size) or 1)
            dump.read_phys(seg.phys_addr, 64, zero_fill=True)
        missing = dump.missing
        assert all(a < b < c for (a, b), (c, _) in pairwise(missing))
        assert dump.incomplete or not missing
        image = dump.to_image()
        assert image.missing == missing
        for seg in image.segments:
            # The image carries no missing address, and every segment reads to its full size.
            assert not any(a < seg.phys_addr + seg.size and seg.phys_addr < b
                           for a, b in missing) or dump.kind.value == "process"
            assert sum(len(chunk) for chunk in seg.iter_chunks(1 << 16)) == seg.size


def _run(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "fuzzed"
    path.write_bytes(data)
    with contextlib.suppress(FormatError):
        exercise(path)


@pytest.fixture
def memory_cap() -> Iterator[None]:
    """Fail with MemoryError, not by swapping, if the reader allocates far beyond the file."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


KINDS = ["elf", "kdump-zlib", "flat", "kdump-lzo", "kdump-snappy", "kdump-zstd"]
FUZZ = settings(max_examples=60, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@pytest.mark.parametrize("kind", KINDS)
@FUZZ
@given(data=st.data())
def test_truncations(seeds: dict[str, bytes], tmp_path: Path, memory_cap: None, kind: str,
                     data: st.DataObject) -> None:
    seed = seeds[kind]
    cut = data.draw(st.one_of(st.integers(0, 20000), st.integers(0, len(seed))))
    _run(tmp_path, seed[:cut])


@pytest.mark.parametrize("kind", KINDS)
@FUZZ
@given(data=st.data())
def test_byte_flips(seeds: dict[str, bytes], tmp_path: Path, memory_cap: None, kind: str,
                    data: st.DataObject) -> None:
    seed = bytearray(seeds[kind])
    # Most flips land in the headers, bitmaps and descriptors, where the parsing is.
    head = min(len(seed), 6 * 4096 + 4096)
    flips = data.draw(st.lists(
        st.tuples(st.one_of(st.integers(0, head - 1), st.integers(0, len(seed) - 1)),
                  st.integers(0, 255)), min_size=1, max_size=8))
    for pos, value in flips:
        seed[pos] = value
    _run(tmp_path, bytes(seed))


@pytest.mark.parametrize("kind", ["kdump-zlib", "elf"])
def test_random_words(seeds: dict[str, bytes], tmp_path: Path, memory_cap: None,
                      kind: str) -> None:
    """Huge values in 32/64-bit header words (counts, offsets, sizes)."""
    rng = random.Random(4)
    seed = seeds[kind]
    for _ in range(300):
        data = bytearray(seed)
        pos = rng.randrange(0, 4096 + 200) & ~3
        fmt = rng.choice(["<I", "<Q", "<i"])
        value = rng.choice([0, 1, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 40, -1 & 0xFFFFFFFF])
        if fmt == "<Q":
            value = rng.choice([value, 1 << 62, (1 << 64) - 1])
        try:
            struct.pack_into(fmt, data, pos, value)
        except struct.error:
            continue
        _run(tmp_path, bytes(data))


def test_hostile_elf_overlaps(tmp_path: Path) -> None:
    """Thousands of overlapping PT_LOADs resolve quickly to one map (no O(n^2))."""
    n = 20000
    page = 4096
    data_off = 64 + 56 * n
    blob = bytearray(data_off + page * 4)
    struct.pack_into("<16sHHIQQQIHHHHHH", blob, 0, b"\x7fELF\x02\x01\x01" + bytes(9), 4, 62, 1,
                     0, 64, 0, 0, 64, 56, n, 0, 0, 0)
    for i in range(n):
        struct.pack_into("<IIQQQQQQ", blob, 64 + 56 * i, 1, 7, data_off, 0x1000 + i,
                         0x1000 + i, 2 * page, 2 * page, 0)
    path = tmp_path / "overlap.elf"
    path.write_bytes(bytes(blob))
    with open_dump(path) as dump:
        assert len(dump.segments) == n
        pages = dict(dump.iter_pages())
        assert min(pages) == 1 and max(pages) <= 1 + 2 + (n // page) + 1


@pytest.mark.parametrize("kind", ["kdump-zlib"])
def test_flattened_out_of_order_and_overwrites(seeds: dict[str, bytes], tmp_path: Path,
                                               kind: str) -> None:
    """Records in shuffled order, split and partly overwritten by later records: the file
    reads exactly like what ``makedumpfile -R`` rebuilds from it (and like our reassembly)."""
    import subprocess

    normal = seeds[kind]
    rng = random.Random(7)
    cuts = sorted(rng.sample(range(1, len(normal)), 40))
    spans = list(zip([0, *cuts], [*cuts, len(normal)], strict=True))
    rng.shuffle(spans)
    out = bytearray(b"makedumpfile".ljust(16, b"\0") + struct.pack(">qq", 1, 1))
    out += bytes(4096 - len(out))
    for a, b in spans:
        # write garbage first, then the real bytes over it (a later record wins)
        out += struct.pack(">qq", a, b - a) + bytes([0xAA]) * (b - a)
    for a, b in spans:
        out += struct.pack(">qq", a, b - a) + normal[a:b]
    out += b"\xff" * 16
    flat = tmp_path / "shuffled.flat"
    flat.write_bytes(bytes(out))
    theirs = tmp_path / "theirs.kdump"
    with open(flat, "rb") as src:
        subprocess.run([td.readers.tool("makedumpfile"), "-R", str(theirs)], stdin=src,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True,
                       timeout=60)
    assert theirs.read_bytes() == normal
    ours = tmp_path / "ours.kdump"
    with open(flat, "rb") as src:
        reassemble_flattened(src, ours)
    assert ours.read_bytes() == normal
    with open_dump(flat) as a, open_dump(theirs) as b:
        assert a.format == "kdump-flat" and a.warnings == []
        assert dict(a.iter_pages()) == dict(b.iter_pages())
        assert a.notes == b.notes
