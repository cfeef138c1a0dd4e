"""The dump reader against files made by real tools, checked page by page against libkdumpfile and
drgn (and pyelftools, crash, makedumpfile -R for the structure).

Sources: a synthetic x86_64 kernel packed as an ELF vmcore by a test-only packer (kexec and
QEMU 7.2 layouts, PN_XNUM, a kexec kernel-text duplicate), and what makedumpfile makes of it
(-c, -l, uncompressed, -E, -F, --split). Then every dump goes through ``to_image`` and the
writer into every format and codec, and back through our reader and libkdumpfile.
"""

from __future__ import annotations

import os
import stat
import struct
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kdumpling import write_dump
from kdumpling.errors import FormatError, UsageError
from kdumpling.image import DumpKind
from kdumpling.reader import (
    Dump,
    PageNotDumpedError,
    open_dump,
    open_elf_stream,
    read_elf_stream,
    reassemble_flattened,
)

from tests import testdumps as td
from tests.readers import crash_osrelease, drgn_module, drgn_program, kdumpfile_module, lkf_open

PAGE = td.PAGE


@dataclass
class Built:
    dir: Path
    machine: td.Machine
    files: dict[str, Path]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    d = tmp_path_factory.mktemp("reader")
    m = td.x86_64_machine()
    files: dict[str, Path] = {}

    def elf(name: str, **kw: Any) -> None:
        files[name] = d / name
        td.pack_elf_vmcore(files[name], m, **kw)

    elf("kexec.elf")
    elf("qemu.elf", layout="qemu")
    elf("textdup.elf", text_duplicate=True)
    return Built(d, m, files)


@pytest.fixture(scope="module")
def mdf(built: Built) -> Built:
    """makedumpfile's conversions of kexec.elf (skips when makedumpfile is missing)."""
    src = str(built.files["kexec.elf"])
    out = built.dir
    for name, args in {
        "zlib.kdump": ["-c", "-d", "1"],
        "lzo.kdump": ["-l", "-d", "1"],
        "raw.kdump": ["-d", "1"],
        "level0.kdump": ["-c", "-d", "0"],
        "filtered.elf": ["-E", "-d", "1"],
    }.items():
        td.makedumpfile([*args, src, str(out / name)])
        built.files[name] = out / name
    for name, args in {"zlib.flat": ["-F", "-c", "-d", "1"], "lzo.flat": ["-F", "-l", "-d", "1"]
                       }.items():
        td.makedumpfile([*args, src], stdout=out / name)
        built.files[name] = out / name
    # a small --splitblock-size, so that both parts get pages
    td.makedumpfile(["--split", "--splitblock-size", "1024", "-c", "-d", "1", src,
                     str(out / "part1.kdump"),
                     str(out / "part2.kdump")])
    built.files["part1.kdump"] = out / "part1.kdump"
    built.files["part2.kdump"] = out / "part2.kdump"
    return built


# --- the comparison --------------------------------------------------------------------------


def _oracle_pages(path: Path, pfns: list[int], flat: bool) -> dict[str, Callable[[int], bytes]]:
    """Page readers we did not write. Debian's libkdumpfile 0.5.1 cannot open flattened files
    (dump-formats.md §3.9); drgn's bundled one can."""
    kd = kdumpfile_module()
    out: dict[str, Callable[[int], bytes]] = {}
    if not flat:
        ctx = lkf_open(str(path))
        out["libkdumpfile"] = lambda pfn: bytes(ctx.read(kd.KDUMP_MACHPHYSADDR, pfn * PAGE, PAGE))
    prog = drgn_program(str(path))
    out["drgn"] = lambda pfn: bytes(prog.read(pfn * PAGE, PAGE, True))
    return out


def no_data_errors() -> tuple[type[BaseException], ...]:
    """What drgn (FaultError) and libkdumpfile (its KDumpBaseException family: NoData,
    Corrupt, ...) raise for a page they have no data for."""
    return (drgn_module().FaultError, kdumpfile_module().exceptions.KDumpBaseException)


