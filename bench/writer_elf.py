"""The bench's ELF vmcore side: reading a core's PT_LOADs and notes, turning it into a
kdumpling image or raw memory files, a kdump file's max_mapnr, and the QEMU fix step
(program headers moved to offset 64 for makedumpfile).
"""

from __future__ import annotations

import os
import shutil
import struct
from dataclasses import dataclass, field
from typing import Any

from writer_runs import unlink


def extract_loads(path: str, max_phys: int | None) -> list[tuple[int, str, int]]:
    """The ELF's PT_LOADs (cut at ``max_phys``) as raw memory files next to it, cached:
    (physical address, path, size) each, what a user hands the seed API."""
    core = read_elf_core(path)
    out = []
    for i, (off, _vaddr, paddr, filesz, _memsz) in enumerate(clipped_loads(core, max_phys)):
        raw = f"{path}.load{i}-{paddr:x}-{filesz:x}.raw"
        if not (os.path.exists(raw) and os.path.getsize(raw) == filesz
                and os.path.getmtime(raw) >= os.path.getmtime(path)):
            tmp = raw + ".tmp"
            with open(path, "rb") as src, open(tmp, "wb") as dst:
                src.seek(off)
                left = filesz
                while left:
                    block = src.read(min(left, 8 << 20))
                    dst.write(block)
                    left -= len(block)
            os.rename(tmp, raw)
        out.append((paddr, raw, filesz))
    return out


# ------------------------------------------------------------------------------------------
# ELF core reading (our converter's input side) and the QEMU fix step
# ------------------------------------------------------------------------------------------
EM_X86_64, EM_AARCH64, EM_S390, EM_PPC64, EM_RISCV = 62, 183, 22, 21, 243
PT_LOAD, PT_NOTE = 1, 4


@dataclass
class ElfCore:
    endian: str
    machine: int
    phoff: int
    phnum: int
    loads: list[tuple[int, int, int, int, int]] = field(default_factory=list)
    # (p_offset, p_vaddr, p_paddr, p_filesz, p_memsz)
    notes: list[tuple[bytes, int, bytes]] = field(default_factory=list)  # (name, type, desc)


def read_elf_core(path: str) -> ElfCore:
    with open(path, "rb") as f:
        eh = f.read(64)
        if eh[:4] != b"\x7fELF" or eh[4] != 2:
            raise SystemExit(f"{path}: not an ELF64 file")
        e = "<" if eh[5] == 1 else ">"
        machine = struct.unpack_from(e + "H", eh, 18)[0]
        phoff, shoff = struct.unpack_from(e + "QQ", eh, 32)
        phentsize, phnum = struct.unpack_from(e + "HH", eh, 54)
        if phnum == 0xFFFF:  # PN_XNUM: the real count is in section header 0's sh_info
            f.seek(shoff)
            phnum = struct.unpack_from(e + "I", f.read(64), 44)[0]
        f.seek(phoff)
        ph = f.read(phentsize * phnum)
        core = ElfCore(e, machine, phoff, phnum)
        note_ranges = []
        for i in range(phnum):
            p_type, _flags, off, vaddr, paddr, filesz, memsz, _align = struct.unpack_from(
                e + "IIQQQQQQ", ph, i * phentsize)
            if p_type == PT_LOAD:
                core.loads.append((off, vaddr, paddr, filesz, memsz))
            elif p_type == PT_NOTE:
                note_ranges.append((off, filesz))
        for off, size in note_ranges:
            f.seek(off)
            blob = f.read(size)
            pos = 0
            while pos + 12 <= len(blob):
                namesz, descsz, ntype = struct.unpack_from(e + "III", blob, pos)
                pos += 12
                name = blob[pos : pos + namesz].rstrip(b"\0")
                pos += (namesz + 3) & ~3
                desc = blob[pos : pos + descsz]
                pos += (descsz + 3) & ~3
                core.notes.append((name, ntype, desc))
    return core


def clipped_loads(core: ElfCore, max_phys: int | None) -> list[tuple[int, int, int, int, int]]:
    """PT_LOADs (off, vaddr, paddr, filesz, memsz) cut at physical address ``max_phys``."""
    out = []
    for off, vaddr, paddr, filesz, memsz in core.loads:
        if max_phys is not None:
            if paddr >= max_phys:
                continue
            filesz = min(filesz, max_phys - paddr)
            memsz = min(memsz, max_phys - paddr)
        if filesz:
            out.append((off, vaddr, paddr, filesz, memsz))
    return out


