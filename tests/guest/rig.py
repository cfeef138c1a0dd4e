"""A real Linux guest for the collector tests: kernel cache, initramfs, QEMU and libvirt.

Everything here is plain Python driving the host's tools:

* ``prepare_kernel``: a Debian kernel (vmlinuz, config, qemu_fw_cfg.ko) fetched with
  ``apt-get download`` and unpacked with ``dpkg-deb``, never installed (``/boot`` is untouched),
  cached in ``$KDUMPLING_TEST_CACHE`` (default ``/var/cache/kdumpling-tests``).
* ``build_initramfs``: a busybox initramfs whose /init loads qemu_fw_cfg (so the guest hands its
  VMCOREINFO to QEMU's ``-device vmcoreinfo``), fills pages with known 64-byte patterns, reports
  the physical frame numbers of some of them (from /proc/PID/pagemap) and the ``address size`` of
  /sys/kernel/vmcoreinfo on the console, writes a marker to /dev/kmsg and sleeps.
* ``QemuGuest``: boots that under TCG with a QMP socket and, optionally, its RAM in a shared
  memory-backend-file (the raw-image collector reads it).
* ``LibvirtDaemons`` / ``LibvirtGuest``: virtlogd + libvirtd started by hand (no systemd on the
  test machines) and a transient domain booting the same kernel.

Processes are only ever stopped by the PID we started them with.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# 63 characters + "\n": every 4 KiB page holds 64 whole records, so a page full of a pattern
# contains at least 60 copies of any 32-byte slice of it, whatever its phase.
PATTERN_LEN = 64
FILE_PATTERN_STEM = "KDT-FILEPAT-tmpfs-page-cache"
ANON_PATTERN_STEM = "KDT-ANONPAT-shell-anon-heap"
FILE_MB = 16
ANON_MB = 4
# x86_64 kernel text map (arch/x86/include/asm/page_64_types.h __START_KERNEL_map)
START_KERNEL_MAP = 0xFFFFFFFF80000000


def cache_dir() -> Path:
    path = Path(os.environ.get("KDUMPLING_TEST_CACHE", "/var/cache/kdumpling-tests"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive flock, so parallel test sessions do not fill the cache twice."""
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run(cmd: list[str], *, cwd: Path | None = None, timeout: float = 600) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RigError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    return proc.stdout


class RigError(RuntimeError):
    """The rig could not be set up (the fixture turns it into a skip or an error)."""


# --- kernel ------------------------------------------------------------------------------------

@dataclass
class KernelFiles:
    version: str  # e.g. 6.1.0-56-amd64
    root: Path
    vmlinuz: Path
    config: Path
    modules: list[Path]  # in load order (dependencies first)

    @property
    def debug_vmlinux(self) -> Path:
        return self.root / "debug" / "vmlinux"


def kernel_package() -> str:
    """The concrete linux-image-X-amd64 package Debian's meta package points at."""
    override = os.environ.get("KDUMPLING_TEST_KERNEL_PKG")
    if override:
        return override
    out = _run(["apt-cache", "depends", "linux-image-amd64"])
    m = re.search(r"Depends: (linux-image-\d\S*)", out)
    if not m:
        raise RigError("apt-cache cannot resolve linux-image-amd64 (run apt-get update)")
    return m.group(1)


def _modinfo_depends(ko: bytes) -> list[str]:
    # .modinfo is a run of NUL-terminated "key=value" strings (include/linux/moduleparam.h).
    m = re.search(rb"(?:^|\0)depends=([^\0]*)\0", ko)
    return [d for d in m.group(1).decode().split(",") if d] if m else []


def prepare_kernel(cache: Path | None = None) -> KernelFiles:
    """vmlinuz, config and qemu_fw_cfg.ko (+ dependencies) of the Debian kernel, cached."""
    cache = cache or cache_dir()
    with _locked(cache / ".kernel.lock"):
        try:
            pkg = kernel_package()
        except (RigError, OSError) as err:
            cached = sorted(cache.glob("kernel-*/READY"))
            if not cached:
                raise RigError(f"no kernel: {err}") from err
            pkg = "linux-image-" + cached[-1].parent.name.removeprefix("kernel-")
        version = pkg.removeprefix("linux-image-")
        root = cache / f"kernel-{version}"
        if not (root / "READY").exists():
            _fetch_kernel(pkg, version, root)
        order = (root / "modules" / "load-order").read_text().split()
        return KernelFiles(version, root, root / "vmlinuz", root / "config",
                           [root / "modules" / name for name in order])


