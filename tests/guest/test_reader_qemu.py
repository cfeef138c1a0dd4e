"""The dump reader on QEMU's own dumps of a real guest (QEMU 7.2 ELF layout with program headers
at 192 and QEMU CPU notes; its flattened kdump-zlib with an almost empty utsname), checked
against drgn and libkdumpfile on the same files, then converted and checked by every reader."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kdumpling import write_dump
from kdumpling.reader import Dump, open_dump, read_elf_stream

from . import rig
from .checks import Expect, assert_readers_agree

pytestmark = [pytest.mark.guest, pytest.mark.slow]
PAGE = 4096


@pytest.fixture(scope="module")
def qemu_dumps(qemu_guest: rig.QemuGuest, guest_dir: Path) -> Iterator[dict[str, Path]]:
    """QEMU's ELF and kdump-zlib dumps of the guest, written by QEMU itself (detach=false)."""
    d = guest_dir / "reader-dumps"
    d.mkdir(exist_ok=True)
    out = {}
    for fmt in ("elf", "kdump-zlib"):
        path = d / f"qemu.{fmt}"
        rig.qmp_command(qemu_guest.qmp_path, "dump-guest-memory",
                        {"paging": False, "protocol": f"file:{path}", "format": fmt})
        out[fmt] = path
    yield out
    shutil.rmtree(d, ignore_errors=True)


def _sample(dump_pfns: list[int], exp: Expect) -> list[int]:
    return sorted(set(dump_pfns[::37]) | set(exp.report.anon_pfns))