def compare_with_oracles(path: Path, dump: Dump, pfns: list[int]) -> int:
    """Every PFN: where we return a page, every oracle returns the same bytes; where we have no
    data, at least one oracle agrees (or it is an ELF p_memsz tail, which they zero-fill), and
    any oracle that fills the page (libkdumpfile fills a partial page, drgn and libkdumpfile a
    p_memsz tail) matches our zero-filled view. Returns pages compared."""
    oracles = _oracle_pages(path, pfns, dump.format == "kdump-flat")
    compared = 0
    for pfn in pfns:
        reason = ""
        try:
            ours: bytes | None = dump.read_phys(pfn * PAGE, PAGE)
        except PageNotDumpedError as err:
            ours, reason = None, err.reason
        theirs: dict[str, bytes | None] = {}
        for name, read in oracles.items():
            try:
                theirs[name] = read(pfn)
            except no_data_errors():  # the readers' own "no data here" (any other error fails)
                theirs[name] = None
        if ours is not None:
            for name, data in theirs.items():
                assert data == ours, f"{path.name} pfn {pfn:#x}: {name} differs"
            compared += 1
        else:
            # Both oracles read an ELF p_filesz < p_memsz tail as zeros; we say "not-dumped".
            assert any(v is None for v in theirs.values()) or reason == "not-dumped", \
                f"{path.name} pfn {pfn:#x}: we have no data but every oracle does"
            filled = dump.read_phys(pfn * PAGE, PAGE, zero_fill=True)
            for name, data in theirs.items():
                assert data is None or data == filled, f"{path.name} pfn {pfn:#x}: {name}"
    return compared


def all_pfns(m: td.Machine) -> list[int]:
    return list(range(m.max_pfn + 8))


ELF_SOURCES = ["kexec.elf", "qemu.elf", "textdup.elf"]
MDF_SOURCES = ["zlib.kdump", "lzo.kdump", "raw.kdump", "level0.kdump", "filtered.elf",
               "zlib.flat", "lzo.flat"]


@pytest.mark.readers
@pytest.mark.parametrize("name", ELF_SOURCES)
def test_elf_vmcores_match_oracles(built: Built, name: str) -> None:
    path = built.files[name]
    with open_dump(path) as dump:
        assert (dump.format, dump.arch.name, dump.kind) == ("elf", "x86_64", DumpKind.KERNEL)
        assert dump.warnings == []
        assert compare_with_oracles(path, dump, all_pfns(built.machine)) > 500
        # The synthetic memory itself, where the file has whole pages.
        for pfn, page in dump.iter_pages():
            assert page == built.machine.page(pfn), f"pfn {pfn:#x}"


@pytest.mark.readers
@pytest.mark.parametrize("name", MDF_SOURCES)
def test_makedumpfile_outputs_match_oracles(mdf: Built, name: str) -> None:
    path = mdf.files[name]
    with open_dump(path) as dump:
        assert dump.arch.name == "x86_64" and dump.kind is DumpKind.KERNEL
        assert dump.warnings == []
        n = compare_with_oracles(path, dump, all_pfns(mdf.machine))
        pages = dict(dump.iter_pages())
        assert len(pages) == n  # iter_pages yields exactly the readable pages
        if name.endswith(("kdump", "flat")):
            expect_codec = "lzo" if name.startswith("lzo") else \
                "none" if name.startswith("raw") else "zlib"
            assert dump.header["codec"] == expect_codec
            assert dump.header["dump_level"] == (0 if name.startswith("level0") else 1)
            assert dump.header["release"] == td.OSRELEASE
            assert dump.header["header_version"] == 6


@pytest.mark.readers
def test_page_reads_across_boundaries(mdf: Built) -> None:
    """Unaligned multi-page reads give the same bytes as libkdumpfile."""
    kd = kdumpfile_module()
    for name in ("zlib.kdump", "kexec.elf", "qemu.elf"):
        ctx = lkf_open(str(mdf.files[name]))
        with open_dump(mdf.files[name]) as dump:
            for addr, length in ((0x100FF3, 3 * PAGE + 77), (0x1000, 1), (0x17FFFF, 1),
                                 (0x400123, 0x5000)):
                assert dump.read_phys(addr, length) == \
                    bytes(ctx.read(kd.KDUMP_MACHPHYSADDR, addr, length))


