"""ELF note records and the standard Linux core notes.

A note is three 32-bit words (namesz, descsz, type), then the NUL-terminated name and the
descriptor, each zero-padded to 4 bytes: Linux uses 4-byte note alignment even in ELF64
(kernel/vmcore_info.c append_elf_note; fs/binfmt_elf.c). Layouts below cite include/linux/elfcore.h
and include/uapi/linux/elf.h.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum

from .arch import PRSTATUS_REG_OFFSET, ArchInfo
from .errors import UsageError

# Note types (include/uapi/linux/elf.h)
NT_PRSTATUS = 1
NT_PRFPREG = 2  # a.k.a. NT_FPREGSET
NT_PRPSINFO = 3
NT_TASKSTRUCT = 4
NT_AUXV = 6
# the architecture regsets (NT_X86_XSTATE, NT_ARM_*) are declared in kdumpling.arch
NT_SIGINFO = 0x53494749
NT_FILE = 0x46494C45

VMCOREINFO_NOTE_NAME = b"VMCOREINFO"
VMCOREINFO_NOTE_TYPE = 0  # makedumpfile insists on 0 (elf_info.c get_pt_note_info)
CORE_NOTE_NAME = b"CORE"
LINUX_NOTE_NAME = b"LINUX"
DEFAULT_NOTE_VENDOR = b"KDUMPLING"

# Types that some reader recognises whatever the owner name: crash counts every type-1 note as
# a CPU (netdump.c dump_Elf64_Nhdr), and treats 2, 3, 4 as FPREGSET, PRPSINFO, TASKSTRUCT.
# Custom notes must stay clear of them.
READER_CLAIMED_TYPES = frozenset({1, 2, 3, 4})


class CustomNoteType(IntEnum):
    """Types of kdumpling's own notes (owner ``KDUMPLING`` by default).

    The values spell "KDL" in their top bytes so that no reader mistakes them for a standard note:
    0.4.0 used 1, 2 and 3, which crash counts as NT_PRSTATUS / NT_PRFPREG / NT_PRPSINFO whatever
    the owner name is, so one annotation looked like a second CPU.
    """

    METADATA = 0x4B444C01  # hash / signature information
    ANNOTATIONS = 0x4B444C02  # KEY=VALUE lines
    FILE_INFO = 0x4B444C03  # description of the dumped file
    USER_DEFINED = 0x4B444D00  # start of the range left to callers


# The seed API (kdumpling 0.4.0) numbered the same notes 1, 2, 3 and 256 under owner KDUMPLING.
SEED_NOTE_TYPES = {1: "METADATA", 2: "ANNOTATIONS", 3: "FILE_INFO", 256: "USER_DEFINED"}


def kdumpling_note_kind(owner: bytes, note_type: int) -> str | None:
    """Name of a kdumpling note in either numbering, or None for any other note.

    Our :class:`CustomNoteType` values count under any owner (``add_annotations`` takes a
    vendor); the seed's 1, 2, 3, 256 only under owner ``KDUMPLING``, where nothing else uses them.
    """
    try:
        return CustomNoteType(note_type).name
    except ValueError:
        pass
    if owner == DEFAULT_NOTE_VENDOR:
        return SEED_NOTE_TYPES.get(note_type)
    return None


@dataclass
class CustomNote:
    """A caller-supplied ELF note, identified by (owner name, type)."""

    name: bytes
    note_type: int
    data: bytes


@dataclass(frozen=True)
class Note:
    """One ELF note: owner name (without NUL), type and descriptor bytes."""

    name: bytes
    type: int
    desc: bytes


_NHDR = {e: struct.Struct(e + "III") for e in "<>"}  # Elf64_Nhdr: three 32-bit words


def _pad4(n: int) -> int:
    return (n + 3) & ~3


def note_size(name: bytes, desc_len: int) -> int:
    """Bytes a note with this owner and descriptor length takes in a note segment."""
    return 12 + _pad4(len(name) + 1) + _pad4(desc_len)


def pack_note(endian: str, note: Note) -> bytes:
    namesz = len(note.name) + 1
    out = bytearray(note_size(note.name, len(note.desc)))
    _NHDR[endian].pack_into(out, 0, namesz, len(note.desc), note.type & 0xFFFFFFFF)
    out[12 : 12 + len(note.name)] = note.name
    off = 12 + _pad4(namesz)
    out[off : off + len(note.desc)] = note.desc
    return bytes(out)


@dataclass(frozen=True)
class PackedNotes:
    """A note segment and where the VMCOREINFO descriptor landed inside it."""

    data: bytes
    vmcoreinfo_offset: int | None  # offset of the VMCOREINFO descriptor within data
    vmcoreinfo_size: int
    prstatus_count: int


def pack_notes(endian: str, notes: Iterable[Note]) -> PackedNotes:
    out = bytearray()
    vmci_off: int | None = None
    vmci_size = 0
    cpus = 0
    for note in notes:
        if note.name == VMCOREINFO_NOTE_NAME and vmci_off is None:
            vmci_off = len(out) + 12 + _pad4(len(note.name) + 1)
            vmci_size = len(note.desc)
        if note.type == NT_PRSTATUS and note.name == CORE_NOTE_NAME:
            cpus += 1
        out += pack_note(endian, note)
    return PackedNotes(bytes(out), vmci_off, vmci_size, cpus)


def iter_notes(data: bytes, endian: str, base_offset: int = 0) -> Iterable[tuple[int, Note]]:
    """Parse a note segment; yields (offset of the note header, note). Stops at a zero header."""
    off = 0
    nhdr = _NHDR[endian]
    while off + 12 <= len(data):
        namesz, descsz, ntype = nhdr.unpack_from(data, off)
        if namesz == 0 and descsz == 0 and ntype == 0:
            break
        name_end = off + 12 + namesz
        desc_off = off + 12 + _pad4(namesz)
        end = desc_off + _pad4(descsz)
        if desc_off + descsz > len(data):
            from .errors import FormatError

            raise FormatError("note runs past the end of the note segment", base_offset + off)
        name = bytes(data[off + 12 : name_end]).rstrip(b"\0")
        yield base_offset + off, Note(name, ntype, bytes(data[desc_off : desc_off + descsz]))
        off = end


# --- NT_PRSTATUS -------------------------------------------------------------------------------
# struct elf_prstatus_common (include/linux/elfcore.h): pr_info {si_signo, si_code, si_errno},
# short pr_cursig (+2 pad), pr_sigpend, pr_sighold, pr_pid, pr_ppid, pr_pgrp, pr_sid, then four
# struct __kernel_old_timeval {long, long}: 112 bytes on every LP64 architecture.
_PRSTATUS_PREFIX = "iiih2xQQiiii8q"


@dataclass
class CpuContext:
    """Register state of one CPU (kernel dumps) or one thread (process cores).

    ``registers`` maps names (``"RIP"``, ``X86_64Reg.RIP``, ...) to values; ``raw_regs``, when
    given, is the whole ``pr_reg`` block as PTRACE_GETREGSET returns it and wins over the dict.
    """

    cpu_id: int = 0
    pid: int = 0
    registers: Mapping[str, int] = field(default_factory=dict)
    pr_pid: int = 0
    pr_ppid: int = 0
    pr_pgrp: int = 0
    pr_sid: int = 0
    si_signo: int = 0
    si_code: int = 0
    si_errno: int = 0
    pr_cursig: int = 0
    pr_sigpend: int = 0
    pr_sighold: int = 0
    pr_fpvalid: int = 0
    raw_regs: bytes | None = None
    extra_notes: Sequence[Note] = ()  # per-thread notes that follow PRSTATUS (FPREGSET, XSTATE)


def pack_registers(arch: ArchInfo, registers: Mapping[str, int]) -> bytes:
    slots = [0] * len(arch.regs)
    for name, value in registers.items():
        slot = arch.register_slot(name)  # raises on unknown names
        slots[slot] = int(value)
    # ppc64 has 48 slots of which 44 carry names; the rest stay zero.
    count = len(struct.unpack(arch.endian + arch.reg_format, bytes(arch.reg_bytes)))
    slots += [0] * (count - len(slots))
    masks = [(1 << (8 * struct.calcsize(arch.endian + c))) - 1 for c in _expand(arch.reg_format)]
    for i, value in enumerate(slots):
        if value < 0 or value > masks[i]:
            if -(masks[i] + 1) // 2 <= value < 0:
                slots[i] = value & masks[i]
            else:
                reg = arch.regs(i).name if i < len(arch.regs) else str(i)
                raise UsageError(f"value {value:#x} does not fit register {reg} of {arch.name}")
    return struct.pack(arch.endian + arch.reg_format, *slots)


def _expand(fmt: str) -> list[str]:
    out: list[str] = []
    num = ""
    for ch in fmt:
        if ch.isdigit():
            num += ch
        else:
            out += [ch] * int(num or "1")
            num = ""
    return out


def unpack_registers(arch: ArchInfo, pr_reg: bytes) -> dict[str, int]:
    values = struct.unpack_from(arch.endian + arch.reg_format, pr_reg)
    return {member.name: values[int(member)] for member in arch.regs}


def pack_prstatus(arch: ArchInfo, ctx: CpuContext) -> bytes:
    """``struct elf_prstatus`` of exactly the kernel's size for ``arch``."""
    if ctx.raw_regs is not None:
        if len(ctx.raw_regs) != arch.reg_bytes:
            raise UsageError(
                f"raw registers for {arch.name} must be {arch.reg_bytes} bytes, "
                f"got {len(ctx.raw_regs)}"
            )
        regs = ctx.raw_regs
    else:
        regs = pack_registers(arch, ctx.registers)
    out = bytearray(arch.prstatus_size)
    struct.pack_into(
        arch.endian + _PRSTATUS_PREFIX, out, 0,
        ctx.si_signo, ctx.si_code, ctx.si_errno, ctx.pr_cursig, ctx.pr_sigpend, ctx.pr_sighold,
        ctx.pr_pid, ctx.pr_ppid, ctx.pr_pgrp, ctx.pr_sid, 0, 0, 0, 0, 0, 0, 0, 0,
    )
    out[PRSTATUS_REG_OFFSET : PRSTATUS_REG_OFFSET + len(regs)] = regs
    struct.pack_into(arch.endian + "i", out, PRSTATUS_REG_OFFSET + len(regs), ctx.pr_fpvalid)
    return bytes(out)


