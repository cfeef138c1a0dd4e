"""The sha256 the writer computes while it writes (WriteResult.sha256) and the writeback it
starts behind itself: the digest equals a sha256 of the bytes read back, for every output
(file, stream, flattened stream, object-storage parts), holes are hashed without being read,
and the agent's record carries it without reading the dump a second time."""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kdumpling import CoreImage, DumpKind, KdumpBuilder, MemorySegment, write_dump
from kdumpling.arch import get_arch
from kdumpling.digest import WriteDigest
from kdumpling.sink_parts import PartsSink
from kdumpling.sinks import FileSink

from tests import tiers
from tests.agenttools import fixture_process
from tests.readers import lkf_open, lkf_read_phys

VMCI = "OSRELEASE=6.1.0-digest\nPAGESIZE=4096\n"
PAGE = 4096


def sha_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def memory() -> bytes:
    """Data, a long zero run (holes in a process core and with dump level 1), data again."""
    rng = __import__("random").Random(12)
    head = rng.randbytes(300 * PAGE)
    tail = rng.randbytes(40 * PAGE) + b"\x11" * (20 * PAGE)
    return head + bytes(600 * PAGE) + tail


def kernel_builder() -> KdumpBuilder:
    b = KdumpBuilder(arch="x86_64").set_vmcoreinfo(VMCI)
    b.add_memory_segment(0x100000, memory())
    return b


def process_image() -> CoreImage:
    seg = MemorySegment(phys_addr=0, data=memory(), virt_addr=0x7F0000000000)
    return CoreImage(arch=get_arch("x86_64"), kind=DumpKind.PROCESS, segments=[seg])


class CountingFileSink(FileSink):
    """A FileSink that counts the bytes its digest reads back from the file."""

    read_back_bytes = 0

    def _read_back(self, offset: int, buf: memoryview) -> int:
        n = super()._read_back(offset, buf)
        CountingFileSink.read_back_bytes += n
        return n

    def _mapped(self, offset: int, length: int) -> Iterator[memoryview]:
        for view in super()._mapped(offset, length):
            CountingFileSink.read_back_bytes += len(view)
            yield view


def test_process_core_with_holes_hashes_as_written_without_reading_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kdumpling.dump.FileSink", CountingFileSink)
    CountingFileSink.read_back_bytes = 0
    out = tmp_path / "proc.core"
    result = write_dump(process_image(), out, format="elf", dump_level=1, sha256=True)
    assert os.stat(out).st_blocks * 512 < out.stat().st_size  # the zero run is a hole
    assert result.sha256 == sha_of(out)
    # the provisional header and every write and hole were followed in order: nothing read
    assert CountingFileSink.read_back_bytes == 0


@pytest.mark.parametrize(("fmt", "level"), [("elf", 0), ("elf", 1), ("kdump", 1),
                                             ("kdump-flat", 1)])
def test_every_format_to_a_path_and_to_a_stream(tmp_path: Path, fmt: str, level: int) -> None:
    out = tmp_path / f"dump.{fmt}"
    result = write_dump(kernel_builder().to_image(), out, format=fmt, dump_level=level,
                        compression="zlib", compression_level=1, sha256=True)
    assert result.sha256 == sha_of(out)
    stream = io.BytesIO()  # not a file: ELF goes out in order, kdump-flat as records
    if fmt != "kdump":
        got = write_dump(kernel_builder().to_image(), stream, format=fmt, dump_level=level,
                         compression="zlib", compression_level=1, sha256=True)
        assert got.sha256 == hashlib.sha256(stream.getvalue()).hexdigest()


@pytest.mark.readers
def test_kdump_digest_is_of_a_file_readers_open(tmp_path: Path) -> None:
    tiers.codec("lzo")
    out = tmp_path / "dump.kdump"
    result = write_dump(kernel_builder().to_image(), out, format="kdump", dump_level=1,
                        compression="lzo", sha256=True)
    assert result.sha256 == sha_of(out)
    ctx = lkf_open(str(out))
    assert lkf_read_phys(ctx, 0x100000, len(memory())) == memory()