def _fetch_kernel(pkg: str, version: str, root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
    debs = root.parent / "debs"
    debs.mkdir(exist_ok=True)
    for old in debs.glob(f"{pkg}_*.deb"):
        old.unlink()
    _run(["apt-get", "download", pkg], cwd=debs)
    (deb,) = debs.glob(f"{pkg}_*.deb")
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "modules").mkdir(parents=True)
    # dpkg-deb --fsys-tarfile gives the data archive; pick out only what the guest needs.
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as p:
        assert p.stdout is not None
        modules: dict[str, bytes] = {}
        with tarfile.open(fileobj=p.stdout, mode="r|") as tar:
            for member in tar:
                name = member.name
                base = os.path.basename(name)
                if not member.isfile():
                    continue
                target: Path | None = None
                if name.endswith(f"boot/vmlinuz-{version}"):
                    target = tmp / "vmlinuz"
                elif name.endswith(f"boot/config-{version}"):
                    target = tmp / "config"
                elif "/kernel/drivers/firmware/" in name and base.startswith("qemu_fw_cfg.ko"):
                    target = tmp / "modules" / base
                elif base.endswith((".ko", ".ko.xz", ".ko.zst")) and "/kernel/" in name:
                    continue  # the guest needs only qemu_fw_cfg and what it depends on
                if target is not None:
                    data = tar.extractfile(member)
                    assert data is not None
                    blob = data.read()
                    target.write_bytes(blob)
                    if target.parent.name == "modules":
                        modules[base] = blob
    if p.returncode:
        raise RigError(f"dpkg-deb failed on {deb}")
    if not (tmp / "vmlinuz").exists():
        raise RigError(f"{deb} has no vmlinuz-{version}")
    config = (tmp / "config").read_text()
    order: list[str] = []
    if "CONFIG_FW_CFG_SYSFS=m" in config:
        ko = next((n for n in modules if n.startswith("qemu_fw_cfg.ko")), None)
        if ko is None or not ko.endswith(".ko"):
            raise RigError(f"qemu_fw_cfg module missing or compressed in {deb}: {ko}")
        deps = _modinfo_depends(modules[ko])
        if deps:
            raise RigError(f"qemu_fw_cfg depends on {deps}; the rig does not resolve those")
        order.append(ko)
    elif "CONFIG_FW_CFG_SYSFS=y" not in config:
        raise RigError("this kernel has no qemu_fw_cfg driver: guests cannot publish VMCOREINFO")
    (tmp / "modules" / "load-order").write_text("".join(o + "\n" for o in order))
    (tmp / "VERSION").write_text(version + "\n")
    tmp.rename(root)
    (root / "READY").write_text(f"{pkg} from {deb.name}\n")
    deb.unlink()


def prepare_debuginfo(kernel: KernelFiles) -> Path:
    """vmlinux with DWARF from the -dbg package (an 858 MB download), cached."""
    target = kernel.debug_vmlinux
    with _locked(kernel.root.parent / ".debug.lock"):
        if target.exists():
            return target
        debs = kernel.root.parent / "debs"
        debs.mkdir(exist_ok=True)
        pkg = f"linux-image-{kernel.version}-dbg"
        _run(["apt-get", "download", pkg], cwd=debs, timeout=3600)
        (deb,) = debs.glob(f"{pkg}_*.deb")
        target.parent.mkdir(exist_ok=True)
        tmp = target.with_name("vmlinux.tmp")
        # stop reading once vmlinux is out: dpkg-deb then dies of EPIPE (stderr silenced)
        with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as p:
            assert p.stdout is not None
            with tarfile.open(fileobj=p.stdout, mode="r|") as tar:
                for member in tar:
                    if member.isfile() and member.name.endswith(f"/vmlinux-{kernel.version}"):
                        src = tar.extractfile(member)
                        assert src is not None
                        with open(tmp, "wb") as out:
                            shutil.copyfileobj(src, out, 1 << 20)
                        break
                else:
                    raise RigError(f"{deb} has no vmlinux-{kernel.version}")
        tmp.rename(target)
        deb.unlink()
        return target


# --- initramfs ---------------------------------------------------------------------------------

