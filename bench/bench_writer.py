#!/usr/bin/env python3
"""Writer benchmark for kdumpling (issue 2, "Streaming and speed").

One run builds its own inputs in a work directory (never in the repo) and prints one table plus
ratios against anchors measured in the same run:

1. a synthetic image (default 1 GiB): 45% zero pages, 40% pages taken from files under /usr,
   15% random pages, shuffled at page granularity with a fixed seed. Our throughput for ELF and
   kdump x {none, zlib, lzo, snappy, zstd} and flattened zlib at dump level 1 on all cores; our
   ELF time against ``cp`` of the same bytes; peak RSS of every write (each runs in a child
   process; ``os.wait4`` gives that child's ``ru_maxrss``).
2. kdumpling 0.4.0 from PyPI (installed in a throwaway venv in the work dir, only run) writing
   the same image with zlib.
3. with ``--guest-elf PATH`` (a QEMU ``dump-guest-memory`` ELF, see bench/README.md): our
   ELF->kdump conversion against ``makedumpfile -c -d 1`` and ``-l -d 1``, on the guest as it is
   and on a "dense" copy whose zero pages are filled with file-like and random content.

Every timed write is measured without fsync, and the fsync of its output is timed separately for
ours and for the anchors alike (columns ``s`` and ``+sync``); targets use the write time.

4. compression levels: zlib kdump at level 1, 6 (the library's default, the seed's) and 9 on the
   synthetic image (and the dense guest copy): what the default costs against level 1.
   ``--levels-only`` runs just this section.

    .venv/bin/python bench/bench_writer.py [--size 1G] [--quick] [--guest-elf PATH] [--json F]
    .venv/bin/python bench/bench_writer.py --levels-only --size 256M
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

PAGE = 4096
MB = 1_000_000
DEFAULT_WORKDIR = "/tmp/kdumpling-bench"
OLD_VERSION = "0.4.0"
SYNTH_MIX = (0.45, 0.40, 0.15)  # zero, file-like, random
FILE_PAGES_PER_FILE = 256  # at most 1 MiB from any one /usr file, for variety
RSS_TARGET_MB = 100.0

# Made-up but well-formed VMCOREINFO for the synthetic image (dump-formats.md §4: what drgn,
# libkdumpfile and crash need to open it).
SYNTH_VMCOREINFO = (
    "OSRELEASE=6.1.0-kdumpling-bench\n"
    "PAGESIZE=4096\n"
    "SYMBOL(swapper_pg_dir)=ffffffff82a0a000\n"
    "SYMBOL(_stext)=ffffffff81000000\n"
    "NUMBER(pgtable_l5_enabled)=0\n"
    "NUMBER(phys_base)=0\n"
    "KERNELOFFSET=0\n"
    "CRASHTIME=1700000000\n"
)


# ------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------
def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = 1
    if t and t[-1] in units:
        mult = units[t[-1]]
        t = t[:-1]
    size = int(float(t) * mult)
    if size <= 0 or size % PAGE:
        raise argparse.ArgumentTypeError(f"size must be a positive multiple of {PAGE}: {text}")
    return size


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def unlink(path: str) -> None:
    for p in (path, path + ".incomplete"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


def fsync_path(path: str) -> float:
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def warm(path: str) -> None:
    """Read a file once so that every measured run reads it from the page cache."""
    with open(path, "rb", buffering=0) as f:
        while f.read(8 << 20):
            pass


def cpu_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0, 0.0
    hz = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields) - idle) / hz, sum(fields) / hz


QUIET_CORES = 0.25  # other processes' load (in cores) below which a measurement may start


def quiesce(timeout: float) -> float:
    """Flush earlier runs' dirty pages (so that their writeback does not land inside the next
    run), then wait up to ``timeout`` s for the machine to be quiet: other engineers' jobs
    share these cores. Returns the background load seen last, in cores."""
    os.sync()
    deadline = time.monotonic() + timeout
    while True:
        b0, _ = cpu_busy()
        time.sleep(0.5)
        b1, _ = cpu_busy()
        load = (b1 - b0) / 0.5
        if load < QUIET_CORES or time.monotonic() >= deadline:
            return load


# ------------------------------------------------------------------------------------------
# Child processes: each measured write runs alone so its peak RSS is its own
# ------------------------------------------------------------------------------------------
@dataclass
class ChildResult:
    rc: int
    wall: float
    maxrss_mb: float
    cpu: float  # the child's user + system CPU seconds
    background: float  # other processes' CPU use during the run, in cores
    out: dict[str, Any]
    stderr: str


# Peak RSS: a process's ru_maxrss also counts what it had before execve, and a child forked
# from this (Python) bench starts as a copy of it. So every command runs under a small launcher
# that forks it and reports its rusage: GNU time when installed, else a bare Python (floor
# ~9 MB, which only matters for small tools such as cp or makedumpfile).
TIME_BIN = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None
LAUNCHER = r"""
import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, st, ru = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write("%d %f %f\n" % (ru.ru_maxrss, ru.ru_utime, ru.ru_stime))
sys.exit(os.waitstatus_to_exitcode(st))
"""


def run_child(argv: Sequence[str], *, cwd: str | None = None) -> ChildResult:
    """Run argv (its stdout's last line may be JSON) and measure it: wall time, peak RSS and
    CPU time of that process alone, and the other processes' load on the machine meanwhile."""
    with tempfile.TemporaryFile() as errf, tempfile.TemporaryDirectory() as td:
        ru_file = os.path.join(td, "rusage")
        if TIME_BIN:
            full = [TIME_BIN, "-f", "%M %U %S", "-o", ru_file, *argv]
        else:
            full = [sys.executable, "-S", "-I", "-c", LAUNCHER, ru_file, *argv]
        busy0, _ = cpu_busy()
        t0 = time.perf_counter()
        proc = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=errf, cwd=cwd)
        assert proc.stdout is not None
        data = proc.stdout.read()
        proc.stdout.close()
        rc = proc.wait()
        wall = time.perf_counter() - t0
        busy1, _ = cpu_busy()
        errf.seek(0)
        err = errf.read().decode("utf-8", "replace")
        try:
            with open(ru_file) as f:
                maxrss_kb, utime, stime = f.read().strip().splitlines()[-1].split()
            rss, cpu = int(maxrss_kb) * 1024 / MB, float(utime) + float(stime)
        except (OSError, ValueError, IndexError):
            rss, cpu = 0.0, 0.0
    out: dict[str, Any] = {}
    lines = data.decode("utf-8", "replace").strip().splitlines()
    if lines:
        try:
            out = json.loads(lines[-1])
        except ValueError:
            out = {}
    background = max(0.0, (busy1 - busy0 - cpu) / wall) if wall > 0 else 0.0
    return ChildResult(rc, wall, rss, cpu, background, out, err)


