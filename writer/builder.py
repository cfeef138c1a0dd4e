"""KdumpBuilder and DumpStats: the seed API, a thin front end over CoreImage + write_dump."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import BinaryIO

from .arch import ArchInfo, get_arch
from .codecs import DEFAULT_LEVEL, CompressionType
from .dump import OutputFormat, ProgressCallback, WriteResult, write_dump
from .elf import phdr_count
from .errors import NoteTypeWarning, UsageError, warn
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

# What crash makes of a note of type 1-4 whatever its owner (netdump.c dump_Elf64_Nhdr).
_CLAIMED_BY_CRASH = {1: "NT_PRSTATUS: one more CPU", 2: "NT_PRFPREG", 3: "NT_PRPSINFO",
                     4: "NT_TASKSTRUCT"}


def _key_value_text(mapping: Mapping[str, str], what: str) -> bytes:
    """``KEY=VALUE`` lines; a key with ``=`` or a newline, or a value with a newline, would not
    read back as the same mapping, so they are refused."""
    for key, value in mapping.items():
        if "=" in str(key) or "\n" in str(key):
            raise UsageError(f"{what} key {key!r} must not contain '=' or a newline")
        if "\n" in str(value):
            raise UsageError(f"{what} value of {key!r} must not contain a newline")
    return annotations_text({str(k): str(v) for k, v in mapping.items()})


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
        """Add an ELF note ``(name, note_type)`` with ``data`` (str is UTF-8 encoded).

        Any 32-bit type under any owner name is written, e.g.::

            builder.add_custom_note(name=b"MYAPP", note_type=1, data=b"version=1.0")

        Types 1-4 (and the owner names CORE and VMCOREINFO) draw a ``NoteTypeWarning``: crash
        reads every note of type 1-4 as NT_PRSTATUS / NT_PRFPREG / NT_PRPSINFO / NT_TASKSTRUCT
        whatever its owner, so a type-1 note counts as one more CPU there. ``CustomNoteType``
        values (0x4B444Cxx) and anything above 0xFFFF stay clear of every reader's types.
        """
        name_b = name.encode("utf-8") if isinstance(name, str) else bytes(name)
        data_b = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        if isinstance(note_type, bool) or not isinstance(note_type, int) \
                or not 0 <= note_type <= 0xFFFFFFFF:
            raise UsageError(f"note type must be an integer 0-0xffffffff, got {note_type!r}")
        if note_type in READER_CLAIMED_TYPES:
            # crash netdump.c dump_Elf64_Nhdr switches on n_type before it looks at the name.
            warn(f"note type {note_type} ({name_b.decode('utf-8', 'replace')}) is written as "
                 f"asked, but crash reads every note of type 1-4 as a standard core note "
                 f"({_CLAIMED_BY_CRASH[note_type]}) whatever its owner; CustomNoteType values "
                 f"or types above 0xffff avoid that", NoteTypeWarning)
        if name_b in (CORE_NOTE_NAME, VMCOREINFO_NOTE_NAME):
            warn(f"note owner {name_b.decode()} is the kernel's own: readers will take this "
                 "note for one of the kernel's", NoteTypeWarning)
        self._custom_notes.append(CustomNote(name=name_b, note_type=note_type, data=data_b))
        return self

    def add_annotations(
        self, annotations: Mapping[str, str], vendor: bytes | str = DEFAULT_NOTE_VENDOR
    ) -> KdumpBuilder:
        """Free-form ``KEY=VALUE`` annotations stored as one ANNOTATIONS note, e.g.::

            builder.add_annotations({"hostname": "prod-server-01"})

        Keys must not contain ``=`` or a newline, values no newline (a ValueError otherwise)."""
        return self.add_custom_note(vendor, CustomNoteType.ANNOTATIONS,
                                    _key_value_text(annotations, "annotation"))

    def add_metadata(
        self, metadata: Mapping[str, str], vendor: bytes | str = DEFAULT_NOTE_VENDOR
    ) -> KdumpBuilder:
        """``KEY=VALUE`` lines (hashes, signatures, timestamps) in one METADATA note, as in
        kdumpling 0.4.0, validated like ``add_annotations``::

            builder.add_metadata({"sha256": "abc123", "created_at": "2024-01-28T10:30:00Z"})
        """
        return self.add_custom_note(vendor, CustomNoteType.METADATA,
                                    _key_value_text(metadata, "metadata"))

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
        phnum = phdr_count(len(self._segments), notes_size > 0, process=False)
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
        compression_level: int = DEFAULT_LEVEL,
        *,
        dump_level: int = 0,
        threads: int | None = None,
        progress: ProgressCallback | None = None,
    ) -> WriteResult:
        """Write the dump (atomically for paths); returns a ``WriteResult``.

        ``compression`` and ``compression_level`` (1-9, default 6 as in the seed) apply to the
        kdump formats. zlib level 1 is the fast path and makedumpfile -c's size; 2-9 are zlib's
        own levels (smaller and slower: README, "The writer library"); zstd maps 1-9 onto its
        levels 1-19; lzo and snappy have no levels. A builder without memory segments still
        writes a valid file, with an ``EmptyDumpWarning``. Examples::

            builder.write("output.vmcore")
            builder.write("output.vmcore", format=OutputFormat.KDUMP_COMPRESSED,
                          compression=CompressionType.ZLIB)
        """
        return write_dump(self.to_image(), output_path, format=format, compression=compression,
                          compression_level=compression_level, dump_level=dump_level,
                          threads=threads, progress=progress)
