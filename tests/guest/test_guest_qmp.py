"""QmpCollector against a real guest: every output format and codec, both capture modes."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kdumpling import write_dump
from kdumpling.collectors.qmp import QmpCollector
from kdumpling.errors import CaptureInterrupted, KdumplingError
from kdumpling.reader import open_dump

from tests import tiers

from . import rig
from .checks import OUTPUT_IDS, OUTPUTS, Expect, assert_readers_agree, scan_pattern_pages

pytestmark = [pytest.mark.guest, pytest.mark.slow]


def _qemu_pipes(pid: int) -> set[str]:
    """The pipes QEMU holds open (a dump descriptor we handed over is one of them)."""
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("pipe:"):
                out.add(target)
    return out


def _pipes_settle(pid: int, expected: set[str], timeout: float = 5.0) -> set[str]:
    deadline = time.monotonic() + timeout
    while (now := _qemu_pipes(pid)) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return now


def _running(guest: rig.QemuGuest) -> bool:
    status = rig.qmp_command(guest.qmp_path, "query-status")
    assert isinstance(status, dict)
    return status["status"] == "running"


@pytest.mark.parametrize(("fmt", "codec"), OUTPUTS, ids=OUTPUT_IDS)
def test_qmp_stream(qemu_guest: rig.QemuGuest, qemu_expect: Expect, out_dir: Path, fmt: str,
                    codec: str) -> None:
    progress: list[tuple[int, int]] = []
    out = out_dir / f"dump.{fmt}"
    with QmpCollector(qemu_guest.qmp_path, progress=lambda d, t: progress.append((d, t))) as snap:
        result = write_dump(snap.image, out, format=fmt, compression=codec)
    # The pause comes from QEMU's STOP/RESUME events; streaming makes it span the conversion.
    assert snap.pause_seconds is not None and snap.pause_seconds > 0
    assert snap.meta["mode"] == "stream"
    assert progress and all(0 <= d <= t for d, t in progress)
    assert result.bytes_out == out.stat().st_size
    assert _running(qemu_guest)
    assert not out.with_name(out.name + ".incomplete").exists()
    assert_readers_agree(out, qemu_expect, fmt, codec, out_dir)


@pytest.mark.parametrize(("fmt", "codec", "dump_format"),
                         [("elf", "none", "elf"), ("kdump", "zstd", "elf"),
                          ("kdump", "lzo", "kdump-zlib")],
                         ids=["elf", "kdump-zstd", "lzo-via-qemu-kdump-zlib"])
def test_qmp_spool(qemu_guest: rig.QemuGuest, qemu_expect: Expect, out_dir: Path, fmt: str,
                   codec: str, dump_format: str) -> None:
    spool = out_dir / "spool"
    spool.mkdir()
    out = out_dir / f"dump.{fmt}"
    with QmpCollector(qemu_guest.qmp_path, spool=str(spool), dump_format=dump_format) as snap:
        # the guest is already running again: the pause was the copy only
        assert _running(qemu_guest)
        assert snap.pause_seconds is not None and snap.pause_seconds > 0
        assert os.listdir(spool) == []  # the spool file has no name
        spooled, streamed = int(snap.meta["spool_bytes"]), int(snap.meta["stream_bytes"])
        if dump_format == "elf":
            # zero pages stay holes in the spool: the rig's guest is mostly free memory
            assert 0 < spooled < streamed // 2
        else:  # QEMU compressed: a small stream, rebuilt into a small file
            assert 0 < streamed < (qemu_guest.mem_mb << 20) // 4
            assert 0 < spooled < (qemu_guest.mem_mb << 20) // 4
        write_dump(snap.image, out, format=fmt, compression=codec)
    assert snap.meta["mode"] == "spool"
    assert os.listdir(spool) == []
    assert_readers_agree(out, qemu_expect, fmt, codec, out_dir)


def test_pattern_pages_by_scan(qemu_guest: rig.QemuGuest, qemu_expect: Expect,
                               out_dir: Path) -> None:
    """Scanning all of physical memory finds the guest's tmpfs and anonymous pattern pages."""
    out = out_dir / "dump.kdump"
    with QmpCollector(qemu_guest.qmp_path) as snap:
        write_dump(snap.image, out, format="kdump", compression="lzo")
    with open_dump(out) as dump:
        ranges = [(s.phys_addr, s.phys_addr + s.file_size) for s in dump.segments]
    counts = scan_pattern_pages(out, qemu_expect, ranges)
    file_pages = (rig.FILE_MB << 20) // qemu_expect.page_size
    anon_pages = (rig.ANON_MB << 20) // qemu_expect.page_size
    assert counts["file"] >= file_pages * 0.95, counts
    assert counts["anon"] >= anon_pages * 0.9, counts