def child_main(spec: dict[str, Any]) -> None:
    """In the child: build the image, write it without fsync, then time the fsync."""
    kind = spec["kind"]
    if kind == "ours":
        result = _child_ours(spec)
    else:
        raise SystemExit(f"unknown child kind {kind}")
    print(json.dumps(result))


def _child_ours(spec: dict[str, Any]) -> dict[str, Any]:
    import kdumpling

    inp = spec["input"]
    if inp["type"] == "raw":
        builder = kdumpling.KdumpBuilder(arch="x86_64")
        builder.set_vmcoreinfo(SYNTH_VMCOREINFO)
        builder.add_cpu_context(0, {"rip": 0xFFFFFFFF81000000, "rsp": 0xFFFFC90000003F00})
        builder.add_cpu_context(1, {"rip": 0xFFFFFFFF81000100, "rsp": 0xFFFFC90000007F00})
        builder.add_memory_segment(inp["phys"], kdumpling.FileRangeSource(inp["path"], 0,
                                                                           inp["size"]))
        image = builder.to_image()
    elif inp["type"] == "public":
        return _child_public(spec)
    else:
        image = image_from_elf(inp["path"], spec.get("converter", "bench"), inp.get("max_phys"))
    out = spec["out"]
    t0 = time.perf_counter()
    res = kdumpling.write_dump(
        image, out, format=spec["format"], compression=spec["compression"],
        compression_level=spec.get("level", 1), dump_level=spec["dump_level"],
        threads=spec["threads"], fsync=False,
    )
    t1 = time.perf_counter()
    sync = fsync_path(out)
    return {"seconds": t1 - t0, "sync": sync, "bytes_in": res.bytes_in,
            "bytes_out": os.stat(out).st_size, "pages": res.pages,
            "zero_pages": res.zero_pages, "compressed_pages": res.compressed_pages,
            "raw_pages": res.raw_pages}


def _child_public(spec: dict[str, Any]) -> dict[str, Any]:
    """The seed API exactly as a user calls it: raw memory files handed to
    ``add_memory_segment`` as open binary file objects or as paths, then ``builder.write``
    (which fsyncs: "sync" is 0, the time includes it)."""
    import kdumpling

    inp = spec["input"]
    core = read_elf_core(inp["elf"])
    vmcoreinfo = next(desc for name, _t, desc in core.notes if name == b"VMCOREINFO")
    builder = kdumpling.KdumpBuilder(arch="x86_64")
    builder.set_vmcoreinfo(vmcoreinfo.rstrip(b"\0").decode())
    files = []
    for paddr, path, _size in inp["loads"]:
        if inp["form"] == "fileobj":
            f = open(path, "rb")  # noqa: SIM115 - closed below, after the write
            files.append(f)
            builder.add_memory_segment(paddr, f)
        else:
            builder.add_memory_segment(paddr, path)
    out = spec["out"]
    t0 = time.perf_counter()
    res = builder.write(out, format=kdumpling.OutputFormat.KDUMP_COMPRESSED,
                        compression=spec["compression"],
                        compression_level=spec.get("level", 1), dump_level=spec["dump_level"])
    t1 = time.perf_counter()
    for f in files:
        f.close()
    return {"seconds": t1 - t0, "sync": 0.0, "bytes_in": res.bytes_in,
            "bytes_out": os.stat(out).st_size, "pages": res.pages,
            "zero_pages": res.zero_pages, "compressed_pages": res.compressed_pages,
            "raw_pages": res.raw_pages}


def extract_loads(path: str, max_phys: int | None) -> list[tuple[int, str, int]]:
    """The ELF's PT_LOADs (cut at ``max_phys``) as raw memory files next to it, cached:
    (physical address, path, size) each, what a user hands the seed API."""
    core = read_elf_core(path)
    out = []
    for i, (off, _vaddr, paddr, filesz, _memsz) in enumerate(clipped_loads(core, max_phys)):
        raw = f"{path}.load{i}-{paddr:x}-{filesz:x}.raw"
        if not (os.path.exists(raw) and os.path.getsize(raw) == filesz
                and os.path.getmtime(raw) >= os.path.getmtime(path)):
            tmp = raw + ".tmp"
            with open(path, "rb") as src, open(tmp, "wb") as dst:
                src.seek(off)
                left = filesz
                while left:
                    block = src.read(min(left, 8 << 20))
                    dst.write(block)
                    left -= len(block)
            os.rename(tmp, raw)
        out.append((paddr, raw, filesz))
    return out


# ------------------------------------------------------------------------------------------
# ELF core reading (our converter's input side) and the QEMU fix step
# ------------------------------------------------------------------------------------------
EM_X86_64, EM_AARCH64, EM_S390, EM_PPC64, EM_RISCV = 62, 183, 22, 21, 243
PT_LOAD, PT_NOTE = 1, 4


@dataclass
class ElfCore:
    endian: str
    machine: int
    phoff: int
    phnum: int
    loads: list[tuple[int, int, int, int, int]] = field(default_factory=list)
    # (p_offset, p_vaddr, p_paddr, p_filesz, p_memsz)
    notes: list[tuple[bytes, int, bytes]] = field(default_factory=list)  # (name, type, desc)


def read_elf_core(path: str) -> ElfCore:
    with open(path, "rb") as f:
        eh = f.read(64)
        if eh[:4] != b"\x7fELF" or eh[4] != 2:
            raise SystemExit(f"{path}: not an ELF64 file")
        e = "<" if eh[5] == 1 else ">"
        machine = struct.unpack_from(e + "H", eh, 18)[0]
        phoff, shoff = struct.unpack_from(e + "QQ", eh, 32)
        phentsize, phnum = struct.unpack_from(e + "HH", eh, 54)
        if phnum == 0xFFFF:  # PN_XNUM: the real count is in section header 0's sh_info
            f.seek(shoff)
            phnum = struct.unpack_from(e + "I", f.read(64), 44)[0]
        f.seek(phoff)
        ph = f.read(phentsize * phnum)
        core = ElfCore(e, machine, phoff, phnum)
        note_ranges = []
        for i in range(phnum):
            p_type, _flags, off, vaddr, paddr, filesz, memsz, _align = struct.unpack_from(
                e + "IIQQQQQQ", ph, i * phentsize)
            if p_type == PT_LOAD:
                core.loads.append((off, vaddr, paddr, filesz, memsz))
            elif p_type == PT_NOTE:
                note_ranges.append((off, filesz))
        for off, size in note_ranges:
            f.seek(off)
            blob = f.read(size)
            pos = 0
            while pos + 12 <= len(blob):
                namesz, descsz, ntype = struct.unpack_from(e + "III", blob, pos)
                pos += 12
                name = blob[pos : pos + namesz].rstrip(b"\0")
                pos += (namesz + 3) & ~3
                desc = blob[pos : pos + descsz]
                pos += (descsz + 3) & ~3
                core.notes.append((name, ntype, desc))
    return core


