"""Read existing dumps: ELF vmcores and process cores, kdump-compressed files (also flattened).

``open_dump(path)`` sniffs the file and returns a ``Dump`` that lists segments and notes, gives the
VMCOREINFO, CPU registers and header facts, reads memory by address, walks every page for
``verify`` and turns the dump into a ``CoreImage`` whose segments read lazily, so any dump converts
into any format without being loaded into memory.

Layouts (dump-formats.md §2, §3): ELF64 per the gABI; the kdump-compressed header, sub-header and
page descriptors per makedumpfile ``diskdump_mod.h``; the flattened records per makedumpfile.h
``makedumpfile_data_header``. The struct layouts are the writers' (``elf.py``, ``diskdump.py``,
``sinks.py``), declared once there.

Robustness: every count and size read from a file is checked against the file's size before
anything is allocated, and malformed input raises ``FormatError`` naming the file offset.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import os
import re
import stat
import struct
import threading
import zlib
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import BinaryIO

from .arch import ARCHITECTURES, ArchInfo, arch_from_machine
from .codecs import (
    DUMP_DH_COMPRESSED_INCOMPLETE,
    DUMP_DH_COMPRESSED_LZO,
    DUMP_DH_COMPRESSED_SNAPPY,
    DUMP_DH_COMPRESSED_ZLIB,
    DUMP_DH_COMPRESSED_ZSTD,
    DUMP_DH_EXCLUDED_VMEMMAP,
    import_codec_module,
)
from .diskdump import DISK_DUMP_HEADER, KDUMP_SIGNATURE, KDUMP_SUB_HEADER, PAGE_DESC
from .elf import (
    DUMP_ELF_INCOMPLETE,
    EHDR,
    EHDR_SIZE,
    ELFCLASS64,
    ELFDATA2LSB,
    ELFDATA2MSB,
    ELFMAG,
    ET_CORE,
    PHDR,
    PHDR_SIZE,
    PN_XNUM,
    PT_LOAD,
    PT_NOTE,
    SHDR,
    SHDR_SIZE,
)
from .errors import (
    FormatError,
    SourceReadError,
    UnsupportedArchError,
    UsageError,
)
from .image import CoreImage, DumpKind
from .notes import (
    CORE_NOTE_NAME,
    NT_AUXV,
    NT_FILE,
    NT_PRPSINFO,
    NT_PRSTATUS,
    NT_SIGINFO,
    VMCOREINFO_NOTE_NAME,
    CustomNoteType,
    Note,
    iter_notes,
    parse_annotations,
    parse_prstatus,
    parse_vmcoreinfo,
    vmcoreinfo_note,
)
from .segments import (
    CallableSource,
    FdRangeSource,
    MemorySegment,
    SegmentSource,
    pread_full,
)
from .sinks import FLAT_HEADER, FLAT_HEADER_SIZE, FLAT_RECORD, FLAT_SIGNATURE

__all__ = [
    "Dump",
    "DumpSegment",
    "ElfStreamReader",
    "PageNotDumpedError",
    "open_dump",
    "open_elf_stream",
    "read_elf_stream",
    "reassemble_flattened",
]

DISKDUMP_SIGNATURE = b"DISKDUMP"  # the pre-kdump diskdump format (different sub-header)
QEMU_NOTE_NAME = b"QEMU"
NO_PADDR = (1 << 64) - 1  # p_paddr of a PT_LOAD without a physical address
ERASEINFO_NOTE_NAME = b"ERASEINFO"
DISK_DUMP_HEADER_SIZE = 464  # sizeof(struct disk_dump_header) on 64-bit targets
SUB_HEADER_SIZE = 104  # sizeof(struct kdump_sub_header), header_version 6
PRSTATUS_MIN = 112  # the common prefix of struct elf_prstatus (include/linux/elfcore.h)
# Bounds for values that are not sizes of something in the file.
MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = 1024, 1 << 20
MAX_STREAM_HEADER = 64 << 20  # default cap on an ELF stream's header + notes
_COPY = 1 << 20
_DESC_BLOCK = 4096  # page descriptors read (and cached) together
_RANK_CHUNK = 512  # bitmap bytes per prefix-popcount entry

# utsname.machine strings (libkdumpfile util.c machine_arch_name) -> our arch names
_UTS_MACHINE = {
    "x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64",
    "s390x": "s390x", "ppc64": "ppc64", "ppc64le": "ppc64le", "riscv64": "riscv64",
}
_32BIT_MACHINES = re.compile(r"^(i[3-6]86|arm(v\d.*)?|ppc|s390|riscv32|mips.*)$")


class PageNotDumpedError(SourceReadError):
    """An address the dump has no data for.

    ``reason`` is ``"absent"`` (no such memory), ``"excluded"`` (filtered out by the dump level),
    ``"not-dumped"`` (an ELF range between p_filesz and p_memsz) or ``"incomplete"`` (the dump
    was cut short before this page was written).
    """

    def __init__(self, message: str, address: int, reason: str) -> None:
        super().__init__(message, address)
        self.reason = reason


@dataclass(frozen=True)
class DumpSegment:
    """One memory range of a dump.

    For ELF files this is a PT_LOAD; for kdump files one run of consecutive dumped pages
    (``file_offset`` is None there: pages are stored one by one).
    """

    phys_addr: int
    virt_addr: int | None
    file_offset: int | None
    file_size: int  # bytes with data in the file (p_filesz)
    mem_size: int  # bytes of memory described (p_memsz)
    flags: int = 7


# --- file access -------------------------------------------------------------------------------


class _Blob:
    """Random access to a dump's bytes: the file itself, or a flattened file's records."""

    size: int  # logical size (reads past it return short)
    stored: int  # bytes physically present: bounds every allocation

    def pread(self, offset: int, length: int) -> bytes:
        raise NotImplementedError


class _FileBlob(_Blob):
    def __init__(self, fd: int, path: str) -> None:
        self.fd, self.path = fd, path
        self.size = self.stored = os.fstat(fd).st_size

    def pread(self, offset: int, length: int) -> bytes:
        if length <= 0 or offset >= self.size:
            return b""
        return pread_full(self.fd, min(length, self.size - offset), offset, self.path)


class _FlatBlob(_Blob):
    """The rearranged view of a flattened file, from an in-memory map of its records.

    Records are applied in file order, so a later record overrides an earlier one at the same
    offset, as ``makedumpfile -R`` does. Bytes no record covers read as zeros (a hole).
    """

    def __init__(self, fd: int, path: str, warnings: list[str]) -> None:
        self.fd, self.path = fd, path
        self._file = _FileBlob(fd, path)
        self.stored = self._file.size
        starts, ends, srcs = array("q"), array("q"), array("q")
        pos = FLAT_HEADER_SIZE
        total = self._file.size
        ended = False
        while pos + FLAT_RECORD.size <= total:
            offset, size = FLAT_RECORD.unpack(self._file.pread(pos, FLAT_RECORD.size))
            if offset == -1 and size == -1:
                ended = True
                pos += FLAT_RECORD.size
                break
            if offset < 0 or size < 0:
                raise FormatError(
                    f"flattened record with offset {offset} and size {size}", pos, path
                )
            if pos + FLAT_RECORD.size + size > total:
                warnings.append(
                    f"flattened record at offset {pos:#x} runs past the end of the file "
                    "(the dump was cut short); its data is ignored"
                )
                break
            if size:
                starts.append(offset)
                ends.append(offset + size)
                srcs.append(pos + FLAT_RECORD.size)
            pos += FLAT_RECORD.size + size
        if not ended:
            warnings.append("flattened file has no end marker: the dump is incomplete")
        elif pos < total:
            warnings.append(f"{total - pos} bytes after the flattened end marker are ignored")
        self.records = len(starts)
        self._build(starts, ends, srcs)
        self.size = self._ends[-1] if len(self._ends) else 0

    def _build(self, starts: array[int], ends: array[int], srcs: array[int]) -> None:
        order = sorted(range(len(starts)), key=lambda i: (starts[i], i))
        overlap = any(
            starts[order[k + 1]] < ends[order[k]] for k in range(len(order) - 1)
        )
        if not overlap:
            self._starts = array("q", (starts[i] for i in order))
            self._ends = array("q", (ends[i] for i in order))
            self._srcs = array("q", (srcs[i] for i in order))
            return
        # Rare (makedumpfile rewrites its sub-header when it adds ERASEINFO): within each
        # cluster of overlapping records, paint them in stream order, later ones cutting
        # earlier ones. Clusters keep the work local to the records that overlap.
        pieces: list[tuple[int, int, int]] = []
        k = 0
        while k < len(order):
            cluster = [order[k]]
            reach = ends[order[k]]
            k += 1
            while k < len(order) and starts[order[k]] < reach:
                cluster.append(order[k])
                reach = max(reach, ends[order[k]])
                k += 1
            pieces += _paint(sorted(cluster), starts, ends, srcs)
        self._starts = array("q", (p[0] for p in pieces))
        self._ends = array("q", (p[1] for p in pieces))
        self._srcs = array("q", (p[2] for p in pieces))

    def pread(self, offset: int, length: int) -> bytes:
        if length <= 0 or offset >= self.size:
            return b""
        out = bytearray()
        for _, take, src in self.fragments(offset, min(length, self.size - offset)):
            out += bytes(take) if src is None else self._file.pread(src, take)
        return bytes(out)

    def fragments(self, offset: int, length: int) -> list[tuple[int, int, int | None]]:
        """(logical offset, length, source file offset or None for a hole) covering the range."""
        out: list[tuple[int, int, int | None]] = []
        pos, end = offset, offset + length
        idx = bisect.bisect_right(self._starts, pos) - 1
        while pos < end:
            if idx >= 0 and pos < self._ends[idx]:
                take = min(end, self._ends[idx]) - pos
                out.append((pos, take, self._srcs[idx] + (pos - self._starts[idx])))
            else:
                nxt = self._starts[idx + 1] if idx + 1 < len(self._starts) else end
                take = min(end, nxt) - pos
                out.append((pos, take, None))
            pos += take
            if idx + 1 < len(self._starts) and pos >= self._starts[idx + 1]:
                idx += 1
        return out


def _paint(records: list[int], starts: array[int], ends: array[int], srcs: array[int]
           ) -> list[tuple[int, int, int]]:
    """Disjoint (start, end, src) pieces of overlapping records applied in the given order."""
    pieces: list[tuple[int, int, int]] = []
    for i in records:
        a, b, src = starts[i], ends[i], srcs[i]
        keep: list[tuple[int, int, int]] = []
        lo = bisect.bisect_left(pieces, (a, -1, -1))
        if lo > 0 and pieces[lo - 1][1] > a:
            lo -= 1
        hi = lo
        while hi < len(pieces) and pieces[hi][0] < b:
            s, e, ps = pieces[hi]
            if s < a:
                keep.append((s, a, ps))
            if e > b:
                keep.append((b, e, ps + (b - s)))
            hi += 1
        pieces[lo:hi] = sorted([*keep, (a, b, src)])
    return pieces


# --- codecs ------------------------------------------------------------------------------------


class _Decompressor:
    """Decodes one stored page; per-page flags decide (zlib -> lzo -> snappy -> zstd, first set
    bit wins, 0 = raw), as makedumpfile readpage_kdump_compressed and libkdumpfile
    diskdump_read_page do. Output is bounded to one page before anything is allocated."""

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self._local = threading.local()

    def codec_name(self, flags: int) -> str:
        if flags & DUMP_DH_COMPRESSED_ZLIB:
            return "zlib"
        if flags & DUMP_DH_COMPRESSED_LZO:
            return "lzo"
        if flags & DUMP_DH_COMPRESSED_SNAPPY:
            return "snappy"
        if flags & DUMP_DH_COMPRESSED_ZSTD:
            return "zstd"
        return "none"

    def decode(self, flags: int, data: bytes) -> bytes:
        """The page, or ValueError saying why the stored bytes are not one."""
        size = self.page_size
        codec = self.codec_name(flags)
        if codec == "none":
            if len(data) != size:
                raise ValueError(f"raw page of {len(data)} bytes, expected {size}")
            return data
        if codec == "zlib":
            obj = zlib.decompressobj()
            try:
                out = obj.decompress(data, size + 1)
            except zlib.error as err:
                raise ValueError(f"zlib: {err}") from None
            if not obj.eof and len(out) <= size:
                raise ValueError("zlib: truncated stream")
        elif codec == "lzo":
            lzo = import_codec_module("lzo", "lzo", "lzo")
            try:
                out = lzo.decompress(data, False, size)
            except lzo.error as err:
                raise ValueError(f"lzo: {err}") from None
        elif codec == "snappy":
            snappy = import_codec_module("snappy", "cramjam", "snappy").snappy
            try:
                claimed = snappy.decompress_raw_len(data)
                if claimed != size:
                    raise ValueError(f"snappy: block holds {claimed} bytes, expected {size}")
                out = bytes(snappy.decompress_raw(data))
            except ValueError:
                raise
            except Exception as err:  # cramjam.DecompressionError has no stable import path
                raise ValueError(f"snappy: {err}") from None
        else:
            zstandard = import_codec_module("zstd", "zstandard", "zstd")
            dctx = getattr(self._local, "zstd", None)
            if dctx is None:
                dctx = self._local.zstd = zstandard.ZstdDecompressor()
            try:
                claimed = zstandard.frame_content_size(data)
                if claimed > size:
                    raise ValueError(f"zstd: frame holds {claimed} bytes, expected {size}")
                out = dctx.decompress(data, max_output_size=size)
            except zstandard.ZstdError as err:
                raise ValueError(f"zstd: {err}") from None
        if len(out) != size:
            raise ValueError(f"{codec}: page decompressed to {len(out)} bytes, expected {size}")
        return bytes(out)


# --- the Dump object ---------------------------------------------------------------------------


@dataclass
class _Range:
    """A piece of the address map: [start, end) of memory, data for [start, data_end)."""

    start: int
    end: int
    data_end: int
    file_offset: int
    virt_addr: int | None
    phys_addr: int
    flags: int


class Dump:
    """An open dump file. Use as a context manager; ``to_image()`` sources need it open."""

    format: str  # "elf" | "kdump" | "kdump-flat"
    arch: ArchInfo
    kind: DumpKind
    page_size: int
    segments: list[DumpSegment]
    notes: list[Note]
    vmcoreinfo: bytes
    header: dict[str, object]
    warnings: list[str]

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd = fd
        self.warnings = []
        self.notes = []
        self.vmcoreinfo = b""
        self.header = {}
        self.segments = []

    # -- lifetime --
    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Dump:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.path!r} {self.format} {self.arch.name} "
                f"{self.kind.value} {len(self.segments)} segments>")

    def _err(self, message: str, offset: int | None) -> FormatError:
        return FormatError(message, offset, self.path)

    # -- derived facts --
    @property
    def vmcoreinfo_fields(self) -> dict[str, str]:
        return parse_vmcoreinfo(self.vmcoreinfo)

    @property
    def cpus(self) -> list[tuple[int, dict[str, int]]]:
        """(pr_pid, registers) of every CORE NT_PRSTATUS note, in note order."""
        need = PRSTATUS_MIN + self.arch.reg_bytes
        out = []
        for note in self.notes:
            if note.type == NT_PRSTATUS and note.name == CORE_NOTE_NAME and len(note.desc) >= need:
                out.append(parse_prstatus(self.arch, note.desc))
        return out

    @property
    def annotations(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for note in self.notes:
            if note.type == CustomNoteType.ANNOTATIONS:
                out.update(parse_annotations(note.desc))
        return out

    @property
    def memory_size(self) -> int:
        return sum(s.file_size for s in self.segments)

    # -- reads, implemented by the formats --
    def read_phys(self, addr: int, length: int, *, zero_fill: bool = False) -> bytes:
        """``length`` bytes of physical memory at ``addr``.

        Addresses the dump has no data for raise ``PageNotDumpedError`` (with the first such
        address and the reason), or read as zeros when ``zero_fill`` is true.
        """
        raise NotImplementedError

    def read_virt(self, addr: int, length: int, *, zero_fill: bool = False) -> bytes:
        """Bytes at a virtual address as the ELF program headers map it (p_vaddr)."""
        raise UsageError(f"{self.format} dumps have no virtual address map")

    def iter_pages(self) -> Iterator[tuple[int, bytes]]:
        """(page frame number, page bytes) for every page with data, in ascending order.

        For kdump files each stored page is decoded and checked to be exactly ``page_size``
        bytes; a page that is not raises FormatError. Process cores number pages by virtual
        address.
        """
        raise NotImplementedError

    def to_image(self) -> CoreImage:
        """A CoreImage of this dump whose segments read lazily from the open file."""
        raise NotImplementedError

    # -- shared helpers --
    def _image_notes(self, extra: list[Note] | None = None) -> list[Note]:
        notes = list(self.notes)
        if self.vmcoreinfo and not any(n.name == VMCOREINFO_NOTE_NAME for n in notes):
            notes.append(vmcoreinfo_note(self.vmcoreinfo))
        return notes + (extra or [])

    def _crash_time(self) -> int | None:
        value = self.vmcoreinfo_fields.get("CRASHTIME")
        if value is not None:
            return None  # the writers take it from VMCOREINFO
        ts = self.header.get("timestamp")
        return ts if isinstance(ts, int) and ts > 0 else None

    def _parse_vmcoreinfo_page_size(self) -> int | None:
        value = self.vmcoreinfo_fields.get("PAGESIZE")
        if value is None:
            return None
        try:
            size = int(value, 0)
        except ValueError:
            self.warnings.append(f"VMCOREINFO PAGESIZE={value!r} is not a number")
            return None
        if size <= 0 or size & (size - 1) or size > MAX_BLOCK_SIZE:
            self.warnings.append(f"VMCOREINFO PAGESIZE={value!r} is not a valid page size")
            return None
        return size

    def _collect_notes(self, data: bytes, endian: str, base: int) -> None:
        try:
            for _, note in iter_notes(data, endian, base):
                self.notes.append(note)
        except FormatError as err:
            raise self._err("note runs past the end of its segment", err.offset) from None


def _vmcoreinfo_facts(fields: dict[str, str]) -> dict[str, object]:
    """Header facts an ELF vmcore carries only in VMCOREINFO (include/linux/vmcore_info.h;
    NUMBER() is decimal and may be negative, KERNELOFFSET hex)."""
    out: dict[str, object] = {}
    if "OSRELEASE" in fields:
        out["osrelease"] = fields["OSRELEASE"]
    for key, name, base in (("NUMBER(phys_base)", "phys_base", 0),
                            ("NUMBER(PHYS_OFFSET)", "phys_base", 0),
                            ("KERNELOFFSET", "kernel_offset", 16),
                            ("CRASHTIME", "crash_time", 10)):
        if key in fields and name not in out:
            try:
                out[name] = int(fields[key], base)
            except ValueError:
                continue
    return out


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


# --- ELF ---------------------------------------------------------------------------------------


class ElfDump(Dump):
    """An ELF64 core: kexec/kdump vmcore, QEMU dump-guest-memory output, or a process core."""

    format = "elf"

    def __init__(self, path: str, fd: int) -> None:
        super().__init__(path, fd)
        self._blob = _FileBlob(fd, path)
        self._parse()

    def _parse(self) -> None:
        blob = self._blob
        size = blob.size
        head = blob.pread(0, EHDR_SIZE)
        if len(head) < EHDR_SIZE:
            raise self._err(f"ELF header truncated: file is {size} bytes", 0)
        if head[4] != ELFCLASS64:
            raise self._err(f"only ELF64 dumps are supported (EI_CLASS {head[4]})", 4)
        if head[5] not in (ELFDATA2LSB, ELFDATA2MSB):
            raise self._err(f"bad EI_DATA {head[5]}", 5)
        endian = "<" if head[5] == ELFDATA2LSB else ">"
        self.endian = endian
        (_, e_type, machine, _, _, phoff, shoff, e_flags, _, phentsize, phnum, shentsize,
         shnum, _) = EHDR[endian].unpack(head)
        if e_type != ET_CORE:
            raise self._err(f"not a core file (e_type {e_type})", 16)
        try:
            self.arch = arch_from_machine(machine, endian == ">")
        except UnsupportedArchError as err:
            raise self._err(str(err), 18) from None
        if phnum == PN_XNUM:
            # The real count is in section header 0's sh_info (gABI; QEMU write_elf_section).
            if shoff == 0 or shoff + SHDR_SIZE > size:
                raise self._err("e_phnum is PN_XNUM but there is no section header 0", 0x28)
            sh = SHDR[endian].unpack(blob.pread(shoff, SHDR_SIZE))
            phnum = sh[7]  # sh_info
        if phnum == 0:
            raise self._err("no program headers", 0x38)
        if phentsize != PHDR_SIZE:
            raise self._err(f"e_phentsize is {phentsize}, expected {PHDR_SIZE}", 0x36)
        if phoff < EHDR_SIZE // 2 or phoff + phnum * PHDR_SIZE > size:
            raise self._err(
                f"{phnum} program headers at {phoff:#x} do not fit in the file ({size} bytes)",
                0x20,
            )
        self.header = {
            "e_machine": machine, "e_flags": e_flags, "e_phoff": phoff, "e_phnum": phnum,
            "e_shoff": shoff, "e_shnum": shnum, "e_shentsize": shentsize,
            "layout": "kexec" if phoff == EHDR_SIZE else "qemu" if shoff == EHDR_SIZE else "other",
            "incomplete": bool(e_flags & DUMP_ELF_INCOMPLETE),
        }
        if e_flags & DUMP_ELF_INCOMPLETE:
            self.warnings.append(
                "ELF e_flags has DUMP_ELF_INCOMPLETE: the dump was cut short (makedumpfile)"
            )
        table = blob.pread(phoff, phnum * PHDR_SIZE)
        phdr = PHDR[endian]
        note_bytes = 0
        loads: list[DumpSegment] = []
        truncated = no_paddr = 0
        for i in range(phnum):
            off = phoff + i * PHDR_SIZE
            p_type, p_flags, p_offset, vaddr, paddr, filesz, memsz, _ = phdr.unpack_from(
                table, i * PHDR_SIZE
            )
            if p_type == PT_NOTE:
                note_bytes += filesz
                if p_offset + filesz > size or note_bytes > size:
                    raise self._err(
                        f"PT_NOTE {i} ({filesz} bytes at {p_offset:#x}) runs past the end of "
                        "the file", off
                    )
                self._collect_notes(blob.pread(p_offset, filesz), endian, p_offset)
            elif p_type == PT_LOAD:
                if memsz < filesz:
                    raise self._err(
                        f"PT_LOAD {i}: p_filesz {filesz:#x} > p_memsz {memsz:#x}", off
                    )
                if filesz and p_offset + filesz > size:
                    have = max(0, size - p_offset)
                    truncated += filesz - have
                    filesz = have
                if paddr == NO_PADDR:
                    # kexec-tools writes -1 where it knows no physical address; drgn skips
                    # those in its physical map too (libdrgn program.c).
                    no_paddr += 1
                elif paddr + memsz > 1 << 64:
                    raise self._err(f"PT_LOAD {i} wraps around the physical address space", off)
                if vaddr + memsz > 1 << 64:
                    raise self._err(f"PT_LOAD {i} wraps around the virtual address space", off)
                loads.append(DumpSegment(paddr, vaddr, p_offset, filesz, memsz, p_flags))
        if truncated:
            self.warnings.append(
                f"file is truncated: {truncated} bytes of PT_LOAD data lie past its end "
                "(they read as not dumped)"
            )
            self.header["incomplete"] = True
        if no_paddr:
            self.warnings.append(f"{no_paddr} PT_LOADs have no physical address (p_paddr -1)")
        self.segments = loads
        for note in self.notes:
            if note.name == VMCOREINFO_NOTE_NAME and not self.vmcoreinfo:
                self.vmcoreinfo = note.desc
        self.kind = self._guess_kind()
        self.page_size = self._guess_page_size()
        self.header.update(_vmcoreinfo_facts(self.vmcoreinfo_fields))
        self.header["nr_cpus"] = len(self.cpus)
        # Reads resolve through a map without overlaps (kexec adds a kernel-text PT_LOAD
        # that repeats part of a RAM PT_LOAD).
        self._map = _build_map(self.segments, self.kind is DumpKind.PROCESS)
        self._starts = [r.start for r in self._map]
        self._vmap: list[_Range] | None = None  # kernel dumps: built on the first read_virt
        self._vstarts: list[int] = []

    def _guess_kind(self) -> DumpKind:
        if self.vmcoreinfo or any(n.name == QEMU_NOTE_NAME for n in self.notes):
            return DumpKind.KERNEL
        process_types = {NT_PRPSINFO, NT_FILE, NT_AUXV, NT_SIGINFO}
        if any(n.name == CORE_NOTE_NAME and n.type in process_types for n in self.notes):
            return DumpKind.PROCESS
        # A vmcore without VMCOREINFO still has physical addresses; process cores have p_paddr 0.
        if any(s.phys_addr for s in self.segments):
            return DumpKind.KERNEL
        return DumpKind.PROCESS

    def _guess_page_size(self) -> int:
        if self.kind is DumpKind.KERNEL:
            return self._parse_vmcoreinfo_page_size() or self.arch.default_page_size
        for note in self.notes:
            if note.type == NT_FILE and note.name == CORE_NOTE_NAME and len(note.desc) >= 16:
                # The kernel stores PAGE_SIZE here (fs/binfmt_elf.c fill_files_note); gdb's
                # gcore stores 1 (offsets in bytes), which says nothing about the page size.
                size = struct.unpack_from(self.endian + "Q", note.desc, 8)[0]
                if MIN_BLOCK_SIZE <= size <= MAX_BLOCK_SIZE and size & (size - 1) == 0:
                    return int(size)
        return self.arch.default_page_size

    def _read(self, addr: int, length: int, zero_fill: bool, *, virtual: bool = False
              ) -> bytes:
        if addr < 0 or length < 0 or addr + length > 1 << 64:
            raise UsageError(f"bad read of {length} bytes at {addr:#x}")
        if virtual and self.kind is DumpKind.KERNEL:
            if self._vmap is None:
                self._vmap = _build_map(self.segments, True)
                self._vstarts = [r.start for r in self._vmap]
            ranges, starts = self._vmap, self._vstarts
        else:
            ranges, starts = self._map, self._starts
        out = bytearray()
        pos, end = addr, addr + length
        idx = bisect.bisect_right(starts, pos) - 1
        if idx >= 0 and pos >= ranges[idx].end:
            idx += 1
        idx = max(idx, 0)
        while pos < end:
            rng = ranges[idx] if idx < len(ranges) else None
            if rng is None or pos < rng.start:  # a gap before the next range
                stop = min(end, rng.start) if rng is not None else end
                if not zero_fill:
                    raise PageNotDumpedError("address not in the dump", pos, "absent")
                out += bytes(stop - pos)
                pos = stop
                continue
            if pos < rng.data_end:
                take = min(end, rng.data_end) - pos
                data = self._blob.pread(rng.file_offset + (pos - rng.start), take)
                if len(data) != take:
                    raise SourceReadError(f"{self.path} shrank while reading", pos + len(data))
                out += data
            else:
                take = min(end, rng.end) - pos
                if not zero_fill:
                    reason = "incomplete" if self.header.get("incomplete") else "not-dumped"
                    raise PageNotDumpedError(
                        "address has no data in the dump (p_filesz < p_memsz)", pos, reason
                    )
                out += bytes(take)
            pos += take
            if pos >= rng.end:
                idx += 1
        return bytes(out)

    def read_phys(self, addr: int, length: int, *, zero_fill: bool = False) -> bytes:
        if self.kind is DumpKind.PROCESS:
            raise UsageError("a process core has no physical addresses; use read_virt")
        return self._read(addr, length, zero_fill)

    def read_virt(self, addr: int, length: int, *, zero_fill: bool = False) -> bytes:
        return self._read(addr, length, zero_fill, virtual=True)

    def iter_pages(self) -> Iterator[tuple[int, bytes]]:
        ps = self.page_size
        pending_pfn = -1
        pending = bytearray()
        for rng in self._map:
            pos = rng.start
            while pos < rng.data_end:
                # Read up to 1 MiB at a time, then cut it into pages.
                chunk_end = min(rng.data_end, pos + _COPY)
                data = self._blob.pread(rng.file_offset + (pos - rng.start), chunk_end - pos)
                if len(data) != chunk_end - pos:
                    raise SourceReadError(f"{self.path} shrank while reading", pos + len(data))
                cur = 0
                while cur < len(data):
                    addr = pos + cur
                    pfn = addr // ps
                    inpage = addr - pfn * ps
                    take = min(len(data) - cur, ps - inpage)
                    if take == ps and pfn != pending_pfn:  # a whole page: no copy
                        if pending_pfn >= 0:
                            yield pending_pfn, bytes(pending)
                            pending_pfn = -1
                        yield pfn, data[cur : cur + ps]
                        cur += ps
                        continue
                    if pfn != pending_pfn:
                        if pending_pfn >= 0:
                            yield pending_pfn, bytes(pending)
                        pending_pfn, pending = pfn, bytearray(ps)
                    pending[inpage : inpage + take] = data[cur : cur + take]
                    cur += take
                pos = chunk_end
        if pending_pfn >= 0:
            yield pending_pfn, bytes(pending)

    def to_image(self) -> CoreImage:
        if self._fd < 0:
            raise UsageError("the dump is closed")
        segs: list[MemorySegment] = []
        ranges = self._map if self.kind is DumpKind.KERNEL else _file_order(self)
        for rng in ranges:
            src = FdRangeSource(self._fd, rng.file_offset, rng.data_end - rng.start,
                                name=self.path)
            segs.append(MemorySegment(
                phys_addr=rng.phys_addr,
                data=src, virt_addr=rng.virt_addr, mem_size=rng.end - rng.start,
                flags=rng.flags,
            ))
        return CoreImage(
            arch=self.arch, kind=self.kind, segments=segs, notes=self._image_notes(),
            vmcoreinfo=self.vmcoreinfo, page_size=self.page_size, crash_time=None,
            extra={"source_format": self.format, "source": self.path},
        )


def _build_map(segments: list[DumpSegment], virtual: bool) -> list[_Range]:
    """Address ranges without overlaps, sorted. Where program headers overlap, the larger one
    wins and the smaller is cut around it: kexec's kernel-text PT_LOAD repeats part of a RAM
    PT_LOAD (kexec/crashdump-elf.c), and keeping the RAM one keeps file order = address order,
    which a stream needs. A list of merged covered intervals finds the gaps, so hostile
    overlapping headers cost O(n log n), not O(n^2)."""
    placed: list[_Range] = []
    cov_starts: list[int] = []  # merged coverage, sorted and disjoint
    cov_ends: list[int] = []
    for seg in sorted(segments, key=lambda s: -s.mem_size):
        if seg.mem_size == 0 or (not virtual and seg.phys_addr == NO_PADDR):
            continue
        base = (seg.virt_addr or 0) if virtual else seg.phys_addr
        lo, hi = base, base + seg.mem_size
        first = bisect.bisect_left(cov_ends, lo)  # first interval ending at/after lo
        last = first
        pieces: list[tuple[int, int]] = []
        pos = lo
        while last < len(cov_starts) and cov_starts[last] <= hi:
            if cov_starts[last] > pos:
                pieces.append((pos, min(hi, cov_starts[last])))
            pos = max(pos, cov_ends[last])
            last += 1
        if pos < hi:
            pieces.append((pos, hi))
        new_lo = min(lo, cov_starts[first]) if first < last else lo
        new_hi = max(hi, cov_ends[last - 1]) if first < last else hi
        cov_starts[first:last] = [new_lo]
        cov_ends[first:last] = [new_hi]
        for a, b in pieces:
            delta = a - base
            placed.append(_Range(
                start=a, end=b,
                data_end=max(a, min(b, base + seg.file_size)),
                file_offset=(seg.file_offset or 0) + delta,
                virt_addr=None if seg.virt_addr is None else seg.virt_addr + delta,
                phys_addr=seg.phys_addr + delta, flags=seg.flags,
            ))
    placed.sort(key=lambda r: r.start)
    return placed


def _file_order(dump: ElfDump) -> list[_Range]:
    """Process cores keep their PT_LOADs as written (virtual order, flags, empty ranges)."""
    out = []
    for seg in dump.segments:
        if seg.mem_size == 0:
            continue
        out.append(_Range(
            start=seg.virt_addr or 0, end=(seg.virt_addr or 0) + seg.mem_size,
            data_end=(seg.virt_addr or 0) + seg.file_size, file_offset=seg.file_offset or 0,
            virt_addr=seg.virt_addr, phys_addr=seg.phys_addr, flags=seg.flags,
        ))
    return out


# --- kdump-compressed --------------------------------------------------------------------------


class KdumpDump(Dump):
    """makedumpfile's kdump-compressed format; ``flat`` for the flattened (``-F``) stream."""

    def __init__(self, path: str, fd: int, flat: bool) -> None:
        super().__init__(path, fd)
        self.format = "kdump-flat" if flat else "kdump"
        self._blob: _Blob = _FlatBlob(fd, path, self.warnings) if flat else _FileBlob(fd, path)
        self._desc_cache: tuple[int, bytes] | None = None
        self._shared: dict[tuple[int, int, int], bytes] = {}
        self._truncation_noted = False
        self._parse()
        self._codec = _Decompressor(self.page_size)

    # -- header --
    def _parse(self) -> None:
        blob = self._blob
        head = blob.pread(0, DISK_DUMP_HEADER_SIZE)
        if len(head) < DISK_DUMP_HEADER_SIZE:
            raise self._err(f"kdump header truncated: {len(head)} of 464 bytes", 0)
        endian = self._detect_endian(head)
        self.endian = endian
        (_, version, sysname, nodename, release, version_str, machine, domain, tv_sec, tv_usec,
         status, block_size, sub_hdr_size, bitmap_blocks, max_mapnr32, _, _, _, _,
         nr_cpus) = DISK_DUMP_HEADER[endian].unpack(head)
        uts_machine = _cstr(machine)
        self.header = {
            "signature": "KDUMP", "header_version": version, "sysname": _cstr(sysname),
            "nodename": _cstr(nodename), "release": _cstr(release),
            "version": _cstr(version_str), "machine": uts_machine,
            "domainname": _cstr(domain), "timestamp": tv_sec, "timestamp_usec": tv_usec,
            "status": status, "block_size": block_size, "sub_hdr_size": sub_hdr_size,
            "bitmap_blocks": bitmap_blocks, "max_mapnr": max_mapnr32, "nr_cpus": nr_cpus,
            "codec": _status_codec(status),
            "incomplete": bool(status & DUMP_DH_COMPRESSED_INCOMPLETE),
            "excluded_vmemmap": bool(status & DUMP_DH_EXCLUDED_VMEMMAP),
        }
        if status & DUMP_DH_COMPRESSED_INCOMPLETE:
            self.warnings.append(
                "kdump status has DUMP_DH_COMPRESSED_INCOMPLETE: the dump was cut short"
            )
        ps = block_size
        if sub_hdr_size < 0 or sub_hdr_size * ps > blob.size:
            raise self._err(f"sub_hdr_size {sub_hdr_size} blocks does not fit the file", 432)
        # Sub-header fields by header_version (diskdump_mod.h): 1 phys_base, dump_level;
        # 2 split, start/end_pfn; 3 vmcoreinfo; 4 notes; 5 eraseinfo; 6 64-bit PFNs.
        sub_raw = blob.pread(ps, SUB_HEADER_SIZE)
        if len(sub_raw) < SUB_HEADER_SIZE:
            raise self._err("kdump sub-header truncated", ps)
        (phys_base, dump_level, split, start_pfn32, end_pfn32, off_vmci, size_vmci, off_note,
         size_note, off_erase, size_erase, start_pfn64, end_pfn64,
         max_mapnr64) = KDUMP_SUB_HEADER[endian].unpack(sub_raw)
        max_mapnr = max_mapnr64 if version >= 6 else max_mapnr32
        split = split if version >= 2 else 0
        start_pfn = (start_pfn64 if version >= 6 else start_pfn32) if split else 0
        end_pfn = (end_pfn64 if version >= 6 else end_pfn32) if split else max_mapnr
        self.header.update({
            "phys_base": phys_base, "dump_level": dump_level, "split": split,
            "start_pfn": start_pfn, "end_pfn": end_pfn, "max_mapnr": max_mapnr,
        })
        self._load_blobs(version, off_vmci, size_vmci, off_note, size_note, off_erase,
                         size_erase)
        self.arch = self._detect_arch(uts_machine, endian)
        vmci_page = self._parse_vmcoreinfo_page_size()
        if vmci_page is not None and vmci_page != ps:
            self.warnings.append(
                f"block_size {ps} differs from VMCOREINFO PAGESIZE {vmci_page}; using block_size"
            )
        self.page_size = ps
        self.kind = DumpKind.KERNEL
        self._load_bitmaps(sub_hdr_size, bitmap_blocks, max_mapnr, start_pfn, end_pfn)
        facts = _vmcoreinfo_facts(self.vmcoreinfo_fields)
        facts.pop("phys_base", None)  # the sub-header's own value stays (QEMU's may be wrong)
        self.header.update(facts)

    def _detect_endian(self, head: bytes) -> str:
        if head[:8] != KDUMP_SIGNATURE:
            raise self._err(f"bad kdump signature {head[:8]!r}", 0)
        for endian in "<>":
            version = struct.unpack_from(endian + "i", head, 8)[0]
            block = struct.unpack_from(endian + "i", head, 428)[0]
            if 1 <= version <= 6 and MIN_BLOCK_SIZE <= block <= MAX_BLOCK_SIZE \
                    and block & (block - 1) == 0:
                return endian
        machine = _cstr(head[272:337])
        if _32BIT_MACHINES.match(machine):
            raise self._err(f"32-bit kdump files ({machine}) are not supported", 272)
        le_version = struct.unpack_from("<i", head, 8)[0]
        le_block = struct.unpack_from("<i", head, 428)[0]
        if not 1 <= le_version <= 6 and not 1 <= struct.unpack_from(">i", head, 8)[0] <= 6:
            raise self._err(f"unsupported kdump header_version {le_version}", 8)
        raise self._err(f"bad block_size {le_block} (not a power of two in 1 KiB..1 MiB)", 428)

    def _detect_arch(self, machine: str, endian: str) -> ArchInfo:
        name = _UTS_MACHINE.get(machine)
        if name == "ppc64" and endian == "<":
            name = "ppc64le"
        if name is not None and ARCHITECTURES[name].endian == endian:
            return ARCHITECTURES[name]
        if _32BIT_MACHINES.match(machine):
            raise self._err(f"32-bit kdump files ({machine}) are not supported", 272)
        # Empty or unknown utsname.machine: guess from the NT_PRSTATUS size and byte order.
        sizes = {n.desc.__len__() for n in self.notes
                 if n.type == NT_PRSTATUS and n.name == CORE_NOTE_NAME}
        for info in ARCHITECTURES.values():
            if info.endian == endian and info.prstatus_size in sizes:
                self.warnings.append(
                    f"utsname.machine {machine!r} unknown; guessed {info.name} from NT_PRSTATUS"
                )
                return info
        fallback = "x86_64" if endian == "<" else "s390x"
        self.warnings.append(f"utsname.machine {machine!r} unknown; assuming {fallback}")
        return ARCHITECTURES[fallback]

    def _load_blobs(self, version: int, off_vmci: int, size_vmci: int, off_note: int,
                    size_note: int, off_erase: int, size_erase: int) -> None:
        blob = self._blob
        limit = blob.size

        def region(name: str, off: int, size: int, field_off: int) -> bytes | None:
            if size == 0 or off == 0:
                return None
            if off < 0 or size < 0 or off + size > limit or size > blob.stored:
                raise self._err(
                    f"{name} ({size} bytes at {off:#x}) lies outside the file", field_off
                )
            data = blob.pread(off, size)
            return data

        base = self.header["block_size"]
        assert isinstance(base, int)
        if version >= 4:
            notes = region("note area", off_note, size_note, base + 48)
            if notes is not None:
                self._collect_notes(notes, self.endian, off_note)
                self.header.update({"offset_note": off_note, "size_note": size_note})
        for note in self.notes:
            if note.name == VMCOREINFO_NOTE_NAME:
                self.vmcoreinfo = note.desc
                break
        if version >= 3:
            text = region("VMCOREINFO", off_vmci, size_vmci, base + 32)
            if text is not None:
                self.header.update({"offset_vmcoreinfo": off_vmci, "size_vmcoreinfo": size_vmci})
                if not self.vmcoreinfo:
                    self.vmcoreinfo = text
        self.eraseinfo = b""
        if version >= 5:
            erase = region("ERASEINFO", off_erase, size_erase, base + 64)
            if erase is not None:
                self.eraseinfo = erase
                self.header.update({"offset_eraseinfo": off_erase, "size_eraseinfo": size_erase})

    def _load_bitmaps(self, sub_hdr_size: int, bitmap_blocks: int, max_mapnr: int,
                      start_pfn: int, end_pfn: int) -> None:
        ps = self.page_size
        blob = self._blob
        bm_off = (1 + sub_hdr_size) * ps
        bm_len = bitmap_blocks * ps
        if bm_len == 0 or bm_off + bm_len > blob.size or bm_len > blob.stored:
            raise self._err(
                f"bitmaps ({bitmap_blocks} blocks at {bm_off:#x}) do not fit the file", 436
            )
        raw = blob.pread(bm_off, bm_len)
        # libkdumpfile read_bitmap / crash dump_is_partial: two bitmaps when max_mapnr fits in
        # half of the area, else one (the old single-bitmap layout).
        if max_mapnr <= bm_len * 8 // 2:
            half = bm_len // 2
            self._bitmap1, self._bitmap2 = raw[:half], raw[half:]
        elif max_mapnr <= bm_len * 8:
            self._bitmap1 = self._bitmap2 = raw
            self.warnings.append("single-bitmap kdump file (no separate dumpable bitmap)")
        else:
            raise self._err(
                f"max_mapnr {max_mapnr} does not fit in {bitmap_blocks} bitmap blocks", 440
            )
        self.max_pfn = max_mapnr
        self._start_pfn = start_pfn
        self._end_pfn = min(end_pfn, max_mapnr) if end_pfn else max_mapnr
        self._desc_off = bm_off + bm_len
        # Every set bit of bitmap 2 in this file's PFN range needs a 24-byte descriptor: bound
        # them by the file before building anything per page (split parts share the bitmaps).
        in_range = self._bitmap2[self._start_pfn // 8 : (self._end_pfn + 7) // 8]
        if (int.from_bytes(in_range, "little").bit_count() - 16) * 24 > blob.stored:
            raise self._err("bitmap 2 marks more pages than the file could describe", bm_off)
        # Dumped pages: runs of set bits of bitmap 2 inside [start_pfn, end_pfn).
        self._runs = _bit_runs(self._bitmap2, self._start_pfn, self._end_pfn)
        self._run_starts = [r[0] for r in self._runs]
        self._run_index: list[int] = []
        count = 0
        for a, b in self._runs:
            self._run_index.append(count)
            count += b - a
        self.header["dumped_pages"] = count
        self.nr_pages = count
        if count * PAGE_DESC["<"].size > blob.stored:
            raise self._err(
                f"bitmap 2 claims {count} pages but the file cannot hold their descriptors",
                self._desc_off,
            )
        desc_end = self._desc_off + count * PAGE_DESC["<"].size
        if desc_end > blob.size:
            self.warnings.append(
                "page descriptors run past the end of the file: the dump is incomplete"
            )
            self.header["incomplete"] = True
        elif count:
            last = PAGE_DESC[self.endian].unpack(blob.pread(desc_end - 24, 24))
            if last[0] == 0:
                self.warnings.append(
                    "the last page descriptor has offset 0: the dump is incomplete"
                )
                self.header["incomplete"] = True
        ps_ = self.page_size
        self.segments = [
            DumpSegment(a * ps_, None, None, (b - a) * ps_, (b - a) * ps_) for a, b in self._runs
        ]

    # -- pages --
    def _is_set(self, bitmap: bytes, pfn: int) -> bool:
        byte = pfn >> 3
        return byte < len(bitmap) and bool(bitmap[byte] >> (pfn & 7) & 1)

    def _desc_index(self, pfn: int) -> int | None:
        idx = bisect.bisect_right(self._run_starts, pfn) - 1
        if idx < 0 or pfn >= self._runs[idx][1]:
            return None
        return self._run_index[idx] + pfn - self._runs[idx][0]

    def _descs(self, first: int, count: int) -> list[tuple[int, int, int, int]]:
        """Descriptors [first, first + count); missing ones (past EOF) come back as offset 0."""
        size = PAGE_DESC["<"].size
        unpack = PAGE_DESC[self.endian].unpack_from
        out: list[tuple[int, int, int, int]] = []
        pos = first
        while pos < first + count:
            block = pos // _DESC_BLOCK
            cache = self._desc_cache
            if cache is None or cache[0] != block:
                data = self._blob.pread(self._desc_off + block * _DESC_BLOCK * size,
                                        _DESC_BLOCK * size)
                cache = self._desc_cache = (block, data)
            data = cache[1]
            stop = min(first + count, (block + 1) * _DESC_BLOCK)
            for i in range(pos, stop):
                rel = (i - block * _DESC_BLOCK) * size
                if rel + size <= len(data):
                    out.append(unpack(data, rel))
                else:
                    out.append((0, 0, 0, 0))
            pos = stop
        return out

    def _decode(self, pfn: int, index: int, desc: tuple[int, int, int, int],
                data: bytes) -> bytes:
        offset, _, flags, _ = desc
        try:
            return self._codec.decode(flags, data)
        except ValueError as err:
            where = self._desc_off + index * 24
            raise self._err(f"page {pfn:#x} (descriptor at {where:#x}): {err}", offset) from None

    def _check_desc(self, pfn: int, index: int, desc: tuple[int, int, int, int]) -> bool:
        """False for a page never written (offset 0); FormatError for an impossible one."""
        offset, size, _, _ = desc
        if offset == 0:
            return False
        where = self._desc_off + index * 24
        if size == 0 or size > self.page_size:
            raise self._err(f"page {pfn:#x}: stored size {size} is not 1..{self.page_size}",
                            where)
        if offset < 0:
            raise self._err(f"page {pfn:#x}: negative data offset {offset}", where)
        if offset + size > self._blob.size:
            # A dump cut short (ENOSPC, a killed producer): the page was never written.
            if not self._truncation_noted:
                self._truncation_noted = True
                self.warnings.append("page data runs past the end of the file: the file is "
                                     "truncated (incomplete dump)")
                self.header["incomplete"] = True
            return False
        return True

    def _pages(self, pfn: int, count: int, index: int, *, missing_ok: bool
               ) -> list[bytes | None]:
        """Pages pfn..pfn+count-1 whose descriptors are index..index+count-1."""
        descs = self._descs(index, count)
        # Descriptors that share their data (makedumpfile's and QEMU's single zero page) are
        # decoded once and remembered.
        seen: dict[int, int] = {}
        for d in descs:
            seen[d[0]] = seen.get(d[0], 0) + 1
        shared = self._shared
        out: list[bytes | None] = []
        i = 0
        while i < count:
            desc = descs[i]
            hit = shared.get(desc[:3])
            if hit is not None:
                out.append(hit)
                i += 1
                continue
            if not self._check_desc(pfn + i, index + i, desc):
                if not missing_ok:
                    raise PageNotDumpedError("page was never written (incomplete dump)",
                                             (pfn + i) * self.page_size, "incomplete")
                out.append(None)
                i += 1
                continue
            # Coalesce the reads of pages stored back to back.
            j = i + 1
            end = desc[0] + desc[1]
            while j < count and j - i < 256 and descs[j][0] == end and \
                    self._check_desc(pfn + j, index + j, descs[j]):
                end += descs[j][1]
                j += 1
            data = self._blob.pread(desc[0], end - desc[0])
            if len(data) != end - desc[0]:
                raise SourceReadError(f"{self.path} shrank while reading", desc[0])
            cur = 0
            for k in range(i, j):
                size = descs[k][1]
                page = self._decode(pfn + k, index + k, descs[k], data[cur : cur + size])
                if seen[descs[k][0]] > 1:
                    if len(shared) >= 64:
                        shared.clear()
                    shared[descs[k][:3]] = page
                out.append(page)
                cur += size
            i = j
        return out

    def page(self, pfn: int, *, zero_fill: bool = False) -> bytes:
        """One page by frame number (decoded)."""
        idx = self._desc_index(pfn)
        if idx is None:
            if zero_fill:
                return bytes(self.page_size)
            addr = pfn * self.page_size
            if pfn >= self.max_pfn:
                raise PageNotDumpedError(f"PFN beyond max_mapnr {self.max_pfn:#x}", addr,
                                         "absent")
            if pfn < self._start_pfn or pfn >= self._end_pfn:
                raise PageNotDumpedError("page belongs to another part of a split dump", addr,
                                         "absent")
            if self._is_set(self._bitmap1, pfn):
                raise PageNotDumpedError("page excluded from the dump", addr, "excluded")
            raise PageNotDumpedError("page not present in the dump", addr, "absent")
        got = self._pages(pfn, 1, idx, missing_ok=zero_fill)[0]
        return got if got is not None else bytes(self.page_size)

    def read_phys(self, addr: int, length: int, *, zero_fill: bool = False) -> bytes:
        if addr < 0 or length < 0:
            raise UsageError(f"bad read of {length} bytes at {addr:#x}")
        ps = self.page_size
        out = bytearray()
        pos, end = addr, addr + length
        while pos < end:
            pfn, inpage = divmod(pos, ps)
            take = min(end - pos, ps - inpage)
            out += self.page(pfn, zero_fill=zero_fill)[inpage : inpage + take]
            pos += take
        return bytes(out)

    def iter_pages(self) -> Iterator[tuple[int, bytes]]:
        never_written = 0
        batch = 256
        for (a, b), first in zip(self._runs, self._run_index, strict=True):
            for pfn in range(a, b, batch):
                n = min(batch, b - pfn)
                for k, page in enumerate(self._pages(pfn, n, first + pfn - a, missing_ok=True)):
                    if page is None:
                        never_written += 1
                    else:
                        yield pfn + k, page
        if never_written:
            msg = f"{never_written} pages have no data (descriptor offset 0): incomplete dump"
            if msg not in self.warnings:
                self.warnings.append(msg)

    def to_image(self) -> CoreImage:
        if self._fd < 0:
            raise UsageError("the dump is closed")
        ps = self.page_size
        segs: list[MemorySegment] = []
        for (a, b), first in zip(self._runs, self._run_index, strict=True):
            segs.append(MemorySegment(
                phys_addr=a * ps, data=self._run_source(a, b - a, first),
            ))
        extra: list[Note] = []
        if self.eraseinfo and not any(n.name == ERASEINFO_NOTE_NAME for n in self.notes):
            extra.append(Note(ERASEINFO_NOTE_NAME, 0, self.eraseinfo))
        fields = self.vmcoreinfo_fields
        key = {"x86_64": "NUMBER(phys_base)", "aarch64": "NUMBER(PHYS_OFFSET)"}.get(
            self.arch.name)
        phys_base = self.header.get("phys_base")
        use_header = key is not None and key not in fields and isinstance(phys_base, int)
        uts_version = self.header.get("version")
        return CoreImage(
            arch=self.arch, kind=DumpKind.KERNEL, segments=segs,
            notes=self._image_notes(extra), vmcoreinfo=self.vmcoreinfo, page_size=ps,
            crash_time=self._crash_time(),
            uts_version=uts_version if isinstance(uts_version, str) and uts_version else "#1",
            phys_base=phys_base if use_header and isinstance(phys_base, int) else None,
            extra={"source_format": self.format, "source": self.path},
        )

    def _run_source(self, first_pfn: int, npages: int, first_index: int) -> SegmentSource:
        ps = self.page_size
        last: list[tuple[int, bytes]] = []  # the last page decoded, for unaligned reads

        def read(offset: int, length: int) -> bytes:
            out = bytearray()
            pos, end = offset, offset + length
            while pos < end:
                rel, inpage = divmod(pos, ps)
                if inpage == 0 and end - pos >= ps:
                    n = min((end - pos) // ps, 256)
                    pages = self._pages(first_pfn + rel, n, first_index + rel, missing_ok=True)
                    for page in pages:
                        out += page if page is not None else bytes(ps)
                    pos += n * ps
                    continue
                if last and last[0][0] == rel:
                    page = last[0][1]
                else:
                    got = self._pages(first_pfn + rel, 1, first_index + rel, missing_ok=True)[0]
                    page = got if got is not None else bytes(ps)
                    last[:] = [(rel, page)]
                take = min(end - pos, ps - inpage)
                out += page[inpage : inpage + take]
                pos += take
            return bytes(out)

        return CallableSource(npages * ps, read)


def _status_codec(status: int) -> str:
    for bit, name in ((DUMP_DH_COMPRESSED_ZLIB, "zlib"), (DUMP_DH_COMPRESSED_LZO, "lzo"),
                      (DUMP_DH_COMPRESSED_SNAPPY, "snappy"), (DUMP_DH_COMPRESSED_ZSTD, "zstd")):
        if status & bit:
            return name
    return "none"


_NONZERO = re.compile(rb"[^\x00]+")


def _bit_runs(bitmap: bytes, lo: int, hi: int) -> list[tuple[int, int]]:
    """[start, end) runs of set bits (LSB first, makedumpfile.h is_on) within [lo, hi)."""
    runs: list[tuple[int, int]] = []

    def add(a: int, b: int) -> None:
        a, b = max(a, lo), min(b, hi)
        if a >= b:
            return
        if runs and runs[-1][1] == a:
            runs[-1] = (runs[-1][0], b)
        else:
            runs.append((a, b))

    limit = (hi + 7) // 8
    for m in _NONZERO.finditer(bitmap, lo // 8, min(len(bitmap), limit)):
        for byte_idx in range(m.start(), m.end()):
            byte = bitmap[byte_idx]
            base = byte_idx * 8
            if byte == 0xFF:
                add(base, base + 8)
                continue
            bit = 0
            while bit < 8:
                if byte >> bit & 1:
                    start = bit
                    while bit < 8 and byte >> bit & 1:
                        bit += 1
                    add(base + start, base + bit)
                else:
                    bit += 1
    return runs


# --- opening -----------------------------------------------------------------------------------


def open_dump(path: str | os.PathLike[str]) -> Dump:
    """Open an ELF vmcore or process core, a kdump-compressed or a flattened kdump file."""
    name = os.fspath(path)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise UsageError(f"cannot open {name}: {err.strerror}") from err
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise UsageError(
                f"{name} is not a regular file; a dump arriving on a pipe needs "
                "read_elf_stream() (ELF) or reassemble_flattened() (flattened kdump)"
            )
        magic = os.pread(fd, 16, 0)
        dump: Dump
        if magic[:4] == ELFMAG:
            dump = ElfDump(name, fd)
        elif magic[:8] == KDUMP_SIGNATURE:
            dump = KdumpDump(name, fd, flat=False)
        elif magic[:16].rstrip(b"\0") == FLAT_SIGNATURE and len(magic) == 16:
            _check_flat_header(os.pread(fd, FLAT_HEADER.size, 0), name)
            dump = KdumpDump(name, fd, flat=True)
        elif magic[:8] == DISKDUMP_SIGNATURE:
            raise FormatError("legacy DISKDUMP files are not supported", 0, name)
        else:
            raise FormatError(f"not a dump file (starts with {magic[:8]!r})", 0, name)
    except struct.error as err:  # a short read the checks above did not foresee
        os.close(fd)
        raise FormatError(f"truncated structure: {err}", None, name) from None
    except BaseException:
        os.close(fd)
        raise
    return dump


def _check_flat_header(head: bytes, name: str) -> None:
    if len(head) < FLAT_HEADER.size:
        raise FormatError("flattened header truncated", 0, name)
    _, ftype, version = FLAT_HEADER.unpack_from(head)
    if ftype != 1:
        raise FormatError(f"flattened header type {ftype}, expected 1", 16, name)
    if version != 1:
        raise FormatError(f"flattened header version {version}, expected 1", 24, name)


# --- flattened -> normal -----------------------------------------------------------------------


def reassemble_flattened(src: BinaryIO | int, dst_path: str | os.PathLike[str]) -> int:
    """Rebuild a normal kdump file from a flattened stream (what ``makedumpfile -R`` does).

    Records are applied in stream order. The output is written as ``DST.incomplete`` (0600,
    never through a symlink) and renamed into place; on failure it is removed. Returns the size
    of the file written.
    """
    dst = os.fspath(dst_path)
    tmp = dst + ".incomplete"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        size = reassemble_flattened_into(src, fd, dst)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.rename(tmp, dst)
        return size
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def reassemble_flattened_into(src: BinaryIO | int, fd: int, name: str = "<file>") -> int:
    """Apply a flattened stream's records to the open file ``fd``; returns the file's size.

    Reads up to the end marker (makedumpfile.h END_FLAG_FLAT_HEADER), not further.
    """
    reader = _StreamIn(src)
    head = reader.read_exact(FLAT_HEADER_SIZE)
    if head[:16].rstrip(b"\0") != FLAT_SIGNATURE:
        raise FormatError(f"not a flattened dump (starts with {head[:12]!r})", 0)
    _check_flat_header(head, "<stream>")
    size = 0
    while True:
        pos = reader.pos
        rec = reader.read_exact(FLAT_RECORD.size, what="record header")
        offset, length = FLAT_RECORD.unpack(rec)
        if offset == -1 and length == -1:
            break
        if offset < 0 or length < 0:
            raise FormatError(f"flattened record with offset {offset} and size {length}", pos)
        while length:
            part = reader.read_exact(min(length, _COPY), what="record data")
            _pwrite_all(fd, part, offset, name)
            offset += len(part)
            length -= len(part)
            size = max(size, offset)
    if os.fstat(fd).st_size < size:
        os.ftruncate(fd, size)
    return size


def _pwrite_all(fd: int, data: bytes, offset: int, name: str) -> None:
    from .errors import DumpWriteError

    view = memoryview(data)
    try:
        while view:
            n = os.pwrite(fd, view, offset)
            view = view[n:]
            offset += n
    except OSError as err:
        raise DumpWriteError.from_oserror(err, name) from err


class _StreamIn:
    """Sequential reads from a file object or descriptor, counting the position."""

    PIPE_SIZE = 1 << 20

    def __init__(self, src: BinaryIO | int) -> None:
        self.pos = 0
        fd: int | None = None
        if isinstance(src, int):
            fd = src
            self._readinto: Callable[[memoryview], int] = lambda v: os.readv(src, [v])
        else:
            with contextlib.suppress(AttributeError, OSError, ValueError):
                fd = src.fileno()
            into = getattr(src, "readinto1", None) or getattr(src, "readinto", None)
            if into is None:  # a minimal stream with read() only
                read = src.read

                def into(v: memoryview) -> int:
                    data = read(len(v))
                    v[: len(data)] = data
                    return len(data)

            self._readinto = into
        if fd is not None:
            # A 1 MiB pipe instead of 64 KiB lets the producer (QEMU) run ahead of us;
            # guest-streaming.md measured the guest's pause halving. Best effort.
            with contextlib.suppress(OSError, ValueError, AttributeError):
                if stat.S_ISFIFO(os.fstat(fd).st_mode):
                    fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, self.PIPE_SIZE)

    def _fill(self, view: memoryview) -> int:
        try:
            n = self._readinto(view)
        except OSError as err:
            raise SourceReadError(f"cannot read the stream: {err.strerror}", self.pos) from err
        n = n or 0
        self.pos += n
        return n

    def read_some(self, n: int) -> bytes:
        buf = bytearray(n)
        got = self._fill(memoryview(buf))
        del buf[got:]
        return bytes(buf)

    def read_exact(self, n: int, what: str = "data") -> bytes:
        return bytes(self.read_into_new(n, what))

    def read_into_new(self, n: int, what: str = "data") -> bytearray:
        """``n`` bytes in a new buffer, without the extra copy into ``bytes`` (memory data)."""
        buf = bytearray(n)
        view = memoryview(buf)
        done = 0
        while done < n:
            got = self._fill(view[done:])
            if not got:
                raise FormatError(f"stream ended in the middle of the {what}", self.pos)
            done += got
        return buf

    def skip(self, n: int) -> None:
        scratch = memoryview(bytearray(min(n, _COPY)))
        while n:
            got = self._fill(scratch[: min(n, len(scratch))])
            if not got:
                raise FormatError("stream ended before the next segment", self.pos)
            n -= got


# --- ELF from a pipe ---------------------------------------------------------------------------


class ElfStreamReader:
    """An ELF vmcore arriving on a non-seekable stream (QEMU ``dump-guest-memory``, libvirt).

    The header, program headers and notes are read from the head of the stream. ``image``'s
    segments then read the stream strictly front to back: each read must start at or after
    the end of the previous one (gaps are skipped), else SourceReadError. QEMU writes its
    PT_LOADs in ascending guest-physical order (dump/dump.c: dump_iterate walks the sorted
    guest_phys_blocks, the same list write_elf_loads used), which is the order the kdump
    writer reads in. Call ``drain()`` when done so the producer sees its whole dump consumed.
    """

    def __init__(self, stream: BinaryIO | int, *, name: str = "<stream>",
                 max_header: int = MAX_STREAM_HEADER) -> None:
        self.name = name
        self.warnings: list[str] = []
        self._in = _StreamIn(stream)
        self._lock = threading.Lock()
        self._last: tuple[int, bytes | bytearray] = (0, b"")
        self._head = bytearray()
        self._parse(max_header)

    def _need(self, end: int, max_header: int, what: str) -> None:
        if end > max_header:
            raise FormatError(f"{what} ends at {end:#x}, past the {max_header:#x}-byte header "
                              "limit for streams", len(self._head), self.name)
        while len(self._head) < end:
            data = self._in.read_some(min(end - len(self._head), _COPY))
            if not data:
                raise FormatError(f"stream ended inside the {what}", len(self._head), self.name)
            self._head += data

    def _parse(self, max_header: int) -> None:
        self._need(EHDR_SIZE, max_header, "ELF header")
        head = bytes(self._head[:EHDR_SIZE])
        if head[:4] != ELFMAG:
            raise FormatError(f"not an ELF stream (starts with {head[:4]!r})", 0, self.name)
        if head[4] != ELFCLASS64 or head[5] not in (ELFDATA2LSB, ELFDATA2MSB):
            raise FormatError("only ELF64 streams are supported", 4, self.name)
        endian = "<" if head[5] == ELFDATA2LSB else ">"
        (_, e_type, machine, _, _, phoff, shoff, e_flags, _, phentsize, phnum, _, _,
         _) = EHDR[endian].unpack(head)
        if e_type != ET_CORE:
            raise FormatError(f"not a core file (e_type {e_type})", 16, self.name)
        try:
            arch = arch_from_machine(machine, endian == ">")
        except UnsupportedArchError as err:
            raise FormatError(str(err), 18, self.name) from None
        if phentsize != PHDR_SIZE:
            raise FormatError(f"e_phentsize is {phentsize}", 0x36, self.name)
        if phnum == PN_XNUM:
            if shoff == 0:
                raise FormatError("PN_XNUM without a section header", 0x28, self.name)
            self._need(shoff + SHDR_SIZE, max_header, "section header")
            phnum = SHDR[endian].unpack_from(self._head, shoff)[7]  # sh_info
        self._need(phoff + phnum * PHDR_SIZE, max_header, "program headers")
        loads: list[DumpSegment] = []
        note_ranges: list[tuple[int, int]] = []
        for i in range(phnum):
            p_type, p_flags, off, vaddr, paddr, filesz, memsz, _ = PHDR[endian].unpack_from(
                self._head, phoff + i * PHDR_SIZE)
            if p_type == PT_NOTE:
                note_ranges.append((off, filesz))
            elif p_type == PT_LOAD:
                if memsz < filesz:
                    raise FormatError(f"PT_LOAD {i}: p_filesz > p_memsz",
                                      phoff + i * PHDR_SIZE, self.name)
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
        if e_flags & DUMP_ELF_INCOMPLETE:
            self.warnings.append("ELF e_flags has DUMP_ELF_INCOMPLETE")
        ranges = _build_map(loads, process)
        # The stream is read in file order; that must also be the address order the writers use.
        by_file = sorted(ranges, key=lambda r: r.file_offset)
        if [r.start for r in by_file if r.data_end > r.start] != \
                [r.start for r in ranges if r.data_end > r.start]:
            self.warnings.append(
                "PT_LOAD file order differs from address order: only the ELF writer, which "
                "keeps the given order, can consume this stream"
            )
            ranges = by_file
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
            if pos < self._in.pos:
                raise SourceReadError(
                    f"{self.name}: read at {pos:#x} but the stream is already at "
                    f"{self._in.pos:#x} (segments must be read in file order)", pos)
            if pos > self._in.pos:
                try:
                    self._in.skip(pos - self._in.pos)
                except FormatError as err:
                    raise SourceReadError(f"{self.name}: {err}", pos) from None
            try:
                # A bytearray nobody changes: callers treat it like bytes (one copy fewer).
                data = self._in.read_into_new(length, what="memory data")
            except FormatError:
                raise SourceReadError(f"{self.name}: stream ended early", self._in.pos) from None
            self._last = (pos, data)
            return data

    def drain(self) -> int:
        """Read and discard the rest of the stream; returns the bytes skipped."""
        with self._lock:
            skipped = 0
            while True:
                data = self._in.read_some(_COPY)
                if not data:
                    return skipped
                skipped += len(data)


def open_elf_stream(stream: BinaryIO | int, *, name: str = "<stream>",
                    max_header: int = MAX_STREAM_HEADER) -> ElfStreamReader:
    return ElfStreamReader(stream, name=name, max_header=max_header)


def read_elf_stream(stream: BinaryIO | int) -> CoreImage:
    """The CoreImage of an ELF vmcore arriving on a pipe; see ElfStreamReader."""
    return ElfStreamReader(stream).image
