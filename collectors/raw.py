"""Raw physical-memory images into kernel dumps.

Inputs:

* raw images: a QEMU ``memory-backend-file``, a ``/dev/mem``-style copy, ``dd`` of /proc/kcore
  ranges... placed by ``phys_map`` (default: one image, byte 0 = physical address 0);
* LiME files (https://github.com/504ensicsLabs/LiME doc/README.md "Spec"): each range is a 32-byte
  little-endian header ``magic 0x4C694D45 ("LiME"), version 1, s_addr, e_addr (inclusive),
  8 reserved bytes`` followed by ``e_addr - s_addr + 1`` bytes of memory.

VMCOREINFO comes from a text file (``vmcoreinfo=``: the KEY=VALUE lines) or from the image itself:
``vmcoreinfo_at`` is the ``address size`` pair /sys/kernel/vmcoreinfo printed on the machine the
image came from (kernel/ksysfs.c: physical address of the VMCOREINFO note, then the note buffer
size, both hex). At that address sits one ELF note: ``Elf64_Nhdr {namesz=11, descsz, type=0}``,
``"VMCOREINFO\\0"`` padded to 4, then the text (kernel/vmcore_info.c update_vmcoreinfo_note).

An image shorter than its phys_map or its LiME headers claim gives every byte it has; the rest
is named in ``image.missing`` (the writers mark the output incomplete) and in a warning.
"""

from __future__ import annotations

import itertools
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

from kdumpling.arch import get_arch
from kdumpling.errors import FormatError, UsageError
from kdumpling.image import CoreImage, DumpKind
from kdumpling.notes import VMCOREINFO_NOTE_NAME, Note, parse_vmcoreinfo, vmcoreinfo_note
from kdumpling.segments import FileRangeSource, MemorySegment

from .base import Snapshot
from .convert import missing_warning

# struct lime_mem_range_header (LiME doc/README.md), packed, little-endian.
LIME_HEADER = struct.Struct("<IIQQ8s")
LIME_MAGIC = 0x4C694D45
LIME_VERSION = 1
# Elf64_Nhdr: three 32-bit words (include/uapi/linux/elf.h).
_NHDR = {"<": struct.Struct("<III"), ">": struct.Struct(">III")}


@dataclass(frozen=True)
class PhysRange:
    """``size`` bytes of physical memory at ``phys_addr``, at ``offset`` of image ``image``."""

    phys_addr: int
    size: int
    image: int = 0
    offset: int = 0

    @property
    def end(self) -> int:
        return self.phys_addr + self.size


PhysMapEntry = PhysRange | tuple[int, int] | tuple[int, int, int] | tuple[int, int, int, int]


def _as_range(entry: PhysMapEntry) -> PhysRange:
    if isinstance(entry, PhysRange):
        return entry
    if not 2 <= len(entry) <= 4:
        raise UsageError(f"phys_map entry {entry!r}: expected (phys_addr, size[, image[, offset]])")
    return PhysRange(*entry)


def parse_phys_map(text: str) -> list[PhysRange]:
    """``PHYS:SIZE[@IMAGE[+OFFSET]]`` items separated by commas, numbers in C syntax.

    ``0:0x80000000,0x100000000:0x40000000@0+0x80000000`` is a 3 GiB guest whose RAM above 2 GiB
    sits above the PCI hole (q35) but continues in the same backing file.
    """
    out: list[PhysRange] = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            where, _, rest = item.partition("@")
            phys, _, size = where.partition(":")
            image, _, offset = rest.partition("+")
            out.append(PhysRange(int(phys, 0), int(size, 0), int(image or "0", 0),
                                 int(offset or "0", 0)))
        except ValueError as err:
            raise UsageError(f"bad phys_map item {item!r}: expected PHYS:SIZE[@IMAGE[+OFFSET]]"
                             ) from err
    return out