def clipped_loads(core: ElfCore, max_phys: int | None) -> list[tuple[int, int, int, int, int]]:
    """PT_LOADs (off, vaddr, paddr, filesz, memsz) cut at physical address ``max_phys``."""
    out = []
    for off, vaddr, paddr, filesz, memsz in core.loads:
        if max_phys is not None:
            if paddr >= max_phys:
                continue
            filesz = min(filesz, max_phys - paddr)
            memsz = min(memsz, max_phys - paddr)
        if filesz:
            out.append((off, vaddr, paddr, filesz, memsz))
    return out


def image_from_elf(path: str, converter: str = "bench", max_phys: int | None = None) -> Any:
    """A kdumpling CoreImage over an ELF vmcore's PT_LOADs and notes; nothing is read yet.
    ``max_phys``: leave out memory at and above that physical address."""
    import kdumpling

    if converter == "reader":
        from kdumpling.reader import open_dump  # type: ignore[import-not-found]

        return open_dump(path).to_image()
    from kdumpling.arch import arch_from_machine

    core = read_elf_core(path)
    arch = arch_from_machine(core.machine, core.endian == ">")
    vmcoreinfo = b""
    notes = []
    for name, ntype, desc in core.notes:
        if name == b"VMCOREINFO" and not vmcoreinfo:
            vmcoreinfo = desc.rstrip(b"\0")
        notes.append(kdumpling.Note(name, ntype, desc))
    segments = [
        kdumpling.MemorySegment(phys_addr=paddr, virt_addr=vaddr, mem_size=max(memsz, filesz),
                                data=kdumpling.FileRangeSource(path, off, filesz))
        for off, vaddr, paddr, filesz, memsz in clipped_loads(core, max_phys)
    ]
    return kdumpling.CoreImage(arch=arch, kind=kdumpling.DumpKind.KERNEL, segments=segments,
                               notes=notes, vmcoreinfo=vmcoreinfo)


def kdump_max_mapnr(path: str) -> int:
    """max_mapnr of a kdump-compressed file (max_mapnr_64 from header version 6 on)."""
    with open(path, "rb") as f:
        head = f.read(464)
        e = "<" if struct.unpack_from("<i", head, 8)[0] < 0x10000 else ">"
        version = struct.unpack_from(e + "i", head, 8)[0]
        block_size = struct.unpack_from(e + "i", head, 428)[0]
        max_mapnr = struct.unpack_from(e + "I", head, 440)[0]
        if version >= 6:
            f.seek(block_size + 96)
            max_mapnr = struct.unpack(e + "Q", f.read(8))[0]
    return int(max_mapnr)


def fix_qemu_elf(src: str, dst: str) -> str:
    """Copy a QEMU ELF with its program headers moved to offset 64.

    QEMU >= 7.2 writes section headers at 64 and program headers after them (e_phoff 192,
    e_ehsize 8); makedumpfile 1.7.x reads program headers at sizeof(Elf64_Ehdr) = 64 whatever
    e_phoff says ("Can't get the number of PT_LOAD"). Moving them there, dropping the section
    headers and setting e_ehsize = 64 is enough; the data offsets do not change.
    """
    core = read_elf_core(src)
    if os.path.exists(dst) and os.path.getsize(dst) == os.path.getsize(src) \
            and os.path.getmtime(dst) >= os.path.getmtime(src) and read_elf_core(dst).phoff == 64:
        return "cached"
    unlink(dst)
    tmp = dst + ".tmp"
    shutil.copyfile(src, tmp)
    e = core.endian
    with open(tmp, "r+b") as f:
        eh = bytearray(f.read(64))
        phentsize, phnum = struct.unpack_from(e + "HH", eh, 54)
        if core.phoff != 64:
            if phnum == 0xFFFF:
                raise SystemExit("PN_XNUM QEMU dumps are not handled by the fix step")
            f.seek(core.phoff)
            ph = f.read(phentsize * phnum)
            first_data = min(struct.unpack_from(e + "Q", ph, i * phentsize + 8)[0]
                             for i in range(phnum))
            if 64 + len(ph) > first_data:
                raise SystemExit("no room for the program headers at offset 64")
            struct.pack_into(e + "QQ", eh, 32, 64, 0)  # e_phoff = 64, e_shoff = 0
            struct.pack_into(e + "H", eh, 52, 64)  # e_ehsize
            struct.pack_into(e + "HHH", eh, 58, 0, 0, 0)  # e_shentsize, e_shnum, e_shstrndx
            f.seek(0)
            f.write(eh)
            f.write(ph)
    os.chmod(tmp, 0o644)
    os.rename(tmp, dst)
    return f"phdrs moved {core.phoff} -> 64" if core.phoff != 64 else "already at 64"


# ------------------------------------------------------------------------------------------
# Input builders
# ------------------------------------------------------------------------------------------
def usr_pages(rng: random.Random, root: str = "/usr") -> Iterator[bytes]:
    """Endless non-zero 4 KiB pages from regular files under ``root``, in a seeded file order."""
    files: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            try:
                if os.path.islink(p) or not os.path.isfile(p) or os.path.getsize(p) < PAGE:
                    continue
            except OSError:
                continue
            files.append(p)
    if not files:
        raise SystemExit(f"no files of at least {PAGE} bytes under {root}")
    rng.shuffle(files)
    zero = bytes(PAGE)
    while True:
        produced = 0
        for p in files:
            try:
                with open(p, "rb") as f:
                    for _ in range(FILE_PAGES_PER_FILE):
                        page = f.read(PAGE)
                        if len(page) < PAGE:
                            break
                        if page != zero:
                            produced += 1
                            yield page
            except OSError:
                continue
        if not produced:
            raise SystemExit(f"only zero pages under {root}")


def build_synthetic(workdir: str, size: int, seed: int) -> tuple[str, dict[str, int]]:
    """The synthetic image file (cached by size and seed); zero pages are written, not holes."""
    path = os.path.join(workdir, f"synthetic-{size >> 20}M-seed{seed}.img")
    meta_path = path + ".json"
    if os.path.exists(path) and os.path.exists(meta_path) and os.path.getsize(path) == size:
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("size") == size and meta.get("seed") == seed:
            return path, meta["counts"]
    n = size // PAGE
    n_zero = round(n * SYNTH_MIX[0])
    n_file = round(n * SYNTH_MIX[1])
    n_rand = n - n_zero - n_file
    rng = random.Random(seed)
    kinds = [0] * n_zero + [1] * n_file + [2] * n_rand
    rng.shuffle(kinds)
    files = usr_pages(random.Random(seed + 1))
    rand = random.Random(seed + 2)
    zero = bytes(PAGE)
    log(f"building {path}: {n} pages ({n_zero} zero, {n_file} from /usr, {n_rand} random)")
    tmp = path + ".tmp"
    with open(tmp, "wb", buffering=0) as out:
        buf = bytearray()
        for k in kinds:
            if k == 0:
                buf += zero
            elif k == 1:
                buf += next(files)
            else:
                buf += rand.randbytes(PAGE)
            if len(buf) >= 8 << 20:
                out.write(buf)
                buf.clear()
        out.write(buf)
        os.fsync(out.fileno())
    os.rename(tmp, path)
    counts = {"zero": n_zero, "file": n_file, "random": n_rand}
    with open(meta_path, "w") as f:
        json.dump({"size": size, "seed": seed, "counts": counts}, f)
    return path, counts


