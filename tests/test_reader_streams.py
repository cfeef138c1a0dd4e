"""Reading ELF streams one way, cut streams, and files that are not dumps: our reader alone
(from oracles/test_reader.py)."""

from __future__ import annotations

import os
import struct
import threading
from pathlib import Path

import pytest
from kdumpling.errors import FormatError, SourceReadError, UsageError
from kdumpling.reader import (
    open_dump,
    read_elf_stream,
)

from tests.oracles import test_reader as oracle_tests
from tests.oracles.test_reader import PAGE, Built, _BytesPipe, _pipe_from

built = oracle_tests.built  # the fixture: dumps our own writer packed, no reader needed


def test_elf_stream_refuses_to_go_back(built: Built) -> None:
    proc, pipe = _pipe_from(built.files["qemu.elf"])
    try:
        image = read_elf_stream(pipe)
        segs = image.segments
        assert [s.phys_addr for s in segs] == sorted(s.phys_addr for s in segs)
        first = segs[0].source.read(0, PAGE)
        assert first == built.machine.regions[0].data[:PAGE]
        assert segs[1].source.read(PAGE, 16) == built.machine.regions[1].data[PAGE : PAGE + 16]
        with pytest.raises(SourceReadError, match="file order"):
            segs[0].source.read(PAGE * 10, PAGE)
    finally:
        pipe.close()
        proc.wait()


def test_elf_stream_truncated(built: Built, tmp_path: Path) -> None:
    data = built.files["qemu.elf"].read_bytes()
    r, w = os.pipe()

    def feed(chunk: bytes) -> None:
        with os.fdopen(w, "wb") as f:
            f.write(chunk)

    t = threading.Thread(target=feed, args=(data[: len(data) // 2],))
    t.start()
    try:
        image = read_elf_stream(r)
        # what did not arrive reads as zeros and is named (test_reader_missing.py checks it
        # byte for byte against drgn and libkdumpfile)
        for seg in image.segments:
            seg.source.read(0, seg.size)
        assert image.missing
    finally:
        t.join()
        os.close(r)
    # A stream cut inside the header is a FormatError.
    with pytest.raises(FormatError, match="ended inside"):
        read_elf_stream(_BytesPipe(data[:100]))


def test_bad_files(tmp_path: Path, built: Built) -> None:
    cases = {
        "empty": b"",
        "text": b"hello world, not a dump\n" * 10,
        "elf32": b"\x7fELF\x01\x01\x01" + bytes(57),
        "elf-exec": built.files["kexec.elf"].read_bytes()[:16] + b"\x02\x00"
        + built.files["kexec.elf"].read_bytes()[18:4096],
        "kdump-short": b"KDUMP   " + bytes(100),
        "flat-short": b"makedumpfile" + bytes(20),
        "diskdump": b"DISKDUMP" + bytes(600),
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(FormatError) as err:
            open_dump(path)
        assert str(path) in str(err.value), name
    with pytest.raises(UsageError, match="cannot open"):
        open_dump(tmp_path / "missing")
    with pytest.raises(UsageError, match="not a regular file"):
        open_dump(tmp_path)
    os.mkfifo(tmp_path / "fifo")
    fd = os.open(tmp_path / "fifo", os.O_RDWR)  # keeps open_dump's O_RDONLY from blocking
    try:
        with pytest.raises(UsageError, match="read_elf_stream"):
            open_dump(tmp_path / "fifo")
    finally:
        os.close(fd)
    # Program headers claiming more than the file holds.
    data = bytearray(built.files["kexec.elf"].read_bytes()[:8192])
    struct.pack_into("<H", data, 56, 60000)
    (tmp_path / "phnum").write_bytes(bytes(data))
    with pytest.raises(FormatError, match="program headers") as err:
        open_dump(tmp_path / "phnum")
    assert err.value.offset == 0x20