# --- notes, registers, header facts ----------------------------------------------------------


@pytest.mark.readers
@pytest.mark.parametrize("name", ["kexec.elf", "qemu.elf", "zlib.kdump", "filtered.elf",
                                  "zlib.flat"])
def test_notes_registers_vmcoreinfo(mdf: Built, name: str) -> None:
    path = mdf.files[name]
    with open_dump(path) as dump:
        ctx_path = path
        if dump.format == "kdump-flat":
            ctx_path = mdf.dir / "reassembled-for-notes.kdump"
            with open(path, "rb") as src:
                reassemble_flattened(src, ctx_path)
        ctx = lkf_open(str(ctx_path))
        attr = ctx.attr
        assert dump.vmcoreinfo == bytes(attr["linux"]["vmcoreinfo"]["raw"])
        assert len(dump.cpus) == attr["cpu.number"] == 2
        for i, (pid, regs) in enumerate(dump.cpus):
            lregs = attr["cpu"][str(i)]["reg"]
            assert pid == attr["cpu"][str(i)]["pid"]
            names = list(lregs.keys())
            assert len(names) == len(regs) == 27
            for reg in names:
                assert regs["EFLAGS" if reg == "rflags" else reg.upper()] == lregs[reg], (i, reg)
            assert regs["RIP"] == td.START_KERNEL_MAP + 0x1000 + i
        assert dump.header["nr_cpus"] == 2
        assert dump.vmcoreinfo_fields["OSRELEASE"] == td.OSRELEASE


@pytest.mark.readers
def test_elf_structure_matches_pyelftools(mdf: Built) -> None:
    from elftools.elf.elffile import ELFFile

    for name in ("kexec.elf", "qemu.elf", "filtered.elf", "textdup.elf"):
        with open(mdf.files[name], "rb") as f, open_dump(mdf.files[name]) as dump:
            elf = ELFFile(f)
            loads = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
            assert [(s.phys_addr, s.virt_addr, s.file_offset, s.file_size, s.mem_size)
                    for s in dump.segments] == \
                [(s["p_paddr"], s["p_vaddr"], s["p_offset"], s["p_filesz"], s["p_memsz"])
                 for s in loads]
            theirs = []
            for seg in elf.iter_segments():
                if seg["p_type"] == "PT_NOTE":
                    for note in seg.iter_notes():
                        f.seek(note["n_offset"] + 12 + ((note["n_namesz"] + 3) & ~3))
                        theirs.append((note["n_name"].encode(), note["n_type"] if isinstance(
                            note["n_type"], int) else None, f.read(note["n_descsz"])))
            assert [(n.name, n.desc) for n in dump.notes] == [(t[0], t[2]) for t in theirs]


@pytest.mark.readers
def test_osrelease_matches_crash(mdf: Built) -> None:
    for name in ("kexec.elf", "qemu.elf", "zlib.kdump", "lzo.kdump", "zlib.flat"):
        with open_dump(mdf.files[name]) as dump:
            assert crash_osrelease(str(mdf.files[name])) == dump.header["osrelease"]


# --- PN_XNUM, big-endian and other architectures --------------------------------------------


