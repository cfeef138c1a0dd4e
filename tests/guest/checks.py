"""Read a guest dump back through readers we did not write, and say what they found.

Every check answers from an independent reader (drgn, libkdumpfile, crash, makedumpfile); the
guest's own report (release, pattern PFNs, marker) is the expected value. ``check_dump`` runs
all that apply to one file and returns a list of failures (empty = all good), so one test shows
every reader's verdict at once.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .rig import GuestReport, GuestSpec

DEBIAN_DIST_PACKAGES = "/usr/lib/python3/dist-packages"
if os.path.isdir(DEBIAN_DIST_PACKAGES) and DEBIAN_DIST_PACKAGES not in sys.path:
    sys.path.append(DEBIAN_DIST_PACKAGES)

UTS_FIELD = 65  # struct new_utsname: six char[__NEW_UTS_LEN + 1] (include/uapi/linux/utsname.h)
UTS_RELEASE = 2

Read = Callable[[int, int], bytes]


@dataclass
class Expect:
    spec: GuestSpec
    report: GuestReport
    page_size: int = 4096

    @property
    def marker(self) -> str:
        return self.spec.marker


def parse_vmcoreinfo(text: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.decode("ascii", "replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out.setdefault(key, value)
    return out


# --- kernel structures through VMCOREINFO only -------------------------------------------------

def uts_release(vmci: dict[str, str], read: Read) -> str:
    """init_uts_ns.name.release at its kernel virtual address (SYMBOL + OFFSET from VMCOREINFO)."""
    base = int(vmci["SYMBOL(init_uts_ns)"], 16) + int(vmci["OFFSET(uts_namespace.name)"])
    raw = read(base + UTS_RELEASE * UTS_FIELD, UTS_FIELD)
    return raw.split(b"\0", 1)[0].decode()


def printk_texts(vmci: dict[str, str], read: Read) -> Iterator[str]:
    """Texts of the records in the >= 5.10 lockless printk ring, oldest first.

    Layout from kernel/printk/printk_ringbuffer.h, every size and offset from VMCOREINFO
    (kernel/printk/printk.c log_buf_vmcoreinfo_setup): a descriptor ring of ``1 << count_bits``
    ``prb_desc`` (state_var: 2 state bits on top of the id; text_blk_lpos begin/next) with
    parallel ``printk_info`` (text_len), and a text ring of ``1 << size_bits`` bytes holding
    blocks ``{unsigned long id; char text[]}``. A block whose begin and next lie in different
    wraps of the ring was placed at its start. Odd lpos values mark records without data.
    """
    def num(key: str) -> int:
        return int(vmci[key])

    def u64(addr: int) -> int:
        value: int = struct.unpack("<Q", read(addr, 8))[0]
        return value

    def u32(addr: int) -> int:
        value: int = struct.unpack("<I", read(addr, 4))[0]
        return value

    counter = num("OFFSET(atomic_long_t.counter)")
    prb = u64(int(vmci["SYMBOL(prb)"], 16))  # SYMBOL(prb) is the pointer variable `prb`
    descs_ring = prb + num("OFFSET(printk_ringbuffer.desc_ring)")
    text_ring = prb + num("OFFSET(printk_ringbuffer.text_data_ring)")
    count_bits = u32(descs_ring + num("OFFSET(prb_desc_ring.count_bits)"))
    descs = u64(descs_ring + num("OFFSET(prb_desc_ring.descs)"))
    infos = u64(descs_ring + num("OFFSET(prb_desc_ring.infos)"))
    head = u64(descs_ring + num("OFFSET(prb_desc_ring.head_id)") + counter)
    tail = u64(descs_ring + num("OFFSET(prb_desc_ring.tail_id)") + counter)
    size_bits = u32(text_ring + num("OFFSET(prb_data_ring.size_bits)"))
    data = u64(text_ring + num("OFFSET(prb_data_ring.data)"))

    id_bits = 62  # DESC_FLAGS_SHIFT = BITS_PER_LONG - 2
    id_mask = (1 << id_bits) - 1
    committed, finalized = 1, 2  # enum desc_state
    desc_size, info_size = num("SIZE(prb_desc)"), num("SIZE(printk_info)")
    ring_size = 1 << size_bits
    lpos = num("OFFSET(prb_desc.text_blk_lpos)")
    begin_off, next_off = num("OFFSET(prb_data_blk_lpos.begin)"), num(
        "OFFSET(prb_data_blk_lpos.next)")
    len_off = num("OFFSET(printk_info.text_len)")

    ident = tail
    for _ in range(1 << count_bits):
        index = ident & ((1 << count_bits) - 1)
        desc = descs + index * desc_size
        state_var = u64(desc + num("OFFSET(prb_desc.state_var)") + counter)
        if state_var & id_mask == ident and state_var >> id_bits in (committed, finalized):
            begin = u64(desc + lpos + begin_off)
            nxt = u64(desc + lpos + next_off)
            text_len = struct.unpack("<H", read(infos + index * info_size + len_off, 2))[0]
            if not (begin & 1 or nxt & 1) and text_len:
                # a block that wrapped was written at the start of the ring
                start = begin % ring_size if begin >> size_bits == nxt >> size_bits else 0
                text_len = min(text_len, ring_size - start - 8)
                yield read(data + start + 8, text_len).decode("utf-8", "replace")
        if ident == head:
            break
        ident = (ident + 1) & id_mask


# --- readers ----------------------------------------------------------------------------------

@dataclass
class Verdict:
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def check(self, ok: bool, what: str) -> None:
        (self.notes if ok else self.failures).append(what)

    def run(self, what: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as err:
            self.failures.append(f"{what}: {type(err).__name__}: {str(err)[:300]}")


def _kernel_checks(v: Verdict, who: str, vmci_text: bytes, read_phys: Read, read_virt: Read,
                   exp: Expect) -> None:
    vmci = parse_vmcoreinfo(vmci_text)
    v.check(vmci.get("OSRELEASE") == exp.report.release,
            f"{who}: VMCOREINFO OSRELEASE={vmci.get('OSRELEASE')!r}")
    kinds = []
    for pfn in exp.report.anon_pfns:
        kinds.append(exp.spec.page_kind(read_phys(pfn * exp.page_size, exp.page_size)))
    good = kinds.count("anon")
    v.check(bool(kinds) and good == len(kinds),
            f"{who}: {good}/{len(kinds)} reported pattern pages hold the pattern")
    release = uts_release(vmci, read_virt)
    v.check(release == exp.report.release, f"{who}: init_uts_ns release via KVADDR={release!r}")
    texts = list(printk_texts(vmci, read_virt))
    hit = any(exp.marker in t for t in texts)
    v.check(hit, f"{who}: marker in printk ring ({len(texts)} records)")


def check_drgn(v: Verdict, path: Path, exp: Expect) -> None:
    import drgn

    prog = drgn.Program()
    prog.set_core_dump(str(path))
    v.check(bool(prog.flags & drgn.ProgramFlags.IS_LINUX_KERNEL), "drgn: IS_LINUX_KERNEL")
    vmci = prog["VMCOREINFO"].to_bytes_().rstrip(b"\0")
    _kernel_checks(v, "drgn", vmci, lambda a, n: prog.read(a, n, True),
                   lambda a, n: prog.read(a, n), exp)


def check_libkdumpfile(v: Verdict, path: Path, exp: Expect) -> None:
    import kdumpfile

    ctx = kdumpfile.kdumpfile(str(path))
    ctx.attr["addrxlat.ostype"] = "linux"
    vmci = bytes(ctx.attr["linux.vmcoreinfo.raw"])
    v.check(str(ctx.attr["arch.name"]) == "x86_64", f"libkdumpfile: arch {ctx.attr['arch.name']}")
    _kernel_checks(v, "libkdumpfile", vmci,
                   lambda a, n: bytes(ctx.read(kdumpfile.KDUMP_KPHYSADDR, a, n)),
                   lambda a, n: bytes(ctx.read(kdumpfile.KDUMP_KVADDR, a, n)), exp)


def _spawn(cmd: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL)


def _finish(proc: subprocess.Popen[str], timeout: float = 300) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        return -9, out
    return proc.returncode, out


def makedumpfile_codecs() -> set[str]:
    """Codecs this makedumpfile was built with (``makedumpfile -v``); zlib always."""
    out = subprocess.run(["makedumpfile", "-v"], capture_output=True, text=True).stdout
    have = {"zlib", "none"}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1] == "enabled":
            have.add(parts[0])
    return have


def check_dump(path: Path, exp: Expect, *, fmt: str, codec: str, workdir: Path) -> Verdict:
    """Every reader on one of our outputs. fmt: elf | kdump | kdump-flat."""
    v = Verdict()
    jobs: dict[str, subprocess.Popen[str]] = {}
    # External tools run in the background while the Python readers work.
    jobs["crash"] = _spawn(["crash", "--osrelease", str(path)])
    reassembled = workdir / (path.name + ".reassembled")
    dmesg = workdir / (path.name + ".dmesg")
    refiltered = workdir / (path.name + ".d31")
    for f in (reassembled, dmesg, refiltered):
        f.unlink(missing_ok=True)
    lkf_path = path
    if fmt == "kdump-flat":
        # libkdumpfile 0.5.1 cannot read the flattened layout; makedumpfile -R rebuilds the
        # normal file (and proves makedumpfile reads our stream).
        with open(path, "rb") as src:
            proc = subprocess.run(["makedumpfile", "-R", str(reassembled)], stdin=src,
                                  capture_output=True, text=True, timeout=300)
        v.check(proc.returncode == 0 and reassembled.exists(),
                f"makedumpfile -R: rc={proc.returncode} {proc.stdout[-200:]}")
        lkf_path = reassembled
    mdf_ok = codec in makedumpfile_codecs() or fmt == "elf"
    if mdf_ok and lkf_path.exists():
        jobs["dmesg"] = _spawn(["makedumpfile", "--dump-dmesg", str(lkf_path), str(dmesg)])
    if fmt == "elf":
        jobs["refilter"] = _spawn(["makedumpfile", "-c", "-d", "31", str(path), str(refiltered)])

    v.run("drgn", lambda: check_drgn(v, path, exp))
    if lkf_path.exists():
        v.run("libkdumpfile", lambda: check_libkdumpfile(v, lkf_path, exp))

    rc, out = _finish(jobs["crash"])
    lines = out.strip().splitlines()
    v.check(rc == 0 and bool(lines) and lines[-1] == exp.report.release,
            f"crash --osrelease: rc={rc} {out.strip()[-200:]!r}")
    if "dmesg" in jobs:
        rc, out = _finish(jobs["dmesg"])
        text = dmesg.read_text(errors="replace") if dmesg.exists() else ""
        v.check(rc == 0 and exp.marker in text,
                f"makedumpfile --dump-dmesg: rc={rc} marker={exp.marker in text} "
                f"{out.strip()[-200:]!r}")
    else:
        v.notes.append(f"makedumpfile --dump-dmesg skipped: makedumpfile has no {codec}")
    if "refilter" in jobs:
        rc, out = _finish(jobs["refilter"])
        size = refiltered.stat().st_size if refiltered.exists() else 0
        v.check(rc == 0 and 0 < size < path.stat().st_size,
                f"makedumpfile -c -d 31: rc={rc} size={size} {out.strip()[-200:]!r}")
        if rc == 0 and size:
            # the re-filtered file must still be this kernel's dump
            proc = subprocess.run(["crash", "--osrelease", str(refiltered)], capture_output=True,
                                  text=True, timeout=120)
            v.check(proc.stdout.strip().endswith(exp.report.release),
                    f"crash --osrelease on makedumpfile's output: {proc.stdout.strip()!r}")
    for f in (reassembled, dmesg, refiltered):
        f.unlink(missing_ok=True)
    return v


def scan_pattern_pages(path: Path, exp: Expect, ranges: list[tuple[int, int]]) -> dict[str, int]:
    """Count pattern pages by reading every page of ``ranges`` through drgn, 2 MiB at a time."""
    import drgn

    prog = drgn.Program()
    prog.set_core_dump(str(path))
    counts = {"file": 0, "anon": 0, "pages": 0}
    ps = exp.page_size
    chunk = 2 << 20
    for start, end in ranges:
        for base in range(start, end, chunk):
            n = min(chunk, end - base)
            try:
                blob = prog.read(base, n, True)
            except drgn.FaultError:
                continue
            for off in range(0, n - ps + 1, ps):
                counts["pages"] += 1
                kind = exp.spec.page_kind(blob[off:off + ps])
                if kind:
                    counts[kind] += 1
    return counts


def have_tools(*names: str) -> list[str]:
    return [n for n in names if shutil.which(n) is None]


# --- what every collector is tried with --------------------------------------------------------

# (output format, codec): ELF, kdump-compressed with every codec we write, and the flattened form.
OUTPUTS = [("elf", "none"), ("kdump", "none"), ("kdump", "zlib"), ("kdump", "lzo"),
           ("kdump", "snappy"), ("kdump", "zstd"), ("kdump-flat", "zlib")]
OUTPUT_IDS = [f"{f}-{c}" if f != "elf" else "elf" for f, c in OUTPUTS]


def assert_readers_agree(path: Path, exp: Expect, fmt: str, codec: str, workdir: Path) -> Verdict:
    verdict = check_dump(path, exp, fmt=fmt, codec=codec, workdir=workdir)
    assert not verdict.failures, "readers disagree with the guest:\n  " + "\n  ".join(
        verdict.failures) + "\npassed:\n  " + "\n  ".join(verdict.notes)
    return verdict