def prstatus_note(arch: ArchInfo, ctx: CpuContext) -> Note:
    return Note(CORE_NOTE_NAME, NT_PRSTATUS, pack_prstatus(arch, ctx))


def parse_prstatus(arch: ArchInfo, desc: bytes) -> tuple[int, dict[str, int]]:
    """(pr_pid, registers) from an NT_PRSTATUS descriptor."""
    pid = struct.unpack_from(arch.endian + "i", desc, 32)[0]
    return pid, unpack_registers(arch, desc[PRSTATUS_REG_OFFSET:])


# --- process-core notes ------------------------------------------------------------------------
# struct elf_prpsinfo (include/linux/elfcore.h), LP64: 136 bytes; uid/gid are 32-bit on every
# architecture we support.
_PRPSINFO = "bcbb4xQIIiiii16s80s"


def prpsinfo_note(
    endian: str, *, state: int, sname: str, zomb: int, nice: int, flag: int, uid: int, gid: int,
    pid: int, ppid: int, pgrp: int, sid: int, fname: bytes, psargs: bytes,
) -> Note:
    desc = struct.pack(
        endian + _PRPSINFO, state, sname.encode()[:1] or b"R", zomb, nice, flag,
        uid & 0xFFFFFFFF, gid & 0xFFFFFFFF, pid, ppid, pgrp, sid, fname[:15], psargs[:79],
    )
    return Note(CORE_NOTE_NAME, NT_PRPSINFO, desc)