@dataclass
class GuestSpec:
    """What the guest's /init does, so tests know what to look for."""

    nonce: str
    marker: str
    file_pattern: bytes  # one 64-byte record, newline included
    anon_pattern: bytes

    def page_kind(self, page: bytes) -> str | None:
        if page.count(self.file_pattern[:32]) >= 60:
            return "file"
        if page.count(self.anon_pattern[:32]) >= 60:
            return "anon"
        return None


def new_spec(nonce: str | None = None) -> GuestSpec:
    """Patterns and marker with a random nonce, or a fixed one (a guest whose boot must repeat
    exactly: the initramfs bytes go into the kernel's KASLR seed)."""
    nonce = nonce or secrets.token_hex(8)

    def pattern(stem: str) -> bytes:
        text = f"{stem}-{nonce}-"
        return (text + "x" * (PATTERN_LEN - 1 - len(text)) + "\n").encode()

    return GuestSpec(nonce, f"KDUMPLING-TEST-MARKER-{nonce}",
                     pattern(FILE_PATTERN_STEM), pattern(ANON_PATTERN_STEM))


def _init_script(spec: GuestSpec) -> str:
    fpat = spec.file_pattern.decode().rstrip("\n")
    apat = spec.anon_pattern.decode().rstrip("\n")
    # busybox ash: 64-bit arithmetic, so pagemap entries (bit 63 = present, bits 0-54 = PFN,
    # Documentation/admin-guide/mm/pagemap.rst) are negative when the page is present.
    return f"""#!/bin/busybox sh
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
say() {{ echo "kdt: $*" > /dev/kmsg; }}
say "init start, release $(uname -r)"
for m in $(cat /lib/modules/load-order); do
    if insmod /lib/modules/$m; then say "insmod $m ok"; else say "insmod $m FAILED"; fi
done
if [ -e /sys/firmware/qemu_fw_cfg/by_name/etc/vmcoreinfo/raw ]; then
    say "fw_cfg vmcoreinfo present"
else
    say "fw_cfg vmcoreinfo ABSENT"
fi
echo 0 > /proc/sys/vm/compaction_proactiveness 2>/dev/null
mount -t tmpfs -o size=64m tmpfs /pattern
yes '{fpat}' | head -c {FILE_MB << 20} > /pattern/blob
sh -c 'v=$(yes "{apat}" | head -c {ANON_MB << 20}); echo $$ > /run/anon.pid; \
while :; do sleep 3600; done' &
while [ ! -s /run/anon.pid ]; do sleep 0.1; done
pid=$(cat /run/anon.pid)
pfns=""
n=0
i=0
while read -r range perms off dev inode name; do
    [ "$perms" = rw-p ] && [ "$inode" = 0 ] && [ -z "$name" ] || continue
    s=$((0x${{range%-*}})); e=$((0x${{range#*-}}))
    [ $((e - s)) -ge {ANON_MB << 20} ] || continue
    # skip the first and last page of the mapping: allocator headers, partial records
    first=$((s / 4096 + 1)); count=$(((e - s) / 4096 - 2))
    for w in $(dd if=/proc/$pid/pagemap bs=8 skip=$first count=$count 2>/dev/null \
               | od -An -v -tx8); do
        ent=$((0x$w))
        if [ $ent -lt 0 ] && [ $((i % 16)) -eq 0 ] && [ $n -lt 48 ]; then
            pfns="$pfns $(printf %x $((ent & 0x7fffffffffffff)))"
            n=$((n + 1))
        fi
        i=$((i + 1))
    done
    break
done < /proc/$pid/maps
say "anon-pfns$pfns"
say "vmcoreinfo $(cat /sys/kernel/vmcoreinfo)"
say "kernel-code $(grep 'Kernel code' /proc/iomem | tr -d ' ')"
say "text-symbol $(grep ' _text$' /proc/kallsyms)"
say "mem $(grep -E 'MemTotal|MemFree' /proc/meminfo | tr -s ' ' | tr '\\n' ' ')"
echo "{spec.marker} release=$(uname -r) uptime=$(cut -d' ' -f1 /proc/uptime)" > /dev/kmsg
while :; do sleep 3600; done
"""