def build_dense(src: str, dst: str, seed: int) -> dict[str, int]:
    """Copy of an ELF vmcore whose all-zero PT_LOAD pages get file-like or random content,
    in the synthetic image's proportions (40 : 15)."""
    meta_path = dst + ".json"
    if os.path.exists(dst) and os.path.exists(meta_path) \
            and os.path.getmtime(dst) >= os.path.getmtime(src):
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("seed") == seed and meta.get("src_size") == os.path.getsize(src):
            return dict(meta["counts"])
    unlink(dst)
    tmp = dst + ".tmp"
    shutil.copyfile(src, tmp)
    core = read_elf_core(src)
    rng = random.Random(seed)
    files = usr_pages(random.Random(seed + 1))
    p_file = SYNTH_MIX[1] / (SYNTH_MIX[1] + SYNTH_MIX[2])
    zero = bytes(PAGE)
    counts = {"pages": 0, "zero_before": 0, "filled_file": 0, "filled_random": 0}
    chunk = 1 << 20
    with open(tmp, "r+b", buffering=0) as f:
        for off, _vaddr, _paddr, filesz, _memsz in core.loads:
            done = 0
            while done < filesz:
                n = min(chunk, filesz - done)
                data = bytearray(os.pread(f.fileno(), n, off + done))
                changed = False
                for i in range(0, n - PAGE + 1, PAGE):
                    counts["pages"] += 1
                    if data[i : i + PAGE] != zero:
                        continue
                    counts["zero_before"] += 1
                    changed = True
                    if rng.random() < p_file:
                        data[i : i + PAGE] = next(files)
                        counts["filled_file"] += 1
                    else:
                        data[i : i + PAGE] = rng.randbytes(PAGE)
                        counts["filled_random"] += 1
                if changed:
                    os.pwrite(f.fileno(), data, off + done)
                done += n
        os.fsync(f.fileno())
    os.rename(tmp, dst)
    with open(meta_path, "w") as f:
        json.dump({"seed": seed, "src_size": os.path.getsize(src), "counts": counts}, f)
    return counts


# The second dense image: page kinds drawn independently per zero page (shares of the pages
# filled), none of them the first image's "any /usr file page in seeded order".
MIXED_KINDS = (("text", 0.30), ("binary", 0.25), ("random", 0.20), ("struct", 0.15),
               ("partial", 0.10))
LOG_WORDS = ("kernel:", "systemd[1]:", "sshd[812]:", "Started", "Stopped", "session", "user",
             "root", "eth0:", "link", "up", "down", "Accepted", "publickey", "for", "from",
             "port", "ssh2", "audit:", "type=1400", "apparmor=", "DENIED", "operation=",
             "open", "profile=", "name=", "/usr/lib/", "pid=", "comm=", "requested_mask=", "r",
             "denied_mask=", "fsuid=0", "ouid=0", "GET", "POST", "/api/v1/items", "HTTP/1.1",
             "200", "404", "500", "ms", "bytes", "cache", "miss", "hit", "worker", "job")


