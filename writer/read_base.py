"""What every dump reader shares: the ``Dump`` interface, its segments and errors, and
random and sequential access to a dump's bytes.

Robustness (every format module follows it): every count and size read from a file is checked
against the file's size before anything is allocated, and malformed input raises
``FormatError`` naming the file offset. Data a file promises but cannot deliver (cut short,
descriptors past its end, marked incomplete by its writer) is reported by ``Dump.incomplete``
and ``Dump.missing``; ``to_image()`` leaves it out of the segments, names it in
``CoreImage.missing`` and sets ``CoreImage.incomplete``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import BinaryIO

from .arch import PHYS_BASE_KEYS, ArchInfo, parse_vmcoreinfo_number
from .errors import FormatError, SourceReadError, UsageError
from .image import CoreImage, DumpKind
from .notes import (
    CORE_NOTE_NAME,
    NT_PRSTATUS,
    VMCOREINFO_NOTE_NAME,
    Note,
    iter_notes,
    kdumpling_note_kind,
    parse_annotations,
    parse_prstatus,
    parse_vmcoreinfo,
    vmcoreinfo_note,
)
from .segments import pread_full

QEMU_NOTE_NAME = b"QEMU"
ERASEINFO_NOTE_NAME = b"ERASEINFO"
NO_PADDR = (1 << 64) - 1  # p_paddr of a PT_LOAD without a physical address
PRSTATUS_MIN = 112  # the common prefix of struct elf_prstatus (include/linux/elfcore.h)
# Bounds for values that are not sizes of something in the file.
MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = 1024, 1 << 20
COPY = 1 << 20  # bytes read or copied at a time


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


class Blob:
    """Random access to a dump's bytes: the file itself, or a flattened file's records."""

    size: int  # logical size (reads past it return short)
    stored: int  # bytes physically present: bounds every allocation

    def pread(self, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def undelivered(self, offset: int, length: int) -> bool:
        """True when the bytes at [offset, offset + length) are not all in the file."""
        return offset + length > self.size


class FileBlob(Blob):
    def __init__(self, fd: int, path: str) -> None:
        self.fd, self.path = fd, path
        self.size = self.stored = os.fstat(fd).st_size

    def pread(self, offset: int, length: int) -> bytes:
        if length <= 0 or offset >= self.size:
            return b""
        return pread_full(self.fd, min(length, self.size - offset), offset, self.path)


class StreamIn:
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
        buf = self.read_upto(n)
        if len(buf) < n:
            raise FormatError(f"stream ended in the middle of the {what}", self.pos)
        return buf

    def read_upto(self, n: int) -> bytearray:
        """``n`` bytes, or fewer when the stream ends first: every byte that arrived."""
        buf = bytearray(n)
        view = memoryview(buf)
        done = 0
        while done < n:
            got = self._fill(view[done:])
            if not got:
                del view
                del buf[done:]
                break
            done += got
        return buf

    def skip(self, n: int) -> None:
        scratch = memoryview(bytearray(min(n, COPY)))
        while n:
            got = self._fill(scratch[: min(n, len(scratch))])
            if not got:
                raise FormatError("stream ended before the next segment", self.pos)
            n -= got



# --- the Dump object ---------------------------------------------------------------------------


@dataclass
class Range:
    """A piece of the address map: [start, end) of memory, data for [start, data_end)."""

    start: int
    end: int
    data_end: int
    file_offset: int
    virt_addr: int | None
    phys_addr: int
    flags: int


class Dump:
    """An open dump file. Use as a context manager; ``to_image()`` sources need it open.

    ``incomplete`` and ``missing`` say whether, and where, the file lacks data it promises;
    ``header["incomplete"]`` only records what was seen so far (``missing`` scans on demand).
    """

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
        self._missing: list[tuple[int, int]] | None = None

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
    def kdumpling_notes(self) -> list[tuple[str, Note]]:
        """(kind, note) of every kdumpling note, in note order: kind is "METADATA",
        "ANNOTATIONS", "FILE_INFO" or "USER_DEFINED", in our numbering or the seed's
        (notes.kdumpling_note_kind)."""
        out = []
        for note in self.notes:
            kind = kdumpling_note_kind(note.name, note.type)
            if kind is not None:
                out.append((kind, note))
        return out

    def _key_values(self, kind: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for found, note in self.kdumpling_notes:
            if found == kind:
                out.update(parse_annotations(note.desc))
        return out

    @property
    def annotations(self) -> dict[str, str]:
        """KEY=VALUE pairs of every ANNOTATIONS note (either numbering)."""
        return self._key_values("ANNOTATIONS")

    @property
    def metadata(self) -> dict[str, str]:
        """KEY=VALUE pairs of every METADATA note (either numbering; ``add_metadata``)."""
        return self._key_values("METADATA")

    @property
    def missing(self) -> list[tuple[int, int]]:
        """Sorted, merged [start, end) address ranges (physical for kernel dumps, virtual for
        process cores) of memory the file promises but cannot deliver: data past the end of a
        cut file, page descriptors past it or never written. ``to_image()`` leaves them out
        and names them in ``CoreImage.missing``. The first call may read every descriptor."""
        if self._missing is None:
            self._missing = self._find_missing()
        return self._missing

    @property
    def incomplete(self) -> bool:
        """True when the dump lacks data it should have: ``missing`` is not empty, or its
        writer marked it cut short (kdump DUMP_DH_COMPRESSED_INCOMPLETE, ELF e_flags
        DUMP_ELF_INCOMPLETE, a flattened stream without its end marker)."""
        return bool(self.missing) or bool(self.header.get("incomplete"))

    def _find_missing(self) -> list[tuple[int, int]]:
        return []

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



def vmcoreinfo_facts(fields: dict[str, str]) -> dict[str, object]:
    """Header facts an ELF vmcore carries only in VMCOREINFO (include/linux/vmcore_info.h;
    NUMBER() is decimal and may be negative, KERNELOFFSET hex)."""
    out: dict[str, object] = {}
    if "OSRELEASE" in fields:
        out["osrelease"] = fields["OSRELEASE"]
    for key in PHYS_BASE_KEYS.values():  # the per-arch key and NUMBER() parser: kdumpling.arch
        if key in fields and "phys_base" not in out:
            with contextlib.suppress(ValueError):
                out["phys_base"] = parse_vmcoreinfo_number(fields[key])
    for key, name, base in (("KERNELOFFSET", "kernel_offset", 16),
                            ("CRASHTIME", "crash_time", 10)):
        if key in fields and name not in out:
            try:
                out[name] = int(fields[key], base)
            except ValueError:
                continue
    return out


def cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[start, end) ranges sorted, with touching or overlapping ones merged."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out
