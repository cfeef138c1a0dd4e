"""FileSink allocates the blocks of each large write just before it (fallocate, KEEP_SIZE):
the bytes on disk are the same, holes stay holes, and a file system without fallocate gets
plain writes."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
from pathlib import Path

import pytest
from kdumpling import KdumpBuilder, write_dump
from kdumpling import sinks as sinks_mod
from kdumpling.sinks import FileSink

MIB = 1 << 20


def write_with_holes(path: Path) -> tuple[FileSink, bytes]:
    data = os.urandom(3 * MIB)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        sink = FileSink(fd, str(path))
        sink.write_at(0, b"head")  # small: not allocated ahead
        sink.write_at(MIB, data[:MIB])
        sink.hole(2 * MIB, 32 * MIB)  # stays a hole
        sink.write_at(34 * MIB, data[MIB:])
        sink.finish()
    finally:
        os.close(fd)
    expected = b"head" + bytes(MIB - 4) + data[:MIB] + bytes(32 * MIB) + data[MIB:]
    return sink, expected


def test_large_writes_are_allocated_first_and_holes_stay_holes(tmp_path: Path) -> None:
    if sinks_mod._fallocate is None:
        pytest.skip("no fallocate in this libc")
    path = tmp_path / "out"
    sink, expected = write_with_holes(path)
    assert path.read_bytes() == expected
    st = os.stat(path)
    assert st.st_size == 36 * MIB
    if sink.preallocated == 0:
        pytest.skip(f"{tmp_path}'s file system has no fallocate")
    assert sink.preallocated == 3 * MIB  # the two large writes, not the 4-byte header
    # the 32 MiB hole is not allocated (with a little slack for metadata blocks)
    assert st.st_blocks * 512 < 8 * MIB


def test_without_fallocate_the_writes_are_plain(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []

    def unsupported(fd: int, mode: int, offset: int, length: int) -> int:
        calls.append((offset, length))
        ctypes.set_errno(errno.EOPNOTSUPP)
        return -1

    monkeypatch.setattr(sinks_mod, "_fallocate", unsupported)
    path = tmp_path / "out"
    sink, expected = write_with_holes(path)
    assert path.read_bytes() == expected
    assert sink.preallocated == 0
    assert len(calls) == 1  # asked once, then never again


def test_a_full_disk_from_fallocate_is_the_write_error(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, mode: int, offset: int, length: int) -> int:
        ctypes.set_errno(errno.ENOSPC)
        return -1

    monkeypatch.setattr(sinks_mod, "_fallocate", full)
    b = KdumpBuilder().add_memory_segment(0, os.urandom(2 * MIB))
    with pytest.raises(Exception, match="No space left") as info:
        b.write(str(tmp_path / "out"))
    assert getattr(info.value, "exit_code", None) == 74
    assert os.listdir(tmp_path) == []


def test_dumps_are_byte_identical_with_and_without_fallocate(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = (KdumpBuilder().set_vmcoreinfo("OSRELEASE=6.1.0-prealloc\nPAGESIZE=4096\n")
             .add_memory_segment(0, os.urandom(MIB) + bytes(4 * MIB) + os.urandom(MIB)))
    digests = []
    for name in ("with", "without"):
        if name == "without":
            monkeypatch.setattr(sinks_mod, "_fallocate", None)
        out = tmp_path / name
        result = write_dump(image.to_image(), str(out), format="elf", sha256=True)
        digests.append((result.sha256, hashlib.sha256(out.read_bytes()).hexdigest()))
    assert digests[0] == digests[1]
    assert digests[0][0] == digests[0][1]
