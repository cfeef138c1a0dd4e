"""Any dump we can read (ELF vmcore, kdump-compressed, flattened) as a Snapshot to rewrite.

The main customers are QEMU's and libvirt's own dump files, which do not open everywhere
(measured with QEMU 7.2, see the project's rig notes):

* ELF: program headers at offset 192 after two section headers; makedumpfile reads them at 64.
  Rewriting puts them at 64.
* kdump-zlib: the flattened layout (libkdumpfile 0.5.1 cannot read it), a utsname with only the
  machine filled in (libkdumpfile then cannot tell the architecture, so drgn refuses it) and a
  sub-header ``phys_base`` parsed from the kernel's decimal NUMBER(phys_base) as if it were hex
  (dump/dump.c vmcoreinfo_update_phys_base), wrong under KASLR. Rewriting writes the normal
  layout, fills utsname from OSRELEASE and takes phys_base from VMCOREINFO.

The CPU notes, QEMU's own notes and the VMCOREINFO note are kept as they are.

A file that promises memory it cannot deliver (cut short, page descriptors past its end) is
converted with every page it still has; the rest is named in ``image.missing``, which makes the
writers mark the output incomplete, and in a warning.
"""

from __future__ import annotations

import os
from types import TracebackType
from typing import Any

from kdumpling.arch import (
    PHYS_BASE_KEYS,
    phys_base_u64,
    qemu_header_phys_base,
    vmcoreinfo_phys_base,
)
from kdumpling.image import CoreImage, DumpKind
from kdumpling.segments import CallableSource, MemorySegment, SegmentSource

from .base import Snapshot

MAX_RANGES_NAMED = 8  # a warning names this many missing ranges, the record all of them


def missing_warning(missing: list[tuple[int, int]], what: str = "memory") -> str:
    """One warning line naming the ranges of ``what`` that could not be read."""
    total = sum(b - a for a, b in missing)
    shown = ", ".join(f"{a:#x}-{b:#x}" for a, b in missing[:MAX_RANGES_NAMED])
    more = f" and {len(missing) - MAX_RANGES_NAMED} more" if len(missing) > MAX_RANGES_NAMED \
        else ""
    return (f"{total} bytes of {what} in {len(missing)} range(s) could not be read: {shown}"
            f"{more}; the output is marked incomplete")


def _phys_base_fix(image: CoreImage, header_base: object) -> tuple[str | None, bool]:
    """Set the image's phys_base from VMCOREINFO. Returns what changed in the header's value
    (None: nothing) and whether it is QEMU's known misreading (expected, not a warning)."""
    fields = image.vmcoreinfo_fields
    phys_base = vmcoreinfo_phys_base(image.arch.name, fields)
    if phys_base is None:
        return None, False
    # VMCOREINFO is the kernel's own word; the header may be QEMU's misparse.
    image.phys_base = phys_base
    # Both sides as the 64-bit field stores them: an ELF reader hands back the signed
    # VMCOREINFO value, a kdump sub-header the unsigned one.
    if not isinstance(header_base, int) or phys_base_u64(header_base) == phys_base_u64(phys_base):
        return None, False
    text = fields[PHYS_BASE_KEYS[image.arch.name]]
    qemu = phys_base_u64(header_base) == qemu_header_phys_base(text)
    why = " (QEMU reads the kernel's decimal value as hex)" if qemu else ""
    return (f"header phys_base {phys_base_u64(header_base):#x} replaced by VMCOREINFO's "
            f"{phys_base:#x}{why}"), qemu


def cut_out(image: CoreImage, ranges: list[tuple[int, int]]) -> None:
    """Split the image's segments so that no data of theirs lies in ``ranges`` (physical for
    kernel dumps): bytes a file only pretends to hold (a spool's holes) stay out."""
    kernel = image.kind is DumpKind.KERNEL
    out: list[MemorySegment] = []
    for seg in image.segments:
        start = seg.phys_addr if kernel else seg.effective_virt_addr
        pieces = [(start, start + seg.size)]
        for a, b in ranges:
            pieces = [p for lo, hi in pieces for p in ((lo, min(hi, a)), (max(lo, b), hi))
                      if p[0] < p[1]]
        if pieces == [(start, start + seg.size)]:
            out.append(seg)
            continue
        for lo, hi in pieces:
            def read(off: int, n: int, src: SegmentSource = seg.source, base: int = lo - start
                     ) -> bytes | bytearray:
                return src.read(base + off, n)
            virt = seg.virt_addr + lo - start if seg.virt_addr is not None else None
            out.append(MemorySegment(phys_addr=seg.phys_addr + lo - start, virt_addr=virt,
                                     data=CallableSource(hi - lo, read), flags=seg.flags))
    image.segments = out


def image_of_dump(dump: Any) -> tuple[CoreImage, dict[str, object], list[str], list[str]]:
    """The image of an opened dump, with what QEMU gets wrong taken from VMCOREINFO instead.

    Returns image, meta, warnings and fixes. Fixes are QEMU's known header mistakes, corrected
    as expected (recorded, not warned); anything else that disagrees, and memory the file
    cannot deliver (``image.missing``), is a warning.
    """
    image = dump.to_image()
    fixes: list[str] = []
    meta: dict[str, object] = {"source_format": dump.format}
    warnings = list(dump.warnings)
    if image.kind is DumpKind.KERNEL:
        fields = image.vmcoreinfo_fields
        fix, expected = _phys_base_fix(image, dump.header.get("phys_base"))
        if fix is not None:
            (fixes if expected else warnings).append(fix)
        if "KERNELOFFSET" in fields:
            try:
                meta["kernel_offset"] = int(fields["KERNELOFFSET"], 16)
            except ValueError:
                warnings.append(f"VMCOREINFO KERNELOFFSET={fields['KERNELOFFSET']!r} "
                                "is not hexadecimal")
        if not image.vmcoreinfo:
            warnings.append("the dump has no VMCOREINFO: crash --osrelease, drgn and "
                            "makedumpfile will not recognise the kernel")
    if image.missing:  # to_image() left them out of every segment (no p_memsz past them)
        warnings.append(missing_warning(image.missing))
    return image, meta, warnings, fixes


class DumpFileCollector:
    """Context manager: ``with DumpFileCollector("qemu.elf") as snap: write_dump(snap.image, x)``

    The dump file stays open until the block ends (the image reads it lazily).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._dump: Any = None

    def __enter__(self) -> Snapshot:
        from kdumpling.reader import open_dump

        dump = self._dump = open_dump(self.path)
        try:
            image, meta, warnings, fixes = image_of_dump(dump)
            meta = {"collector": "convert", "source": self.path, **meta}
            if fixes:
                meta["fixes"] = fixes
            return Snapshot(image, f"{dump.format} dump {self.path}", warnings=warnings,
                            meta=meta)
        except BaseException:
            dump.close()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._dump is not None:
            self._dump.close()
            self._dump = None