def _cpio_newc(entries: list[tuple[str, int, bytes, tuple[int, int]]]) -> bytes:
    """SVR4 "newc" cpio (Documentation/driver-api/early-userspace/buffer-format.rst).

    entries: (name, mode, data, (rdev major, minor)).
    """
    out = io.BytesIO()

    def put(ino: int, name: str, mode: int, data: bytes, rdev: tuple[int, int]) -> None:
        raw = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(raw), 0]
        out.write(b"070701" + b"".join(b"%08X" % v for v in fields))
        out.write(raw)
        out.write(b"\0" * (-(110 + len(raw)) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))

    for ino, (name, mode, data, rdev) in enumerate(entries, start=1):
        put(ino, name, mode, data, rdev)
    put(0, "TRAILER!!!", 0, b"", (0, 0))
    return out.getvalue()


def find_busybox() -> Path:
    for cand in ("/bin/busybox", "/usr/bin/busybox"):
        path = Path(cand)
        if path.exists():
            head = path.read_bytes()[:4096]
            # a static binary has no PT_INTERP, so no dynamic loader path near the start
            if b"ld-linux" not in head:
                return path
    raise RigError("need a statically linked busybox (apt-get install busybox-static)")


def build_initramfs(kernel: KernelFiles, target: Path, spec: GuestSpec) -> Path:
    dirs = ["bin", "sbin", "usr", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "run",
            "pattern", "lib", "lib/modules"]
    entries: list[tuple[str, int, bytes, tuple[int, int]]] = [
        (d, stat.S_IFDIR | 0o755, b"", (0, 0)) for d in dirs
    ]
    entries.append(("dev/console", stat.S_IFCHR | 0o600, b"", (5, 1)))
    entries.append(("bin/busybox", stat.S_IFREG | 0o755, find_busybox().read_bytes(), (0, 0)))
    names = []
    for ko in kernel.modules:
        entries.append((f"lib/modules/{ko.name}", stat.S_IFREG | 0o644, ko.read_bytes(), (0, 0)))
        names.append(ko.name)
    order = "".join(n + "\n" for n in names).encode()
    entries.append(("lib/modules/load-order", stat.S_IFREG | 0o644, order, (0, 0)))
    entries.append(("init", stat.S_IFREG | 0o755, _init_script(spec).encode(), (0, 0)))
    # mtime 0: the same spec gives the same bytes (a deterministic guest boots from them)
    target.write_bytes(gzip.compress(_cpio_newc(entries), 6, mtime=0))
    target.chmod(0o644)
    return target


# --- what the guest reported -------------------------------------------------------------------

@dataclass
class GuestReport:
    release: str
    vmcoreinfo_addr: int
    vmcoreinfo_size: int
    anon_pfns: list[int]
    fw_cfg_vmcoreinfo: bool
    lines: list[str] = field(default_factory=list)
    # where KASLR put the kernel: physical _text ("Kernel code" in /proc/iomem) minus its
    # offset in the kernel text map (arch/x86/include/asm/page_64.h __phys_addr_symbol)
    phys_base: int | None = None


def parse_report(serial: str, spec: GuestSpec) -> GuestReport:
    lines = [ln.split("] ", 1)[-1].strip() for ln in serial.splitlines() if "kdt: " in ln
             or spec.marker in ln]
    text = "\n".join(lines)
    rel = re.search(rf"{spec.marker} release=(\S+)", text)
    vmci = re.search(r"kdt: vmcoreinfo (?:0x)?([0-9a-f]+) ([0-9a-f]+)", text)
    pfns = re.search(r"kdt: anon-pfns(( [0-9a-f]+)*)", text)
    if not (rel and vmci and pfns):
        raise RigError("guest report incomplete:\n" + text)
    code = re.search(r"kdt: kernel-code ([0-9a-f]+)-", text)
    sym = re.search(r"kdt: text-symbol ([0-9a-f]+) ", text)
    phys_base = int(code.group(1), 16) - (int(sym.group(1), 16) - START_KERNEL_MAP) \
        if code and sym and int(sym.group(1), 16) else None
    return GuestReport(
        release=rel.group(1),
        vmcoreinfo_addr=int(vmci.group(1), 16),
        vmcoreinfo_size=int(vmci.group(2), 16),
        anon_pfns=[int(p, 16) for p in pfns.group(1).split()],
        fw_cfg_vmcoreinfo="fw_cfg vmcoreinfo present" in text,
        lines=lines,
        phys_base=phys_base,
    )