def qemu_x86_phys_map(ram_bytes: int, machine: str = "pc") -> list[PhysRange]:
    """Where QEMU puts an x86 guest's RAM backend: low RAM, then the rest above 4 GiB.

    hw/i386/pc_piix.c and pc_q35.c: RAM above ``lowmem`` (pc: 3.5 GiB, or 3 GiB with
    gigabyte alignment, when RAM >= 3.5 GiB; q35: 2 GiB when RAM >= 2.75 GiB) moves to 4 GiB.
    """
    if machine.startswith("q35"):
        lowmem = 0x80000000 if ram_bytes >= 0xB0000000 else ram_bytes
    else:
        lowmem = 0xC0000000 if ram_bytes >= 0xE0000000 else ram_bytes
    ranges = [PhysRange(0, lowmem)]
    if ram_bytes > lowmem:
        ranges.append(PhysRange(1 << 32, ram_bytes - lowmem, 0, lowmem))
    return ranges


def read_lime_ranges(path: str, image_index: int = 0, *,
                     missing: list[tuple[int, int]] | None = None,
                     warnings: list[str] | None = None) -> list[PhysRange]:
    """The ranges of a LiME file, each checked against the file size.

    A file cut short raises FormatError, unless ``missing`` is given: then the last range
    keeps the bytes it has and the physical range it lacks goes into ``missing`` (a header
    cut short, whose range is unknown, into ``warnings``).
    """
    try:
        size = os.stat(path).st_size
        f = open(path, "rb")  # noqa: SIM115 - closed below, also on errors
    except OSError as err:
        raise UsageError(f"cannot read {path}: {err.strerror}") from err
    ranges: list[PhysRange] = []
    with f:
        off = 0
        while off < size:
            f.seek(off)
            raw = f.read(LIME_HEADER.size)
            if len(raw) < LIME_HEADER.size and ranges and warnings is not None:
                warnings.append(f"{path} ends inside a LiME range header at offset {off:#x} "
                                f"({len(raw)} of {LIME_HEADER.size} bytes): whatever range "
                                "it described is not in the dump")
                break
            if len(raw) < LIME_HEADER.size:
                raise FormatError(f"truncated LiME header ({len(raw)} of {LIME_HEADER.size} bytes)",
                                  off, path)
            magic, version, start, end, _ = LIME_HEADER.unpack(raw)
            if magic != LIME_MAGIC:
                raise FormatError(f"no LiME range header (magic {magic:#010x}, expected "
                                  f"{LIME_MAGIC:#010x})", off, path)
            if version != LIME_VERSION:
                raise FormatError(f"unsupported LiME version {version}", off + 4, path)
            if end < start:
                raise FormatError(f"LiME range ends ({end:#x}) before it starts ({start:#x})",
                                  off + 8, path)
            length = end - start + 1  # e_addr is inclusive
            data = off + LIME_HEADER.size
            if data + length > size and missing is not None:
                have = max(0, size - data)
                if have:
                    ranges.append(PhysRange(start, have, image_index, data))
                missing.append((start + have, end + 1))
                break
            if data + length > size:
                raise FormatError(
                    f"truncated LiME file: range {start:#x}-{end:#x} needs {length:#x} bytes at "
                    f"offset {data:#x}, the file ends at {size:#x}", data, path)
            ranges.append(PhysRange(start, length, image_index, data))
            off = data + length
    if not ranges:
        raise FormatError("empty LiME file", 0, path)
    return ranges


