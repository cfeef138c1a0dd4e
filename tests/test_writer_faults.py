"""Failure paths, big layouts, streams and memory bounds of the writer."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import kdumpling
import pytest
from kdumpling import CallableSource, KdumpBuilder

from tests import tiers

VMCI = ("OSRELEASE=6.1.0-faults\nPAGESIZE=4096\nSYMBOL(swapper_pg_dir)=ffffffff82a0c000\n"
        "NUMBER(pgtable_l5_enabled)=0\n")


def builder_with(*segments: tuple[int, object]) -> KdumpBuilder:
    b = KdumpBuilder().set_vmcoreinfo(VMCI).add_cpu_context(0, {"RIP": 1}, pid=1)
    for addr, data in segments:
        b.add_memory_segment(addr, data)  # type: ignore[arg-type]
    return b


def leftovers(directory: str) -> list[str]:
    return sorted(os.listdir(directory))


@pytest.mark.parametrize("fmt", ["elf", "kdump", "kdump-flat"])
def test_source_failing_mid_write_leaves_nothing(tmp_path: str, fmt: str) -> None:
    def reader(offset: int, length: int) -> bytes:
        if offset >= 3 << 20:
            raise kdumpling.SourceReadError("device went away", 0x1000 + offset)
        return b"\x5a" * length

    b = builder_with((0x1000000, CallableSource(8 << 20, reader)))
    with pytest.raises(kdumpling.SourceReadError, match="device went away at 0x"):
        b.write(os.path.join(tmp_path, "out"), format=fmt)
    assert leftovers(str(tmp_path)) == []


def test_interrupt_leaves_nothing(tmp_path: str) -> None:
    b = builder_with((0, os.urandom(4 << 20)))

    def progress(done: int, total: int) -> None:
        if done > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        b.write(os.path.join(tmp_path, "out"), format="kdump", progress=progress)
    assert leftovers(str(tmp_path)) == []


def test_existing_symlink_is_not_followed(tmp_path: str) -> None:
    victim = os.path.join(tmp_path, "victim")
    open(victim, "w").close()
    os.symlink(victim, os.path.join(tmp_path, "out.incomplete"))
    with pytest.raises(kdumpling.DumpWriteError):
        builder_with((0, b"a" * 4096)).write(os.path.join(tmp_path, "out"))
    assert os.path.getsize(victim) == 0


@pytest.fixture
def small_tmpfs(tmp_path: str) -> str:
    mnt = os.path.join(tmp_path, "mnt")
    os.mkdir(mnt)
    mount = tiers.tool("root", "mount")
    res = subprocess.run([mount, "-t", "tmpfs", "-o", "size=2m", "tmpfs", mnt], capture_output=True)
    if res.returncode != 0:
        tiers.missing("root", f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", mnt], check=False)


@pytest.mark.parametrize("fmt", ["elf", "kdump"])
def test_disk_full_is_a_clear_error_and_leaves_nothing(small_tmpfs: str, fmt: str) -> None:
    b = builder_with((0, os.urandom(6 << 20)))
    with pytest.raises(kdumpling.DumpWriteError, match="No space left") as info:
        b.write(os.path.join(small_tmpfs, "out"), format=fmt, compression="zlib")
    assert info.value.exit_code == 74
    assert leftovers(small_tmpfs) == []


def test_file_mode_is_private(tmp_path: str) -> None:
    out = os.path.join(tmp_path, "x")
    builder_with((0, b"a" * 4096)).write(out)
    assert os.stat(out).st_mode & 0o777 == 0o600


_KILLED_WRITER = textwrap.dedent("""
    import sys, time, kdumpling
    def slow(offset, length):
        if offset >= (2 << 20):
            time.sleep(60)
        return bytes([offset >> 20 & 0xff]) * length
    b = kdumpling.KdumpBuilder().set_vmcoreinfo({vmci!r})
    b.add_memory_segment(0, kdumpling.CallableSource(8 << 20, slow))
    b.write(sys.argv[1], format=sys.argv[2], compression="none")
""")


@pytest.mark.slow
@pytest.mark.parametrize("fmt,codec", [("elf", "none"), ("kdump", "zstd")])
def test_peak_rss_stays_small_for_a_2gb_dump(tmp_path: str, fmt: str, codec: str) -> None:
    tiers.codec(codec)
    image = os.path.join(tmp_path, "mem.img")
    with open(image, "wb") as f:
        f.truncate(2 << 30)  # sparse: reads are cheap, the writer still walks 2 GiB
        for i in range(0, 2 << 30, 64 << 20):
            f.seek(i)
            f.write(os.urandom(1 << 20))
    code = textwrap.dedent(f"""
        import sys, kdumpling
        b = kdumpling.KdumpBuilder().set_vmcoreinfo({VMCI!r})
        b.add_memory_segment(0, kdumpling.FileRangeSource(sys.argv[1]))
        b.write(sys.argv[2], format={fmt!r}, compression={codec!r}, dump_level=1)
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forking parent.
        print([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1])
    """)
    res = subprocess.run([sys.executable, "-c", code, image, os.path.join(tmp_path, "o")],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    peak_kib = int(res.stdout.split()[-1])
    assert peak_kib < 100 * 1024, f"peak RSS {peak_kib} KiB"
