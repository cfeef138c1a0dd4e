"""An ELF vmcore arriving on a pipe (QEMU ``dump-guest-memory``, libvirt), read front to back."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import BinaryIO

from . import layout
from .errors import FormatError, SourceReadError
from .image import CoreImage, DumpKind
from .notes import (
    CORE_NOTE_NAME,
    NT_AUXV,
    NT_FILE,
    NT_PRPSINFO,
    VMCOREINFO_NOTE_NAME,
    Note,
    iter_notes,
    parse_vmcoreinfo,
)
from .read_base import COPY, QEMU_NOTE_NAME, DumpSegment, Range, StreamIn, merge_ranges
from .read_elf import build_map, parse_ehdr
from .segments import CallableSource, MemorySegment

MAX_STREAM_HEADER = 64 << 20  # default cap on an ELF stream's header + notes


class ElfStreamReader:
    """An ELF vmcore arriving on a non-seekable stream (QEMU ``dump-guest-memory``, libvirt).

    The header, program headers and notes are read from the head of the stream. ``image``'s
    segments then read the stream strictly front to back: each read must start at or after
    the end of the previous one (gaps are skipped), else SourceReadError. QEMU writes its
    PT_LOADs in ascending guest-physical order (dump/dump.c: dump_iterate walks the sorted
    guest_phys_blocks, the same list write_elf_loads used), which is the order the kdump
    writer reads in. Call ``drain()`` when done so the producer sees its whole dump consumed.

    A stream that ends before the data its program headers promise (the producer died) keeps
    every byte that arrived: the rest reads as zeros and is named in ``image.missing``
    (physical addresses, virtual for process cores) and in ``warnings`` as soon as the end is
    met, so the writers, which look at ``missing`` when they finish, mark their output
    incomplete. A header flagged DUMP_ELF_INCOMPLETE makes ``image.incomplete`` true.
    """

    def __init__(self, stream: BinaryIO | int, *, name: str = "<stream>",
                 max_header: int = MAX_STREAM_HEADER) -> None:
        self.name = name
        self.warnings: list[str] = []
        self._in = StreamIn(stream)
        self._lock = threading.Lock()
        self._last: tuple[int, bytes | bytearray] = (0, b"")
        self._head = bytearray()
        self.ended_at: int | None = None  # where the stream ended short of its data, if it did
        self._ranges: list[Range] = []
        self._parse(max_header)

    def _need(self, end: int, max_header: int, what: str) -> None:
        if end > max_header:
            raise FormatError(f"{what} ends at {end:#x}, past the {max_header:#x}-byte header "
                              "limit for streams", len(self._head), self.name)
        while len(self._head) < end:
            data = self._in.read_some(min(end - len(self._head), COPY))
            if not data:
                raise FormatError(f"stream ended inside the {what}", len(self._head), self.name)
            self._head += data

    def _parse(self, max_header: int) -> None:
        self._need(layout.EHDR_SIZE, max_header, "ELF header")
        ehdr = parse_ehdr(bytes(self._head[:layout.EHDR_SIZE]), self.name)
        endian, arch, e_flags = ehdr.endian, ehdr.arch, ehdr.flags
        phoff, phnum, phentsize, shoff = ehdr.phoff, ehdr.phnum, ehdr.phentsize, ehdr.shoff
        if phentsize != layout.PHDR_SIZE:
            raise FormatError(f"e_phentsize is {phentsize}", 0x36, self.name)
        if phnum == layout.PN_XNUM:
            if shoff == 0:
                raise FormatError("PN_XNUM without a section header", 0x28, self.name)
            self._need(shoff + layout.SHDR_SIZE, max_header, "section header")
            phnum = layout.SHDR[endian].unpack_from(self._head, shoff)[7]  # sh_info
        self._need(phoff + phnum * layout.PHDR_SIZE, max_header, "program headers")
        loads: list[DumpSegment] = []
        note_ranges: list[tuple[int, int]] = []
        for i in range(phnum):
            p_type, p_flags, off, vaddr, paddr, filesz, memsz, _ = layout.PHDR[endian].unpack_from(
                self._head, phoff + i * layout.PHDR_SIZE)
            if p_type == layout.PT_NOTE:
                note_ranges.append((off, filesz))
            elif p_type == layout.PT_LOAD:
                if memsz < filesz:
                    raise FormatError(f"PT_LOAD {i}: p_filesz > p_memsz",
                                      phoff + i * layout.PHDR_SIZE, self.name)
                loads.append(DumpSegment(paddr, vaddr, off, filesz, memsz, p_flags))
        notes: list[Note] = []
        for off, filesz in note_ranges:
            self._need(off + filesz, max_header, "notes")
            try:
                notes += [n for _, n in iter_notes(bytes(self._head[off : off + filesz]),
                                                   endian, off)]
            except FormatError as err:
                raise FormatError("note runs past the end of its segment", err.offset,
                                  self.name) from None
        vmcoreinfo = next((n.desc for n in notes if n.name == VMCOREINFO_NOTE_NAME), b"")
        process = not vmcoreinfo and not any(n.name == QEMU_NOTE_NAME for n in notes) and \
            any(n.name == CORE_NOTE_NAME and n.type in (NT_PRPSINFO, NT_FILE, NT_AUXV)
                for n in notes)
        kind = DumpKind.PROCESS if process else DumpKind.KERNEL
        incomplete = bool(e_flags & layout.DUMP_ELF_INCOMPLETE)
        if incomplete:
            self.warnings.append("ELF e_flags has DUMP_ELF_INCOMPLETE")
        ranges = build_map(loads, process)
        # The stream is read in file order; that must also be the address order the writers use.
        by_file = sorted(ranges, key=lambda r: r.file_offset)
        if [r.start for r in by_file if r.data_end > r.start] != \
                [r.start for r in ranges if r.data_end > r.start]:
            self.warnings.append(
                "PT_LOAD file order differs from address order: only the ELF writer, which "
                "keeps the given order, can consume this stream"
            )
            ranges = by_file
        self._ranges = ranges
        segs = []
        for rng in ranges:
            segs.append(MemorySegment(
                phys_addr=rng.phys_addr, virt_addr=rng.virt_addr, mem_size=rng.end - rng.start,
                flags=rng.flags,
                data=CallableSource(rng.data_end - rng.start, self._reader(rng.file_offset)),
            ))
        page_size = None
        ps_text = parse_vmcoreinfo(vmcoreinfo).get("PAGESIZE")
        if ps_text and ps_text.isdigit():
            value = int(ps_text)
            page_size = value if value and value & (value - 1) == 0 else None
        self.image = CoreImage(
            arch=arch, kind=kind, segments=segs, notes=notes, vmcoreinfo=vmcoreinfo,
            page_size=page_size, extra={"source_format": "elf-stream", "source": self.name},
            incomplete=incomplete,
        )

    @property
    def position(self) -> int:
        """Bytes consumed from the stream so far."""
        return self._in.pos

    def _reader(self, base: int) -> Callable[[int, int], bytes | bytearray]:
        def read(offset: int, length: int) -> bytes | bytearray:
            return self.read_at(base + offset, length)
        return read

    def read_at(self, pos: int, length: int) -> bytes | bytearray:
        """``length`` bytes at stream offset ``pos``; ``pos`` must not go backwards."""
        with self._lock:
            end = pos + length
            if end <= len(self._head):
                return bytes(self._head[pos:end])
            last_pos, last = self._last
            if last_pos <= pos and end <= last_pos + len(last):
                return last[pos - last_pos : end - last_pos]
            if self.ended_at is not None and pos >= self.ended_at:
                return bytes(length)  # never arrived: named in image.missing
            if pos < self._in.pos:
                raise SourceReadError(
                    f"{self.name}: read at {pos:#x} but the stream is already at "
                    f"{self._in.pos:#x} (segments must be read in file order)", pos)
            if pos > self._in.pos:
                try:
                    self._in.skip(pos - self._in.pos)
                except FormatError:
                    self._ended(self._in.pos)
                    return bytes(length)
            # A bytearray nobody changes: callers treat it like bytes (one copy fewer).
            data = self._in.read_upto(length)
            if len(data) < length:
                self._ended(pos + len(data))
                data += bytes(length - len(data))
            self._last = (pos, data)
            return data

    def _ended(self, at: int) -> None:
        """The stream ended at offset ``at``: name the memory data it did not deliver."""
        self.ended_at = at
        lost = [(rng.start + max(at, rng.file_offset) - rng.file_offset, rng.data_end)
                for rng in self._ranges
                if rng.data_end > rng.start and rng.file_offset + rng.data_end - rng.start > at]
        if not lost:
            return
        missing = self.image.missing
        missing[:] = merge_ranges([*missing, *lost])
        total = sum(b - a for a, b in lost)
        self.warnings.append(
            f"{self.name}: the stream ended at byte {at:#x}, {total} bytes of memory data "
            f"short in {len(lost)} range(s) from {lost[0][0]:#x}; they read as zeros and are "
            "named in image.missing"
        )

    def drain(self) -> int:
        """Read and discard the rest of the stream; returns the bytes skipped."""
        with self._lock:
            skipped = 0
            while True:
                data = self._in.read_some(COPY)
                if not data:
                    return skipped
                skipped += len(data)


def open_elf_stream(stream: BinaryIO | int, *, name: str = "<stream>",
                    max_header: int = MAX_STREAM_HEADER) -> ElfStreamReader:
    return ElfStreamReader(stream, name=name, max_header=max_header)


def read_elf_stream(stream: BinaryIO | int) -> CoreImage:
    """The CoreImage of an ELF vmcore arriving on a pipe; see ElfStreamReader."""
    return ElfStreamReader(stream).image