@pytest.mark.readers
@pytest.mark.slow
def test_pn_xnum(tmp_path: Path) -> None:
    m = td.generic_machine("x86_64", 12)
    path = tmp_path / "xnum.elf"
    td.pack_elf_vmcore(path, m, extra_loads=0xFFFF)
    with open(path, "rb") as f:
        assert struct.unpack_from("<H", f.read(64), 56)[0] == 0xFFFF
    with open_dump(path) as dump:
        assert dump.header["e_phnum"] == 0xFFFF + 1 + len(m.regions)
        assert len(dump.segments) == 0xFFFF + len(m.regions)
        ctx = lkf_open(str(path))
        kd = kdumpfile_module()
        for pfn, page in dump.iter_pages():
            assert page == bytes(ctx.read(kd.KDUMP_MACHPHYSADDR, pfn * PAGE, PAGE))
        # The p_filesz 0 ranges: no data, a clear error or zeros on request.
        with pytest.raises(PageNotDumpedError) as err:
            dump.read_phys(1 << 40, 16)
        assert err.value.reason == "not-dumped"
        assert dump.read_phys(1 << 40, 16, zero_fill=True) == bytes(16)


@pytest.mark.readers
@pytest.mark.parametrize("arch", ["s390x", "ppc64", "ppc64le", "aarch64", "riscv64"])
def test_other_arches_and_big_endian(tmp_path: Path, arch: str) -> None:
    """ELF via the packer, then kdump via our writer: libkdumpfile reads both like we do."""
    m = td.generic_machine(arch)
    src = tmp_path / f"{arch}.elf"
    td.pack_elf_vmcore(src, m)
    kd = kdumpfile_module()
    with open_dump(src) as dump:
        assert dump.arch.name == arch
        assert dump.page_size == m.arch.default_page_size
        assert dump.cpus[0][1][m.arch.regs(0).name] == 0x1234
        ref = dict(dump.iter_pages())
        out = tmp_path / f"{arch}.kdump"
        write_dump(dump.to_image(), out, format="kdump", compression="zlib")
    ps = m.arch.default_page_size
    for path in (src, out):
        ctx = lkf_open(str(path))
        if arch != "riscv64":  # libkdumpfile 0.5.1 reads riscv64 files but names no arch
            assert ctx.attr["arch.name"] == {"ppc64le": "ppc64"}.get(arch, arch)
        with open_dump(path) as dump:
            assert dump.arch.name == arch
            got = dict(dump.iter_pages())
            assert got.keys() == ref.keys()
            for pfn, page in got.items():
                assert page == ref[pfn] == bytes(ctx.read(kd.KDUMP_MACHPHYSADDR, pfn * ps, ps))


# --- conversion through the writer ----------------------------------------------------------

OUTPUTS = [("elf", "none"), ("kdump", "none"), ("kdump", "zlib"), ("kdump", "lzo"),
           ("kdump", "snappy"), ("kdump", "zstd"), ("kdump-flat", "zlib"),
           ("kdump-flat", "zstd")]


@pytest.mark.readers
@pytest.mark.parametrize("source", ["kexec.elf", "qemu.elf", "textdup.elf", "zlib.kdump",
                                    "lzo.flat", "filtered.elf"])
@pytest.mark.parametrize(("fmt", "codec"), OUTPUTS)
def test_convert_round_trip(mdf: Built, source: str, fmt: str, codec: str) -> None:
    src = mdf.files[source]
    out = mdf.dir / f"conv-{source}-{fmt}-{codec}"
    with open_dump(src) as dump:
        ref = dict(dump.iter_pages())
        image = dump.to_image()
        result = write_dump(image, out, format=fmt, compression=codec)
        assert result.bytes_out == out.stat().st_size
    with open_dump(out) as conv:
        assert conv.format == fmt
        assert conv.vmcoreinfo == dump.vmcoreinfo and len(conv.cpus) == 2
        got = dict(conv.iter_pages())
        assert got.keys() == ref.keys()
        assert all(got[p] == ref[p] for p in ref)
        # An independent reader sees the same pages in the converted file.
        compare_with_oracles(out, conv, sorted(ref))


# --- streams and flattened reassembly ---------------------------------------------------------


