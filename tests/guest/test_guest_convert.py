"""DumpFileCollector on QEMU's own dumps of the guest (ELF and flattened kdump-zlib), also of a
guest whose phys_base is negative on every boot."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from kdumpling import write_dump
from kdumpling.arch import qemu_header_phys_base
from kdumpling.collectors.convert import DumpFileCollector
from kdumpling.notes import parse_vmcoreinfo
from kdumpling.reader import open_dump

from tests import tiers
from tests.agenttools import json_out, run_agent

from . import rig
from .checks import OUTPUT_IDS, OUTPUTS, Expect, assert_readers_agree

pytestmark = [pytest.mark.guest, pytest.mark.slow]


def _qemu_dump(guest: rig.QemuGuest, path: Path, fmt: str) -> Path:
    # QEMU opens "file:" paths itself (relative to its cwd): give it an absolute one.
    rig.qmp_command(guest.qmp_path, "dump-guest-memory",
                    {"paging": False, "protocol": f"file:{path}", "format": fmt})
    return path


@pytest.fixture(scope="module")
def qemu_dumps(qemu_guest: rig.QemuGuest, guest_dir: Path) -> Iterator[dict[str, Path]]:
    where = guest_dir / "qemu-dumps"
    where.mkdir(exist_ok=True)
    dumps = {"elf": _qemu_dump(qemu_guest, where / "qemu.elf", "elf"),
             "kdump-zlib": _qemu_dump(qemu_guest, where / "qemu.kdump", "kdump-zlib")}
    yield dumps
    for p in dumps.values():
        p.unlink(missing_ok=True)


@pytest.mark.parametrize(("fmt", "codec"), OUTPUTS, ids=OUTPUT_IDS)
@pytest.mark.parametrize("source", ["elf", "kdump-zlib"])
def test_convert_qemu_dump(qemu_dumps: dict[str, Path], qemu_expect: Expect, out_dir: Path,
                           source: str, fmt: str, codec: str) -> None:
    out = out_dir / f"dump.{fmt}"
    with DumpFileCollector(qemu_dumps[source]) as snap:
        vmci = parse_vmcoreinfo(snap.image.vmcoreinfo)
        assert vmci["OSRELEASE"] == qemu_expect.report.release
        # QEMU's notes (CPU state) and both NT_PRSTATUS stay
        assert snap.image.cpu_count == 2
        assert sum(1 for n in snap.image.notes if n.name == b"QEMU") == 2
        write_dump(snap.image, out, format=fmt, compression=codec)
    assert_readers_agree(out, qemu_expect, fmt, codec, out_dir)


def test_convert_fixes_what_makedumpfile_cannot_read(qemu_dumps: dict[str, Path],
                                                     qemu_expect: Expect, out_dir: Path) -> None:
    """QEMU's own ELF fails in makedumpfile (phdrs at 192); ours, converted, does not."""
    dmesg = out_dir / "qemu.dmesg"
    qemu = subprocess.run(["makedumpfile", "--dump-dmesg", str(qemu_dumps["elf"]), str(dmesg)],
                          capture_output=True, text=True, timeout=300)
    if qemu.returncode == 0:
        # Deliberate: a QEMU that fixed its ELF layout leaves nothing to compare.
        tiers.not_applicable("this QEMU writes ELF dumps makedumpfile already reads")
    out = out_dir / "dump.elf"
    with DumpFileCollector(qemu_dumps["elf"]) as snap:
        write_dump(snap.image, out, format="elf")
    ours = subprocess.run(["makedumpfile", "--dump-dmesg", str(out), str(dmesg)],
                          capture_output=True, text=True, timeout=300)
    assert ours.returncode == 0, ours.stdout
    assert qemu_expect.marker in dmesg.read_text(errors="replace")


@pytest.fixture(scope="module")
def negative_dumps(negative_phys_base_guest: rig.QemuGuest,
                   guest_dir: Path) -> Iterator[dict[str, Path]]:
    where = guest_dir / "negative-dumps"
    where.mkdir(exist_ok=True)
    guest = negative_phys_base_guest
    dumps = {"elf": _qemu_dump(guest, where / "qemu.elf", "elf"),
             "kdump-zlib": _qemu_dump(guest, where / "qemu.kdump", "kdump-zlib")}
    yield dumps
    for p in dumps.values():
        p.unlink(missing_ok=True)


@pytest.mark.parametrize("out_fmt", ["elf", "kdump"])
@pytest.mark.parametrize("source", ["elf", "kdump-zlib"])
def test_convert_negative_phys_base(negative_phys_base_guest: rig.QemuGuest,
                                    negative_dumps: dict[str, Path], out_dir: Path,
                                    source: str, out_fmt: str) -> None:
    """`convert` of QEMU's own dump of a guest loaded below its link address exits 0 without a
    warning (it exited 1: "header phys_base -0xa400000 replaced by VMCOREINFO's -0xa400000"),
    and every reader opens the result, translating kernel addresses through phys_base."""
    report = negative_phys_base_guest.report
    assert report is not None and report.phys_base is not None and report.phys_base < 0
    src = negative_dumps[source]
    with open_dump(src) as qemu:
        text = parse_vmcoreinfo(qemu.vmcoreinfo)["NUMBER(phys_base)"]
        assert int(text) == report.phys_base
        if source == "kdump-zlib":
            # QEMU's header holds the decimal number read as hex: an expected correction
            assert qemu.header["phys_base"] == qemu_header_phys_base(text)
    out = out_dir / f"dump.{out_fmt}"
    proc = run_agent(["convert", str(src), str(out), "--format", out_fmt, "--json"], out_dir)
    assert proc.returncode == 0, proc.stderr
    rec = json_out(proc)
    assert rec["warnings"] == [] and "missing" not in rec
    assert bool(rec["meta"].get("fixes")) == (source == "kdump-zlib")
    expect = Expect(negative_phys_base_guest.spec, report)
    assert_readers_agree(out, expect, out_fmt, "zlib" if out_fmt == "kdump" else "none", out_dir)
