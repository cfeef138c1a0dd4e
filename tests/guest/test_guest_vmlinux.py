"""crash with the guest's vmlinux on our converted cores: sys, bt -a, log.

Needs the kernel's -dbg package (an 858 MB download): KDUMPLING_TEST_DEBUGINFO=1.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from kdumpling import write_dump
from kdumpling.collectors.qmp import QmpCollector

from . import rig
from .checks import Expect

pytestmark = [pytest.mark.guest, pytest.mark.slow]


@pytest.mark.parametrize(("fmt", "codec"), [("elf", "none"), ("kdump", "zlib")],
                         ids=["elf", "kdump-zlib"])
def test_crash_with_vmlinux(qemu_guest: rig.QemuGuest, qemu_expect: Expect, guest_vmlinux: Path,
                            out_dir: Path, fmt: str, codec: str) -> None:
    out = out_dir / f"dump.{fmt}"
    with QmpCollector(qemu_guest.qmp_path) as snap:
        write_dump(snap.image, out, format=fmt, compression=codec)
    proc = subprocess.run(["crash", "-s", str(guest_vmlinux), str(out)],
                          input="sys\nbt -a\nlog\nquit\n", capture_output=True, text=True,
                          timeout=600)
    text = proc.stdout
    assert proc.returncode == 0, proc.stderr[-2000:] + text[-2000:]
    release = re.search(r"^\s*RELEASE: (\S+)", text, re.M)
    assert release and release.group(1) == qemu_expect.report.release, text[:2000]
    cpus = re.search(r"^\s*CPUS: (\d+)", text, re.M)
    assert cpus and int(cpus.group(1)) == qemu_guest.smp
    # bt -a: one back trace per CPU, each with frames
    traces = re.findall(r"^PID: \s*\d+ .*CPU: (\d+)", text, re.M)
    assert sorted(map(int, traces)) == list(range(qemu_guest.smp)), text[-4000:]
    assert len(re.findall(r"^ ?#\d+ \[", text, re.M)) >= qemu_guest.smp
    assert qemu_expect.marker in text
