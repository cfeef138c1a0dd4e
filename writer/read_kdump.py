"""Reading makedumpfile's kdump-compressed format, normal or flattened (``read_flat.py`` gives
the flattened file's rearranged view).

Layout (layout.py; makedumpfile diskdump_mod.h, dump-formats.md §3): in blocks of the dumped
kernel's page size, disk_dump_header, kdump_sub_header (with VMCOREINFO, notes, ERASEINFO),
bitmap 1 (pages present), bitmap 2 (pages dumped), one page_desc per set bit of bitmap 2 in
ascending PFN order, then the page data.
"""

from __future__ import annotations

import bisect
import re
import struct
import sys
from array import array
from collections.abc import Iterator

from .arch import ARCHITECTURES, PHYS_BASE_KEYS, ArchInfo
from .codecs import PageDecoder, codec_of_flags
from .errors import SourceReadError, UsageError
from .image import CoreImage, DumpKind
from .layout import (
    DISK_DUMP_HEADER,
    DUMP_DH_COMPRESSED_INCOMPLETE,
    DUMP_DH_EXCLUDED_VMEMMAP,
    KDUMP_SIGNATURE,
    KDUMP_SUB_HEADER,
    PAGE_DESC,
)
from .notes import CORE_NOTE_NAME, NT_PRSTATUS, VMCOREINFO_NOTE_NAME, Note
from .read_base import (
    ERASEINFO_NOTE_NAME,
    MAX_BLOCK_SIZE,
    MIN_BLOCK_SIZE,
    Blob,
    Dump,
    DumpSegment,
    FileBlob,
    PageNotDumpedError,
    cstr,
    merge_ranges,
    vmcoreinfo_facts,
)
from .read_flat import FlatBlob
from .segments import CallableSource, MemorySegment, SegmentSource

_DESC_BLOCK = 4096  # page descriptors read (and cached) together
_SCAN_BLOCK = 1 << 16  # page descriptors checked together for ``missing``
# Sizes are the same in both byte orders.
_HEADER_SIZE = DISK_DUMP_HEADER["<"].size
_SUB_HEADER_SIZE = KDUMP_SUB_HEADER["<"].size
_DESC_SIZE = PAGE_DESC["<"].size

# utsname.machine strings (libkdumpfile util.c machine_arch_name) -> our arch names
_UTS_MACHINE = {
    "x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64",
    "s390x": "s390x", "ppc64": "ppc64", "ppc64le": "ppc64le", "riscv64": "riscv64",
}
_32BIT_MACHINES = re.compile(r"^(i[3-6]86|arm(v\d.*)?|ppc|s390|riscv32|mips.*)$")


