"""Snapshot a live process into an ELF core that gdb and eu-stack open, without killing it.

One module per responsibility (the capture sequence is described in ``collector``):

- ``policy``: which mappings go into the core (the kernel's vma_dump_size(), coredump_filter
  bits) and how a size cap trims them; pure decisions, testable without a process.
- ``memory``: reading the target's memory (process_vm_readv, /proc/PID/mem, pagemap) and the
  segment sources the writer reads.
- ``tracer``: the ptrace(2) layer, stopping and releasing every thread, signal deferral.
- ``corenotes``: register sets per thread and the process-wide notes, in the kernel's order.
- ``collector``: ``ProcessCollector`` and ``capture_process``, which tie these together.
- ``signal_watch``: ``SignalWatch``, which holds a process at a watched signal's delivery stop
  so ``ProcessCollector(pid, caught=...)`` captures it there, then delivers the signal.

Architecture facts (register sets, NT_ARM_* and other regset note types) are in
``kdumpling.arch``. Every name below stays importable from ``kdumpling.collectors.process``.
"""

from kdumpling.arch import REGSETS, ArchRegsets
from kdumpling.notes import NT_PRSTATUS, Note

from .collector import (
    DEFAULT_STOP_TIMEOUT,
    EAGER_LIMIT,
    MODES,
    Mode,
    ProcessCollector,
    capture_process,
)
from .corenotes import MAX_FILE_NOTE_SIZE, ThreadState, build_notes, note_owner, read_thread_state
from .memory import (
    CHUNK,
    PFN_MASK,
    LazyMemory,
    MemoryReader,
    SparseCopy,
    _runs,
    _zero_pfn,
    vm_read,
    zero_page_pfn,
    zeros,
)
from .policy import (
    ANON_PRIVATE,
    ANON_SHARED,
    DAX_PRIVATE,
    DAX_SHARED,
    DEFAULT_FILTER,
    ELF_HEADERS,
    EXPECTED_HOLES,
    FILTER_BITS,
    HUGETLB_PRIVATE,
    HUGETLB_SHARED,
    MAPPED_PRIVATE,
    MAPPED_SHARED,
    RECHECK_LIMIT,
    MappingPlan,
    Probe,
    apply_size_cap,
    limit_to_file,
    mark_stacks,
    plan_mapping,
    plan_mappings,
    vmflags_of,
)
from .tracer import SETTLE_TIMEOUT, TargetNotStoppedError

__all__ = [
    "ANON_PRIVATE", "ANON_SHARED", "CHUNK", "DAX_PRIVATE", "DAX_SHARED", "DEFAULT_FILTER",
    "DEFAULT_STOP_TIMEOUT", "EAGER_LIMIT", "ELF_HEADERS", "EXPECTED_HOLES", "FILTER_BITS",
    "HUGETLB_PRIVATE", "HUGETLB_SHARED", "MAPPED_PRIVATE", "MAPPED_SHARED", "MAX_FILE_NOTE_SIZE",
    "MODES", "NT_PRSTATUS", "PFN_MASK", "RECHECK_LIMIT", "REGSETS", "SETTLE_TIMEOUT",
    "ArchRegsets", "LazyMemory", "MappingPlan", "MemoryReader", "Mode", "Note", "Probe",
    "ProcessCollector", "SparseCopy", "TargetNotStoppedError", "ThreadState", "_runs",
    "_zero_pfn", "apply_size_cap", "build_notes", "capture_process", "limit_to_file",
    "mark_stacks", "note_owner", "plan_mapping", "plan_mappings", "read_thread_state",
    "vm_read", "vmflags_of", "zero_page_pfn", "zeros",
]
