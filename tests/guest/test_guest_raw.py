"""RawMemoryCollector on the live guest's RAM (QEMU memory-backend-file) and on LiME files."""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from kdumpling import write_dump
from kdumpling.collectors.raw import LIME_HEADER, LIME_MAGIC, RawMemoryCollector

from . import rig
from .checks import OUTPUT_IDS, OUTPUTS, Expect, assert_readers_agree

pytestmark = [pytest.mark.guest, pytest.mark.slow]


@contextlib.contextmanager
def paused(guest: rig.QemuGuest) -> Iterator[None]:
    """A consistent image: the guest does not run while we read its RAM file."""
    rig.qmp_command(guest.qmp_path, "stop")
    try:
        yield
    finally:
        rig.qmp_command(guest.qmp_path, "cont")


def _vmcoreinfo_at(exp: Expect) -> str:
    # exactly what `cat /sys/kernel/vmcoreinfo` printed inside the guest
    return f"{exp.report.vmcoreinfo_addr:x} {exp.report.vmcoreinfo_size:x}"


@pytest.mark.parametrize(("fmt", "codec"), OUTPUTS, ids=OUTPUT_IDS)
def test_raw_guest_ram(qemu_guest: rig.QemuGuest, qemu_expect: Expect, out_dir: Path, fmt: str,
                       codec: str) -> None:
    assert qemu_guest.ram_file is not None
    out = out_dir / f"dump.{fmt}"
    with paused(qemu_guest), RawMemoryCollector(
            qemu_guest.ram_file, vmcoreinfo_at=_vmcoreinfo_at(qemu_expect)) as snap:
        assert snap.image.memory_size == qemu_guest.mem_mb << 20
        write_dump(snap.image, out, format=fmt, compression=codec)
    assert_readers_agree(out, qemu_expect, fmt, codec, out_dir)


def test_raw_vmcoreinfo_from_text_file(qemu_guest: rig.QemuGuest, qemu_expect: Expect,
                                       out_dir: Path) -> None:
    assert qemu_guest.ram_file is not None
    with paused(qemu_guest):
        found = RawMemoryCollector(qemu_guest.ram_file, vmcoreinfo_at=_vmcoreinfo_at(
            qemu_expect))
        text = found.load_vmcoreinfo(found.ranges())
        (out_dir / "vmcoreinfo.txt").write_bytes(text)
        out = out_dir / "dump.kdump"
        with RawMemoryCollector(qemu_guest.ram_file,
                                vmcoreinfo=out_dir / "vmcoreinfo.txt") as snap:
            assert snap.image.vmcoreinfo == text
            write_dump(snap.image, out, format="kdump", compression="zlib")
    assert_readers_agree(out, qemu_expect, "kdump", "zlib", out_dir)


def test_lime_from_guest_ram(qemu_guest: rig.QemuGuest, qemu_expect: Expect,
                             out_dir: Path) -> None:
    """LiME as LiME writes it: System RAM ranges only (the legacy VGA/BIOS hole left out),
    split over two files."""
    assert qemu_guest.ram_file is not None
    ram = qemu_guest.mem_mb << 20
    ranges = [(0, 0x9FFFF), (0x100000, ram // 2 - 1), (ram // 2, ram - 1)]
    files = [out_dir / "a.lime", out_dir / "b.lime"]
    with paused(qemu_guest), open(qemu_guest.ram_file, "rb") as src:
        for path, part in ((files[0], ranges[:2]), (files[1], ranges[2:])):
            with open(path, "wb") as dst:
                for start, end in part:
                    dst.write(LIME_HEADER.pack(LIME_MAGIC, 1, start, end, bytes(8)))
                    src.seek(start)
                    left = end - start + 1
                    while left:
                        chunk = src.read(min(left, 1 << 22))
                        dst.write(chunk)
                        left -= len(chunk)
    out = out_dir / "dump.elf"
    with RawMemoryCollector(files, vmcoreinfo_at=_vmcoreinfo_at(qemu_expect)) as snap:
        spans = [(s.phys_addr, s.phys_addr + s.size - 1) for s in snap.image.segments]
        assert spans == ranges
        write_dump(snap.image, out, format="elf")
    for f in files:
        f.unlink()
    assert_readers_agree(out, qemu_expect, "elf", "none", out_dir)
    # the hole stays a hole: no PT_LOAD covers 0xa0000
    with open(out, "rb") as f:
        head = f.read(64)
        phoff, = struct.unpack_from("<Q", head, 0x20)
        phnum, = struct.unpack_from("<H", head, 0x38)
        f.seek(phoff)
        phdrs = f.read(56 * phnum)
    loads = [struct.unpack_from("<IIQQQQQQ", phdrs, i * 56) for i in range(phnum)]
    assert not any(p[0] == 1 and p[4] <= 0xA0000 < p[4] + p[6] for p in loads)