def wait_for_marker(log: Path, spec: GuestSpec, alive: object, timeout: float) -> str:
    """Serial-log text once the marker line is complete; ``alive()`` False aborts."""
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text(errors="replace") if log.exists() else ""
        if re.search(rf"{spec.marker} release=\S+ uptime=[0-9.]+\s", text):
            return text
        if callable(alive) and not alive():
            raise RigError(f"guest exited before the marker:\n{text[-3000:]}")
        if time.monotonic() > deadline:
            raise RigError(f"no marker after {timeout:.0f} s:\n{text[-3000:]}")
        time.sleep(0.2)


# --- QEMU --------------------------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class QemuGuest:
    """One QEMU process we start and stop ourselves (TCG by default; KVM via env)."""

    def __init__(self, kernel: KernelFiles, initramfs: Path, workdir: Path, spec: GuestSpec,
                 *, mem_mb: int = 512, smp: int = 2, ram_file: Path | None = None,
                 vmcoreinfo_device: bool = True, replay_seed: int | None = None) -> None:
        self.kernel, self.initramfs, self.workdir, self.spec = kernel, initramfs, workdir, spec
        self.mem_mb, self.smp, self.ram_file = mem_mb, smp, ram_file
        # A boot that repeats itself: see replay_options()
        self.replay_seed = replay_seed
        self.vmcoreinfo_device = vmcoreinfo_device
        self.qmp_path = workdir / "qmp.sock"
        self.serial_log = workdir / "serial.log"
        self.name = f"kdt-{spec.nonce}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.report: GuestReport | None = None
        self.boot_seconds = 0.0

    def command(self) -> list[str]:
        accel = os.environ.get("KDUMPLING_TEST_ACCEL", "tcg")
        if self.replay_seed is not None:
            accel_opts, cpu = replay_options(self.replay_seed), "max,la57=off"
        elif accel == "kvm":
            accel_opts, cpu = ["-accel", "kvm"], "host"
        else:
            # -cpu max without la57: 4-level paging like most real machines
            accel_opts, cpu = ["-accel", "tcg,thread=multi"], "max,la57=off"
        machine = "pc"
        mem: list[str] = ["-m", str(self.mem_mb)]
        if self.ram_file is not None:
            mem += ["-object", f"memory-backend-file,id=ram0,size={self.mem_mb}M,"
                    f"mem-path={self.ram_file},share=on"]
            machine += ",memory-backend=ram0"
        append = "console=ttyS0 panic=-1 transparent_hugepage=never"
        cmd = ["qemu-system-x86_64", "-name", self.name, "-machine", machine, *accel_opts,
               "-cpu", cpu, "-smp", str(self.smp), *mem,
               "-kernel", str(self.kernel.vmlinuz), "-initrd", str(self.initramfs),
               "-append", append, "-display", "none", "-monitor", "none",
               "-serial", f"file:{self.serial_log}",
               "-qmp", f"unix:{self.qmp_path},server=on,wait=off", "-no-reboot",
               "-nodefaults"]
        if self.vmcoreinfo_device:
            cmd += ["-device", "vmcoreinfo"]
        return cmd

    def start(self, timeout: float = 300) -> GuestReport:
        self.workdir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        with open(self.workdir / "qemu.log", "wb") as log:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)
        proc = self.proc
        text = wait_for_marker(self.serial_log, self.spec, lambda: proc.poll() is None, timeout)
        self.boot_seconds = time.monotonic() - t0
        self.report = parse_report(text, self.spec)
        return self.report

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
        finally:
            if self.ram_file is not None:  # QEMU creates it but never removes it
                with contextlib.suppress(FileNotFoundError):
                    self.ram_file.unlink()


# --- a guest whose KASLR always gives the same (negative) phys_base -----------------------------

def replay_options(seed: int) -> list[str]:
    """QEMU options under which the same kernel and initramfs boot to the same KASLR layout.

    x86 KASLR mixes a hash of boot_params and the build string (so the initramfs size and
    the command line) with RDRAND, RDTSC and the i8254 (arch/x86/lib/kaslr.c
    kaslr_get_random_long). Under TCG, ``-icount`` makes RDTSC and the timers count executed
    instructions (``sleep=off``: idle time does not follow the host's clock) and ``-seed``
    makes RDRAND a seeded generator (QEMU qemu-options.hx). icount needs a single TCG thread.
    Measured here: the same seed gave the same phys_base on every boot, another seed another.
    """
    return ["-accel", "tcg,thread=single", "-icount", "shift=0,sleep=off", "-seed", str(seed)]


NEGATIVE_PHYS_BASE_SEEDS = range(1, 13)  # P(phys_base >= 0) ~ 0.4 each: 12 misses ~ 2e-5