def _text_files(root: str = "/usr/share") -> list[str]:
    """Plain-text files (docs, licences, man sources, data) under ``root``."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.endswith((".gz", ".xz", ".bz2", ".png", ".mo", ".so", ".zst")):
                continue
            p = os.path.join(dirpath, name)
            with contextlib.suppress(OSError):
                if os.path.isfile(p) and not os.path.islink(p) and \
                        4096 <= os.path.getsize(p) <= 4 << 20:
                    found.append(p)
    return found


def _binary_files() -> list[str]:
    """ELF executables and libraries."""
    found = []
    for root in ("/usr/lib/x86_64-linux-gnu", "/usr/bin", "/usr/sbin"):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                p = os.path.join(dirpath, name)
                with contextlib.suppress(OSError):
                    if os.path.isfile(p) and not os.path.islink(p) and \
                            os.path.getsize(p) >= 16384:
                        with open(p, "rb") as f:
                            if f.read(4) == b"\x7fELF":
                                found.append(p)
    return found


class MixedPages:
    """Page makers for the mixed image: text (real text files and generated log lines),
    binaries (pages of ELF files), random bytes, kernel-object-like structs (pointers, small
    counters, list heads), and partly used pages (data then zeros, as a slab page)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.texts = _text_files()
        self.bins = _binary_files()
        self.rng.shuffle(self.texts)
        self.rng.shuffle(self.bins)

    def _file_page(self, files: list[str]) -> bytes:
        for _ in range(20):
            p = self.rng.choice(files)
            try:
                size = os.path.getsize(p)
                with open(p, "rb") as f:
                    f.seek(self.rng.randrange(0, max(1, size - PAGE)) // 64 * 64)
                    page = f.read(PAGE)
            except OSError:
                continue
            if len(page) == PAGE and page.count(0) < PAGE // 2:
                return page
        return self.rng.randbytes(PAGE)

    def _log_page(self) -> bytes:
        rng, out = self.rng, bytearray()
        while len(out) < PAGE:
            words = " ".join(rng.choice(LOG_WORDS) for _ in range(rng.randrange(4, 14)))
            out += (f"Dec {rng.randrange(1, 31):2d} {rng.randrange(24):02d}:"
                    f"{rng.randrange(60):02d}:{rng.randrange(60):02d} host{rng.randrange(9)} "
                    f"{words} {rng.randrange(1 << 20)}\n").encode()
        return bytes(out[:PAGE])

    def _struct_page(self) -> bytes:
        rng = self.rng
        base = 0xFFFF888000000000 + (rng.randrange(1 << 20) << 12)
        words = []
        for _ in range(PAGE // 8):
            kind = rng.random()
            if kind < 0.45:
                words.append(base + rng.randrange(1 << 16) * 64)  # pointers into one area
            elif kind < 0.75:
                words.append(rng.randrange(256))  # small counters, flags
            elif kind < 0.9:
                words.append(0)
            else:
                words.append(0xFFFFFFFF81000000 + rng.randrange(1 << 24))  # kernel text
        return struct.pack(f"<{len(words)}Q", *words)

    def page(self) -> tuple[str, bytes]:
        r, acc = self.rng.random(), 0.0
        kind = MIXED_KINDS[-1][0]
        for name, share in MIXED_KINDS:
            acc += share
            if r < acc:
                kind = name
                break
        if kind == "text":
            body = self._file_page(self.texts) if self.rng.random() < 0.6 else self._log_page()
        elif kind == "binary":
            body = self._file_page(self.bins)
        elif kind == "random":
            body = self.rng.randbytes(PAGE)
        elif kind == "struct":
            body = self._struct_page()
        else:
            used = self.rng.randrange(64, 2048)
            src = self._log_page() if self.rng.random() < 0.5 else self._struct_page()
            body = src[:used] + bytes(PAGE - used)
        return kind, body


def build_mixed(src: str, dst: str, seed: int) -> dict[str, int]:
    """The second dense copy of an ELF vmcore (issue 12 item 3), built independently of
    ``build_dense``: each all-zero page becomes one of ``MIXED_KINDS`` (its own seed, its own
    page sources), so zlib's size is checked on memory the fast path was not tuned on."""
    meta_path = dst + ".json"
    if os.path.exists(dst) and os.path.exists(meta_path) \
            and os.path.getmtime(dst) >= os.path.getmtime(src):
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("seed") == seed and meta.get("src_size") == os.path.getsize(src) \
                and meta.get("kinds") == [k for k, _ in MIXED_KINDS]:
            return dict(meta["counts"])
    unlink(dst)
    tmp = dst + ".tmp"
    shutil.copyfile(src, tmp)
    core = read_elf_core(src)
    maker = MixedPages(seed + 1000)
    zero = bytes(PAGE)
    counts: dict[str, int] = {"pages": 0, "zero_before": 0}
    with open(tmp, "r+b", buffering=0) as f:
        for off, _vaddr, _paddr, filesz, _memsz in core.loads:
            done = 0
            while done < filesz:
                n = min(1 << 20, filesz - done)
                data = bytearray(os.pread(f.fileno(), n, off + done))
                changed = False
                for i in range(0, n - PAGE + 1, PAGE):
                    counts["pages"] += 1
                    if data[i : i + PAGE] != zero:
                        continue
                    counts["zero_before"] += 1
                    kind, body = maker.page()
                    data[i : i + PAGE] = body
                    counts[kind] = counts.get(kind, 0) + 1
                    changed = True
                if changed:
                    os.pwrite(f.fileno(), data, off + done)
                done += n
        os.fsync(f.fileno())
    os.rename(tmp, dst)
    with open(meta_path, "w") as f:
        json.dump({"seed": seed, "src_size": os.path.getsize(src), "counts": counts,
                   "kinds": [k for k, _ in MIXED_KINDS]}, f)
    return counts


def zero_page_count(path: str) -> tuple[int, int]:
    core = read_elf_core(path)
    zero = bytes(PAGE)
    total = zeros = 0
    with open(path, "rb", buffering=0) as f:
        for off, _v, _p, filesz, _m in core.loads:
            done = 0
            while done < filesz:
                n = min(1 << 22, filesz - done)
                data = os.pread(f.fileno(), n, off + done)
                mv = memoryview(data)
                for i in range(0, n - PAGE + 1, PAGE):
                    total += 1
                    zeros += mv[i : i + PAGE] == zero
                done += n
    return total, zeros


def ensure_old_venv(workdir: str) -> str:
    venv = os.path.join(workdir, f"venv-kdumpling-{OLD_VERSION}")
    py = os.path.join(venv, "bin", "python")
    probe = [py, "-c", "import kdumpling, importlib.metadata as m; "
                       f"assert m.version('kdumpling') == '{OLD_VERSION}'"]
    # cwd: the work dir, so that a checkout's egg-info in the current directory is not found.
    if os.path.exists(py) and subprocess.run(probe, capture_output=True,
                                             cwd=workdir).returncode == 0:
        return py
    log(f"installing kdumpling=={OLD_VERSION} from PyPI into {venv}")
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run(["python3", "-m", "venv", venv], check=True)
    subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    f"kdumpling=={OLD_VERSION}"], check=True)
    subprocess.run(probe, check=True, cwd=workdir)
    return py


# The 0.4.0 run: its seed API only (run, never copied). It reads a path segment whole.
OLD_SCRIPT = r"""
import json, os, sys, time
from kdumpling import KdumpBuilder, OutputFormat, CompressionType
img, size, out, level, vmci = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), \
    sys.argv[5]
b = KdumpBuilder(arch="x86_64")
b.set_vmcoreinfo(vmci)
b.add_memory_segment(0, img)
t0 = time.perf_counter()
b.write(out, format=OutputFormat.KDUMP_COMPRESSED, compression=CompressionType.ZLIB,
        compression_level=level)
t1 = time.perf_counter()
fd = os.open(out, os.O_RDONLY); os.fsync(fd); os.close(fd)
t2 = time.perf_counter()
print(json.dumps({"seconds": t1 - t0, "sync": t2 - t1, "bytes_in": size,
                  "bytes_out": os.stat(out).st_size}))
"""


