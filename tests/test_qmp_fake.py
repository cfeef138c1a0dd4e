"""QmpCollector against a scripted QMP peer (no QEMU needed): the protocol steps the guest tests
cannot isolate (fd passing, closefd on refusal, pause from event timestamps, EPIPE on abort).

The peer speaks QMP as QEMU 7.2 does for these commands (qapi/dump.json, qapi/misc.json): it
takes the descriptor from SCM_RIGHTS on the ``getfd`` message, answers ``dump-guest-memory``
after emitting STOP, writes an ELF vmcore into the descriptor, closes it, then emits
DUMP_COMPLETED and RESUME. The vmcore is the suite's synthetic kernel in QEMU's ELF layout
(phdrs at 192), packed by the test packer, not by our writer; the output is read back with
libkdumpfile.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from kdumpling import write_dump
from kdumpling.collectors.qmp import DumpFailedError, QmpCollector
from kdumpling.errors import CaptureInterrupted, TargetGoneError, UsageError

from tests import testdumps as td
from tests.readers import kdumpfile_module, lkf_open, tool

STOP_TS = (1700000000, 250000)
RESUME_TS = (1700000001, 500000)  # the guest was paused 1.25 s, by QEMU's clock


class FakeQemu(threading.Thread):
    def __init__(self, path: Path, payload: bytes, *, refuse: str | None = None,
                 chunk: int = 4096, greet: bool = True, delay: float = 0.0,
                 cut_at: int | None = None) -> None:
        super().__init__(daemon=True)
        self.path, self.payload, self.refuse, self.chunk, self.greet = (
            path, payload, refuse, chunk, greet)
        self.delay = delay  # seconds between two writes: a slow guest
        self.cut_at = cut_at  # QEMU fails after writing this many bytes (EIO, as on a bad disk)
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(str(path))
        self.srv.listen(4)
        self.fds: dict[str, int] = {}
        self.pending: list[int] = []
        self.commands: list[dict[str, Any]] = []
        self.closed_names: list[str] = []
        self.dump_status = "none"
        self.written = 0
        self.write_error: str | None = None
        self.send_lock = threading.Lock()
        self.writer: threading.Thread | None = None

    def send(self, conn: socket.socket, msg: dict[str, Any]) -> None:
        # A client that gave up (an aborted capture) may be gone before the last events.
        with self.send_lock, contextlib.suppress(OSError):
            conn.sendall(json.dumps(msg).encode() + b"\n")

    def event(self, conn: socket.socket, name: str, ts: tuple[int, int],
              data: dict[str, Any] | None = None) -> None:
        msg: dict[str, Any] = {"event": name,
                               "timestamp": {"seconds": ts[0], "microseconds": ts[1]}}
        if data is not None:
            msg["data"] = data
        self.send(conn, msg)

    def run(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.srv.accept()
                with conn:
                    self.serve(conn)

    def serve(self, conn: socket.socket) -> None:
        if not self.greet:
            conn.recv(1)  # hold the connection without a greeting
            return
        self.send(conn, {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}},
                                 "capabilities": []}})
        buf = b""
        while True:
            data, fds, _, _ = socket.recv_fds(conn, 65536, 4)
            if not data:
                return
            self.pending += fds
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                self.handle(conn, json.loads(line))

    def handle(self, conn: socket.socket, cmd: dict[str, Any]) -> None:
        self.commands.append(cmd)
        name, args = cmd["execute"], cmd.get("arguments", {})
        ret: Any = {}
        if name == "query-status":
            ret = {"status": "running", "running": True}
        elif name == "query-dump":
            ret = {"status": self.dump_status, "completed": self.written,
                   "total": len(self.payload)}
        elif name == "query-memory-size-summary":
            ret = {"base-memory": len(self.payload)}
        elif name == "getfd":
            self.fds[args["fdname"]] = self.pending.pop(0)
        elif name == "closefd":
            os.close(self.fds.pop(args["fdname"]))
            self.closed_names.append(args["fdname"])
        elif name == "dump-guest-memory":
            if self.refuse:
                self.send(conn, {"error": {"class": "GenericError", "desc": self.refuse}})
                return
            fd = self.fds.pop(args["protocol"].removeprefix("fd:"))
            self.event(conn, "STOP", STOP_TS)
            self.dump_status = "active"
            self.writer = threading.Thread(target=self.write_dump, args=(conn, fd))
            self.writer.start()
        self.send(conn, {"return": ret})

    def write_dump(self, conn: socket.socket, fd: int) -> None:
        try:
            view = memoryview(self.payload)[: self.cut_at]
            while self.written < len(view):
                self.written += os.write(fd, view[self.written : self.written + self.chunk])
                if self.delay:
                    time.sleep(self.delay)
            if self.cut_at is not None:
                self.write_error = os.strerror(5)
        except OSError as err:
            self.write_error = os.strerror(err.errno or 0)
        finally:
            os.close(fd)  # QEMU's close is the reader's EOF
        self.dump_status = "failed" if self.write_error else "completed"
        data = {"result": {"status": self.dump_status, "completed": self.written,
                           "total": len(self.payload)}}
        if self.write_error:
            data["error"] = f"dump: failed to save memory: {self.write_error}"
        self.event(conn, "DUMP_COMPLETED", RESUME_TS, data)
        self.event(conn, "RESUME", RESUME_TS)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.srv.shutdown(socket.SHUT_RDWR)
        self.srv.close()
        if self.writer is not None:
            self.writer.join(10)


@pytest.fixture(autouse=True)
def deadline() -> Iterator[None]:
    """A stuck pipe (a write end left open) would hang forever: fail instead."""
    def boom(signum: int, frame: FrameType | None) -> None:
        raise TimeoutError("test took longer than 60 s")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def machine() -> td.Machine:
    return td.x86_64_machine()


@pytest.fixture
def qemu_elf(machine: td.Machine, tmp_path: Path) -> bytes:
    path = tmp_path / "qemu.elf"
    td.pack_elf_vmcore(path, machine, layout="qemu")
    return path.read_bytes()


@pytest.fixture
def fake(tmp_path: Path, qemu_elf: bytes, request: pytest.FixtureRequest) -> Iterator[FakeQemu]:
    kw = getattr(request, "param", {})
    server = FakeQemu(tmp_path / "qmp.sock", qemu_elf, **kw)
    server.start()
    yield server
    server.close()


def _read_back(path: Path, machine: td.Machine) -> None:
    kdumpfile = kdumpfile_module()
    ctx = lkf_open(str(path))
    assert bytes(ctx.attr["linux.vmcoreinfo.raw"]) == machine.vmcoreinfo
    for pfn in machine.pfns():
        assert bytes(ctx.read(kdumpfile.KDUMP_MACHPHYSADDR, pfn * td.PAGE, td.PAGE)) == \
            machine.page(pfn), f"pfn {pfn:#x}"


def test_dump_format_is_checked_before_anything_starts(tmp_path: Path) -> None:
    sock = str(tmp_path / "nobody-listens.sock")
    with pytest.raises(UsageError, match="needs a spool directory"):
        QmpCollector(sock, dump_format="kdump-zlib")
    with pytest.raises(UsageError, match="unknown guest dump format"):
        QmpCollector(sock, spool=str(tmp_path), dump_format="kdump-lzo")


@pytest.mark.parametrize("fake", [{"refuse": "kdump-lzo is not available now"}],
                         indirect=True)
def test_refused_dump_takes_the_fd_back(fake: FakeQemu) -> None:
    with pytest.raises(DumpFailedError, match="not available now"), QmpCollector(fake.path):
        pass
    getfd = next(c for c in fake.commands if c["execute"] == "getfd")
    assert fake.closed_names == [getfd["arguments"]["fdname"]]
    assert fake.fds == {}


@pytest.mark.parametrize("fake", [{"chunk": 512}], indirect=True)
def test_abort_breaks_the_pipe(fake: FakeQemu, tmp_path: Path) -> None:
    out = tmp_path / "out.kdump"
    collector = QmpCollector(fake.path, pipe_size=4096)

    def progress(done: int, total: int) -> None:
        if done > 64 * 1024:
            collector.abort()

    with pytest.raises(CaptureInterrupted), collector as snap:
        write_dump(snap.image, out, format="kdump", compression="none", progress=progress)
    assert fake.write_error == os.strerror(32)  # EPIPE: QEMU fails the dump, resumes the guest
    assert fake.written < len(fake.payload)
    assert not out.exists()


@pytest.mark.parametrize("fake", [{"chunk": 4096, "delay": 0.002}], indirect=True)
def test_abort_during_the_spool_copy(fake: FakeQemu, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    collector = QmpCollector(fake.path, spool=str(spool), pipe_size=4096)
    timer = threading.Timer(0.2, collector.abort)
    timer.start()
    try:
        with pytest.raises(CaptureInterrupted), collector:
            pass
    finally:
        timer.cancel()
    assert fake.write_error == os.strerror(32)  # EPIPE: QEMU fails the dump, resumes the guest
    assert 0 < fake.written < len(fake.payload)
    assert os.listdir(spool) == []


@pytest.mark.parametrize("fake", [{"greet": False}], indirect=True)
def test_busy_monitor(fake: FakeQemu) -> None:
    """QEMU serves one QMP client per socket; a second one waits without a greeting."""
    with pytest.raises(TargetGoneError, match="another one connected"), \
            QmpCollector(fake.path, timeout=1.0):
        pass


CUT = 50 * td.PAGE + 123  # bytes of the last RAM block QEMU never writes


@pytest.fixture
def cut_fake(tmp_path: Path, qemu_elf: bytes) -> Iterator[FakeQemu]:
    server = FakeQemu(tmp_path / "qmp.sock", qemu_elf, cut_at=len(qemu_elf) - CUT)
    server.start()
    yield server
    server.close()


def _lost(machine: td.Machine) -> list[tuple[int, int]]:
    last = machine.regions[-1]  # QEMU's layout packs the RAM blocks in order, the last last
    return [(last.end - CUT, last.end)]


def _pages_before_cut(path: Path, machine: td.Machine, read_ok_past_cut: bool) -> None:
    kdumpfile = kdumpfile_module()
    ctx = lkf_open(str(path))
    cut = _lost(machine)[0][0]
    for pfn in machine.pfns():
        if (pfn + 1) * td.PAGE <= cut:
            assert bytes(ctx.read(kdumpfile.KDUMP_MACHPHYSADDR, pfn * td.PAGE, td.PAGE)) == \
                machine.page(pfn), f"pfn {pfn:#x}"
        elif pfn * td.PAGE >= cut and not read_ok_past_cut:
            with pytest.raises(kdumpfile.exceptions.KDumpBaseException):
                ctx.read(kdumpfile.KDUMP_MACHPHYSADDR, pfn * td.PAGE, td.PAGE)
    with open(path, "rb") as f:
        assert struct.unpack_from("<I", f.read(0x1AC), 0x1A8)[0] & 0x8  # INCOMPLETE status


# -- kdump-zlib: QEMU's flattened stream cut short (spool mode rebuilds it) -------------------

@pytest.fixture(scope="module")
def kdump_flat(machine: td.Machine, tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[bytes, Path]:
    """A flattened kdump stream as QEMU's kdump-zlib sends one (makedumpfile -F -c: page data
    and descriptors in alternating records) and the normal file makedumpfile -R rebuilds."""
    d = tmp_path_factory.mktemp("kdumpzlib")
    elf, flat, normal = d / "src.elf", d / "src.flat", d / "src.kdump"
    td.pack_elf_vmcore(elf, machine)
    td.makedumpfile(["-F", "-c", "-d", "1", str(elf)], stdout=flat)
    with flat.open("rb") as stream:
        subprocess.run([tool("makedumpfile"), "-R", str(normal)], stdin=stream, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
    return flat.read_bytes(), normal


def _flat_records(stream: bytes) -> list[tuple[int, int, int]]:
    """(stream position, offset, size) of each record: big-endian int64 offset and size after
    the 4 KiB header, offset -1 at the end (makedumpfile.h makedumpfile_data_header)."""
    out, pos = [], 4096
    while True:
        offset, size = struct.unpack_from(">qq", stream, pos)
        if offset == -1:
            return out
        out.append((pos, offset, size))
        pos += 16 + size


def _dumped_pages(normal: Path) -> list[tuple[int, int, int, int]]:
    """(pfn, descriptor offset, data offset, data size) of every page of a kdump file: the set
    bits of bitmap 2 in order, one 24-byte page_desc each after the bitmaps (diskdump_mod.h;
    block_size, sub_hdr_size, bitmap_blocks at 0x1ac)."""
    data = normal.read_bytes()
    block, sub_hdr, bitmap_blocks = struct.unpack_from("<iii", data, 0x1AC)
    half = bitmap_blocks // 2 * block
    bitmap2 = data[(1 + sub_hdr) * block + half : (1 + sub_hdr) * block + 2 * half]
    pfns = [i * 8 + b for i, byte in enumerate(bitmap2) for b in range(8) if byte >> b & 1]
    desc0 = (1 + sub_hdr + bitmap_blocks) * block
    out = []
    for i, pfn in enumerate(pfns):
        offset, size = struct.unpack_from("<qI", data, desc0 + 24 * i)
        out.append((pfn, desc0 + 24 * i, offset, size))
    return out


def _kdump_cut(flat: bytes, normal: Path) -> tuple[int, set[int], list[tuple[int, int]]]:
    """A cut a third into a page-data-sized record in the middle of the stream: the cut
    point, the PFNs whose descriptor and data arrived, the physical ranges of the others."""
    records = [r for r in _flat_records(flat)[5:] if r[2] > td.PAGE]
    pos, _, size = records[len(records) // 2]
    cut = pos + 16 + size // 3
    arrived = [(off, off + min(n, cut - at - 16)) for at, off, n in _flat_records(flat)
               if at + 16 < cut]

    def inside(a: int, b: int) -> bool:
        return any(lo <= a and b <= hi for lo, hi in arrived)

    kept, lost = set(), []
    for pfn, desc, offset, length in _dumped_pages(normal):
        if inside(desc, desc + 24) and inside(offset, offset + length):
            kept.add(pfn)
        elif lost and lost[-1][1] == pfn * td.PAGE:
            lost[-1] = (lost[-1][0], (pfn + 1) * td.PAGE)
        else:
            lost.append((pfn * td.PAGE, (pfn + 1) * td.PAGE))
    return cut, kept, lost