def _pipe_from(path: Path) -> tuple[subprocess.Popen[bytes], Any]:
    proc = subprocess.Popen(["cat", str(path)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    return proc, proc.stdout


@pytest.mark.readers
@pytest.mark.parametrize("name", ["qemu.elf", "kexec.elf", "textdup.elf"])
def test_elf_stream_to_kdump(built: Built, name: str) -> None:
    proc, pipe = _pipe_from(built.files[name])
    out = built.dir / f"stream-{name}.kdump"
    try:
        reader = open_elf_stream(pipe, name=name)
        assert reader.image.kind is DumpKind.KERNEL and len(reader.image.notes) == 3
        write_dump(reader.image, out, format="kdump", compression="zstd")
        reader.drain()
    finally:
        pipe.close()
        proc.wait()
    with open_dump(built.files[name]) as src, open_dump(out) as conv:
        ref = dict(src.iter_pages())
        got = dict(conv.iter_pages())
        assert got.keys() == ref.keys() and all(got[p] == ref[p] for p in ref)
        compare_with_oracles(out, conv, sorted(ref))


class _BytesPipe:
    """A non-seekable stream over bytes."""

    def __init__(self, data: bytes) -> None:
        self._data, self._pos = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n < 0 else self._pos + n
        out = self._data[self._pos : end]
        self._pos += len(out)
        return out


@pytest.mark.readers
@pytest.mark.parametrize("name", ["zlib.flat", "lzo.flat"])
def test_reassemble_matches_makedumpfile_r(mdf: Built, name: str) -> None:
    theirs = mdf.dir / f"{name}.R"
    with open(mdf.files[name], "rb") as src:
        subprocess.run([td.readers.tool("makedumpfile"), "-R", str(theirs)], stdin=src,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True,
                       timeout=60)
    ours = mdf.dir / f"{name}.ours"
    with open(mdf.files[name], "rb") as src:
        size = reassemble_flattened(src, ours)
    assert size == ours.stat().st_size
    assert ours.read_bytes() == theirs.read_bytes()
    assert oct(ours.stat().st_mode & 0o777) == "0o600"
    # The normal file reads exactly like the flattened one.
    with open_dump(ours) as a, open_dump(mdf.files[name]) as b:
        assert a.format == "kdump" and b.format == "kdump-flat"
        assert dict(a.iter_pages()) == dict(b.iter_pages())
    # From a raw descriptor too, and a truncated stream leaves nothing behind.
    r, w = os.pipe()
    data = mdf.files[name].read_bytes()
    t = threading.Thread(target=lambda: (os.write(w, data[: len(data) // 2]), os.close(w)))
    t.start()
    cut = mdf.dir / f"{name}.cut"
    with pytest.raises(FormatError, match="stream ended"):
        reassemble_flattened(r, cut)
    t.join()
    os.close(r)
    assert not cut.exists() and not Path(str(cut) + ".incomplete").exists()


@pytest.mark.readers
def test_reassemble_goes_through_the_writers_atomic_path(mdf: Built, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Like every writer (dump.atomic_output): the file is fsynced under PATH.incomplete,
    renamed, and then its directory is fsynced, so the rename survives a crash."""
    synced: list[tuple[str, bool]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        name = "dir" if stat.S_ISDIR(st.st_mode) else "file"
        synced.append((name, (tmp_path / "out.kdump").exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with open(mdf.files["zlib.flat"], "rb") as src:
        reassemble_flattened(src, tmp_path / "out.kdump")
    # The file before the rename (the name does not exist yet), the directory after it.
    assert synced == [("file", False), ("dir", True)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.kdump"]


# --- split, incomplete and filtered dumps ------------------------------------------------------


@pytest.mark.readers
def test_split_parts(mdf: Built) -> None:
    with open_dump(mdf.files["zlib.kdump"]) as whole:
        ref = dict(whole.iter_pages())
    union: dict[int, bytes] = {}
    for part in ("part1.kdump", "part2.kdump"):
        with open_dump(mdf.files[part]) as dump:
            assert dump.header["split"] == 1
            lo, hi = dump.header["start_pfn"], dump.header["end_pfn"]
            assert isinstance(lo, int) and isinstance(hi, int)
            pages = dict(dump.iter_pages())
            assert all(lo <= p < hi for p in pages)
            assert not union.keys() & pages.keys()
            union.update(pages)
            outside = next(p for p in ref if not lo <= p < hi)
            with pytest.raises(PageNotDumpedError):
                dump.read_phys(outside * PAGE, 8)
    assert union == ref


@pytest.mark.readers
def test_incomplete_kdump(mdf: Built, tmp_path: Path) -> None:
    """makedumpfile's output marked incomplete the way makedumpfile marks a dump it had to cut
    (status DUMP_DH_COMPRESSED_INCOMPLETE, descriptors never written left at offset 0)."""
    data = bytearray(mdf.files["zlib.kdump"].read_bytes())
    with open_dump(mdf.files["zlib.kdump"]) as dump:
        ref = dict(dump.iter_pages())
        desc_off = dump._desc_off  # type: ignore[attr-defined]
    status = struct.unpack_from("<I", data, 424)[0]
    struct.pack_into("<I", data, 424, status | 0x08)
    lost = sorted(ref)[-5:]
    for i in range(len(ref) - 5, len(ref)):
        struct.pack_into("<qIIQ", data, desc_off + 24 * i, 0, 0, 0, 0)
    path = tmp_path / "incomplete.kdump"
    path.write_bytes(bytes(data))
    with open_dump(path) as dump:
        assert dump.header["incomplete"] is True
        assert any("INCOMPLETE" in w for w in dump.warnings)
        got = dict(dump.iter_pages())
        assert sorted(ref.keys() - got.keys()) == lost
        with pytest.raises(PageNotDumpedError) as err:
            dump.read_phys(lost[0] * PAGE, 1)
        assert err.value.reason == "incomplete"
        assert dump.read_phys(lost[0] * PAGE, 4, zero_fill=True) == bytes(4)
        # Everything still written reads like libkdumpfile reads it.
        kd = kdumpfile_module()
        ctx = lkf_open(str(path))
        for pfn, page in got.items():
            assert page == bytes(ctx.read(kd.KDUMP_MACHPHYSADDR, pfn * PAGE, PAGE))
    # Truncated in the page data: the pages past the end are incomplete, with a warning.
    cut = tmp_path / "cut.kdump"
    cut.write_bytes(mdf.files["zlib.kdump"].read_bytes()[:-50000])
    with open_dump(cut) as dump:
        got = dict(dump.iter_pages())
        assert 0 < len(got) < len(ref) and all(ref[p] == got[p] for p in got)
        assert any("truncated" in w for w in dump.warnings)


@pytest.mark.readers
def test_incomplete_elf(built: Built, tmp_path: Path) -> None:
    marked = tmp_path / "marked.elf"
    td.pack_elf_vmcore(marked, built.machine, e_flags=1)
    with open_dump(marked) as dump:
        assert dump.header["incomplete"] is True
        assert any("INCOMPLETE" in w for w in dump.warnings)
    cut = tmp_path / "cut.elf"
    full = built.files["kexec.elf"].read_bytes()
    cut.write_bytes(full[: len(full) - 10 * PAGE - 100])
    with open_dump(cut) as dump:
        assert any("truncated" in w for w in dump.warnings)
        last = dump.segments[-1]
        end = last.phys_addr + last.mem_size
        with pytest.raises(PageNotDumpedError) as err:
            dump.read_phys(end - PAGE, PAGE)
        assert err.value.reason == "incomplete"
        drgn_prog = drgn_program(str(cut))
        assert dump.read_phys(end - 12 * PAGE, PAGE) == drgn_prog.read(end - 12 * PAGE, PAGE,
                                                                        True)


@pytest.mark.readers
def test_excluded_and_absent_pages(mdf: Built) -> None:
    with open_dump(mdf.files["zlib.kdump"]) as dump:
        # 0x9f is RAM but only partly (range 1 ends at 0x9fc00): makedumpfile excludes it.
        with pytest.raises(PageNotDumpedError) as err:
            dump.read_phys(0x9F000, 8)
        assert err.value.reason == "excluded"
        with pytest.raises(PageNotDumpedError) as err:
            dump.read_phys(0x200000, 8)  # a gap between RAM ranges
        assert err.value.reason == "absent"
        with pytest.raises(PageNotDumpedError):
            dump.read_phys(1 << 45, 8)


# --- bad input -------------------------------------------------------------------------------


# --- process cores -----------------------------------------------------------------------------

GDB_REGS = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11",
            "r12", "r13", "r14", "r15", "rip", "eflags", "cs", "ss"]


def _gdb_core(core: Path, *commands: str) -> str:
    from tests.readers import tool

    args = [tool("gdb"), "-nx", "-batch", "-c", str(core)]
    for cmd in commands:
        args += ["-ex", cmd]
    return subprocess.run(args, capture_output=True, text=True, timeout=120).stdout


def _gdb_registers(core: Path) -> dict[str, int]:
    out = _gdb_core(core, "info registers " + " ".join(GDB_REGS))
    regs = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in GDB_REGS:
            regs[parts[0]] = int(parts[1], 16)
    assert len(regs) == len(GDB_REGS), out
    return regs


@pytest.mark.ptrace
@pytest.mark.readers
def test_gcore_process_core(tmp_path: Path) -> None:
    """A core gdb's gcore wrote of a live process: memory, threads and registers read like gdb
    reads them, and the converted core (to_image -> ELF writer) reads the same in gdb."""
    import sys

    from elftools.elf.elffile import ELFFile

    from tests.readers import tool

    marker = b"KDUMPLING-PROC-MARKER-" * 200
    child = subprocess.Popen([sys.executable, "-c", (
        "import ctypes, threading, time\n"
        f"buf = ctypes.create_string_buffer({marker!r})\n"
        "threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
        "print(ctypes.addressof(buf), flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        addr = int(child.stdout.readline())
        subprocess.run([tool("gcore"), "-o", str(tmp_path / "core"), str(child.pid)],
                       capture_output=True, check=True, timeout=120)
    finally:
        child.kill()
        child.wait()
    core = tmp_path / f"core.{child.pid}"
    converted = tmp_path / "converted.core"
    with open_dump(core) as dump, open(core, "rb") as f:
        assert (dump.format, dump.kind, dump.page_size) == ("elf", DumpKind.PROCESS, 4096)
        assert dump.read_virt(addr, len(marker)) == marker
        with pytest.raises(UsageError):
            dump.read_phys(0, 8)
        assert len(dump.cpus) == 2  # two threads
        regs = _gdb_registers(core)
        ours = dump.cpus[0][1]
        for name in GDB_REGS:
            assert ours[name.upper()] == regs[name], name
        # every PT_LOAD's bytes, as pyelftools reads them
        for seg in ELFFile(f).iter_segments():
            if seg["p_type"] == "PT_LOAD" and seg["p_filesz"]:
                assert dump.read_virt(seg["p_vaddr"], seg["p_filesz"]) == seg.data()
        write_dump(dump.to_image(), converted, format="elf")
    assert _gdb_registers(converted) == regs
    out = _gdb_core(converted, f"x/s {addr}")
    assert "KDUMPLING-PROC-MARKER-KDUMPLING" in out


# --- header versions, annotations, virtual reads ---------------------------------------------


@pytest.mark.readers
@pytest.mark.parametrize("version", [1, 2, 3, 4, 5])
def test_older_header_versions(mdf: Built, tmp_path: Path, version: int) -> None:
    """makedumpfile's file relabelled as an older header_version: what each version adds to
    the sub-header (diskdump_mod.h) is used or ignored accordingly, as libkdumpfile does."""
    data = bytearray(mdf.files["zlib.kdump"].read_bytes())
    struct.pack_into("<i", data, 8, version)
    path = tmp_path / f"v{version}.kdump"
    path.write_bytes(bytes(data))
    with open_dump(mdf.files["zlib.kdump"]) as v6:
        ref = dict(v6.iter_pages())
    kd = kdumpfile_module()
    ctx = lkf_open(str(path))
    with open_dump(path) as dump:
        assert dump.header["header_version"] == version
        got = dict(dump.iter_pages())
        assert got == ref
        for pfn in list(got)[::25]:
            assert got[pfn] == bytes(ctx.read(kd.KDUMP_MACHPHYSADDR, pfn * PAGE, PAGE))
        assert bool(dump.vmcoreinfo) == (version >= 3)
        assert len(dump.cpus) == (2 if version >= 4 else 0)
        if version >= 3:
            assert dump.vmcoreinfo == bytes(ctx.attr["linux"]["vmcoreinfo"]["raw"])
        else:
            assert "vmcoreinfo" not in ctx.attr["linux"]


@pytest.mark.readers
def test_annotations_round_trip(built: Built, tmp_path: Path) -> None:
    """KDUMPLING annotation notes survive conversion, and readelf sees them as notes."""
    from kdumpling.notes import CustomNoteType, Note, annotations_text

    from tests.readers import readelf

    ann = {"host": "test-host", "reason": "unit test", "ticket": "KDL-4"}
    with open_dump(built.files["kexec.elf"]) as dump:
        image = dump.to_image()
    image.notes = [*image.notes, Note(b"KDUMPLING", CustomNoteType.ANNOTATIONS,
                                      annotations_text(ann))]
    for fmt in ("elf", "kdump"):
        out = tmp_path / f"ann.{fmt}"
        with open_dump(built.files["kexec.elf"]) as dump:
            image.segments = dump.to_image().segments
            write_dump(image, out, format=fmt, compression="zlib")
        with open_dump(out) as back:
            assert back.annotations == ann
            assert len(back.cpus) == 2
    notes = readelf("-n", str(tmp_path / "ann.elf"))
    assert "KDUMPLING" in notes and "0x4b444c02" in notes.lower()


@pytest.mark.readers
def test_virtual_reads(built: Built, tmp_path: Path) -> None:
    """read_virt follows p_vaddr: the kexec kernel-text PT_LOAD reads like drgn's page-table
    walk of the same address, and a p_paddr -1 PT_LOAD is readable only virtually."""
    with open_dump(built.files["textdup.elf"]) as dump:
        uts = td.START_KERNEL_MAP + td.UTS_NS + td.UTS_NAME_OFFSET
        ours = dump.read_virt(uts, 6 * 65)
        assert ours[:5] == b"Linux" and td.OSRELEASE.encode() in ours
        assert ours == drgn_program(str(built.files["textdup.elf"])).read(uts, 6 * 65)
        assert dump.read_virt(td.PAGE_OFFSET + 0x100000, 3 * PAGE) == \
            dump.read_phys(0x100000, 3 * PAGE)
        with pytest.raises(PageNotDumpedError):
            dump.read_virt(0xFFFFFFFFC0000000, 8)
    blob = bytes(range(256)) * 64
    path = tmp_path / "nopaddr.elf"
    td.pack_elf_vmcore(path, built.machine, no_paddr_data=blob)
    with open_dump(path) as dump:
        assert any("no physical address" in w for w in dump.warnings)
        assert dump.read_virt(td.VMALLOC_NO_PADDR, len(blob)) == blob
        pages = dict(dump.iter_pages())
        assert pages.keys() == dict(open_dump(built.files["kexec.elf"]).iter_pages()).keys()
        compare_with_oracles(path, dump, all_pfns(built.machine)[::5])


@pytest.mark.readers
@pytest.mark.slow
def test_pn_xnum_stream(tmp_path: Path) -> None:
    m = td.generic_machine("x86_64", 12)
    path = tmp_path / "xnum.elf"
    td.pack_elf_vmcore(path, m, extra_loads=0xFFFF)
    proc, pipe = _pipe_from(path)
    out = tmp_path / "xnum.kdump"
    try:
        write_dump(read_elf_stream(pipe), out, format="kdump", compression="lzo")
    finally:
        pipe.close()
        proc.wait()
    with open_dump(path) as src, open_dump(out) as conv:
        assert dict(conv.iter_pages()) == dict(src.iter_pages())
        compare_with_oracles(out, conv, [p for p, _ in src.iter_pages()])