def boot_negative_phys_base(kernel: KernelFiles, initramfs: Path, workdir: Path,
                            spec: GuestSpec, *, mem_mb: int = 256) -> QemuGuest:
    """A stopped guest whose phys_base is negative (the kernel below its link address), by a
    replay seed found once (bounded search, cached by kernel, initramfs and QEMU) and checked
    on every boot: a seed that stops giving the same layout is an error, never a skip."""
    qemu = _run(["qemu-system-x86_64", "--version"]).splitlines()[0]
    h = hashlib.sha256(f"{qemu}|{mem_mb}|".encode())
    h.update(kernel.vmlinuz.read_bytes())
    h.update(initramfs.read_bytes())
    key = h.hexdigest()[:24]
    seeds_file = cache_dir() / "negative-phys-base-seeds.json"
    with _locked(cache_dir() / ".seeds.lock"):
        known = json.loads(seeds_file.read_text()) if seeds_file.exists() else {}
    cached = known.get(key)
    tried: list[str] = []
    for seed in [cached] if cached is not None else NEGATIVE_PHYS_BASE_SEEDS:
        guest = QemuGuest(kernel, initramfs, workdir / f"seed{seed}", spec, mem_mb=mem_mb, smp=1,
                          replay_seed=seed)
        try:
            report = guest.start()
        except BaseException:
            guest.stop()
            raise
        if report.phys_base is not None and report.phys_base < 0:
            # sleep=off runs an idle guest's clock as fast as the host can: stop the CPU
            # (dump-guest-memory works on a stopped guest)
            qmp_command(guest.qmp_path, "stop")
            if cached is None:
                with _locked(cache_dir() / ".seeds.lock"):
                    known = json.loads(seeds_file.read_text()) if seeds_file.exists() else {}
                    known[key] = seed
                    seeds_file.write_text(json.dumps(known, indent=1) + "\n")
            return guest
        guest.stop()
        tried.append(f"seed {seed}: {report.phys_base}")
        if cached is not None:
            raise RigError(f"replay seed {seed} (cached in {seeds_file}) gave phys_base "
                           f"{report.phys_base} this time: the boot did not repeat itself")
    raise RigError("no seed gave a negative phys_base: " + ", ".join(tried))


# --- libvirt -----------------------------------------------------------------------------------

def libvirt_reachable(uri: str = "qemu:///system") -> bool:
    try:
        import libvirt
    except ImportError:
        return False
    libvirt.registerErrorHandler(lambda *_: None, None)
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError:
        return False
    conn.close()
    return True


class LibvirtDaemons:
    """virtlogd + libvirtd started by hand with pidfiles in ``workdir`` (no systemd here).

    If a libvirtd already answers on qemu:///system it is used and left alone.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: dict[str, int] = {}

    def start(self, timeout: float = 120) -> None:
        if libvirt_reachable():
            return
        for tool in ("virtlogd", "libvirtd"):
            if shutil.which(tool) is None:
                raise RigError(f"{tool} is not installed (apt-get install libvirt-daemon-system)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        for daemon in ("virtlogd", "libvirtd"):
            pidfile = self.workdir / f"{daemon}.pid"
            _run([daemon, "--daemon", "--pid-file", str(pidfile)], timeout=60)
            for _ in range(100):
                if pidfile.exists() and pidfile.read_text().strip():
                    break
                time.sleep(0.05)
            self.started[daemon] = int(pidfile.read_text())
        deadline = time.monotonic() + timeout
        while not libvirt_reachable():
            if not _pid_alive(self.started["libvirtd"]):
                raise RigError("libvirtd exited during start-up")
            if time.monotonic() > deadline:
                raise RigError("libvirtd did not answer on qemu:///system")
            time.sleep(0.2)

    def stop(self) -> None:
        _kill_domain_qemus()
        for daemon in ("libvirtd", "virtlogd"):
            pid = self.started.pop(daemon, None)
            if pid is None or not _pid_alive(pid):
                continue
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            if comm != daemon:  # the PID was reused: not ours any more
                continue
            os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                if not _pid_alive(pid):
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)


# Domains this session created: their QEMU processes must not outlive the tests, even when
# libvirt could not destroy them (seen once: a QEMU left running after the daemons stopped).
LIBVIRT_DOMAINS: set[str] = set()


def _kill_domain_qemus() -> None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not cmdline or not cmdline[0].endswith(b"qemu-system-x86_64"):
            continue
        args = b" ".join(cmdline).decode("utf-8", "replace")
        if any(f"guest={name}," in args for name in LIBVIRT_DOMAINS):
            with contextlib.suppress(OSError):
                os.kill(int(entry.name), signal.SIGKILL)


DOMAIN_XML = """<domain type='{domtype}'>
  <name>{name}</name>
  <memory unit='MiB'>{mem}</memory>
  <vcpu>2</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 panic=-1 transparent_hugepage=never</cmdline>
  </os>
  <features><acpi/><apic/><vmcoreinfo state='on'/></features>
  {cpu}
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{emulator}</emulator>
    <serial type='file'><source path='{serial}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""


