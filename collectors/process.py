"""Snapshot a live process into an ELF core that gdb and eu-stack open, without killing it.

Sequence (facts measured in the project's process-cores notes):

1. Before stopping anything: parse /proc/PID/smaps (it walks page tables, ~18 ms per GiB of RSS),
   coredump_filter, stat/status, cmdline, auxv, and open /proc/PID/mem and pagemap.
2. Stop every thread: PTRACE_SEIZE (+TRACECLONE so threads born meanwhile are caught) and
   PTRACE_INTERRUPT, waitpid(__WALL) with a deadline, rescanning /proc/PID/task until stable.
3. While stopped: PTRACE_GETREGSET for every regset of the architecture, re-read /proc/PID/maps,
   decide per mapping what the kernel would dump (fs/coredump.c vma_dump_size), build the notes.
4. ``consistent`` mode copies a small process (EAGER_LIMIT) now and detaches; a bigger one
   returns still stopped, the writer reads memory lazily in its own read-ahead thread
   (process_vm_readv; /proc/PID/mem for what that cannot read), and the process is detached as
   soon as the writer closes the memory sources (before its fsync and rename; or in
   ``__exit__``). ``low-pause`` mode copies the live part of the thread stacks now, detaches,
   and lets the writer read the rest while the process runs.

Whatever happens (read errors, the target exiting or exec'ing, SIGINT/SIGTERM), every thread is
detached before the error leaves this module; if this process dies, the kernel detaches them.
"""

from __future__ import annotations

import array
import bisect
import contextlib
import ctypes
import errno
import mmap
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, BinaryIO, Literal, Protocol

from kdumpling.arch import ArchInfo, get_arch
from kdumpling.errors import (
    CaptureInterrupted,
    KdumplingError,
    SourceReadError,
    TargetGoneError,
    UsageError,
)
from kdumpling.image import CoreImage, DumpKind
from kdumpling.notes import (
    CORE_NOTE_NAME,
    LINUX_NOTE_NAME,
    NT_AUXV,
    NT_PRFPREG,
    NT_PRSTATUS,
    NT_X86_XSTATE,
    CpuContext,
    CustomNoteType,
    Note,
    annotations_text,
    file_note,
    prpsinfo_note,
    prstatus_note,
    siginfo_note,
    unpack_registers,
)
from kdumpling.segments import PF_R, PF_W, PF_X, CallableSource, MemorySegment, SegmentSource

from . import _ptrace
from ._procfs import FileInfo, MapEntry, ProcFS, ProcStat, SmapsEntry
from .base import Snapshot, UnreadableRange

if TYPE_CHECKING:
    from kdumpling.dump import WriteResult

Mode = Literal["consistent", "low-pause"]
MODES: tuple[str, ...] = ("consistent", "low-pause")

CHUNK = 1 << 20  # /proc/PID/mem reads: ~1 MiB measured fastest here (bounce-page copies)
DEFAULT_STOP_TIMEOUT = 5.0
# Private anonymous mappings whose smaps shows no pages are re-checked in pagemap while stopped
# (a page may have been touched after smaps was read) up to this size; larger untouched ones
# (address-space reservations) stay undumped, like the kernel's "no anon_vma" case.
RECHECK_LIMIT = 64 << 20
# Consistent mode copies a process whose dump is at most this big while it is stopped and
# resumes it before the writer runs (the file's creation, writes and fsync are then outside the
# pause); bigger ones stay stopped until the writer has read the last byte.
EAGER_LIMIT = 32 << 20
MAX_FILE_NOTE_SIZE = 4 << 20  # fs/binfmt_elf.c MAX_FILE_NOTE_SIZE (older kernels' fixed cap)
# Special mappings the kernel's own coredump cannot read either (VM_IO|VM_PFNMAP, or above
# 2^63): their holes are flagged ``expected`` so callers need not match reason text.
EXPECTED_HOLES = frozenset((b"[vvar]", b"[vvar_vclock]", b"[vsyscall]"))

# --- coredump_filter bits (include/linux/sched/coredump.h MMF_DUMP_*) --------------------------
ANON_PRIVATE = 1 << 0
ANON_SHARED = 1 << 1
MAPPED_PRIVATE = 1 << 2
MAPPED_SHARED = 1 << 3
ELF_HEADERS = 1 << 4
HUGETLB_PRIVATE = 1 << 5
HUGETLB_SHARED = 1 << 6
DAX_PRIVATE = 1 << 7
DAX_SHARED = 1 << 8
FILTER_BITS = 0x1FF
DEFAULT_FILTER = 0x33

# --- per-architecture regsets ------------------------------------------------------------------
# The kernel writes, per thread, one note per regset of the task's user_regset_view that has a
# core note type and is active (fs/binfmt_elf.c fill_thread_core_info). We ask PTRACE_GETREGSET
# for each of these types in the view's order and keep the ones that answer with data.
NT_386_IOPERM = 0x201
NT_X86_SHSTK = 0x204
NT_ARM_TLS = 0x401
NT_ARM_HW_BREAK = 0x402
NT_ARM_HW_WATCH = 0x403
NT_ARM_SYSTEM_CALL = 0x404
NT_ARM_SVE = 0x405
NT_ARM_PAC_MASK = 0x406
NT_ARM_TAGGED_ADDR_CTRL = 0x409
NT_ARM_PAC_ENABLED_KEYS = 0x40A
NT_ARM_SSVE = 0x40B
NT_ARM_ZA = 0x40C
NT_ARM_ZT = 0x40D
NT_ARM_FPMR = 0x40E
NT_ARM_POE = 0x40F
NT_ARM_GCS = 0x410
NT_RISCV_CSR = 0x900
NT_RISCV_VECTOR = 0x901


@dataclass(frozen=True)
class ArchRegsets:
    """What the collector must know about an architecture beyond kdumpling.arch."""

    sp_register: str  # name in the arch's register enum
    regsets: tuple[int, ...]  # note types after NT_PRSTATUS, in the kernel's view order


# Adding an architecture = one line here (plus its ArchInfo in kdumpling.arch). PAC keys
# (NT_ARM_PACA_KEYS/PACG_KEYS) are left out on purpose: they are secrets gdb does not need.
REGSETS: dict[str, ArchRegsets] = {
    # arch/x86/kernel/ptrace.c x86_64_regsets
    "x86_64": ArchRegsets("RSP", (NT_PRFPREG, NT_386_IOPERM, NT_X86_XSTATE, NT_X86_SHSTK)),
    # arch/arm64/kernel/ptrace.c aarch64_regsets
    "aarch64": ArchRegsets("SP", (
        NT_PRFPREG, NT_ARM_TLS, NT_ARM_HW_BREAK, NT_ARM_HW_WATCH, NT_ARM_SYSTEM_CALL,
        NT_ARM_SVE, NT_ARM_SSVE, NT_ARM_ZA, NT_ARM_ZT, NT_ARM_PAC_MASK, NT_ARM_PAC_ENABLED_KEYS,
        NT_ARM_TAGGED_ADDR_CTRL, NT_ARM_FPMR, NT_ARM_POE, NT_ARM_GCS,
    )),
    # arch/riscv/kernel/ptrace.c riscv_user_regset
    "riscv64": ArchRegsets("SP", (NT_PRFPREG, NT_RISCV_VECTOR)),
}


def note_owner(note_type: int) -> bytes:
    """"CORE" for the two classic regsets, "LINUX" for every arch extension (binfmt_elf.c)."""
    return CORE_NOTE_NAME if note_type in (NT_PRSTATUS, NT_PRFPREG) else LINUX_NOTE_NAME


