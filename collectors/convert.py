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
"""

from __future__ import annotations

import os
from types import TracebackType
from typing import Any

from kdumpling.image import CoreImage, DumpKind

from .base import Snapshot

# The VMCOREINFO key that carries the kernel's physical load offset, per architecture
# (arch/x86/kernel/machine_kexec_64.c, arch/arm64/kernel/vmcore_info.c).
PHYS_BASE_KEY = {"x86_64": "NUMBER(phys_base)", "aarch64": "NUMBER(PHYS_OFFSET)"}


def vmcoreinfo_number(fields: dict[str, str], key: str) -> int | None:
    """A NUMBER() value: decimal (``%ld``, maybe negative) or 0x-hex (some arm64 keys)."""
    value = fields.get(key)
    if value is None:
        return None
    try:
        return int(value, 0)
    except ValueError:
        try:
            return int(value, 10)  # int("-0123", 0) fails on leading zeros
        except ValueError:
            return None


def image_of_dump(dump: Any) -> tuple[CoreImage, dict[str, object], list[str], list[str]]:
    """The image of an opened dump, with what QEMU gets wrong taken from VMCOREINFO instead.

    Returns image, meta, warnings and fixes: what was corrected comes apart from the warnings,
    as the caller says whether it is news (a file someone hands us) or expected (QEMU's own
    dump, asked for by a collector).
    """
    image = dump.to_image()
    fixes: list[str] = []
    meta: dict[str, object] = {"source_format": dump.format}
    warnings = list(dump.warnings)
    if image.kind is DumpKind.KERNEL:
        fields = image.vmcoreinfo_fields
        key = PHYS_BASE_KEY.get(image.arch.name)
        phys_base = vmcoreinfo_number(fields, key) if key else None
        header_base = dump.header.get("phys_base")
        if phys_base is not None:
            # VMCOREINFO is the kernel's own word; the header may be QEMU's misparse.
            image.phys_base = phys_base
            if isinstance(header_base, int) and header_base != phys_base & (2**64 - 1):
                fixes.append(f"header phys_base {header_base:#x} replaced by "
                             f"VMCOREINFO's {phys_base:#x}")
        if "KERNELOFFSET" in fields:
            try:
                meta["kernel_offset"] = int(fields["KERNELOFFSET"], 16)
            except ValueError:
                warnings.append(f"VMCOREINFO KERNELOFFSET={fields['KERNELOFFSET']!r} "
                                "is not hexadecimal")
        if not image.vmcoreinfo:
            warnings.append("the dump has no VMCOREINFO: crash --osrelease, drgn and "
                            "makedumpfile will not recognise the kernel")
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
            warnings += fixes  # a file someone hands us: say what in it was wrong
            meta = {"collector": "convert", "source": self.path, **meta}
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
