"""LibvirtCollector against a transient domain on a libvirtd started by the fixture."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from kdumpling import write_dump
from kdumpling.collectors.libvirt import LibvirtCollector
from kdumpling.errors import CaptureInterrupted, TargetGoneError

from . import rig
from .checks import OUTPUT_IDS, OUTPUTS, Expect, assert_readers_agree

pytestmark = [pytest.mark.guest, pytest.mark.libvirt, pytest.mark.slow]


def _state(guest: rig.LibvirtGuest) -> tuple[int, int]:
    import libvirt

    conn = libvirt.open(guest.uri)
    try:
        state: tuple[int, int] = tuple(conn.lookupByName(guest.name).state())  # type: ignore
        return state
    finally:
        conn.close()


def _running(guest: rig.LibvirtGuest) -> bool:
    import libvirt

    return _state(guest)[0] == libvirt.VIR_DOMAIN_RUNNING


def _our_leftovers() -> list[str]:
    tmp = tempfile.gettempdir()
    return [n for n in os.listdir(tmp) if n.startswith("kdumpling-libvirt-")]


@pytest.mark.parametrize(("fmt", "codec"), OUTPUTS, ids=OUTPUT_IDS)
def test_libvirt_stream(libvirt_guest: rig.LibvirtGuest, libvirt_expect: Expect, out_dir: Path,
                        fmt: str, codec: str) -> None:
    before = _our_leftovers()
    progress: list[tuple[int, int]] = []
    out = out_dir / f"dump.{fmt}"
    with LibvirtCollector(libvirt_guest.name, uri=libvirt_guest.uri,
                          progress=lambda d, t: progress.append((d, t))) as snap:
        write_dump(snap.image, out, format=fmt, compression=codec)
    assert snap.pause_seconds is not None and snap.pause_seconds > 0
    assert snap.meta["mode"] == "stream"
    assert all(0 <= d <= t for d, t in progress)
    if snap.pause_seconds > 1.0:  # jobStats is polled every 0.25 s during the call
        assert progress, "no progress from jobStats during a dump of over a second"
        # QEMU's total: the guest's RAM blocks, at least its -m size
        assert len({t for _, t in progress}) == 1 and progress[0][1] >= libvirt_guest.mem_mb << 20
    assert _running(libvirt_guest)
    assert _our_leftovers() == before  # FIFO and its directory are gone
    assert_readers_agree(out, libvirt_expect, fmt, codec, out_dir)


def test_libvirt_by_uuid_spool(libvirt_guest: rig.LibvirtGuest, libvirt_expect: Expect,
                               out_dir: Path) -> None:
    import libvirt

    conn = libvirt.open(libvirt_guest.uri)
    uuid = conn.lookupByName(libvirt_guest.name).UUIDString()
    conn.close()
    spool = out_dir / "spool"
    spool.mkdir()
    out = out_dir / "dump.kdump"
    with LibvirtCollector(uuid, uri=libvirt_guest.uri, spool=str(spool)) as snap:
        assert _running(libvirt_guest)  # already resumed: the pause was the copy
        assert os.listdir(spool) == []
        assert 0 < int(snap.meta["spool_bytes"]) < int(snap.meta["stream_bytes"]) // 2
        write_dump(snap.image, out, format="kdump", compression="zstd")
    assert snap.pause_seconds is not None and snap.pause_seconds > 0
    assert os.listdir(spool) == []
    assert_readers_agree(out, libvirt_expect, "kdump", "zstd", out_dir)


def test_libvirt_spool_via_kdump_zlib(libvirt_guest: rig.LibvirtGuest, libvirt_expect: Expect,
                                      out_dir: Path) -> None:
    """libvirt's own kdump-zlib (QEMU compresses), rebuilt in the spool and converted."""
    spool = out_dir / "spool-kz"
    spool.mkdir()
    out = out_dir / "dump-via-kz.kdump"
    with LibvirtCollector(libvirt_guest.name, uri=libvirt_guest.uri, spool=str(spool),
                          dump_format="kdump-zlib") as snap:
        assert _running(libvirt_guest)
        assert snap.meta["dump_format"] == "kdump-zlib"
        assert 0 < int(snap.meta["stream_bytes"]) < (libvirt_guest.mem_mb << 20) // 4
        write_dump(snap.image, out, format="kdump", compression="zlib")
    assert snap.pause_seconds is not None and snap.pause_seconds > 0
    assert os.listdir(spool) == []
    assert_readers_agree(out, libvirt_expect, "kdump", "zlib", out_dir)


def test_libvirt_abort(libvirt_guest: rig.LibvirtGuest, out_dir: Path) -> None:
    before = _our_leftovers()
    out = out_dir / "dump.kdump"
    collector = LibvirtCollector(libvirt_guest.name, uri=libvirt_guest.uri)

    def progress(done: int, total: int) -> None:
        if done > total // 4:
            collector.abort()

    with pytest.raises(CaptureInterrupted), collector as snap:
        write_dump(snap.image, out, format="kdump", compression="zlib", progress=progress)
    assert not out.exists() and not out.with_name(out.name + ".incomplete").exists()
    assert _running(libvirt_guest)
    assert _our_leftovers() == before


def test_libvirt_unknown_domain(libvirt_daemons: rig.LibvirtDaemons) -> None:
    with pytest.raises(TargetGoneError), LibvirtCollector("kdt-no-such-domain"):
        pass