def test_parts_sink_digest_is_the_joined_parts() -> None:
    parts: dict[int, bytes] = {}
    sink = PartsSink("parts", lambda n, data: parts.__setitem__(n, bytes(data)))
    result = write_dump(kernel_builder().to_image(), sink, format="elf", sha256=True)
    whole = b"".join(parts[n] for n in sorted(parts))
    assert result.sha256 == hashlib.sha256(whole).hexdigest()


def test_no_digest_unless_asked(tmp_path: Path) -> None:
    result = write_dump(kernel_builder().to_image(), tmp_path / "x.elf", format="elf")
    assert result.sha256 is None


def test_a_rewrite_with_other_bytes_is_read_back_or_refused() -> None:
    blob = bytearray(os.urandom(3 * PAGE))

    def read_back(offset: int, buf: memoryview) -> int:
        n = min(len(buf), len(blob) - offset)
        buf[:n] = blob[offset : offset + n]
        return n

    for rb in (read_back, None):
        digest = WriteDigest(rb)
        digest.data(0, bytes(blob[:PAGE]))
        digest.data(PAGE, bytes(blob[PAGE:]))
        blob[:16] = b"\xee" * 16  # a rewrite behind the cursor, not announced as final
        digest.data(0, bytes(blob[:16]))
        got = digest.finish(len(blob))
        if rb is None:
            assert got is None  # nothing to read back: no digest rather than a wrong one
        else:
            assert got == hashlib.sha256(blob).hexdigest()


def test_final_bytes_and_writes_ahead_of_the_cursor() -> None:
    final = b"F" * 64
    tail = os.urandom(5000)
    for rb_wanted in (True, False):
        file = bytearray(64 + 100 + len(tail))
        file[:64] = b"P" * 64  # provisional
        file[164:] = tail

        def read_back(offset: int, buf: memoryview, file: bytearray = file) -> int:
            n = min(len(buf), len(file) - offset)
            buf[:n] = file[offset : offset + n]
            return n

        digest = WriteDigest(read_back if rb_wanted else None)
        digest.data(0, b"P" * 64, final=final)
        digest.data(164, tail)  # ahead: a gap of 100 never-written bytes before it
        file[:64] = final
        digest.data(0, final)  # the rewrite brings the announced bytes
        assert digest.finish(len(file)) == hashlib.sha256(bytes(file)).hexdigest()


def test_writeback_is_started_while_writing(tmp_path: Path) -> None:
    data = os.urandom(24 << 20)
    for writeback in (True, False):
        path = tmp_path / f"wb{writeback}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            sink = FileSink(fd, str(path), writeback=writeback)
            for off in range(0, len(data), 1 << 20):
                sink.write_at(off, data[off : off + (1 << 20)])
            sink.finish()
        finally:
            os.close(fd)
        assert path.read_bytes() == data
        requests = sink.writeback.requests if sink.writeback is not None else 0
        assert (requests >= 2) is writeback