def is_lime(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return len(head) == 4 and struct.unpack("<I", head)[0] == LIME_MAGIC


def parse_vmcoreinfo_at(value: tuple[int, int] | str) -> tuple[int, int]:
    """``(address, size)`` from a tuple or the text of /sys/kernel/vmcoreinfo (hex)."""
    if isinstance(value, tuple):
        return value
    parts = value.split()
    if len(parts) != 2:
        raise UsageError(f"vmcoreinfo_at {value!r}: expected 'ADDRESS SIZE' as "
                         "/sys/kernel/vmcoreinfo prints it")
    try:
        return int(parts[0], 16), int(parts[1], 16)
    except ValueError as err:
        raise UsageError(f"vmcoreinfo_at {value!r}: not hexadecimal") from err


class RawMemoryCollector:
    """Context manager: ``with RawMemoryCollector("mem.raw", vmcoreinfo_at=...) as snap: ...``.

    ``images``: one path or several. LiME files are recognised by their magic and bring their own
    ranges; other images need ``phys_map`` unless there is exactly one (then it starts at
    physical 0). ``phys_map`` entries: ``PhysRange``, ``(phys, size)``, ``(phys, size, image)`` or
    ``(phys, size, image, offset)``.
    """

    def __init__(self, images: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *,
                 phys_map: Sequence[PhysMapEntry] | None = None,
                 vmcoreinfo: str | os.PathLike[str] | bytes | None = None,
                 vmcoreinfo_at: tuple[int, int] | str | None = None,
                 arch: str = "x86_64") -> None:
        if isinstance(images, str | os.PathLike):
            images = [images]
        self.images = [os.fspath(p) for p in images]
        if not self.images:
            raise UsageError("no memory image given")
        self.phys_map = [_as_range(e) for e in phys_map] if phys_map is not None else None
        self.vmcoreinfo = vmcoreinfo
        self.vmcoreinfo_at = vmcoreinfo_at
        self.arch = get_arch(arch)
        self._sources: list[FileRangeSource] = []
        # physical ranges the images claim but do not hold (filled by ranges())
        self.missing: list[tuple[int, int]] = []
        self.warnings: list[str] = []

    # -- layout ---------------------------------------------------------------------------------
    def ranges(self) -> list[PhysRange]:
        """Every range with data, sorted by physical address; what the files claim but do not
        hold goes to ``self.missing``."""
        self.missing, self.warnings = [], []
        sizes = []
        for path in self.images:
            try:
                sizes.append(os.stat(path).st_size)
            except OSError as err:
                raise UsageError(f"cannot read memory image {path}: {err.strerror}") from err
        lime = [is_lime(p) for p in self.images]
        ranges: list[PhysRange] = []
        for i, path in enumerate(self.images):
            if lime[i]:
                ranges += read_lime_ranges(path, i, missing=self.missing,
                                           warnings=self.warnings)
        raw = [i for i in range(len(self.images)) if not lime[i]]
        if self.phys_map is not None:
            for r in self.phys_map:
                if r.image not in raw:
                    kind = "a LiME file" if 0 <= r.image < len(lime) else "not given"
                    raise UsageError(f"phys_map entry {r}: image {r.image} is {kind}")
                if r.size <= 0 or r.phys_addr < 0 or r.offset < 0:
                    raise UsageError(f"phys_map entry {r}: size must be positive, addresses >= 0")
            for r in self.phys_map:
                have = min(r.size, max(0, sizes[r.image] - r.offset))
                if have < r.size:  # the image is shorter than the phys_map says
                    self.missing.append((r.phys_addr + have, r.end))
                if have:
                    ranges.append(PhysRange(r.phys_addr, have, r.image, r.offset))
            unmapped = sorted(set(raw) - {r.image for r in self.phys_map})
            if unmapped:
                raise UsageError(f"phys_map places nothing from {self.images[unmapped[0]]}")
        elif len(raw) == 1:
            if sizes[raw[0]] == 0:
                raise FormatError("empty memory image", 0, self.images[raw[0]])
            ranges.append(PhysRange(0, sizes[raw[0]], raw[0], 0))
        elif raw:
            raise UsageError(f"{len(raw)} raw images: give a phys_map saying where each goes")
        ranges.sort(key=lambda r: r.phys_addr)
        self.missing.sort()
        for a, b in itertools.pairwise(ranges):
            if b.phys_addr < a.end:
                raise UsageError(f"physical ranges overlap: {a.phys_addr:#x}-{a.end:#x} "
                                 f"({self.images[a.image]}) and {b.phys_addr:#x}-{b.end:#x} "
                                 f"({self.images[b.image]})")
        return ranges

    def read_phys(self, ranges: Sequence[PhysRange], addr: int, length: int) -> bytes:
        for r in ranges:
            if r.phys_addr <= addr < r.end:
                if addr + length > r.end:
                    raise UsageError(f"physical {addr:#x}+{length:#x} runs past the end of the "
                                     f"mapped range {r.phys_addr:#x}-{r.end:#x}")
                with open(self.images[r.image], "rb") as f:
                    f.seek(r.offset + addr - r.phys_addr)
                    return f.read(length)
        spans = ", ".join(f"{r.phys_addr:#x}-{r.end:#x}" for r in ranges)
        raise UsageError(f"physical address {addr:#x} is not in the image (mapped: {spans})")

    # -- VMCOREINFO -----------------------------------------------------------------------------
    def load_vmcoreinfo(self, ranges: Sequence[PhysRange]) -> bytes:
        if self.vmcoreinfo is not None and self.vmcoreinfo_at is not None:
            raise UsageError("give vmcoreinfo or vmcoreinfo_at, not both")
        if isinstance(self.vmcoreinfo, bytes):
            text = self.vmcoreinfo
            where = "the given VMCOREINFO"
        elif self.vmcoreinfo is not None:
            where = os.fspath(self.vmcoreinfo)
            try:
                with open(where, "rb") as f:
                    text = f.read(1 << 20)
            except OSError as err:
                raise UsageError(f"cannot read VMCOREINFO file {where}: {err.strerror}") from err
        elif self.vmcoreinfo_at is not None:
            addr, size = parse_vmcoreinfo_at(self.vmcoreinfo_at)
            text = self._note_at(ranges, addr, size)
            where = f"the VMCOREINFO note at physical {addr:#x}"
        else:
            raise UsageError(
                "a raw image needs VMCOREINFO: pass vmcoreinfo=FILE (its KEY=VALUE text) or "
                "vmcoreinfo_at='ADDRESS SIZE' (cat /sys/kernel/vmcoreinfo on the machine the "
                "image came from)")
        fields = parse_vmcoreinfo(text)
        missing = [k for k in ("OSRELEASE", "PAGESIZE") if k not in fields]
        if missing:
            raise FormatError(f"{where} is not VMCOREINFO: no {' or '.join(missing)} line")
        return text.rstrip(b"\0")

    def _note_at(self, ranges: Sequence[PhysRange], addr: int, size: int) -> bytes:
        if size < 12 + 12:
            raise UsageError(f"vmcoreinfo size {size:#x} is too small for a note")
        raw = self.read_phys(ranges, addr, min(size, 1 << 20))
        namesz, descsz, ntype = _NHDR[self.arch.endian].unpack_from(raw, 0)
        name_end = 12 + namesz
        desc_off = 12 + ((namesz + 3) & ~3)
        name = raw[12:name_end].rstrip(b"\0")
        if namesz != len(VMCOREINFO_NOTE_NAME) + 1 or name != VMCOREINFO_NOTE_NAME or ntype != 0:
            shown = raw[12:12 + min(namesz, 16)]
            raise FormatError(
                f"no VMCOREINFO note at physical {addr:#x}: found namesz={namesz} type={ntype} "
                f"name={shown!r} (wrong address, or the phys_map does not match the image)",
                addr)
        if desc_off + descsz > len(raw):
            raise FormatError(f"VMCOREINFO note at physical {addr:#x} claims {descsz} bytes, "
                              f"more than the {size:#x}-byte note buffer", addr + 4)
        return raw[desc_off:desc_off + descsz]

    # -- the Snapshot ---------------------------------------------------------------------------
    def __enter__(self) -> Snapshot:
        ranges = self.ranges()
        text = self.load_vmcoreinfo(ranges)
        segments = []
        for r in ranges:
            src = FileRangeSource(self.images[r.image], r.offset, r.size)
            self._sources.append(src)
            segments.append(MemorySegment(r.phys_addr, src))
        notes: list[Note] = [vmcoreinfo_note(text)]
        image = CoreImage(arch=self.arch, kind=DumpKind.KERNEL, segments=segments, notes=notes,
                          vmcoreinfo=text, missing=list(self.missing))
        names = ", ".join(self.images)
        warnings = list(self.warnings)
        if image.missing:
            warnings.append(missing_warning(image.missing, "physical memory the images claim"))
        return Snapshot(image, f"memory image {names}", warnings=warnings, meta={
            "collector": "raw", "images": self.images,
            "ranges": [[r.phys_addr, r.size, r.image, r.offset] for r in ranges],
        })

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for src in self._sources:
            src.close()
        self._sources.clear()
