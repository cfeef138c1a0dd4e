"""The bench's inputs: the synthetic image, and the dense and mixed copies of a guest ELF whose
zero pages are filled with file-like, random and kernel-like content (bench/README.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import struct
from collections.abc import Callable, Iterator

from writer_elf import read_elf_core
from writer_runs import PAGE, log, unlink

SYNTH_MIX = (0.45, 0.40, 0.15)  # zero, file-like, random
FILE_PAGES_PER_FILE = 256  # at most 1 MiB from any one /usr file, for variety

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
    rng = random.Random(seed)
    files = usr_pages(random.Random(seed + 1))
    p_file = SYNTH_MIX[1] / (SYNTH_MIX[1] + SYNTH_MIX[2])

    def fill() -> tuple[str, bytes]:
        if rng.random() < p_file:
            return "filled_file", next(files)
        return "filled_random", rng.randbytes(PAGE)

    counts = {"pages": 0, "zero_before": 0, "filled_file": 0, "filled_random": 0}
    _fill_zero_pages(src, dst, fill, counts)
    with open(meta_path, "w") as f:
        json.dump({"seed": seed, "src_size": os.path.getsize(src), "counts": counts}, f)
    return counts


def _fill_zero_pages(src: str, dst: str, fill: Callable[[], tuple[str, bytes]],
                     counts: dict[str, int]) -> None:
    """Copy the ELF vmcore ``src`` to ``dst`` with every all-zero page of its PT_LOADs
    replaced by ``fill()``'s bytes, counting pages, zero pages and each kind ``fill`` names."""
    unlink(dst)
    tmp = dst + ".tmp"
    shutil.copyfile(src, tmp)
    core = read_elf_core(src)
    zero = bytes(PAGE)
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
                    kind, body = fill()
                    data[i : i + PAGE] = body
                    counts[kind] = counts.get(kind, 0) + 1
                    changed = True
                if changed:
                    os.pwrite(f.fileno(), data, off + done)
                done += n
        os.fsync(f.fileno())
    os.rename(tmp, dst)


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
    maker = MixedPages(seed + 1000)
    counts: dict[str, int] = {"pages": 0, "zero_before": 0}
    _fill_zero_pages(src, dst, maker.page, counts)
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