def test_qemu_elf(qemu_dumps: dict[str, Path], qemu_expect: Expect) -> None:
    import kdumpfile

    from tests.readers import drgn_program, lkf_open

    path = qemu_dumps["elf"]
    with open_dump(path) as dump:
        assert (dump.format, dump.arch.name, dump.kind.value) == ("elf", "x86_64", "kernel")
        assert dump.header["e_phoff"] != 64 and dump.header["layout"] == "qemu"
        names = [n.name for n in dump.notes]
        assert names.count(b"QEMU") == 2 and names.count(b"CORE") == 2
        assert dump.header["osrelease"] == qemu_expect.report.release
        assert len(dump.cpus) == 2
        for pfn in qemu_expect.report.anon_pfns:
            assert qemu_expect.spec.page_kind(dump.read_phys(pfn * PAGE, PAGE)) == "anon"
        pfns = [p for s in dump.segments
                for p in range(s.phys_addr // PAGE, (s.phys_addr + s.file_size) // PAGE)]
        ctx = lkf_open(str(path))
        prog = drgn_program(str(path))
        for pfn in _sample(pfns, qemu_expect):
            ours = dump.read_phys(pfn * PAGE, PAGE)
            assert ours == bytes(ctx.read(kdumpfile.KDUMP_MACHPHYSADDR, pfn * PAGE, PAGE))
            assert ours == prog.read(pfn * PAGE, PAGE, True)
        assert dump.vmcoreinfo == bytes(ctx.attr["linux.vmcoreinfo.raw"])


def test_qemu_flattened_kdump(qemu_dumps: dict[str, Path], qemu_expect: Expect,
                              out_dir: Path) -> None:
    """drgn refuses this file (no arch: QEMU leaves utsname.sysname empty) and libkdumpfile
    0.5.1 cannot read flattened files, so the oracle is libkdumpfile's machine-physical reads
    of what ``makedumpfile -R`` rebuilds from it."""
    import kdumpfile

    from tests.readers import lkf_open, tool

    path = qemu_dumps["kdump-zlib"]
    normal = out_dir / "reassembled.kdump"
    with open(path, "rb") as src:
        subprocess.run([tool("makedumpfile"), "-R", str(normal)], stdin=src, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    with open_dump(path) as dump, open_dump(qemu_dumps["elf"]) as elf:
        assert dump.format == "kdump-flat" and dump.arch.name == "x86_64"
        assert dump.header["sysname"] == ""  # QEMU fills only utsname.machine
        assert dump.header["codec"] == "zlib" and dump.header["dump_level"] == 1
        assert dump.vmcoreinfo == elf.vmcoreinfo
        assert len(dump.cpus) == 2
        ctx = lkf_open(str(normal))
        pfns = [pfn for pfn, _ in dump.iter_pages()]
        assert len(pfns) > 100000
        for pfn in _sample(pfns, qemu_expect):
            theirs = bytes(ctx.read(kdumpfile.KDUMP_MACHPHYSADDR, pfn * PAGE, PAGE))
            assert dump.read_phys(pfn * PAGE, PAGE) == theirs
        for pfn in qemu_expect.report.anon_pfns:
            assert qemu_expect.spec.page_kind(dump.read_phys(pfn * PAGE, PAGE)) == "anon"


@pytest.mark.parametrize(("source", "fmt", "codec"), [
    ("elf", "kdump", "zlib"), ("elf", "kdump", "lzo"), ("kdump-zlib", "elf", "none"),
    ("kdump-zlib", "kdump", "zstd"),
])
def test_convert_qemu_dump(qemu_dumps: dict[str, Path], qemu_expect: Expect, out_dir: Path,
                           source: str, fmt: str, codec: str) -> None:
    """QEMU's dump converted through the reader opens everywhere (crash, drgn, libkdumpfile,
    makedumpfile), which QEMU's own files do not (rig README)."""
    out = out_dir / f"converted.{fmt}"
    t0 = time.monotonic()
    with open_dump(qemu_dumps[source]) as dump:
        result = write_dump(dump.to_image(), out, format=fmt, compression=codec)
    print(f"convert {source} -> {fmt}/{codec}: {result.bytes_in >> 20} MiB in "
          f"{time.monotonic() - t0:.2f} s, {result.bytes_out} bytes")
    assert_readers_agree(out, qemu_expect, fmt, codec, out_dir)


def test_qemu_elf_as_stream(qemu_dumps: dict[str, Path], qemu_expect: Expect,
                            out_dir: Path) -> None:
    """QEMU's ELF read from a pipe (as from dump-guest-memory's fd) straight into a kdump."""
    proc = subprocess.Popen(["cat", str(qemu_dumps["elf"])], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    out = out_dir / "stream.kdump"
    try:
        image = read_elf_stream(proc.stdout)
        write_dump(image, out, format="kdump", compression="zlib")
    finally:
        proc.stdout.close()
        proc.wait()
    with open_dump(out) as conv, open_dump(qemu_dumps["elf"]) as src:
        for pfn in qemu_expect.report.anon_pfns:
            assert conv.read_phys(pfn * PAGE, PAGE) == src.read_phys(pfn * PAGE, PAGE)
    assert_readers_agree(out, qemu_expect, "kdump", "zlib", out_dir)


def test_qemu_dumps_complete_and_cut(qemu_dumps: dict[str, Path], out_dir: Path) -> None:
    """QEMU's whole dumps are complete; its kdump-zlib cut short names exactly the pages that
    did not arrive (every other page reads as in the whole file), and a conversion keeps them."""
    for path in qemu_dumps.values():
        with open_dump(path) as dump:
            t0 = time.monotonic()
            assert (dump.incomplete, dump.missing) == (False, [])
            print(f"{path.name}: missing scan {time.monotonic() - t0:.3f} s")
    whole_path = qemu_dumps["kdump-zlib"]
    cut = out_dir / "cut.flat"
    data = whole_path.read_bytes()
    cut.write_bytes(data[: len(data) * 2 // 3])
    out = out_dir / "cut.kdump"
    with open_dump(whole_path) as whole, open_dump(cut) as dump:
        assert dump.incomplete and dump.missing
        missing = {p for a, b in dump.missing for p in range(a // PAGE, b // PAGE)}
        kept = _compare_pages(whole, dump, missing)
        assert kept > 0 and missing
        write_dump(dump.to_image(), out, format="kdump", compression="zlib", dump_level=0)
        with open_dump(out) as back:
            assert back.incomplete
            assert _compare_pages(dump, back, set()) == kept
    print(f"cut at 2/3: {kept} pages kept, {len(missing)} missing")


def _compare_pages(ref: Dump, dump: Dump, missing: set[int]) -> int:
    """Pages of ``ref`` are in ``dump`` unchanged unless in ``missing``, which ``dump`` lacks
    (both walked in PFN order, so the big dumps are never held in memory). Returns pages read."""
    got = dump.iter_pages()
    kept = 0
    for pfn, page in ref.iter_pages():
        if pfn in missing:
            continue
        assert next(got) == (pfn, page), f"pfn {pfn:#x}"
        kept += 1
    assert next(got, None) is None
    return kept