def test_qmp_refused_dump_gives_the_fd_back(qemu_guest: rig.QemuGuest,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused dump-guest-memory leaves no descriptor behind in QEMU (closefd)."""
    import kdumpling.collectors.qmp as qmp_mod

    before = _qemu_pipes(qemu_guest.pid)
    real = qmp_mod.QmpClient.execute

    def refuse(self: qmp_mod.QmpClient, command: str, arguments: dict[str, object] | None = None,
               **kw: object) -> object:
        if command == "dump-guest-memory" and arguments:
            arguments = {**arguments, "format": "kdump-no-such-format"}
        return real(self, command, arguments, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(qmp_mod.QmpClient, "execute", refuse)
    with pytest.raises(qmp_mod.DumpFailedError, match="refused"), \
            QmpCollector(qemu_guest.qmp_path):
        pass
    assert _pipes_settle(qemu_guest.pid, before) == before
    assert _running(qemu_guest)


def test_qmp_abort_resumes_guest(qemu_guest: rig.QemuGuest, out_dir: Path) -> None:
    """Aborting mid-stream: the writer stops, no output is left, QEMU fails the dump and the
    guest runs again."""
    out = out_dir / "dump.kdump"
    before = _qemu_pipes(qemu_guest.pid)
    collector = QmpCollector(qemu_guest.qmp_path)

    def progress(done: int, total: int) -> None:
        if done > total // 4:
            collector.abort()

    with pytest.raises(CaptureInterrupted), collector as snap:
        write_dump(snap.image, out, format="kdump", compression="zlib",
                   progress=progress)
    assert not out.exists() and not out.with_name(out.name + ".incomplete").exists()
    assert _running(qemu_guest)
    assert _pipes_settle(qemu_guest.pid, before) == before
    status = rig.qmp_command(qemu_guest.qmp_path, "query-dump")
    assert isinstance(status, dict) and status["status"] == "failed"


def test_qmp_no_socket(tmp_path: Path) -> None:
    from kdumpling.errors import TargetGoneError

    with pytest.raises(TargetGoneError), QmpCollector(str(tmp_path / "nope.sock")):
        pass


def test_qmp_spool_too_small(qemu_guest: rig.QemuGuest, out_dir: Path) -> None:
    """Spool space is checked before the guest is paused."""
    small = out_dir / "small"
    small.mkdir()
    rc = os.system(f"mount -t tmpfs -o size=1m kdt-small {small} 2>/dev/null")
    if rc != 0:
        tiers.missing("guest", "cannot mount a small tmpfs here (root)")
    try:
        with pytest.raises(KdumplingError, match="MiB free"), \
                QmpCollector(qemu_guest.qmp_path, spool=str(small)):
            pass
        assert _running(qemu_guest)
    finally:
        os.system(f"umount {small}")


def test_qmp_concurrent_progress_thread_is_gone(qemu_guest: rig.QemuGuest,
                                                out_dir: Path) -> None:
    with QmpCollector(qemu_guest.qmp_path) as snap:
        write_dump(snap.image, out_dir / "d.elf", format="elf")
    names = [t.name for t in threading.enumerate()]
    assert "kdumpling-qmp-progress" not in names


@pytest.fixture
def doomed_guest(guest_kernel: rig.KernelFiles, guest_dir: Path) -> Iterator[rig.QemuGuest]:
    """A guest of its own, killed during the test."""
    spec = rig.new_spec()
    initramfs = rig.build_initramfs(guest_kernel, guest_dir / "doomed-initramfs.cpio.gz", spec)
    guest = rig.QemuGuest(guest_kernel, initramfs, guest_dir / "doomed", spec, mem_mb=256)
    try:
        guest.start()
    except rig.RigError as err:
        guest.stop()
        pytest.fail(f"guest did not boot: {err}")
    try:
        yield guest
    finally:
        guest.stop()


@pytest.mark.parametrize("spool", [False, True], ids=["stream", "spool"])
def test_qemu_killed_mid_dump_keeps_what_arrived(doomed_guest: rig.QemuGuest, out_dir: Path,
                                                 spool: bool) -> None:
    """QEMU dies (SIGKILL) half way through its dump: the dump keeps every page that arrived,
    names the rest, says incomplete (libkdumpfile and our reader read it), instead of the
    TargetGoneError that kept nothing."""
    import signal

    guest = doomed_guest
    pid = guest.pid
    killed = threading.Event()
    # The spool copy reads the 256 MiB in ~0.17 s, faster than query-dump is polled (0.2 s):
    # waiting for half often saw the dump completed. QEMU's first report comes while its
    # 1 MiB pipe is full and we have not started reading.

    def progress(done: int, total: int) -> None:
        at = 0 if spool else total // 2
        if at < done < total and not killed.is_set():
            killed.set()
            os.kill(pid, signal.SIGKILL)

    out = out_dir / "dump.kdump"
    where = None
    if spool:
        where = out_dir / "spool"
        where.mkdir()
    with QmpCollector(guest.qmp_path, progress=progress,
                      spool=str(where) if where else None) as snap:
        result = write_dump(snap.image, out, format="kdump", compression="zlib")
    assert killed.is_set()
    lost = sum(b - a for a, b in result.missing)
    assert 0 < lost < 256 << 20
    assert any("ended after" in w for w in snap.warnings)
    with open_dump(out) as back:
        assert back.header["incomplete"]  # DUMP_DH_COMPRESSED_INCOMPLETE
        # what arrived is there: the memory below the cut, page for page
        below = sum(min(s.phys_addr + s.mem_size, result.missing[0][0]) - s.phys_addr
                    for s in back.segments if s.phys_addr < result.missing[0][0])
    assert below >= result.missing[0][0] - (1 << 20)  # less the ISA hole and firmware ranges
    from tests.readers import kdumpfile_module, lkf_open

    kdumpfile = kdumpfile_module()
    ctx = lkf_open(str(out))
    assert bytes(ctx.attr["linux.vmcoreinfo.raw"]).startswith(b"OSRELEASE=")
    assert len(bytes(ctx.read(kdumpfile.KDUMP_MACHPHYSADDR, 0x1000, 4096))) == 4096


def test_qemu_killed_mid_kdump_zlib_keeps_what_arrived(doomed_guest: rig.QemuGuest,
                                                       out_dir: Path) -> None:
    """QEMU dies (SIGKILL) during its own kdump-zlib dump: the spool keeps the flattened
    records that arrived (it raised FormatError and kept nothing), the rebuilt file's reader
    names the pages whose descriptor or data never came, the output says incomplete, and
    libkdumpfile reads the pages below the cut as our reader does."""
    import signal

    from tests.readers import kdumpfile_module, lkf_open

    guest = doomed_guest
    pid = guest.pid
    killed = threading.Event()

    def progress(done: int, total: int) -> None:
        if total // 4 < done < total and not killed.is_set():  # page data is flowing
            killed.set()
            os.kill(pid, signal.SIGKILL)

    out = out_dir / "dump.kdump"
    spool = out_dir / "spool"
    spool.mkdir()
    with QmpCollector(guest.qmp_path, progress=progress, spool=str(spool),
                      dump_format="kdump-zlib") as snap:
        assert snap.image.incomplete
        result = write_dump(snap.image, out, format="kdump", compression="zlib")
    assert killed.is_set()
    assert result.incomplete
    lost = sum(b - a for a, b in result.missing)
    assert 0 < lost < 256 << 20
    assert any("kept what arrived" in w for w in snap.warnings), snap.warnings
    assert any("could not be read" in w and f"{result.missing[0][0]:#x}" in w
               for w in snap.warnings), snap.warnings
    first = result.missing[0][0]
    with open_dump(out) as back:
        assert back.header["incomplete"]  # DUMP_DH_COMPRESSED_INCOMPLETE
        below = sum(min(s.phys_addr + s.mem_size, first) - s.phys_addr
                    for s in back.segments if s.phys_addr < first)
        assert below >= first - (1 << 20)  # less the ISA hole and firmware ranges
        kd = kdumpfile_module()
        ctx = lkf_open(str(out))
        for addr in (0x1000, first // 2 & ~0xFFF, first - 0x1000):
            assert bytes(ctx.read(kd.KDUMP_MACHPHYSADDR, addr, 4096)) == \
                back.read_phys(addr, 4096), hex(addr)