def image_from_elf(path: str, converter: str = "bench", max_phys: int | None = None) -> Any:
    """A kdumpling CoreImage over an ELF vmcore's PT_LOADs and notes; nothing is read yet.
    ``max_phys``: leave out memory at and above that physical address."""
    import kdumpling

    if converter == "reader":
        from kdumpling.reader import open_dump  # type: ignore[import-not-found]

        return open_dump(path).to_image()
    from kdumpling.arch import arch_from_machine

    core = read_elf_core(path)
    arch = arch_from_machine(core.machine, core.endian == ">")
    vmcoreinfo = b""
    notes = []
    for name, ntype, desc in core.notes:
        if name == b"VMCOREINFO" and not vmcoreinfo:
            vmcoreinfo = desc.rstrip(b"\0")
        notes.append(kdumpling.Note(name, ntype, desc))
    segments = [
        kdumpling.MemorySegment(phys_addr=paddr, virt_addr=vaddr, mem_size=max(memsz, filesz),
                                data=kdumpling.FileRangeSource(path, off, filesz))
        for off, vaddr, paddr, filesz, memsz in clipped_loads(core, max_phys)
    ]
    return kdumpling.CoreImage(arch=arch, kind=kdumpling.DumpKind.KERNEL, segments=segments,
                               notes=notes, vmcoreinfo=vmcoreinfo)


def kdump_max_mapnr(path: str) -> int:
    """max_mapnr of a kdump-compressed file (max_mapnr_64 from header version 6 on)."""
    with open(path, "rb") as f:
        head = f.read(464)
        e = "<" if struct.unpack_from("<i", head, 8)[0] < 0x10000 else ">"
        version = struct.unpack_from(e + "i", head, 8)[0]
        block_size = struct.unpack_from(e + "i", head, 428)[0]
        max_mapnr = struct.unpack_from(e + "I", head, 440)[0]
        if version >= 6:
            f.seek(block_size + 96)
            max_mapnr = struct.unpack(e + "Q", f.read(8))[0]
    return int(max_mapnr)


def fix_qemu_elf(src: str, dst: str) -> str:
    """Copy a QEMU ELF with its program headers moved to offset 64.

    QEMU >= 7.2 writes section headers at 64 and program headers after them (e_phoff 192,
    e_ehsize 8); makedumpfile 1.7.x reads program headers at sizeof(Elf64_Ehdr) = 64 whatever
    e_phoff says ("Can't get the number of PT_LOAD"). Moving them there, dropping the section
    headers and setting e_ehsize = 64 is enough; the data offsets do not change.
    """
    core = read_elf_core(src)
    if os.path.exists(dst) and os.path.getsize(dst) == os.path.getsize(src) \
            and os.path.getmtime(dst) >= os.path.getmtime(src) and read_elf_core(dst).phoff == 64:
        return "cached"
    unlink(dst)
    tmp = dst + ".tmp"
    shutil.copyfile(src, tmp)
    e = core.endian
    with open(tmp, "r+b") as f:
        eh = bytearray(f.read(64))
        phentsize, phnum = struct.unpack_from(e + "HH", eh, 54)
        if core.phoff != 64:
            if phnum == 0xFFFF:
                raise SystemExit("PN_XNUM QEMU dumps are not handled by the fix step")
            f.seek(core.phoff)
            ph = f.read(phentsize * phnum)
            first_data = min(struct.unpack_from(e + "Q", ph, i * phentsize + 8)[0]
                             for i in range(phnum))
            if 64 + len(ph) > first_data:
                raise SystemExit("no room for the program headers at offset 64")
            struct.pack_into(e + "QQ", eh, 32, 64, 0)  # e_phoff = 64, e_shoff = 0
            struct.pack_into(e + "H", eh, 52, 64)  # e_ehsize
            struct.pack_into(e + "HHH", eh, 58, 0, 0, 0)  # e_shentsize, e_shnum, e_shstrndx
            f.seek(0)
            f.write(eh)
            f.write(ph)
    os.chmod(tmp, 0o644)
    os.rename(tmp, dst)
    return f"phdrs moved {core.phoff} -> 64" if core.phoff != 64 else "already at 64"