def file_note(endian: str, page_size: int, mappings: Sequence[tuple[int, int, int, bytes]]) -> Note:
    """NT_FILE: (start, end, file offset in bytes, path) per file mapping (fs/binfmt_elf.c
    fill_files_note); offsets are stored in units of ``page_size`` as the kernel does."""
    head = struct.pack(endian + "QQ", len(mappings), page_size)
    table = b"".join(
        struct.pack(endian + "QQQ", start, end, offset // page_size)
        for start, end, offset, _ in mappings
    )
    names = b"".join(path + b"\0" for *_, path in mappings)
    return Note(CORE_NOTE_NAME, NT_FILE, head + table + names)


def siginfo_note(endian: str, signo: int = 0, code: int = 0, errno_: int = 0) -> Note:
    """NT_SIGINFO: a 128-byte siginfo_t; zeros are right for a snapshot nobody signalled."""
    return Note(CORE_NOTE_NAME, NT_SIGINFO, struct.pack(endian + "iii116x", signo, errno_, code))


def vmcoreinfo_note(text: bytes) -> Note:
    return Note(VMCOREINFO_NOTE_NAME, VMCOREINFO_NOTE_TYPE, text)


def annotations_text(annotations: Mapping[str, str]) -> bytes:
    return "\n".join(f"{k}={v}" for k, v in annotations.items()).encode("utf-8")


def parse_annotations(desc: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in desc.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key] = value
    return out


def parse_vmcoreinfo(text: bytes | str) -> dict[str, str]:
    """KEY=VALUE lines of a VMCOREINFO blob (include/linux/vmcore_info.h)."""
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key not in out:
            out[key] = value.strip()
    return out