@pytest.mark.ptrace
def test_agent_record_sha256_without_a_second_read(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from kdumpling.agent import capture as agent_capture
    from kdumpling.agent.cli import main

    def refuse(path: str) -> str:
        raise AssertionError(f"the dump was read back: {path}")

    monkeypatch.setattr(agent_capture, "sha256_file", refuse)
    store = tmp_path / "store"
    with fixture_process(mb=8) as fx:
        code = main(["capture", "process", str(fx.pid), "-o", f"{store}/", "-q"])
    assert code == 0
    (record,) = [json.loads(p.read_text()) for p in store.glob("*.json")]
    core = Path(record["path"]) if "path" in record else next(store.glob("*.core"))
    assert record["sha256"] == sha_of(core)


def write_in_chunks(sink: FileSink, data: bytes) -> str | None:
    """``data`` through ``sink`` in 1 MiB writes; the digest it finishes with."""
    for off in range(0, len(data), 1 << 20):
        sink.write_at(off, data[off : off + (1 << 20)])
    sink.finish()
    return sink.finish_digest()


def test_read_back_through_the_page_cache_when_the_digest_falls_behind(tmp_path: Path) -> None:
    """A digest with no room for the data (budget 0) hashes every big write from the file, in
    mmap windows, and still gets the file's sha256."""
    data = os.urandom(20 << 20)
    path = tmp_path / "behind"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        sink = CountingFileSink(fd, str(path))
        CountingFileSink.read_back_bytes = 0
        sink.start_digest()
        assert sink.digest is not None
        sink.digest._budget = 0  # everything over 64 KiB is dropped from the queue
        got = write_in_chunks(sink, data)
    finally:
        os.close(fd)
    assert got == hashlib.sha256(data).hexdigest()
    assert CountingFileSink.read_back_bytes >= len(data) - (1 << 20)


@pytest.mark.parametrize("defer", [True, False])
def test_deferred_digest_hashes_after_the_writing(tmp_path: Path, defer: bool) -> None:
    """FileSink.defer_digest (the default): nothing is hashed until ``finish`` (the target is
    released then); without it the digest hashes alongside the writer. Same result."""

    class DeferredSink(FileSink):
        defer_digest = defer

    data = os.urandom(30 << 20)
    path = tmp_path / "deferred"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        sink = DeferredSink(fd, str(path))
        sink.start_digest()
        digest = sink.digest
        assert digest is not None
        for off in range(0, len(data), 1 << 20):
            sink.write_at(off, data[off : off + (1 << 20)])
        if defer:
            assert digest._pos == 0  # still waiting for the end of the writing
        else:
            deadline = time.monotonic() + 10
            while digest._pos == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert digest._pos > 0  # hashing while the writer still writes
        sink.finish()
        got = sink.finish_digest()
    finally:
        os.close(fd)
    assert got == hashlib.sha256(data).hexdigest()


def test_a_deferred_digest_keeps_little_in_memory(tmp_path: Path) -> None:
    """While it waits for the writing to end, the digest keeps at most DEFERRED_BUDGET of the
    large writes (kept buffers made the writer fault in fresh memory while a process was
    stopped); the rest is hashed from the page cache, with the same result."""
    from kdumpling.digest import DEFERRED_BUDGET

    data = os.urandom(24 << 20)
    path = tmp_path / "deferred-budget"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        sink = CountingFileSink(fd, str(path))
        assert sink.defer_digest
        CountingFileSink.read_back_bytes = 0
        sink.start_digest()
        got = write_in_chunks(sink, data)
    finally:
        os.close(fd)
    assert got == hashlib.sha256(data).hexdigest()
    assert CountingFileSink.read_back_bytes >= len(data) - DEFERRED_BUDGET


@pytest.mark.parametrize("sha256", [False, True])
def test_write_dump_starts_writeback_unless_it_hashes(tmp_path: Path, sha256: bool,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A path with fsync gets writeback behind the writer; with a digest (which hashes while
    the fsync runs) it does not: early writeback only took CPU from the writing."""
    made: list[FileSink] = []

    class Recording(FileSink):
        def __init__(self, *args: object, **kwargs: bool) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            made.append(self)

    monkeypatch.setattr("kdumpling.dump.FileSink", Recording)
    b = KdumpBuilder(arch="x86_64").set_vmcoreinfo(VMCI)
    b.add_memory_segment(0x100000, os.urandom(24 << 20))
    out = tmp_path / "wb.elf"
    result = write_dump(b.to_image(), out, format="elf", dump_level=1, sha256=sha256)
    (sink,) = made
    assert (sink.writeback is None) is sha256
    if not sha256:
        assert sink.writeback is not None and sink.writeback.requests >= 2
    else:
        assert result.sha256 == sha_of(out)
