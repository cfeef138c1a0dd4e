"""Failure paths, big layouts, streams and memory bounds of the writer."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import textwrap
import time

import kdumpling
import pytest
from kdumpling import CallableSource, KdumpBuilder, write_dump

from tests import tiers
from tests.readers import crash_osrelease, drgn_program, kdumpfile_module, lkf_open, lkf_read_phys

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
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", mnt],
                         capture_output=True)
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


@pytest.mark.parametrize("fmt", ["elf", "kdump"])
def test_killed_write_leaves_a_file_marked_incomplete(tmp_path: str, fmt: str) -> None:
    """SIGKILL cannot be cleaned up after: what remains is named *.incomplete and its header
    says so (kdump status DUMP_DH_COMPRESSED_INCOMPLETE, ELF e_flags DUMP_ELF_INCOMPLETE)."""
    out = os.path.join(tmp_path, "core")
    code = _KILLED_WRITER.format(vmci=VMCI)
    proc = subprocess.Popen([sys.executable, "-c", code, out, fmt])
    partial = out + ".incomplete"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (
            not os.path.exists(partial) or os.path.getsize(partial) < (2 << 20)):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(out)
    with open(partial, "rb") as f:
        head = f.read(512)
    if fmt == "kdump":
        (status,) = struct.unpack_from("<I", head, 424)
        assert status & 0x08
        # libkdumpfile refuses the pages that were never written instead of inventing data:
        # their descriptor is still the reserved zeros, a compressed size of 0.
        ctx = lkf_open(partial)
        kdumpfile = kdumpfile_module()
        with pytest.raises(kdumpfile.exceptions.CorruptException, match="page size: 0"):
            lkf_read_phys(ctx, 7 << 20, 4096)
    else:
        (e_flags,) = struct.unpack_from("<I", head, 48)
        assert e_flags & 0x1


@pytest.mark.readers
@pytest.mark.slow
def test_70000_program_headers_use_pn_xnum(tmp_path: str) -> None:
    b = KdumpBuilder().set_vmcoreinfo(VMCI).add_cpu_context(0, {"RIP": 1}, pid=1)
    page = bytes(range(256)) * 16
    for i in range(70_000):
        b.add_memory_segment(i * 8192, page[:64] + struct.pack("<Q", i) + page[72:])
    out = os.path.join(tmp_path, "many.elf")
    b.write(out)
    with open(out, "rb") as f:
        head = f.read(64)
    assert struct.unpack_from("<H", head, 56)[0] == 0xFFFF  # e_phnum = PN_XNUM
    assert crash_osrelease(out) == "6.1.0-faults"
    ctx = lkf_open(out)
    prog = drgn_program(out)
    for i in (0, 1, 65_534, 65_535, 69_999):
        want = page[:64] + struct.pack("<Q", i) + page[72:]
        assert lkf_read_phys(ctx, i * 8192, 4096) == want
        assert prog.read(i * 8192, 4096, True) == want


@pytest.mark.readers
@pytest.mark.parametrize("fmt", ["elf", "kdump-flat"])
def test_write_to_a_pipe(tmp_path: str, fmt: str) -> None:
    data = os.urandom(1 << 20)
    code = textwrap.dedent(f"""
        import sys, kdumpling
        b = kdumpling.KdumpBuilder().set_vmcoreinfo({VMCI!r})
        b.add_memory_segment(0x100000, {str(tmp_path)!r} + "/mem")
        b.write(sys.stdout.buffer, format={fmt!r})
    """)
    with open(os.path.join(tmp_path, "mem"), "wb") as f:
        f.write(data)
    out = os.path.join(tmp_path, "piped")
    with open(out, "wb") as sink:
        # cat makes stdout a real pipe, not the file
        p1 = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
        p2 = subprocess.Popen(["cat"], stdin=p1.stdout, stdout=sink)
        assert p1.stdout is not None
        p1.stdout.close()
        assert p1.wait(60) == 0 and p2.wait(60) == 0
    prog = drgn_program(out)
    assert prog.read(0x100000, len(data), True) == data


@pytest.mark.readers
def test_elf_to_an_open_file_keeps_zero_pages_as_holes(tmp_path: str) -> None:
    data = os.urandom(1 << 16)
    b = KdumpBuilder().set_vmcoreinfo(VMCI)
    b.add_memory_segment(0x100000, data)
    b.add_memory_segment(0x1000000, bytes(64 << 20))
    b.add_memory_segment(0x9000000, data)
    out = os.path.join(tmp_path, "sparse.elf")
    with open(out, "w+b") as f:
        write_dump(b.to_image(), f, format="elf", dump_level=1)
        assert f.tell() == os.path.getsize(out) > 64 << 20  # left at the end, like a write
    assert os.stat(out).st_blocks * 512 < 4 << 20  # the 64 MiB of zeros are holes
    prog = drgn_program(out)
    assert prog.read(0x100000, len(data), True) == data
    assert prog.read(0x9000000, len(data), True) == data
    assert prog.read(0x1000000 + (32 << 20), 4096, True) == bytes(4096)

    # A file with old data in it: every byte written, so no old data shows through a hole.
    reused = os.path.join(tmp_path, "reused.elf")
    with open(reused, "wb") as f:
        f.write(b"\xee" * (80 << 20))
    with open(reused, "r+b") as f:
        write_dump(b.to_image(), f, format="elf", dump_level=1)
    assert drgn_program(reused).read(0x1000000 + (32 << 20), 4096, True) == bytes(4096)

    # Not at its start (something before the dump): written sequentially after it.
    prefixed = os.path.join(tmp_path, "prefixed")
    with open(prefixed, "wb") as f:
        f.write(b"x" * 100)
        write_dump(b.to_image(), f, format="elf", dump_level=1)
    with open(prefixed, "rb") as f:
        assert f.read(104) == b"x" * 100 + b"\x7fELF"


@pytest.mark.slow
@pytest.mark.parametrize("fmt,codec", [("elf", "none"), ("kdump", "zstd")])
def test_peak_rss_stays_small_for_a_2gb_dump(tmp_path: str, fmt: str, codec: str) -> None:
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
