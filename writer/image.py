"""What a writer writes: a plain description of one dump, built by KdumpBuilder or a collector."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

from .arch import ArchInfo
from .notes import NT_PRSTATUS, Note, parse_vmcoreinfo
from .segments import MemorySegment


class DumpKind(Enum):
    KERNEL = "kernel"  # a vmcore: physical memory, VMCOREINFO, one PRSTATUS per CPU
    PROCESS = "process"  # a process core: virtual memory, one PRSTATUS per thread


@dataclass
class CoreImage:
    """Everything needed to write one dump, with memory still unread.

    ``notes`` are in file order (for kernel dumps: PRSTATUS per CPU, VMCOREINFO, then the rest).
    ``vmcoreinfo`` repeats the VMCOREINFO text for the kdump header; it must also be in ``notes``.
    """

    arch: ArchInfo
    kind: DumpKind
    segments: Sequence[MemorySegment]
    notes: Sequence[Note] = ()
    vmcoreinfo: bytes = b""
    page_size: int | None = None  # None: VMCOREINFO PAGESIZE, else the arch default
    crash_time: int | None = None  # None: VMCOREINFO CRASHTIME, else 0
    uts_version: str = "#1"
    phys_base: int | None = None  # None: VMCOREINFO NUMBER(phys_base) (x86_64), else 0
    extra: dict[str, str] = field(default_factory=dict)
    # (start, end) address ranges whose bytes could not be read (physical for kernel dumps,
    # virtual for process cores). Non-empty: every writer marks its output incomplete. Writers
    # look at it when they finish, so a source may append to it while it is being read.
    missing: list[tuple[int, int]] = field(default_factory=list)
    # The source says it lacks data without naming where (kdump DUMP_DH_COMPRESSED_INCOMPLETE,
    # ELF e_flags DUMP_ELF_INCOMPLETE, a flattened stream without its end marker): writers mark
    # their output incomplete when ``missing or incomplete``.
    incomplete: bool = False

    @property
    def vmcoreinfo_fields(self) -> dict[str, str]:
        return parse_vmcoreinfo(self.vmcoreinfo)

    @property
    def effective_page_size(self) -> int:
        if self.page_size:
            return self.page_size
        value = self.vmcoreinfo_fields.get("PAGESIZE")
        if value:
            try:
                size = int(value, 0)
            except ValueError:
                size = 0
            if size > 0 and size & (size - 1) == 0:
                return size
        return self.arch.default_page_size

    @property
    def cpu_count(self) -> int:
        return sum(1 for n in self.notes if n.type == NT_PRSTATUS and n.name == b"CORE")

    @property
    def memory_size(self) -> int:
        return sum(s.size for s in self.segments)