# --- dump policy -------------------------------------------------------------------------------
class Probe(Protocol):
    """Questions the policy asks about a mapping; answered from /proc while stopped."""

    def file_info(self, entry: MapEntry) -> FileInfo | None: ...

    def starts_with_elf_magic(self, entry: MapEntry) -> bool: ...

    def has_anon_pages(self, entry: MapEntry) -> bool | None:
        """Any private anonymous (written / COW'd, resident or swapped) page? None: unknown."""
        ...


@dataclass
class MappingPlan:
    """What to write for one VMA: bytes [skip_head, dump) from its start; ``readable`` bytes
    from its start can be read, the rest of the dumped range is zeros recorded as unreadable."""

    entry: MapEntry
    dump: int
    reason: str
    readable: int = -1  # -1: same as dump
    unreadable_reason: str = ""
    unreadable_expected: bool = False  # the kernel's own core has the same hole
    sparse: bool = False  # private anonymous: pagemap says which pages exist
    priority: int = 2  # size cap: 0 thread stacks, 1 what gdb needs to load symbols, 2 the rest
    skip_head: int = 0
    stack_sp: int | None = None  # lowest SP of a thread whose stack is in this VMA

    def __post_init__(self) -> None:
        if self.readable < 0:
            self.readable = self.dump


def vmflags_of(entry: MapEntry, smaps: SmapsEntry | None) -> frozenset[str]:
    """smaps VmFlags, or the part of it maps can tell when smaps lacks this VMA."""
    if smaps is not None and smaps.vmflags:
        return smaps.vmflags
    flags = set()
    if entry.readable:
        flags.add("rd")
    if entry.writable:
        flags.add("wr")
    if entry.may_share:
        flags.update(("ms", "sh") if entry.writable else ("ms",))
    return frozenset(flags)


def _elf_header_page(entry: MapEntry, page: int, probe: Probe) -> MappingPlan | None:
    info = probe.file_info(entry)
    if (info is not None and info.mode & 0o111) or probe.starts_with_elf_magic(entry):
        return MappingPlan(entry, min(page, entry.size), "ELF header page", priority=1)
    return None


def plan_mapping(entry: MapEntry, smaps: SmapsEntry | None, mask: int, page: int,
                 probe: Probe) -> MappingPlan:
    """The kernel's vma_dump_size() (fs/coredump.c), decided from user space.

    smaps VmFlags stand in for vm_flags (dd = VM_DONTDUMP, io = VM_IO, sh = VM_SHARED,
    ht = hugetlb) and its Anonymous/Swap counters for ``vma->anon_vma``; DAX is not visible in
    /proc and is treated like any other mapping.
    """
    flags = vmflags_of(entry, smaps)
    whole = entry.size

    if entry.is_special:
        # always_dump_vma(): [vdso], [vvar], [vsyscall], ... are dumped whatever the filter says,
        # but [vvar] (VM_IO|VM_PFNMAP) and [vsyscall] (above 2^63, rejected by pread) cannot be
        # read through /proc/PID/mem: the kernel leaves holes there; we write no bytes.
        if "io" in flags or entry.start >= 1 << 63 or not entry.readable:
            why = ("special mapping above 2^63" if entry.start >= 1 << 63
                   else "special VM_IO mapping" if "io" in flags else "special unreadable mapping")
            return MappingPlan(entry, 0, "special mapping", readable=0,
                               unreadable_reason=f"{entry.path.decode(errors='replace')}: {why}",
                               unreadable_expected=entry.path in EXPECTED_HOLES)
        return MappingPlan(entry, whole, "special mapping", priority=1)
    if "dd" in flags:
        return MappingPlan(entry, 0, "VM_DONTDUMP (MADV_DONTDUMP)")
    if entry.path == b"/secretmem" or entry.path.startswith(b"/secretmem "):
        return MappingPlan(entry, 0, "memfd_secret", readable=0,
                           unreadable_reason="memfd_secret memory cannot be read")
    shared = "sh" in flags
    if "ht" in flags:
        bit = HUGETLB_SHARED if shared else HUGETLB_PRIVATE
        if mask & bit:
            return MappingPlan(entry, whole, "hugetlb", sparse=False)
        return MappingPlan(entry, 0, "hugetlb (filtered out)")
    if "io" in flags:
        return MappingPlan(entry, 0, "VM_IO device mapping")
    if shared:
        # i_nlink == 0: shared anonymous memory (/dev/zero, SysV shm, memfd) or deleted files
        anon = (not entry.is_file or entry.deleted or entry.path.startswith(b"[anon_shmem:")
                or entry.path.startswith(b"/SYSV"))
        if mask & (ANON_SHARED if anon else MAPPED_SHARED):
            return MappingPlan(entry, whole, "shared anonymous" if anon else "shared file")
        return MappingPlan(entry, 0, "shared (filtered out)")

    if smaps is not None and smaps.counters:
        anon_vma: bool | None = (smaps.counter("Anonymous") + smaps.counter("Swap")
                                 + smaps.counter("AnonHugePages")) > 0
    else:
        anon_vma = None
    if not entry.is_file:
        touched = anon_vma
        if touched is False and entry.size <= RECHECK_LIMIT:
            # smaps (read before the stop) saw no pages; one may have been touched since
            touched = bool(probe.has_anon_pages(entry))
        elif touched is None:  # this VMA appeared after smaps was read
            probed = probe.has_anon_pages(entry) if entry.size <= RECHECK_LIMIT else None
            touched = probed if probed is not None else entry.readable
        if touched and mask & ANON_PRIVATE:
            return MappingPlan(entry, whole, "private anonymous", sparse=True)
        return MappingPlan(entry, 0, "private anonymous (filtered out)" if touched
                           else "private anonymous, never written")

    if anon_vma is None:
        anon_vma = probe.has_anon_pages(entry)
        if anon_vma is None:
            anon_vma = entry.writable
    if anon_vma and mask & ANON_PRIVATE:
        # Written or COW'd at least once: the RELRO page gdb needs (DT_DEBUG) is one of these.
        return MappingPlan(entry, whole, "private file mapping with written pages", priority=1)
    if mask & MAPPED_PRIVATE:
        return MappingPlan(entry, whole, "private file mapping", priority=1)
    if mask & ELF_HEADERS and entry.offset == 0 and entry.readable:
        plan = _elf_header_page(entry, page, probe)
        if plan is not None:
            return plan
    return MappingPlan(entry, 0, "private file mapping (filtered out)")


