"""Which memory of a process goes into its core: the kernel's vma_dump_size() (fs/coredump.c),
decided from user space from /proc/PID/maps and smaps, then trimmed to a size cap.

Pure decisions: the questions that need the live process (file modes, ELF magic, pagemap) go
through a ``Probe``, so the unit tests answer them from a fake.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from .._procfs import FileInfo, MapEntry, SmapsEntry

# Private anonymous mappings whose smaps shows no pages are re-checked in pagemap while stopped
# (a page may have been touched after smaps was read) up to this size; larger untouched ones
# (address-space reservations) stay undumped, like the kernel's "no anon_vma" case.
RECHECK_LIMIT = 64 << 20
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