class LibvirtGuest:
    """A transient domain (gone when destroyed) booting the rig kernel and initramfs."""

    def __init__(self, kernel: KernelFiles, initramfs: Path, workdir: Path, spec: GuestSpec,
                 *, mem_mb: int = 512, uri: str = "qemu:///system") -> None:
        self.spec, self.uri, self.mem_mb = spec, uri, mem_mb
        self.name = f"kdt-lv-{spec.nonce}"
        LIBVIRT_DOMAINS.add(self.name)
        # The QEMU process runs as libvirt-qemu: kernel, initrd and serial log must sit in a
        # directory it can traverse.
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        for d in (workdir, *workdir.parents):
            if d == Path("/"):
                break
            if not os.stat(d).st_mode & stat.S_IXOTH:
                d.chmod(os.stat(d).st_mode | 0o055)
        self.kernel = workdir / "vmlinuz"
        self.initrd = workdir / "initramfs.cpio.gz"
        shutil.copyfile(kernel.vmlinuz, self.kernel)
        shutil.copyfile(initramfs, self.initrd)
        self.serial_log = workdir / "serial.log"
        self.serial_log.touch()
        for f in (self.kernel, self.initrd, self.serial_log):
            f.chmod(0o644)
        self.report: GuestReport | None = None
        self.boot_seconds = 0.0

    def xml(self) -> str:
        accel = os.environ.get("KDUMPLING_TEST_ACCEL", "tcg")
        if accel == "kvm":
            domtype, cpu = "kvm", "<cpu mode='host-passthrough'/>"
        else:
            domtype = "qemu"
            cpu = ("<cpu mode='maximum' check='none'>"
                   "<feature policy='disable' name='la57'/></cpu>")
        return DOMAIN_XML.format(domtype=domtype, name=self.name, mem=self.mem_mb,
                                 kernel=self.kernel, initrd=self.initrd, cpu=cpu,
                                 emulator=shutil.which("qemu-system-x86_64"),
                                 serial=self.serial_log)

    def start(self, timeout: float = 300) -> GuestReport:
        import libvirt

        conn = libvirt.open(self.uri)
        try:
            t0 = time.monotonic()
            dom = conn.createXML(self.xml(), 0)

            def alive() -> bool:
                try:
                    return bool(dom.isActive())
                except libvirt.libvirtError:
                    return False

            text = wait_for_marker(self.serial_log, self.spec, alive, timeout)
            self.boot_seconds = time.monotonic() - t0
        finally:
            conn.close()
        self.report = parse_report(text, self.spec)
        return self.report

    def stop(self) -> None:
        import libvirt

        libvirt.registerErrorHandler(lambda *_: None, None)
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError:
            return
        try:
            dom = conn.lookupByName(self.name)
            dom.destroy()
        except libvirt.libvirtError:
            pass
        finally:
            conn.close()


# --- small QMP helper for the tests themselves (stop/cont around raw-image reads) --------------

def qmp_command(path: Path, command: str, arguments: dict[str, object] | None = None) -> object:
    import json

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        f = sock.makefile("rwb")

        def call(cmd: str, args: dict[str, object] | None) -> object:
            msg: dict[str, object] = {"execute": cmd}
            if args:
                msg["arguments"] = args
            f.write(json.dumps(msg).encode() + b"\n")
            f.flush()
            while True:
                reply = json.loads(f.readline())
                if "return" in reply:
                    return reply["return"]
                if "error" in reply:
                    raise RigError(f"QMP {cmd}: {reply['error']}")

        json.loads(f.readline())  # greeting
        call("qmp_capabilities", None)
        return call(command, arguments)