def limit_to_file(plan: MappingPlan, info: FileInfo | None, page: int) -> None:
    """Pages past the end of the mapped file raise SIGBUS in the process and EIO in
    /proc/PID/mem: plan them as zeros instead of discovering that while writing."""
    entry = plan.entry
    if info is None or not entry.is_file or plan.dump == 0 or info.mode & 0o170000 != 0o100000:
        return
    file_end = -(-info.size // page) * page
    readable = max(0, min(plan.dump, file_end - entry.offset))
    if readable < plan.readable:
        plan.readable = readable
        plan.unreadable_reason = "beyond the end of the mapped file"


def plan_mappings(entries: Sequence[MapEntry], smaps: Sequence[SmapsEntry], mask: int, page: int,
                  probe: Probe) -> list[MappingPlan]:
    """Plans for the VMAs seen while stopped, using the smaps read before stopping."""
    by_key = {s.map.key: s for s in smaps}
    plans = []
    for entry in sorted(entries, key=lambda e: e.start):
        info = by_key.get(entry.key)
        if info is not None and info.map.perms != entry.perms:
            info = None  # mprotect'ed in between: its flags no longer describe this VMA
        plan = plan_mapping(entry, info, mask, page, probe)
        if plan.dump and entry.is_file and plan.readable == plan.dump:
            limit_to_file(plan, probe.file_info(entry), page)
        if (plan.sparse and info is not None and info.counters
                and info.counter("Rss") + info.counter("Swap") >= entry.size):
            # Every page had data when smaps was read: skip the pagemap walk (a page dropped
            # since then reads as zeros, which is what it holds). Rss leaves out zero-page
            # mappings, so none of those is read as data either.
            plan.sparse = False
        plans.append(plan)
    return plans


def mark_stacks(plans: Sequence[MappingPlan], sps: Iterator[int] | Sequence[int]) -> None:
    """Flag the VMAs that hold a thread's stack pointer (priority 0 under a size cap)."""
    starts = [p.entry.start for p in plans]
    for sp in sps:
        i = bisect.bisect_right(starts, sp) - 1
        if i >= 0 and plans[i].entry.start <= sp < plans[i].entry.end:
            plan = plans[i]
            plan.priority = 0
            plan.stack_sp = sp if plan.stack_sp is None else min(plan.stack_sp, sp)


def apply_size_cap(plans: Sequence[MappingPlan], cap: int, page: int) -> int:
    """Trim the dumped bytes to at most ``cap``: thread stacks from their SP upwards first, then
    what gdb needs to find symbols (ELF headers, written file mappings, vdso), then the rest,
    smallest first. Returns the number of bytes left out (0: nothing was cut)."""
    budget = cap
    omitted = 0
    # Within a class, small mappings first: the big ones are the bulk data (heaps, caches),
    # the small ones the metadata a debugger walks (library .bss, ld.so's lists, TLS).
    order = sorted(range(len(plans)),
                   key=lambda i: (plans[i].priority, plans[i].dump, plans[i].entry.start))
    for i in order:
        plan = plans[i]
        if plan.dump == 0:
            continue
        want = plan.dump
        if want > budget and plan.stack_sp is not None and plan.dump == plan.entry.size:
            # Below the stack pointer (less the x86_64 red zone) is dead stack: drop that first.
            low = max(plan.entry.start, (plan.stack_sp - 128) // page * page)
            plan.skip_head = low - plan.entry.start
            omitted += plan.skip_head
            want -= plan.skip_head
        if want <= budget:
            budget -= want
            continue
        keep = budget // page * page
        omitted += want - keep
        if keep:
            plan.dump = plan.skip_head + keep
        else:
            plan.dump = plan.skip_head = 0
        plan.readable = min(plan.readable, plan.dump)
        budget -= keep
    return omitted


# --- reading memory ----------------------------------------------------------------------------
# pagemap entry: bit 63 present, 62 swapped, 61 file-page or shared-anon
# (Documentation/admin-guide/mm/pagemap.rst). Top byte of each little-endian u64 -> 1 if the
# page has data we must read (present or swapped).
_HAS_DATA = bytes(1 if b & 0xC0 else 0 for b in range(256))
# ... and 1 if it is a private anonymous page (swapped, or present and not a file page).
_IS_ANON = bytes(1 if (b & 0x40) or (b & 0x80 and not b & 0x20) else 0 for b in range(256))


_ZEROS = bytes(CHUNK)


def zeros(length: int) -> bytes:
    """``length`` zero bytes; the common whole-chunk case shares one object (a fresh 1 MiB
    calloc costs 256 page faults each time the writer looks at it)."""
    return _ZEROS if length == CHUNK else bytes(length)


PFN_MASK = (1 << 55) - 1  # pagemap bits 0-54
_zero_pfn: list[int | None] = []


def zero_page_pfn(page: int) -> int | None:
    """PFN of the kernel's shared zero page, learnt once from our own pagemap: a private
    anonymous page that was only read maps it. None when PFNs are hidden (they read as 0
    without CAP_SYS_ADMIN) or the architecture does not use a zero page."""
    if _zero_pfn:
        return _zero_pfn[0]
    pfn: int | None = None
    try:
        m = mmap.mmap(-1, page, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            ref = ctypes.c_char.from_buffer(m)
            addr = ctypes.addressof(ref)
            _ = m[0]  # a read fault maps the zero page
            with open("/proc/self/pagemap", "rb", buffering=0) as f:
                entry = int.from_bytes(os.pread(f.fileno(), 8, addr // page * 8), sys.byteorder)
            del ref
        finally:
            m.close()
        if entry >> 63 and entry & PFN_MASK:
            pfn = entry & PFN_MASK
    except (OSError, ValueError, BufferError):
        pfn = None
    _zero_pfn.append(pfn)
    return pfn


def _runs(flags: bytes) -> list[tuple[int, int]]:
    """[start, end) index runs of 1 bytes."""
    runs = []
    i, n = 0, len(flags)
    while i < n:
        j = flags.find(1, i)
        if j < 0:
            break
        k = flags.find(0, j)
        if k < 0:
            k = n
        runs.append((j, k))
        i = k
    return runs


class MemoryReader:
    """Reads the target's memory through /proc/PID/mem; unreadable pages become zeros and are
    recorded, a vanished address space becomes TargetGoneError.

    Reads go through process_vm_readv first (no bounce page: ~20% less CPU per byte); the
    pages it cannot read (PROT_NONE ones need /proc/PID/mem's forced access) go through pread.
    process_vm_readv follows the pid, not the address space: unless ``stopped`` (every thread
    in a ptrace stop, so no exec can happen), each such read is confirmed afterwards with a
    one-byte pread on the mm-bound /proc/PID/mem descriptor, which reads nothing once the
    address space we opened is gone (exit or exec; the pid may point elsewhere by then).
    """

    def __init__(self, pid: int, procfs: ProcFS, mem_fd: int, pagemap_fd: int | None,
                 page: int, unreadable: list[UnreadableRange], note: str = "") -> None:
        self.pid, self.procfs, self.page = pid, procfs, page
        self.mem_fd, self.pagemap_fd = mem_fd, pagemap_fd
        self.unreadable = unreadable
        self.note = note  # appended to EIO reasons (e.g. "process was running")
        self.stopped = False
        self._lock = threading.Lock()

    def _pagemap(self, addr: int, length: int) -> bytes | None:
        """The pagemap entries (8 bytes per page) covering [addr, addr + length)."""
        if self.pagemap_fd is None:
            return None
        first = addr // self.page
        count = -(-(addr + length) // self.page) - first
        try:
            data = os.pread(self.pagemap_fd, count * 8, first * 8)
        except OSError:
            return None
        return data if len(data) == count * 8 else None

    def _flags(self, entries: bytes, table: bytes) -> bytes:
        """One byte per page, 1 where ``table`` says the page has data; pages that map the
        shared zero page count as empty (a debugger's reads leave whole stacks of them)."""
        flags = entries[7::8].translate(table)
        zero = zero_page_pfn(self.page)
        if zero is None or entries.find(zero.to_bytes(8, "little")[:6]) < 0:
            return flags
        words = array.array("Q")
        words.frombytes(entries)
        if sys.byteorder != "little":
            words.byteswap()
        return bytes(0 if e >> 63 and not e >> 62 & 1 and e & PFN_MASK == zero else f
                     for e, f in zip(words, flags, strict=True))

    def present_runs(self, addr: int, length: int) -> list[tuple[int, int]] | None:
        """Address runs that hold data (present or swapped pages); None when unknown."""
        entries = self._pagemap(addr, length)
        if entries is None:
            return None
        base = addr // self.page * self.page
        out = []
        for a, b in _runs(self._flags(entries, _HAS_DATA)):
            out.append((max(addr, base + a * self.page), min(addr + length, base + b * self.page)))
        return out

    def has_anon_pages(self, addr: int, length: int) -> bool | None:
        entries = self._pagemap(addr, length)
        if entries is None:
            return None
        return 1 in self._flags(entries, _IS_ANON)

    def record(self, start: int, end: int, reason: str, expected: bool = False) -> None:
        with self._lock:
            last = self.unreadable[-1] if self.unreadable else None
            if (last is not None and last.end == start and last.reason == reason
                    and last.expected == expected):
                last.end = end
            else:
                self.unreadable.append(UnreadableRange(start, end, reason, expected))

    def gone(self) -> TargetGoneError:
        """The address space went away under a read: exited (or killed), or exec'd. A thread
        that still runs without PF_EXITING means exec; exiting threads carry the flag before
        they drop the mm (kernel/exit.c do_exit: exit_signals, then exit_mm)."""
        if self.procfs.has_running_thread(self.pid):
            return TargetGoneError(
                f"process {self.pid} replaced its memory (exec) during the capture")
        return TargetGoneError(f"process {self.pid} exited during the capture")

    def read(self, addr: int, length: int, *, sparse: bool = False) -> bytes:
        if sparse:
            runs = self.present_runs(addr, length)
            if runs is not None:
                if not runs:
                    return zeros(length)
                if runs != [(addr, addr + length)]:
                    buf = bytearray(length)
                    for a, b in runs:
                        buf[a - addr : b - addr] = self.read_raw(a, b - a)
                    return bytes(buf)
        return self.read_raw(addr, length)

    def read_raw(self, addr: int, length: int) -> bytes:
        pieces: list[bytes] = []
        pos, end = addr, addr + length
        try:
            data = _ptrace.vm_read(self.pid, addr, length)
        except (OSError, OverflowError):
            data = b""  # gone, not permitted, no syscall: pread tells what it is
        if data and not self.stopped:
            try:
                if not os.pread(self.mem_fd, 1, addr):
                    raise self.gone()
            except OSError:
                data = b""  # unmapped meanwhile: let pread record what it can read
        if len(data) == length:
            return data
        if data:
            pieces.append(data)
            pos += len(data)
        while pos < end:
            want = min(end - pos, CHUNK)
            try:
                data = os.pread(self.mem_fd, want, pos)
            except OSError as err:
                if err.errno not in (errno.EIO, errno.EFAULT, errno.ENOMEM, errno.EINVAL):
                    raise SourceReadError(
                        f"process {self.pid}: cannot read memory: {err.strerror}", pos) from err
                # That page cannot be read: zeros, recorded; carry on at the next page.
                nxt = min(end, (pos // self.page + 1) * self.page)
                pieces.append(bytes(nxt - pos))
                reason = f"read error ({errno.errorcode.get(err.errno or 0, err.errno)})"
                self.record(pos, nxt, reason + self.note)
                pos = nxt
                continue
            except OverflowError:
                raise SourceReadError(f"process {self.pid}: address beyond pread's range",
                                      pos) from None
            if not data:
                raise self.gone()  # mem_rw() returns 0 once the mm is gone
            pieces.append(data)
            pos += len(data)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)


class SparseCopy:
    """A segment source whose bytes from ``copied_from`` on were read while the process was
    stopped (low-pause stacks: the live part, above the stack pointer); the bytes before it go
    to ``fallback``, read later, or are zeros without one."""

    def __init__(self, size: int, pieces: Sequence[tuple[int, bytes]], copied_from: int = 0,
                 fallback: Callable[[int, int], bytes] | None = None) -> None:
        self._size = size
        self._pieces = sorted(pieces)
        self._starts = [p[0] for p in self._pieces]
        self._copied_from = copied_from
        self._fallback = fallback

    @property
    def size(self) -> int:
        return self._size

    @property
    def stored(self) -> int:
        return sum(len(p[1]) for p in self._pieces)

    def read(self, offset: int, length: int) -> bytes:
        head = b""
        if offset < self._copied_from:
            n = min(length, self._copied_from - offset)
            head = self._fallback(offset, n) if self._fallback else bytes(n)
            offset, length = offset + n, length - n
            if not length:
                return head
        out = bytearray(length)
        i = max(0, bisect.bisect_right(self._starts, offset) - 1)
        end = offset + length
        while i < len(self._pieces) and self._pieces[i][0] < end:
            start, data = self._pieces[i]
            a, b = max(offset, start), min(end, start + len(data))
            if a < b:
                out[a - offset : b - offset] = data[a - start : b - start]
            i += 1
        return head + bytes(out) if head else bytes(out)

    def file_range(self) -> None:
        return None

    def close(self) -> None:
        pass


class _LiveProbe:
    """Probe answers from /proc while the target is stopped (cached per file)."""

    def __init__(self, pid: int, procfs: ProcFS, reader: MemoryReader,
                 cache: dict[tuple[str, int], FileInfo | None]) -> None:
        self.pid, self.procfs, self.reader, self.cache = pid, procfs, reader, cache

    def file_info(self, entry: MapEntry) -> FileInfo | None:
        key = (entry.dev, entry.inode)
        if key not in self.cache:
            self.cache[key] = self.procfs.file_info(self.pid, entry)
        return self.cache[key]

    def starts_with_elf_magic(self, entry: MapEntry) -> bool:
        try:
            return os.pread(self.reader.mem_fd, 4, entry.start) == b"\x7fELF"
        except OSError:
            return False

    def has_anon_pages(self, entry: MapEntry) -> bool | None:
        return self.reader.has_anon_pages(entry.start, entry.size)


# --- stopping threads --------------------------------------------------------------------------
class TargetNotStoppedError(KdumplingError):
    """A thread did not reach a ptrace stop in time (uninterruptible sleep, frozen cgroup)."""

    exit_code = 69


@dataclass
class _Thread:
    tid: int
    stopped: bool = False
    gone: bool = False
    signal: int = 0  # signal-delivery-stop: re-inject on detach
    group_stop: bool = False  # reported a group-stop (job control stopped the process)


# Stop signals (default action "stop"): a seized tracee reports a group-stop as
# PTRACE_EVENT_STOP with one of these, a plain PTRACE_INTERRUPT trap as SIGTRAP.
_STOP_SIGNALS = frozenset((signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU))
SETTLE_TIMEOUT = 1.0


class _SignalGuard:
    """SIGINT/SIGTERM become CaptureInterrupted, except inside ``deferred()`` sections (ptrace
    bookkeeping) where they are remembered and raised when the section ends."""

    def __init__(self) -> None:
        self.pending: int | None = None
        self._defer = 0
        self._old: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers; the caller's own apply
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handler)

    def restore(self) -> None:
        for sig, old in self._old.items():
            # None: the old handler was not set from Python; the default is the best guess
            signal.signal(sig, signal.SIG_DFL if old is None else old)  # type: ignore[arg-type]
        self._old.clear()

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        del frame
        if self.pending is None:
            self.pending = signum
        if not self._defer:
            raise self.error()

    def error(self) -> CaptureInterrupted:
        signum = self.pending or signal.SIGINT
        err = CaptureInterrupted(
            f"capture interrupted by {signal.Signals(signum).name}; the target was released")
        err.exit_code = 128 + signum
        return err

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self._defer += 1
        try:
            yield
        finally:
            self._defer -= 1
        if not self._defer and self.pending is not None:
            raise self.error()

    def hold(self) -> None:
        """Defer from now on (cleanup): a signal then only marks the capture interrupted."""
        self._defer += 1


class _Tracer:
    """Stops and releases every thread of one process with seize-based ptrace."""

    def __init__(self, pid: int, procfs: ProcFS, timeout: float) -> None:
        self.pid, self.procfs, self.timeout = pid, procfs, timeout
        self.threads: dict[int, _Thread] = {}
        self.dropped: list[int] = []
        self.first_stop: float | None = None
        self.released_at: float | None = None

    def stop_all(self) -> None:
        options = _ptrace.PTRACE_O_TRACECLONE | _ptrace.PTRACE_O_TRACEEXEC
        deadline = time.monotonic() + self.timeout
        me = os.getpid()
        while True:
            tids = self.procfs.tasks(self.pid)
            new = [t for t in tids if t not in self.threads and t not in self.dropped]
            for tid in new:
                th = _Thread(tid)
                try:
                    _ptrace.seize(tid, options)
                except OSError as err:
                    state = self.procfs.thread_state(self.pid, tid)
                    if err.errno == errno.ESRCH or state is None or state in "ZX":
                        self.dropped.append(tid)  # exited between listing and seizing
                        continue
                    if err.errno != errno.EPERM:
                        raise SourceReadError(f"cannot trace thread {tid}: {err.strerror}") \
                            from err
                    tracer = self._tracer_of(tid)
                    if tracer != me:
                        raise self.procfs.permission_error(self.pid, "trace threads") from err
                    # Auto-attached by TRACECLONE before we saw its clone event.
                    self.threads[tid] = th
                    continue
                self.threads[tid] = th
                if self.first_stop is None:
                    self.first_stop = time.monotonic()
                with contextlib.suppress(OSError):  # it died: the wait below sees the exit
                    _ptrace.interrupt(tid)
            self._wait_all(deadline)
            if not new:
                break
        live = [t for t in self.threads.values() if not t.gone]
        if not live:
            raise TargetGoneError(f"process {self.pid} exited while being stopped")

    def _tracer_of(self, tid: int) -> int:
        try:
            return int(self.procfs.status(self.pid, tid).get("TracerPid", "0"))
        except (OSError, ValueError):
            return 0

    def _wait_all(self, deadline: float) -> None:
        delay = 0.0
        while True:
            waiting = [t for t in self.threads.values() if not t.stopped and not t.gone]
            if not waiting:
                return
            progressed = False
            for th in waiting:
                if self._poll(th):
                    progressed = True
            if progressed:
                delay = 0.0
                continue
            if time.monotonic() > deadline:
                stuck = [t for t in self.threads.values() if not t.stopped and not t.gone]
                states = ", ".join(
                    f"{t.tid} ({self.procfs.thread_state(self.pid, t.tid) or '?'})"
                    for t in stuck[:5])
                raise TargetNotStoppedError(
                    f"process {self.pid}: {len(stuck)} thread(s) did not stop within "
                    f"{self.timeout:g} s: {states} (uninterruptible sleep or a frozen cgroup?)")
            time.sleep(delay)
            delay = min(0.002, delay * 2 or 0.00002)

    def _poll(self, th: _Thread) -> bool:
        """One non-blocking wait for ``th``; True when it reported something."""
        try:
            wpid, status = os.waitpid(th.tid, _ptrace.WALL | os.WNOHANG)
        except ChildProcessError:
            th.gone = True  # not our tracee any more: it exited and was released
            self._drop(th.tid)
            return True
        if wpid == 0:
            return False
        if os.WIFSTOPPED(status):
            th.stopped = True
            event = status >> 16
            sig = os.WSTOPSIG(status)
            if event == _ptrace.PTRACE_EVENT_CLONE:
                with contextlib.suppress(OSError):
                    child = _ptrace.geteventmsg(th.tid)
                    self.threads.setdefault(child, _Thread(child))
            elif event == _ptrace.PTRACE_EVENT_EXEC:
                raise TargetGoneError(
                    f"process {self.pid} called exec while being stopped; capture it again")
            elif event == _ptrace.PTRACE_EVENT_STOP and sig in _STOP_SIGNALS:
                th.group_stop = True
            elif event == 0:
                th.signal = sig  # a signal was on its way in: hand it back on detach
            return True
        # WIFEXITED / WIFSIGNALED: the thread died before it stopped.
        th.gone = True
        self._drop(th.tid)
        return True

    def _drop(self, tid: int) -> None:
        if tid not in self.dropped:
            self.dropped.append(tid)

    def live_tids(self) -> list[int]:
        tids = [t.tid for t in self.threads.values() if t.stopped and not t.gone]
        return sorted(tids, key=lambda t: (t != self.pid, t))  # leader first, as gdb expects

    def release_all(self) -> list[str]:
        """Detach every thread; never raises. Returns problems worth a warning."""
        problems: list[str] = []
        pending: list[_Thread] = []
        restopping: list[int] = []
        for th in self.threads.values():
            if th.gone:
                continue
            try:
                _ptrace.detach(th.tid, th.signal if th.stopped else 0)
                th.gone = True
                if th.group_stop:
                    restopping.append(th.tid)
            except OSError:
                pending.append(th)  # not in a ptrace stop yet, or dead
        # Threads that were seized but not yet stopped must stop before they can be detached;
        # dead ones must be reaped so they do not linger as ptrace zombies.
        deadline = time.monotonic() + max(1.0, self.timeout)
        delay = 0.0
        while pending and time.monotonic() < deadline:
            still: list[_Thread] = []
            for th in pending:
                state = self.procfs.thread_state(self.pid, th.tid)
                if (th.tid == self.pid and (state is None or state in "ZX")
                        and self._is_our_child()):
                    continue  # our own child: its parent (the caller) reaps it
                try:
                    wpid, status = os.waitpid(th.tid, _ptrace.WALL | os.WNOHANG)
                except ChildProcessError:
                    continue  # released already
                if wpid and os.WIFSTOPPED(status):
                    sig = os.WSTOPSIG(status) if status >> 16 == 0 else 0
                    try:
                        _ptrace.detach(th.tid, sig or th.signal)
                        if th.group_stop or (status >> 16 == _ptrace.PTRACE_EVENT_STOP
                                             and os.WSTOPSIG(status) in _STOP_SIGNALS):
                            restopping.append(th.tid)
                        continue
                    except OSError:
                        pass
                elif wpid:
                    continue  # exited and reaped
                still.append(th)
            pending = still
            if pending:
                time.sleep(delay)
                delay = min(0.01, delay * 2 or 0.0001)
        for th in pending:
            problems.append(f"thread {th.tid} could not be detached")
        self.released_at = time.monotonic()
        self._settle(restopping)
        return problems

    def _settle(self, tids: list[int]) -> None:
        """Wait until threads detached out of a group-stop are stopped again.

        PTRACE_DETACH wakes a tracee even when job control still holds its process stopped
        (kernel/ptrace.c __ptrace_unlink re-arms JOBCTL_STOP_PENDING, then kicks the task):
        it runs in the kernel (state R) until do_signal_stop() puts it back in T, and never
        returns to user space. Returning only then means nobody (a supervisor, the caller)
        sees a job-stopped process "running" after we are done. Only R is the transition: a
        thread in S/D was resumed by a SIGCONT meanwhile; the deadline covers a spinning one.
        """
        deadline = time.monotonic() + SETTLE_TIMEOUT
        delay = 0.0
        while tids and time.monotonic() < deadline:
            tids = [t for t in tids if self.procfs.thread_state(self.pid, t) == "R"]
            if tids:
                time.sleep(delay)
                delay = min(0.005, delay * 2 or 0.00005)

    def _is_our_child(self) -> bool:
        try:
            return self.procfs.stat(self.pid).ppid == os.getpid()
        except KdumplingError:
            return False


# --- notes -------------------------------------------------------------------------------------
@dataclass
class ThreadState:
    tid: int
    regs: bytes  # pr_reg from PTRACE_GETREGSET NT_PRSTATUS
    extra: list[Note]  # the other regsets, in view order
    sighold: int = 0

    def sp(self, arch: ArchInfo, sp_register: str) -> int:
        return unpack_registers(arch, self.regs)[sp_register]


def read_thread_state(tid: int, arch: ArchInfo, regsets: ArchRegsets,
                      reader: _ptrace.RegsetReader) -> ThreadState:
    regs = reader.get(tid, NT_PRSTATUS)
    if len(regs) != arch.reg_bytes:
        raise UsageError(
            f"thread {tid}: {len(regs)}-byte registers where {arch.name} has {arch.reg_bytes}: "
            f"32-bit (compat) processes are not supported")
    extra = []
    for nt in regsets.regsets:
        try:
            data = reader.get(tid, nt)
        except OSError:
            continue  # not supported / not active for this task (ENODEV, EINVAL, ENXIO)
        if data:
            extra.append(Note(note_owner(nt), nt, data))
    sighold = 0
    with contextlib.suppress(OSError):
        sighold = _ptrace.getsigmask(tid)
    return ThreadState(tid, regs, extra, sighold)


def _psargs(cmdline: bytes) -> bytes:
    # fs/binfmt_elf.c fill_psinfo: at most ELF_PRARGSZ-1 bytes of the argument area, with the
    # NULs between arguments (and the final one) turned into spaces.
    return cmdline[:79].replace(b"\0", b" ")


def build_notes(arch: ArchInfo, threads: Sequence[ThreadState], stat: ProcStat,
                status: Mapping[str, str], cmdline: bytes, auxv: bytes,
                files: Sequence[tuple[int, int, int, bytes]], page: int,
                annotations: Mapping[str, str]) -> list[Note]:
    """Notes in the kernel's order: PRSTATUS of the first thread, the process-wide PRPSINFO,
    SIGINFO, AUXV, FILE, that thread's other regsets, then each other thread, then ours."""
    endian = arch.endian
    uid = int((status.get("Uid", "0").split() or ["0"])[0])
    gid = int((status.get("Gid", "0").split() or ["0"])[0])
    sname = {"t": "T", "I": "D"}.get(stat.state, stat.state)
    state_index = "RSDTZW".find(sname)
    psinfo = prpsinfo_note(
        endian, state=max(state_index, 0), sname=sname if state_index >= 0 else ".",
        zomb=1 if sname == "Z" else 0, nice=max(-128, min(127, stat.nice)),
        flag=stat.flags & 0xFFFFFFFFFFFFFFFF, uid=uid, gid=gid, pid=stat.pid, ppid=stat.ppid,
        pgrp=stat.pgrp, sid=stat.session, fname=stat.comm[:15], psargs=_psargs(cmdline),
    )
    notes: list[Note] = []
    for i, th in enumerate(threads):
        ctx = CpuContext(
            cpu_id=i, pr_pid=th.tid, pr_ppid=stat.ppid, pr_pgrp=stat.pgrp, pr_sid=stat.session,
            pr_sighold=th.sighold, raw_regs=th.regs,
            pr_fpvalid=1 if any(n.type == NT_PRFPREG for n in th.extra) else 0,
        )
        notes.append(prstatus_note(arch, ctx))
        if i == 0:
            notes.append(psinfo)
            notes.append(siginfo_note(endian))
            notes.append(Note(CORE_NOTE_NAME, NT_AUXV, auxv))
            notes.append(file_note(endian, page, _cap_files(files)))
        notes.extend(th.extra)
    if annotations:
        notes.append(Note(b"KDUMPLING", CustomNoteType.ANNOTATIONS,
                          annotations_text(annotations)))
    return notes


def _cap_files(files: Sequence[tuple[int, int, int, bytes]]) -> list[tuple[int, int, int, bytes]]:
    size = 16
    out = []
    for f in files:
        size += 24 + len(f[3]) + 1
        if size > MAX_FILE_NOTE_SIZE:
            break
        out.append(f)
    return out


def _segment_flags(entry: MapEntry) -> int:
    return ((PF_R if entry.readable else 0) | (PF_W if entry.writable else 0)
            | (PF_X if entry.executable else 0))


def _hex_range(start: int, end: int) -> str:
    return f"{start:#x}-{end:#x}"


# --- the collector -----------------------------------------------------------------------------
@dataclass
class _PreStop:
    """What is read before the target is stopped."""

    stat: ProcStat
    status: dict[str, str]
    cmdline: bytes
    auxv: bytes
    smaps: list[SmapsEntry]
    mask: int
    files: dict[tuple[str, int], FileInfo | None] = field(default_factory=dict)


class ProcessCollector:
    """Capture a live process as a ``CoreImage(kind=PROCESS)``; use it as a context manager.

    ``mode``: "consistent" keeps every thread stopped until the ``with`` block ends (the writer
    reads inside it); "low-pause" stops only to read registers and thread stacks.
    ``filter_mask``: coredump_filter bits (None: the target's own /proc/PID/coredump_filter).
    ``size_cap``: at most this many bytes of memory data; past it the core is marked truncated.
    ``copy_limit``: in "consistent" mode, a dump of at most this many bytes is copied while
    stopped and the target resumes before ``__enter__`` returns; a bigger one resumes when the
    writer closes the memory sources (its last read), before its fsync.
    ``pause_seconds`` (also on the snapshot) is the time from the first stop to the last detach.
    ptrace ties the target to the tracing thread: leave the ``with`` block in the thread that
    entered it. SIGINT/SIGTERM raise ``CaptureInterrupted`` meanwhile (main thread only).
    """

    def __init__(self, pid: int, *, mode: Mode | str = "consistent",
                 filter_mask: int | None = None, size_cap: int | None = None,
                 procfs: str | os.PathLike[str] = "/proc",
                 stop_timeout: float = DEFAULT_STOP_TIMEOUT,
                 copy_limit: int = EAGER_LIMIT) -> None:
        if mode not in MODES:
            raise UsageError(f"unknown capture mode {mode!r}; use one of: {', '.join(MODES)}")
        if filter_mask is not None and not 0 <= filter_mask <= FILTER_BITS:
            raise UsageError(f"filter mask must be 0..{FILTER_BITS:#x}, got {filter_mask:#x}")
        if size_cap is not None and size_cap < 0:
            raise UsageError("size cap must not be negative")
        if pid <= 0:
            raise UsageError(f"invalid process id {pid}")
        if pid == os.getpid():
            raise UsageError("a process cannot capture itself with ptrace")
        self.pid = pid
        self.mode = mode
        self.filter_mask = filter_mask
        self.size_cap = size_cap
        self.procfs = ProcFS(procfs)
        self.stop_timeout = stop_timeout
        self.copy_limit = copy_limit
        self.pause_seconds: float | None = None
        self.snapshot: Snapshot | None = None
        self._tracer: _Tracer | None = None
        self._guard = _SignalGuard()
        self._fds: list[int] = []
        self._lazy: LazyMemory | None = None
        self._reader: MemoryReader | None = None
        self._owner = 0  # ident of the thread that stopped the target (ptrace's tracer)
        self._problems: list[str] = []
        self._predicted = 0  # unreadable ranges known before writing (listed in the notes)
        self._arch = get_arch(os.uname().machine)
        self._regsets = REGSETS.get(self._arch.name, ArchRegsets("SP", (NT_PRFPREG,)))
        self._page = os.sysconf("SC_PAGE_SIZE")

    # context manager ---------------------------------------------------------------------------
    def __enter__(self) -> Snapshot:
        self._owner = threading.get_ident()
        self._guard.install()
        try:
            self.snapshot = self._capture()
            return self.snapshot
        except BaseException:
            self._guard.hold()
            try:
                self._release()
            finally:
                self._guard.restore()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._guard.hold()
        try:
            problems = self._release()
        finally:
            self._guard.restore()
        if self.snapshot is not None:
            self.snapshot.pause_seconds = self.pause_seconds
            self.snapshot.warnings.extend(problems)
            # Ranges found unreadable while the writer ran came after the notes were written:
            # the snapshot (and the agent's report) is where they are listed.
            late = self.snapshot.unreadable[self._predicted:]
            if late:
                shown = ", ".join(f"{_hex_range(r.start, r.end)} ({r.reason})" for r in late[:5])
                more = f" and {len(late) - 5} more" if len(late) > 5 else ""
                self.snapshot.warnings.append(
                    f"{len(late)} range(s) could not be read and were written as zeros: "
                    f"{shown}{more}")
            self.snapshot.meta["pause_seconds"] = self.pause_seconds
        if exc is None and self._guard.pending is not None:
            raise self._guard.error()

    def _release(self) -> list[str]:
        if self._lazy is not None:
            self._lazy.close()  # no read may run once the target is released
        self._resume()
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        return self._problems

    def _resume(self) -> None:
        """Detach every thread (once) and note the pause; signals wait until it is done."""
        tracer = self._tracer
        if tracer is None or tracer.released_at is not None:
            return
        if self._reader is not None:
            self._reader.stopped = False  # from now on the pid may exec: reads are confirmed
        with self._guard.deferred():
            self._problems.extend(tracer.release_all())
            if tracer.first_stop is not None and tracer.released_at is not None:
                self.pause_seconds = tracer.released_at - tracer.first_stop

    def _reads_done(self) -> None:
        """The writer closed the memory sources: it will not read again, so what it does next
        (flush, fsync, rename) and what the caller does need not keep the target stopped.
        Only the tracing thread may detach; from any other, ``__exit__`` does it."""
        if threading.get_ident() == self._owner:
            self._resume()

    # capture -------------------------------------------------------------------------------
    def _check_target(self) -> None:
        pid, procfs = self.pid, self.procfs
        if not procfs.exists(pid):
            raise TargetGoneError(f"process {pid} does not exist")
        stat = procfs.stat(pid)
        if stat.state in "ZX":
            raise TargetGoneError(f"process {pid} has exited (zombie)")

    def _pre_stop(self) -> _PreStop:
        pid, procfs = self.pid, self.procfs
        with procfs.errors(pid, "read process status"):
            status = procfs.status(pid)
        if status.get("Tgid") and int(status["Tgid"]) != pid:
            raise UsageError(f"{pid} is a thread of process {status['Tgid']}; capture that")
        stat = procfs.stat(pid)
        auxv = procfs.auxv(pid)
        smaps = procfs.smaps(pid)
        if not smaps and not auxv:
            raise UsageError(f"process {pid} is a kernel thread: it has no user memory")
        mask = self.filter_mask
        if mask is None:
            try:
                mask = procfs.coredump_filter(pid)
            except SourceReadError:
                mask = DEFAULT_FILTER
        pre = _PreStop(stat, status, procfs.cmdline(pid), auxv, smaps, mask & FILTER_BITS)
        # stat() the mapped files now (cheap, and it keeps the stopped phase short)
        for s in smaps:
            e = s.map
            if e.is_file and (e.dev, e.inode) not in pre.files:
                pre.files[(e.dev, e.inode)] = procfs.file_info(pid, e)
        return pre

    def _capture(self) -> Snapshot:
        pid, procfs, page = self.pid, self.procfs, self._page
        self._check_target()
        pre = self._pre_stop()
        mem_fd = procfs.open_mem(pid)
        self._fds.append(mem_fd)
        pagemap_fd = procfs.open_pagemap(pid)
        if pagemap_fd is not None:
            self._fds.append(pagemap_fd)
        unreadable: list[UnreadableRange] = []
        low_pause = self.mode == "low-pause"
        reader = self._reader = MemoryReader(pid, procfs, mem_fd, pagemap_fd, page, unreadable,
                                             " while the process ran" if low_pause else "")

        tracer = self._tracer = _Tracer(pid, procfs, self.stop_timeout)
        with self._guard.deferred():
            tracer.stop_all()
        stopped_at = time.monotonic()
        reader.stopped = True

        # --- stopped ---
        regset_reader = _ptrace.RegsetReader()
        threads: list[ThreadState] = []
        for tid in tracer.live_tids():
            try:
                threads.append(read_thread_state(tid, self._arch, self._regsets, regset_reader))
            except OSError as err:
                if err.errno != errno.ESRCH:
                    raise SourceReadError(f"thread {tid}: cannot read registers: "
                                          f"{err.strerror}") from err
                tracer._drop(tid)  # killed while stopped
        if not threads:
            raise TargetGoneError(f"process {pid} exited during the capture")
        entries = procfs.maps(pid)
        probe = _LiveProbe(pid, procfs, reader, pre.files)
        plans = plan_mappings(entries, pre.smaps, pre.mask, page, probe)
        mark_stacks(plans, [t.sp(self._arch, self._regsets.sp_register) for t in threads])
        omitted = apply_size_cap(plans, self.size_cap, page) if self.size_cap is not None else 0

        stack_copies: dict[int, SparseCopy] = {}
        eager = not low_pause and _eager_bytes(plans, pre.smaps) <= self.copy_limit
        if low_pause:
            for plan in plans:
                if plan.priority == 0 and plan.dump:
                    stack_copies[plan.entry.start] = self._copy_now(reader, plan)
        elif eager:
            for plan in plans:
                if plan.dump > plan.skip_head:
                    stack_copies[plan.entry.start] = _copy_all(reader, plan)
        if low_pause or eager:
            self._resume()

        for plan in plans:  # predicted holes are known now: list them in the annotations
            if plan.unreadable_reason:
                lo = plan.entry.start + plan.readable
                hi = plan.entry.start + (plan.dump or plan.entry.size)
                if hi > lo:
                    reader.record(lo, hi, plan.unreadable_reason, plan.unreadable_expected)
        predicted = list(unreadable)
        self._predicted = len(predicted)
        self._lazy = LazyMemory(reader, self._reads_done)
        segments = self._segments(plans, self._lazy, stack_copies)

        comm = pre.stat.comm.decode("utf-8", "replace")
        annotations = self._annotations(pre, threads, tracer, predicted, omitted)
        files = [(p.entry.start, p.entry.end, p.entry.offset, p.entry.path)
                 for p in plans if p.entry.is_file]
        notes = build_notes(self._arch, threads, pre.stat, pre.status, pre.cmdline, pre.auxv,
                            files, page, annotations)
        image = CoreImage(arch=self._arch, kind=DumpKind.PROCESS, segments=segments, notes=notes,
                          page_size=page, crash_time=int(time.time()))
        snap = Snapshot(
            image=image, target=f"process {pid} ({comm})", pause_seconds=self.pause_seconds,
            unreadable=unreadable, annotations=annotations, truncated=omitted > 0,
        )
        if tracer.dropped:
            snap.warnings.append(
                f"{len(tracer.dropped)} thread(s) exited during the capture and were left out: "
                + ", ".join(map(str, tracer.dropped)))
        if low_pause:
            snap.warnings.append("low-pause mode: memory other than the thread stacks was read "
                                 "while the process ran and may be inconsistent")
        if omitted:
            snap.warnings.append(f"size cap of {self.size_cap} bytes reached: {omitted} bytes "
                                 "of memory left out; the core is marked truncated")
        snap.meta.update({
            "pid": pid, "comm": comm, "mode": self.mode, "threads": [t.tid for t in threads],
            "dropped_threads": list(tracer.dropped), "coredump_filter": pre.mask,
            "stop_seconds": stopped_at - (tracer.first_stop or stopped_at),
            "segments": len(segments), "dump_bytes": image.memory_size,
            "omitted_bytes": omitted, "pause_seconds": self.pause_seconds,
            "copied_while_stopped": sum(c.stored for c in stack_copies.values()) if eager else 0,
        })
        return snap

    def _copy_now(self, reader: MemoryReader, plan: MappingPlan) -> SparseCopy:
        """Copy the live part of a stack VMA (from the lowest stack pointer in it, less the
        red zone, to its end: the frames, and TLS and struct pthread for glibc threads) while
        the process is stopped; the dead part below is read later, like the heap."""
        e = plan.entry
        lo, hi = e.start + plan.skip_head, e.start + plan.readable
        if plan.stack_sp is not None:
            lo = max(lo, min(hi, (plan.stack_sp - 128) // self._page * self._page))
        pieces: list[tuple[int, bytes]] = []
        base = e.start + plan.skip_head
        if hi > lo:
            runs = reader.present_runs(lo, hi - lo) if plan.sparse else None
            for a, b in runs if runs is not None else [(lo, hi)]:
                pieces.append((a - base, reader.read_raw(a, b - a)))

        def below_sp(offset: int, length: int) -> bytes:
            return reader.read(base + offset, length, sparse=plan.sparse)

        return SparseCopy(plan.dump - plan.skip_head, pieces, lo - base, below_sp)

    def _segments(self, plans: Sequence[MappingPlan], lazy: LazyMemory,
                  copies: Mapping[int, SparseCopy]) -> list[MemorySegment]:
        segments: list[MemorySegment] = []
        for plan in plans:
            e = plan.entry
            flags = _segment_flags(e)
            start = e.start
            if plan.skip_head:
                segments.append(MemorySegment(0, None, virt_addr=start, mem_size=plan.skip_head,
                                              flags=flags))
                start += plan.skip_head
            size = plan.dump - plan.skip_head
            mem_size = e.end - start
            if size <= 0:
                segments.append(MemorySegment(0, None, virt_addr=start, mem_size=mem_size,
                                              flags=flags))
                continue
            src: SegmentSource | None = copies.get(e.start)
            if src is None:
                src = lazy.add(start, size, plan.readable - plan.skip_head, plan.sparse)
            segments.append(MemorySegment(0, src, virt_addr=start, mem_size=mem_size,
                                          flags=flags))
        return segments

    def _annotations(self, pre: _PreStop, threads: Sequence[ThreadState], tracer: _Tracer,
                     predicted: Sequence[UnreadableRange], omitted: int) -> dict[str, str]:
        ann: dict[str, str] = {
            "collector": "process",
            "pid": str(self.pid),
            "comm": pre.stat.comm.decode("utf-8", "replace"),
            "mode": self.mode,
            "coredump_filter": f"{pre.mask:#x}",
            "threads": str(len(threads)),
        }
        if tracer.dropped:
            ann["dropped_threads"] = ",".join(map(str, tracer.dropped))
        if self.mode == "low-pause":
            ann["consistency"] = ("heap may be inconsistent: registers and thread stacks were "
                                  "read while stopped, the rest while the process ran")
        if self.pause_seconds is not None:  # known here when the target resumed already
            ann["pause_seconds"] = f"{self.pause_seconds:.6f}"
        ann["unreadable_count"] = str(len(predicted))
        for i, r in enumerate(predicted):
            ann[f"unreadable.{i}"] = f"{_hex_range(r.start, r.end)} {r.reason}"
        if self.size_cap is not None:
            ann["size_cap"] = str(self.size_cap)
        if omitted:
            ann["truncated"] = "yes"
            ann["omitted_bytes"] = str(omitted)
        return ann


def _eager_bytes(plans: Sequence[MappingPlan], smaps: Sequence[SmapsEntry]) -> int:
    """Bytes a full copy of the plans would hold: resident + swapped pages (smaps, read
    before the stop) for private anonymous mappings, the readable size for the others."""
    held = {s.map.key: s.counter("Rss") + s.counter("Swap") for s in smaps}
    total = 0
    for plan in plans:
        size = max(0, plan.readable - plan.skip_head)
        if plan.sparse and plan.entry.key in held:
            size = min(size, held[plan.entry.key])
        total += size
    return total


def _copy_all(reader: MemoryReader, plan: MappingPlan) -> SparseCopy:
    """Copy the dumped part of one mapping now, chunk by chunk, only the pages that exist."""
    base = plan.entry.start + plan.skip_head
    end = plan.entry.start + plan.readable
    pieces: list[tuple[int, bytes]] = []
    for pos in range(base, end, CHUNK):
        n = min(CHUNK, end - pos)
        runs = reader.present_runs(pos, n) if plan.sparse else None
        for a, b in runs if runs is not None else [(pos, pos + n)]:
            pieces.append((a - base, reader.read_raw(a, b - a)))
    return SparseCopy(plan.dump - plan.skip_head, pieces)


@dataclass(frozen=True)
class _LazyRange:
    start: int  # address of byte 0 of the segment
    size: int  # bytes the segment provides
    readable: int  # bytes from ``start`` that can be read; zeros after
    sparse: bool


class LazyMemory:
    """The lazily dumped segments' sources: the writer reads them chunk by chunk, in its own
    read-ahead thread (kdumpling.layout.prefetch), so reads overlap its writes on another CPU.

    ``close()`` (the writer closes every source when it is done, also on errors) waits for a
    read in flight and refuses later ones, then calls ``on_close`` once: from then on the
    target's memory is not needed. A read holds the lock throughout (one reader at a time, the
    writer's read-ahead thread), so an exception anywhere in it, SIGINT's included, frees it.
    """

    def __init__(self, reader: MemoryReader, on_close: Callable[[], None] | None = None) -> None:
        self.reader = reader
        self._on_close = on_close
        self.ranges: list[_LazyRange] = []
        self._lock = threading.Lock()
        self._closed = False

    def add(self, start: int, size: int, readable: int, sparse: bool) -> CallableSource:
        index = len(self.ranges)
        self.ranges.append(_LazyRange(start, size, readable, sparse))
        return CallableSource(size, lambda off, n: self.read(index, off, n), self.close)

    def fetch(self, index: int, offset: int, length: int) -> bytes:
        r = self.ranges[index]
        if offset + length <= r.readable:
            return self.reader.read(r.start + offset, length, sparse=r.sparse)
        head = max(0, r.readable - offset)
        data = self.reader.read(r.start + offset, head, sparse=r.sparse) if head else b""
        return data + zeros(length - head) if data else zeros(length)

    def read(self, index: int, offset: int, length: int) -> bytes:
        with self._lock:
            if self._closed:
                raise SourceReadError("process memory read after the capture ended", offset)
            return self.fetch(index, offset, length)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()


def capture_process(
    pid: int, output: str | os.PathLike[str] | BinaryIO, *, mode: Mode | str = "consistent",
    filter_mask: int | None = None, size_cap: int | None = None,
    procfs: str | os.PathLike[str] = "/proc", stop_timeout: float = DEFAULT_STOP_TIMEOUT,
    copy_limit: int = EAGER_LIMIT, **writer_options: object,
) -> tuple[Snapshot, WriteResult]:
    """Capture ``pid`` and write its core to ``output`` (path or binary stream); the writer
    options (format, progress, ...) go to ``kdumpling.write_dump``."""
    from kdumpling.dump import write_dump

    with ProcessCollector(pid, mode=mode, filter_mask=filter_mask, size_cap=size_cap,
                          procfs=procfs, stop_timeout=stop_timeout,
                          copy_limit=copy_limit) as snap:
        result = write_dump(snap.image, output, **writer_options)  # type: ignore[arg-type]
    return snap, result