# ------------------------------------------------------------------------------------------
# The measurements
# ------------------------------------------------------------------------------------------
@dataclass
class Row:
    section: str
    name: str
    bytes_in: int
    seconds: float
    sync: float
    bytes_out: int
    maxrss_mb: float | None
    note: str = ""
    runs: list[float] = field(default_factory=list)
    background: float = 0.0  # other processes' CPU load during the kept run, in cores
    cpu: float = 0.0  # CPU seconds of the kept run (all threads)
    wall: float = 0.0  # the kept run's process lifetime (start-up and imports included)
    extra: Any = None

    @property
    def mbps(self) -> float:
        return self.bytes_in / MB / self.seconds if self.seconds else 0.0


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rows: list[Row] = []
        self.targets: list[dict[str, Any]] = []
        self.info: dict[str, Any] = {}
        self.outdir = os.path.join(args.workdir, "out")
        os.makedirs(self.outdir, exist_ok=True)

    # -- runners ---------------------------------------------------------------------------
    def _measure(self, section: str, name: str, argv: list[str], out: str, bytes_in: int,
                 repeat: int, note: str, inspect: Any = None) -> Row:
        """Run ``argv`` ``repeat`` times and keep the fastest run. A child that prints JSON
        with "seconds" (ours, 0.4.0) is timed by its own clock around the write call; a plain
        command (cp, makedumpfile) by its process lifetime. The output's fsync is timed apart.
        """
        best: dict[str, Any] | None = None
        rss = 0.0
        times: list[float] = []
        # ``repeat`` runs, then more (up to --max-runs) while the fastest one shared the machine
        # with other jobs: noise only ever adds time, so the fastest quiet run is kept.
        while len(times) < repeat or (best is not None and best["background"] > QUIET_CORES
                                      and len(times) < max(repeat, self.args.max_runs)):
            unlink(out)
            quiesce(self.args.quiet_timeout)
            res = run_child(argv, cwd=self.outdir)
            if res.rc != 0 or not os.path.exists(out):
                raise SystemExit(f"{name}: {' '.join(argv)[:300]} failed (rc {res.rc}):\n"
                                 f"{res.stderr[-3000:]}")
            if "seconds" in res.out:
                run = dict(res.out)
            else:
                run = {"seconds": res.wall, "sync": fsync_path(out),
                       "bytes_out": os.path.getsize(out)}
            run.update(background=res.background, cpu=res.cpu, wall=res.wall)
            times.append(run["seconds"])
            rss = max(rss, res.maxrss_mb)
            if best is None or run["seconds"] < best["seconds"]:
                best = run
        assert best is not None
        row = Row(section, name, best.get("bytes_in", bytes_in), best["seconds"], best["sync"],
                  best["bytes_out"], rss, note, times, best["background"], best["cpu"],
                  best["wall"])
        if inspect is not None:
            row.extra = inspect(out)
        self._add(row)
        if not self.args.keep:
            unlink(out)
        return row

    def ours(self, section: str, name: str, inp: dict[str, Any], fmt: str, comp: str,
             dump_level: int, repeat: int, note: str = "", level: int = 1) -> Row:
        """One of our writes; ``level`` 1 (the fast path) unless a row says otherwise, so that
        zlib compares with makedumpfile -c (zlib level 1) whatever the library's default."""
        out = os.path.join(self.outdir, f"{section}-{name}.out".replace(" ", "-"))
        spec = {"kind": "ours", "input": inp, "out": out, "format": fmt, "compression": comp,
                "dump_level": dump_level, "threads": self.args.threads,
                "converter": self.args.converter, "level": level}
        argv = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
        return self._measure(section, name, argv, out, 0, repeat, note)

    def public(self, section: str, form: str, elf: str, loads: list[tuple[int, str, int]],
               comp: str, repeat: int) -> Row:
        """A write through the seed API as a user calls it (``_child_public``)."""
        name = f"public {form} {comp} d1"
        out = os.path.join(self.outdir, f"{section}-{name}.out".replace(" ", "-"))
        spec = {"kind": "ours", "out": out, "format": "kdump", "compression": comp,
                "dump_level": 1, "threads": None, "level": 1,
                "input": {"type": "public", "form": form, "elf": elf, "loads": loads}}
        argv = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
        return self._measure(section, name, argv, out, 0, repeat,
                             f"add_memory_segment({'open(raw)' if form == 'fileobj' else 'path'})"
                             " + builder.write (fsync included)")

    def command(self, section: str, name: str, argv: list[str], out: str, bytes_in: int,
                repeat: int, note: str = "", inspect: Any = None) -> Row:
        return self._measure(section, name, argv, out, bytes_in, repeat, note, inspect)

    def _add(self, row: Row) -> None:
        self.rows.append(row)
        log(f"{row.section}/{row.name}: {row.seconds:.2f} s (+{row.sync:.2f} s sync), "
            f"out {human(row.bytes_out)}, rss "
            f"{row.maxrss_mb or 0:.0f} MB, cpu {row.cpu:.2f} s, background "
            f"{row.background:.2f} cores, runs {', '.join(f'{t:.2f}' for t in row.runs)}")

    def target(self, name: str, value: float, ok: bool, goal: str, detail: str = "") -> None:
        self.targets.append({"target": name, "value": value, "pass": ok, "goal": goal,
                             "detail": detail})

    # -- sections --------------------------------------------------------------------------
    def synthetic(self) -> None:
        a = self.args
        img, counts = build_synthetic(a.workdir, a.size, a.seed)
        self.info["synthetic"] = {"path": img, "size": a.size, "seed": a.seed, "pages": counts}
        warm(img)
        inp = {"type": "raw", "path": img, "size": a.size, "phys": 0}
        sec = "synthetic"
        cp_out = os.path.join(self.outdir, "synthetic-cp.out")
        cp = self.command(sec, "cp (anchor)", ["cp", img, cp_out], cp_out, a.size, a.repeat_fast,
                          "coreutils cp, same bytes")
        elf0 = self.ours(sec, "elf d0", inp, "elf", "none", 0, a.repeat_fast,
                         "plain copy, vs cp")
        for name, fmt, comp in [("elf d1", "elf", "none"), ("kdump none", "kdump", "none"),
                                ("kdump zlib", "kdump", "zlib"), ("kdump lzo", "kdump", "lzo"),
                                ("kdump snappy", "kdump", "snappy"),
                                ("kdump zstd", "kdump", "zstd"),
                                ("kdump-flat zlib", "kdump-flat", "zlib")]:
            row = self.ours(sec, name, inp, fmt, comp, 1, a.repeat)
            if name == "kdump zlib":
                zlib_row = row
        ratio = cp.seconds / elf0.seconds
        self.target("ELF write speed vs cp (write only)", ratio, ratio >= 0.9,
                    ">= 0.9x cp speed",
                    f"ours {elf0.seconds:.2f} s, cp {cp.seconds:.2f} s")
        ratio_s = (cp.seconds + cp.sync) / (elf0.seconds + elf0.sync)
        self.target("ELF write speed vs cp (incl. fsync)", ratio_s, ratio_s >= 0.9,
                    ">= 0.9x cp speed",
                    f"ours {elf0.seconds + elf0.sync:.2f} s, cp {cp.seconds + cp.sync:.2f} s")
        worst = max((r for r in self.rows if r.section == sec and not r.name.startswith("cp")),
                    key=lambda r: r.maxrss_mb or 0)
        self.target("peak RSS of our writes", worst.maxrss_mb or 0,
                    (worst.maxrss_mb or 0) < RSS_TARGET_MB, f"< {RSS_TARGET_MB:.0f} MB",
                    f"worst: {worst.name}")
        if not a.skip_old:
            py = ensure_old_venv(a.workdir)
            out = os.path.join(self.outdir, "synthetic-old.out")
            old = self.command(sec, f"kdumpling {OLD_VERSION} zlib", [
                py, "-c", OLD_SCRIPT, img, str(a.size), out, "1", SYNTH_VMCOREINFO], out,
                a.size, 1, "PyPI, level 1, in its own venv")
            # Its own timer excludes interpreter start; prefer it to the wall time.
            ratio = zlib_row.mbps / old.mbps
            self.target(f"kdump zlib throughput vs kdumpling {OLD_VERSION}", ratio, ratio >= 20,
                        ">= 20x", f"ours {zlib_row.mbps:.0f} MB/s, {OLD_VERSION} "
                        f"{old.mbps:.1f} MB/s")

    def levels(self) -> None:
        """What the library's default compression_level (6, the seed's) costs against level 1
        (the agent's default and the fast path): zlib kdump -d 1 of the synthetic image, and of
        the dense guest copy when --guest-elf is given. Level 9 for the curve's end."""
        a = self.args
        inputs = []
        img, counts = build_synthetic(a.workdir, a.size, a.seed)
        self.info.setdefault("synthetic", {"path": img, "size": a.size, "seed": a.seed,
                                           "pages": counts})
        inputs.append(("levels synth", {"type": "raw", "path": img, "size": a.size, "phys": 0},
                       img))
        if a.guest_elf:
            fixed = os.path.join(a.workdir, "guest-fixed.elf")
            dense = os.path.join(a.workdir, "guest-dense.elf")
            fix_qemu_elf(os.path.abspath(a.guest_elf), fixed)
            build_dense(fixed, dense, a.seed)
            inputs.append(("levels dense", {"type": "elf", "path": dense}, dense))
        for sec, inp, path in inputs:
            warm(path)
            rows = {lv: self.ours(sec, f"kdump zlib level {lv}", inp, "kdump", "zlib", 1,
                                  a.repeat, "library default" if lv == 6 else "", level=lv)
                    for lv in (1, 6, 9)}
            one, six, nine = rows[1], rows[6], rows[9]
            self.target(f"{sec}: level 6 time vs level 1", six.seconds / one.seconds, True,
                        "(info only)", f"level 6 {six.seconds:.2f} s, level 1 "
                        f"{one.seconds:.2f} s, level 9 {nine.seconds:.2f} s")
            self.target(f"{sec}: level 6 size vs level 1", six.bytes_out / one.bytes_out,
                        six.bytes_out <= one.bytes_out and nine.bytes_out <= six.bytes_out,
                        "9 <= 6 <= 1", f"level 6 {human(six.bytes_out)}, level 1 "
                        f"{human(one.bytes_out)}, level 9 {human(nine.bytes_out)}")

    def guest(self) -> None:
        a = self.args
        src = os.path.abspath(a.guest_elf)
        fixed = os.path.join(a.workdir, "guest-fixed.elf")
        dense = os.path.join(a.workdir, "guest-dense.elf")
        how = fix_qemu_elf(src, fixed)
        log(f"guest ELF fix step: {how}")
        dcounts = build_dense(fixed, dense, a.seed)
        mixed = os.path.join(a.workdir, "guest-mixed.elf")
        mcounts = build_mixed(fixed, mixed, a.seed)
        total, zeros = zero_page_count(fixed)
        self.info["guest"] = {"source": src, "fixed": fixed, "dense": dense, "mixed": mixed,
                              "pages": total, "zero_pages": zeros, "dense_fill": dcounts,
                              "mixed_fill": mcounts}
        mdf = shutil.which("makedumpfile")
        if not mdf:
            raise SystemExit("makedumpfile not found (apt-get install makedumpfile)")
        for variant, path in (("guest as-is", fixed), ("guest dense", dense),
                              ("guest mixed", mixed)):
            warm(path)
            core = read_elf_core(path)
            rows = {}
            for codec, opt in (("zlib", "-c"), ("lzo", "-l")):
                out = os.path.join(self.outdir, f"{variant.replace(' ', '-')}-mdf-{codec}.out")
                m = self.command(variant, f"makedumpfile {opt} -d 1", [
                    mdf, opt, "-d", "1", path, out], out, 0, a.repeat, "anchor",
                    inspect=kdump_max_mapnr)
                # makedumpfile dumps only PFNs below the kernel's last memory section (here the
                # VGA framebuffer and BIOS PT_LOADs of QEMU's ELF fall outside); convert the
                # same pages so that time and size compare the writers, not the page sets.
                max_phys = m.extra * PAGE
                kept = clipped_loads(core, max_phys)
                m.bytes_in = sum(ld[3] for ld in kept)
                dropped = sum(ld[3] for ld in core.loads) - m.bytes_in
                if dropped:
                    m.note = f"anchor; max_mapnr {m.extra:#x}"
                inp = {"type": "elf", "path": path, "max_phys": max_phys}
                o = self.ours(variant, f"ours kdump {codec} d1", inp, "kdump", codec, 1,
                              a.repeat, f"PFNs < {m.extra:#x} as makedumpfile ({human(dropped)}"
                              f" of device memory left out)" if dropped else "")
                rows[codec] = (m, o)
                loads = extract_loads(path, max_phys)
                for form in ("fileobj", "path"):
                    warm(path)
                    pub = self.public(variant, form, path, loads, codec, a.repeat)
                    # builder.write fsyncs: compare with makedumpfile's write plus its fsync
                    r = pub.seconds / (m.seconds + m.sync)
                    goal = 0.5 if codec == "zlib" and variant != "guest as-is" else 1.0
                    if codec == "zlib" and variant == "guest as-is":
                        self.target(f"{variant}: public {form} zlib vs makedumpfile -c +fsync",
                                    r, True, "(info only)",
                                    f"ours {pub.seconds:.2f} s, makedumpfile "
                                    f"{m.seconds + m.sync:.2f} s")
                    else:
                        self.target(f"{variant}: public {form} {codec} vs makedumpfile "
                                    f"{opt} +fsync", r, r <= goal, f"<= {goal}x",
                                    f"ours {pub.seconds:.2f} s (internal "
                                    f"{o.seconds + o.sync:.2f} s), makedumpfile "
                                    f"{m.seconds + m.sync:.2f} s")
                size_ratio = o.bytes_out / m.bytes_out
                self.target(f"{variant}: {codec} output size vs makedumpfile", size_ratio,
                            abs(size_ratio - 1) <= 0.02, "within 2%",
                            f"ours {human(o.bytes_out)}, makedumpfile {human(m.bytes_out)}")
            m, o = rows["zlib"]
            r = o.seconds / m.seconds
            if variant != "guest as-is":
                self.target(f"{variant}: zlib time vs makedumpfile -c", r, r <= 0.5, "<= 0.5x",
                            f"ours {o.seconds:.2f} s, makedumpfile {m.seconds:.2f} s")
            else:
                self.target(f"{variant}: zlib time vs makedumpfile -c", r, True,
                            "(info only)",
                            f"ours {o.seconds:.2f} s, makedumpfile {m.seconds:.2f} s")
            m, o = rows["lzo"]
            r = o.seconds / m.seconds
            self.target(f"{variant}: lzo time vs makedumpfile -l", r, r <= 1.0, "<= 1.0x",
                        f"ours {o.seconds:.2f} s, makedumpfile {m.seconds:.2f} s")

    # -- report ----------------------------------------------------------------------------
    def report(self) -> str:
        lines = []
        hdr = (f"{'section':<12} {'run':<26} {'memory':>9} {'s':>7} {'+sync':>6} {'MB/s':>7} "
               f"{'output':>10} {'RSS MB':>7} {'cpu s':>6} {'bg':>4}  note")
        lines += [hdr, "-" * len(hdr)]
        for r in self.rows:
            rss = f"{r.maxrss_mb:.0f}" if r.maxrss_mb is not None else "-"
            rep = f" [runs {', '.join(f'{t:.2f}' for t in r.runs)}]" if len(r.runs) > 1 else ""
            lines.append(f"{r.section:<12} {r.name:<26} {human(r.bytes_in):>9} {r.seconds:7.2f} "
                         f"{r.sync:6.2f} {r.mbps:7.0f} {human(r.bytes_out):>10} {rss:>7} "
                         f"{r.cpu:6.2f} {r.background:4.1f}  {r.note}{rep}")
        lines.append("s: the write (ours and 0.4.0: their own clock around the write call; "
                     "cp, makedumpfile: process lifetime); +sync: fsync of the output,")
        lines.append("timed apart; RSS: the process's peak (wait4); cpu: its CPU seconds; bg: "
                     "other processes' load during the run, in cores (shared machine).")
        lines.append("")
        lines.append("Targets (ratios from this run; times are write times, fsync shown apart):")
        for t in self.targets:
            verdict = "PASS" if t["pass"] else "FAIL"
            if t["goal"] == "(info only)":
                verdict = "info"
            lines.append(f"  {verdict:<4} {t['target']:<52} {t['value']:8.2f}  goal "
                         f"{t['goal']:<16} {t['detail']}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "args": {k: v for k, v in vars(self.args).items() if k != "child"},
            "host": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
            "kdumpling": writer_version(),
            "inputs": self.info,
            "rows": [dict(asdict(r), mbps=r.mbps) for r in self.rows],
            "targets": self.targets,
        }


