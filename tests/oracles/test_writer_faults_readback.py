"""Writes that go wrong, judged by readers we did not write: a killed writer, a pipe, 70000
program headers, holes (from test_writer_faults.py)."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import textwrap
import time

import pytest
from kdumpling import KdumpBuilder, write_dump

from tests.readers import crash_osrelease, drgn_program, kdumpfile_module, lkf_open, lkf_read_phys
from tests.test_writer_faults import _KILLED_WRITER, VMCI


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
