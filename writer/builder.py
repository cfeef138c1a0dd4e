"""KdumpBuilder and DumpStats: the seed API, a thin front end over CoreImage + write_dump."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import BinaryIO

from .arch import ArchInfo, get_arch
from .codecs import CompressionType
from .dump import OutputFormat, ProgressCallback, WriteResult, write_dump
from .errors import UsageError
from .image import CoreImage, DumpKind
from .layout import EHDR_SIZE, PHDR_SIZE, PN_XNUM, SHDR_SIZE
from .notes import (
    CORE_NOTE_NAME,
    DEFAULT_NOTE_VENDOR,
    READER_CLAIMED_TYPES,
    VMCOREINFO_NOTE_NAME,
    CpuContext,
    CustomNote,
    CustomNoteType,
    Note,
    annotations_text,
    note_size,
    prstatus_note,
    vmcoreinfo_note,
)
from .segments import MemorySegment, SegmentData


def _format_size(size_bytes: int) -> str:
    if size_bytes < 1024:
        return f"{size_bytes} B"
    if size_bytes < 1024 * 1024:
        return f"{size_bytes / 1024:.1f} KB"
    if size_bytes < 1024 * 1024 * 1024:
        return f"{size_bytes / (1024 * 1024):.1f} MB"
    return f"{size_bytes / (1024 * 1024 * 1024):.1f} GB"


@dataclass
class DumpStats:
    """What a builder holds so far, and the size of the ELF file it would write."""

    architecture: str
    num_memory_segments: int
    num_cpu_contexts: int
    total_memory_size: int
    vmcoreinfo_size: int
    estimated_file_size: int
    memory_segments: list[tuple[int, int, int]]  # (phys_addr, virt_addr, size)

    @property
    def total_memory_size_human(self) -> str:
        return _format_size(self.total_memory_size)

    @property
    def estimated_file_size_human(self) -> str:
        return _format_size(self.estimated_file_size)

    def __str__(self) -> str:
        lines = [
            "Dump Statistics:",
            f"  Architecture: {self.architecture}",
            f"  Memory Segments: {self.num_memory_segments}",
            f"  CPU Contexts: {self.num_cpu_contexts}",
            f"  Total Memory: {self.total_memory_size_human} ({self.total_memory_size} bytes)",
            f"  VMCOREINFO Size: {self.vmcoreinfo_size} bytes",
            f"  Estimated File Size: {self.estimated_file_size_human}",
        ]
        if self.memory_segments:
            lines.append("  Segments:")
            for phys_addr, virt_addr, size in self.memory_segments:
                if phys_addr == virt_addr:
                    lines.append(f"    0x{phys_addr:016x}: {_format_size(size)}")
                else:
                    lines.append(
                        f"    phys=0x{phys_addr:016x} virt=0x{virt_addr:016x}: "
                        f"{_format_size(size)}"
                    )
        return "\n".join(lines)


@dataclass
class KdumpBuilder:
    """Collects memory, registers and notes, then writes a vmcore.

    Example::

        builder = KdumpBuilder(arch="x86_64")
        builder.set_vmcoreinfo("OSRELEASE=6.1.0\\nPAGESIZE=4096\\n")
        builder.add_memory_segment(phys_addr=0x100000, data=memory_bytes)
        builder.write("output.vmcore")
    """

    arch: str = "x86_64"
    _vmcoreinfo: bytes = field(default=b"", init=False)
    _segments: list[MemorySegment] = field(default_factory=list, init=False)
    _cpu_contexts: list[CpuContext] = field(default_factory=list, init=False)
    _custom_notes: list[CustomNote] = field(default_factory=list, init=False)
    _arch_info: ArchInfo = field(init=False)

    def __post_init__(self) -> None:
        self._arch_info = get_arch(self.arch)  # ValueError naming the supported ones

    def set_vmcoreinfo(self, data: str | bytes) -> KdumpBuilder:
        """The VMCOREINFO text (``/sys/kernel/vmcoreinfo`` contents): ``KEY=VALUE`` lines."""
        self._vmcoreinfo = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        return self

    def add_memory_segment(
        self, phys_addr: int, data: SegmentData, virt_addr: int | None = None
    ) -> KdumpBuilder:
        """Add memory at ``phys_addr``: bytes, a file path, a binary file object or any
        ``SegmentSource`` (e.g. ``FileRangeSource(path, offset, length)``). Nothing is read
        until ``write``."""
        self._segments.append(MemorySegment(phys_addr=phys_addr, data=data, virt_addr=virt_addr))
        return self

    def add_cpu_context(
        self,
        cpu_id: int = 0,
        registers: Mapping[str, int] | None = None,
        pid: int = 0,
        **kwargs: int,
    ) -> KdumpBuilder:
        """Add one CPU's NT_PRSTATUS. Unknown register names raise a ValueError listing the
        known ones; extra keywords set prstatus fields (pr_ppid, pr_pgrp, pr_sid, si_signo...)."""
        allowed = {"pr_pid", "pr_ppid", "pr_pgrp", "pr_sid", "si_signo", "si_code", "si_errno",
                   "pr_cursig", "pr_sigpend", "pr_sighold", "pr_fpvalid"}
        unknown = set(kwargs) - allowed
        if unknown:
            raise UsageError(f"unknown prstatus field(s): {', '.join(sorted(unknown))}")
        if any(c.cpu_id == cpu_id for c in self._cpu_contexts):
            raise UsageError(f"CPU {cpu_id} already has a context")
        ctx = CpuContext(cpu_id=cpu_id, pid=pid, registers=dict(registers or {}),
                         pr_pid=kwargs.pop("pr_pid", pid))
        for key, value in kwargs.items():
            setattr(ctx, key, int(value))
        prstatus_note(self._arch_info, ctx)  # validate now, not at write time
        self._cpu_contexts.append(ctx)
        return self

    def add_custom_note(self, name: bytes | str, note_type: int, data: bytes | str) -> KdumpBuilder:
        """Add a vendor note. Types 1-4 are refused: crash takes any note of those types for
        NT_PRSTATUS/FPREGSET/PRPSINFO/TASKSTRUCT whatever its owner name."""
        name_b = name.encode("utf-8") if isinstance(name, str) else bytes(name)
        data_b = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        if note_type in READER_CLAIMED_TYPES:
            raise UsageError(
                f"note type {note_type} is read as a standard core note by crash; use "
                f"CustomNoteType values or >= {int(CustomNoteType.USER_DEFINED):#x}"
            )
        if name_b in (CORE_NOTE_NAME, VMCOREINFO_NOTE_NAME):
            raise UsageError(f"note name {name_b!r} is reserved")
        if not 0 <= note_type <= 0xFFFFFFFF:
            raise UsageError("note type must fit in 32 bits")
        self._custom_notes.append(CustomNote(name=name_b, note_type=note_type, data=data_b))
        return self

    def add_annotations(
        self, annotations: Mapping[str, str], vendor: bytes | str = DEFAULT_NOTE_VENDOR
    ) -> KdumpBuilder:
        """Free-form KEY=VALUE annotations stored as one note."""
        for key in annotations:
            if "=" in key or "\n" in key:
                raise UsageError(f"annotation key {key!r} must not contain '=' or a newline")
        return self.add_custom_note(vendor, CustomNoteType.ANNOTATIONS,
                                    annotations_text(annotations))

    # -- output --------------------------------------------------------------------------------
    def _notes(self) -> list[Note]:
        notes = [prstatus_note(self._arch_info, c)
                 for c in sorted(self._cpu_contexts, key=lambda c: c.cpu_id)]
        if self._vmcoreinfo:
            notes.append(vmcoreinfo_note(self._vmcoreinfo))
        notes += [Note(n.name, n.note_type, n.data) for n in self._custom_notes]
        return notes

    def to_image(self) -> CoreImage:
        return CoreImage(arch=self._arch_info, kind=DumpKind.KERNEL, segments=list(self._segments),
                         notes=self._notes(), vmcoreinfo=self._vmcoreinfo)

    @property
    def stats(self) -> DumpStats:
        total = sum(seg.size for seg in self._segments)
        notes_size = sum(note_size(n.name, len(n.desc)) for n in self._notes())
        phnum = 1 + len(self._segments)
        estimated = EHDR_SIZE + phnum * PHDR_SIZE + notes_size + total
        if phnum >= PN_XNUM:
            estimated += SHDR_SIZE
        return DumpStats(
            architecture=self._arch_info.name,
            num_memory_segments=len(self._segments),
            num_cpu_contexts=len(self._cpu_contexts),
            total_memory_size=total,
            vmcoreinfo_size=len(self._vmcoreinfo),
            estimated_file_size=estimated,
            memory_segments=[(s.phys_addr, s.effective_virt_addr, s.size)
                             for s in self._segments],
        )

    def write(
        self,
        output_path: str | os.PathLike[str] | BinaryIO,
        format: OutputFormat | str = OutputFormat.ELF,
        compression: CompressionType | str = CompressionType.ZLIB,
        compression_level: int = 1,
        *,
        dump_level: int = 0,
        threads: int | None = None,
        progress: ProgressCallback | None = None,
    ) -> WriteResult:
        """Write the dump (atomically for paths). ``compression`` applies to the kdump formats.

        ``compression_level`` defaults to 1 (makedumpfile's Z_BEST_SPEED; 0.4.0 used 6)."""
        return write_dump(self.to_image(), output_path, format=format, compression=compression,
                          compression_level=compression_level, dump_level=dump_level,
                          threads=threads, progress=progress)