def writer_version() -> dict[str, Any]:
    """Which kdumpling was measured: its version, file, and the checkout's commit and state."""
    info: dict[str, Any] = {}
    res = subprocess.run([sys.executable, "-c", "import kdumpling; print(kdumpling.__version__);"
                          " print(kdumpling.__file__)"], capture_output=True, text=True)
    if res.returncode == 0:
        info["version"], info["file"] = res.stdout.split("\n")[:2]
        src = os.path.dirname(os.path.dirname(info["file"]))
        head = subprocess.run(["git", "-C", src, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True)
        if head.returncode == 0:
            dirty = subprocess.run(["git", "-C", src, "status", "--porcelain", "--", "writer"],
                                   capture_output=True, text=True).stdout.split("\n")
            info["commit"] = head.stdout.strip()
            tree = subprocess.run(["git", "-C", src, "rev-parse", "--short", "HEAD:writer"],
                                  capture_output=True, text=True)
            info["writer_tree"] = tree.stdout.strip()
            info["writer_changes"] = [line[3:] for line in dirty if line.strip()]
    return info


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=parse_size, default=None,
                   help="synthetic image size (default 1G; 64M with --quick)")
    p.add_argument("--quick", action="store_true", help="small sizes, one run each: smoke test")
    p.add_argument("--guest-elf", help="QEMU dump-guest-memory ELF of a Linux guest "
                   "(see bench/README.md); without it the guest section is skipped")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON ('-': stdout)")
    p.add_argument("--workdir", default=DEFAULT_WORKDIR, help=f"default {DEFAULT_WORKDIR}")
    p.add_argument("--threads", type=int, default=None,
                   help="codec threads for our writes (default: the library's, i.e. all cores "
                   "where threads pay off)")
    p.add_argument("--repeat", type=int, default=None,
                   help="runs per measurement, best kept (default 2; 1 with --quick)")
    p.add_argument("--seed", type=int, default=2, help="seed of the synthetic and dense inputs")
    p.add_argument("--skip-old", action="store_true", help=f"skip kdumpling {OLD_VERSION}")
    p.add_argument("--skip-synthetic", action="store_true", help="guest section only")
    p.add_argument("--levels-only", action="store_true",
                   help="only the compression-level section: zlib levels 1, 6 (the library "
                   "default) and 9 on the synthetic image (and the dense guest with "
                   "--guest-elf)")
    p.add_argument("--skip-levels", action="store_true",
                   help="leave out the compression-level section")
    p.add_argument("--converter", choices=("bench", "reader"), default="bench",
                   help="guest ELF -> image: this script's ELF parser, or kdumpling.reader")
    p.add_argument("--keep", action="store_true", help="keep the output files")
    p.add_argument("--max-runs", type=int, default=None,
                   help="extra runs allowed while the fastest run had other load on the machine "
                   "(default 5; 1 with --quick)")
    p.add_argument("--quiet-timeout", type=float, default=None,
                   help="seconds to wait before each run for other processes to go quiet "
                   "(default 60; 5 with --quick; column bg = their load in cores)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        child_main(json.loads(a.child))
        return 0
    if a.size is None:
        a.size = (64 << 20) if a.quick else (1 << 30)
    if a.repeat is None:
        a.repeat = 1 if a.quick else 2
    if a.max_runs is None:
        a.max_runs = 1 if a.quick else 5
    if a.quiet_timeout is None:
        a.quiet_timeout = 5.0 if a.quick else 60.0
    a.repeat_fast = a.repeat if a.quick else max(a.repeat, 3)  # cp and ELF: short, noisy
    a.workdir = os.path.abspath(a.workdir)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.commonpath([a.workdir, repo]) == repo:
        raise SystemExit("--workdir must be outside the repository")
    os.makedirs(a.workdir, exist_ok=True)
    bench = Bench(a)
    ver0 = writer_version()
    t0 = time.time()
    if not a.skip_synthetic and not a.levels_only:
        bench.synthetic()
    if a.guest_elf and not a.levels_only:
        bench.guest()
    if not a.skip_levels or a.levels_only:
        bench.levels()
    text = bench.report()
    print(text)
    ver = writer_version()
    changed = f", uncommitted: {' '.join(ver['writer_changes'])}" \
        if ver.get("writer_changes") else ""
    print(f"\nkdumpling {ver.get('version', '?')} at {ver.get('commit', '?')}{changed}")
    same = ("writer_tree", "writer_changes")
    if any(ver.get(k) != ver0.get(k) for k in same):
        print(f"WARNING: the writer changed during the run (at start: {ver0.get('commit')}, "
              f"uncommitted {ver0.get('writer_changes')}); rows may mix versions")
    print(f"({time.time() - t0:.0f} s; work dir {a.workdir}; threads="
          f"{a.threads or f'library default ({os.cpu_count()} cores)'}; fastest of "
          f"{a.repeat} runs ({a.repeat_fast} for cp/ELF d0), up to {a.max_runs} while bg > "
          f"{QUIET_CORES} cores)")
    if a.json:
        data = json.dumps(bench.to_json(), indent=2)
        if a.json == "-":
            print(data)
        else:
            with open(a.json, "w") as f:
                f.write(data + "\n")
    return 0 if all(t["pass"] for t in bench.targets) else 1


if __name__ == "__main__":
    sys.exit(main())