class KdumpDump(Dump):
    """makedumpfile's kdump-compressed format; ``flat`` for the flattened (``-F``) stream."""

    def __init__(self, path: str, fd: int, flat: bool) -> None:
        super().__init__(path, fd)
        self.format = "kdump-flat" if flat else "kdump"
        self._blob: Blob = FlatBlob(fd, path, self.warnings) if flat else FileBlob(fd, path)
        self._desc_cache: tuple[int, bytes] | None = None
        self._shared: dict[tuple[int, int, int], bytes] = {}
        self._truncation_noted = False
        # A flattened stream cut short: a hole may be data that never arrived, so every
        # descriptor and page is checked against what did (FlatBlob.undelivered).
        self._cut = isinstance(self._blob, FlatBlob) and not self._blob.ended
        self._parse()
        if self._cut:
            self.header["incomplete"] = True
        self._codec = PageDecoder(self.page_size)

    # -- header --
    def _parse(self) -> None:
        blob = self._blob
        head = blob.pread(0, _HEADER_SIZE)
        if len(head) < _HEADER_SIZE:
            raise self._err(f"kdump header truncated: {len(head)} of {_HEADER_SIZE} bytes", 0)
        endian = self._detect_endian(head)
        self.endian = endian
        (_, version, sysname, nodename, release, version_str, machine, domain, tv_sec, tv_usec,
         status, block_size, sub_hdr_size, bitmap_blocks, max_mapnr32, _, _, _, _,
         nr_cpus) = DISK_DUMP_HEADER[endian].unpack(head)
        uts_machine = cstr(machine)
        self.header = {
            "signature": "KDUMP", "header_version": version, "sysname": cstr(sysname),
            "nodename": cstr(nodename), "release": cstr(release),
            "version": cstr(version_str), "machine": uts_machine,
            "domainname": cstr(domain), "timestamp": tv_sec, "timestamp_usec": tv_usec,
            "status": status, "block_size": block_size, "sub_hdr_size": sub_hdr_size,
            "bitmap_blocks": bitmap_blocks, "max_mapnr": max_mapnr32, "nr_cpus": nr_cpus,
            "codec": codec_of_flags(status).name.lower(),
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
        sub_raw = blob.pread(ps, _SUB_HEADER_SIZE)
        if len(sub_raw) < _SUB_HEADER_SIZE:
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
        facts = vmcoreinfo_facts(self.vmcoreinfo_fields)
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
        machine = cstr(head[272:337])
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
        # Every set bit of bitmap 2 in this file's PFN range needs a descriptor: bound
        # them by the file before building anything per page (split parts share the bitmaps).
        in_range = self._bitmap2[self._start_pfn // 8 : (self._end_pfn + 7) // 8]
        if (int.from_bytes(in_range, "little").bit_count() - 16) * _DESC_SIZE > blob.stored:
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
        if count * _DESC_SIZE > blob.stored:
            raise self._err(
                f"bitmap 2 claims {count} pages but the file cannot hold their descriptors",
                self._desc_off,
            )
        desc_end = self._desc_off + count * _DESC_SIZE
        if desc_end > blob.size:
            self.warnings.append(
                "page descriptors run past the end of the file: the dump is incomplete"
            )
            self.header["incomplete"] = True
        elif count:
            last = PAGE_DESC[self.endian].unpack(blob.pread(desc_end - _DESC_SIZE, _DESC_SIZE))
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
        size = _DESC_SIZE
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
                if rel + size <= len(data) and not (
                        self._cut and self._blob.undelivered(self._desc_off + i * size, size)):
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
            where = self._desc_off + index * _DESC_SIZE
            raise self._err(f"page {pfn:#x} (descriptor at {where:#x}): {err}", offset) from None

    def _check_desc(self, pfn: int, index: int, desc: tuple[int, int, int, int]) -> bool:
        """False for a page never written (offset 0); FormatError for an impossible one."""
        offset, size, _, _ = desc
        if offset == 0:
            return False
        where = self._desc_off + index * _DESC_SIZE
        if size == 0 or size > self.page_size:
            raise self._err(f"page {pfn:#x}: stored size {size} is not 1..{self.page_size}",
                            where)
        if offset < 0:
            raise self._err(f"page {pfn:#x}: negative data offset {offset}", where)
        if self._blob.undelivered(offset, size):
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

    def _find_missing(self) -> list[tuple[int, int]]:
        """Pages whose descriptor lies past the end of the file, was never written (offset 0:
        makedumpfile leaves it so in a dump it cut short) or points past the end of the file;
        in a flattened stream cut short, also those whose descriptor or data never arrived."""
        ps = self.page_size
        limit = self._blob.size
        swap = self.endian != ("<" if sys.byteorder == "little" else ">")
        found: list[tuple[int, int]] = []
        for (a, b), first in zip(self._runs, self._run_index, strict=True):
            for pfn in range(a, b, _SCAN_BLOCK):
                n = min(_SCAN_BLOCK, b - pfn)
                raw = self._blob.pread(self._desc_off + (first + pfn - a) * _DESC_SIZE,
                                       n * _DESC_SIZE)
                have = len(raw) // _DESC_SIZE
                if have < n:
                    found.append((pfn + have, pfn + n))  # descriptors past the end of the file
                if not have:
                    continue
                # Three 64-bit words per descriptor; the first is the data offset. Valid sizes
                # are at most one page, so offsets in (0, limit - page] need no closer look.
                words = array("q", raw[: have * _DESC_SIZE])
                if swap:
                    words.byteswap()
                offsets = words[0::3]
                if min(offsets) > 0 and max(offsets) <= limit - ps and not self._cut:
                    continue
                unpack = PAGE_DESC[self.endian].unpack_from
                desc_at = self._desc_off + (first + pfn - a) * _DESC_SIZE
                for k in range(have):
                    offset, size, _, _ = unpack(raw, k * _DESC_SIZE)
                    if offset == 0 or (offset > 0 and 0 < size <= ps and offset + size > limit) \
                            or (self._cut and (
                                self._blob.undelivered(desc_at + k * _DESC_SIZE, _DESC_SIZE)
                                or (offset > 0 and self._blob.undelivered(offset, size)))):
                        found.append((pfn + k, pfn + k + 1))
        pfns = merge_ranges(found)
        if pfns:
            self.header["incomplete"] = True
        return [(a * ps, b * ps) for a, b in pfns]

    def _readable_runs(self) -> Iterator[tuple[int, int, int]]:
        """(first pfn, end pfn, first descriptor index) of dumped pages outside ``missing``."""
        ps = self.page_size
        holes = [(a // ps, b // ps) for a, b in self.missing]
        starts = [h[0] for h in holes]
        for (a, b), first in zip(self._runs, self._run_index, strict=True):
            pos = a
            idx = max(bisect.bisect_right(starts, a) - 1, 0)
            while pos < b:
                while idx < len(holes) and holes[idx][1] <= pos:
                    idx += 1
                if idx < len(holes) and holes[idx][0] <= pos:
                    pos = holes[idx][1]
                    continue
                stop = min(b, holes[idx][0]) if idx < len(holes) else b
                yield pos, stop, first + pos - a
                pos = stop

    def to_image(self) -> CoreImage:
        if self._fd < 0:
            raise UsageError("the dump is closed")
        ps = self.page_size
        segs: list[MemorySegment] = []
        for a, b, first in self._readable_runs():
            segs.append(MemorySegment(
                phys_addr=a * ps, data=self._run_source(a, b - a, first),
            ))
        extra: list[Note] = []
        if self.eraseinfo and not any(n.name == ERASEINFO_NOTE_NAME for n in self.notes):
            extra.append(Note(ERASEINFO_NOTE_NAME, 0, self.eraseinfo))
        fields = self.vmcoreinfo_fields
        key = PHYS_BASE_KEYS.get(self.arch.name)
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
            missing=list(self.missing), incomplete=self.incomplete,
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

