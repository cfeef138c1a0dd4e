"""The notes of a live process's core, in the kernel's order (fs/binfmt_elf.c
fill_note_info): each thread's register sets read with PTRACE_GETREGSET, and the
process-wide PRPSINFO, SIGINFO, AUXV and FILE notes, then kdumpling's annotations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kdumpling.arch import ArchInfo, ArchRegsets
from kdumpling.errors import UsageError
from kdumpling.notes import (
    CORE_NOTE_NAME,
    DEFAULT_NOTE_VENDOR,
    LINUX_NOTE_NAME,
    NT_AUXV,
    NT_PRFPREG,
    NT_PRSTATUS,
    NT_SIGINFO,
    CpuContext,
    CustomNoteType,
    Note,
    annotations_text,
    file_note,
    prpsinfo_note,
    prstatus_note,
    siginfo_note,
    unpack_registers,
)

from .._procfs import ProcStat
from .tracer import RegsetReader, getsigmask

MAX_FILE_NOTE_SIZE = 4 << 20  # fs/binfmt_elf.c MAX_FILE_NOTE_SIZE (older kernels' fixed cap)


def note_owner(note_type: int) -> bytes:
    """"CORE" for the two classic regsets, "LINUX" for every arch extension (binfmt_elf.c)."""
    return CORE_NOTE_NAME if note_type in (NT_PRSTATUS, NT_PRFPREG) else LINUX_NOTE_NAME


@dataclass
class ThreadState:
    tid: int
    regs: bytes  # pr_reg from PTRACE_GETREGSET NT_PRSTATUS
    extra: list[Note]  # the other regsets, in view order
    sighold: int = 0

    def sp(self, arch: ArchInfo, sp_register: str) -> int:
        return unpack_registers(arch, self.regs)[sp_register]


def read_thread_state(tid: int, arch: ArchInfo, regsets: ArchRegsets,
                      reader: RegsetReader) -> ThreadState:
    regs = reader.get(tid, NT_PRSTATUS)
    if len(regs) != arch.reg_bytes:
        raise UsageError(
            f"thread {tid}: {len(regs)}-byte registers where {arch.name} has {arch.reg_bytes}: "
            f"32-bit (compat) processes are not supported")
    extra = []
    for nt in (NT_PRFPREG, *regsets.regsets):
        try:
            data = reader.get(tid, nt)
        except OSError:
            continue  # not supported / not active for this task (ENODEV, EINVAL, ENXIO)
        if data:
            extra.append(Note(note_owner(nt), nt, data))
    sighold = 0
    with contextlib.suppress(OSError):
        sighold = getsigmask(tid)
    return ThreadState(tid, regs, extra, sighold)


def _psargs(cmdline: bytes) -> bytes:
    # fs/binfmt_elf.c fill_psinfo: at most ELF_PRARGSZ-1 bytes of the argument area, with the
    # NULs between arguments (and the final one) turned into spaces.
    return cmdline[:79].replace(b"\0", b" ")


def build_notes(arch: ArchInfo, threads: Sequence[ThreadState], stat: ProcStat,
                status: Mapping[str, str], cmdline: bytes, auxv: bytes,
                files: Sequence[tuple[int, int, int, bytes]], page: int,
                annotations: Mapping[str, str], *, cursig: int = 0,
                siginfo: bytes | None = None) -> list[Note]:
    """Notes in the kernel's order: PRSTATUS of the first thread, the process-wide PRPSINFO,
    SIGINFO, AUXV, FILE, that thread's other regsets, then each other thread, then ours.

    ``cursig``/``siginfo``: the signal the first thread stopped on (a signal watch), recorded
    as the kernel does for a fatal signal: pr_cursig and pr_info.si_signo in every thread's
    PRSTATUS (fs/binfmt_elf.c fill_prstatus gets the dump's signr for each thread) and the
    raw siginfo_t as NT_SIGINFO (fill_siginfo_note). gdb shows it as "terminated with signal"
    and ``$_siginfo``."""
    endian = arch.endian
    uid = int((status.get("Uid", "0").split() or ["0"])[0])
    gid = int((status.get("Gid", "0").split() or ["0"])[0])
    sname = {"t": "T", "I": "D"}.get(stat.state, stat.state)
    state_index = "RSDTZW".find(sname)
    psinfo = prpsinfo_note(
        endian, state=max(state_index, 0), sname=sname if state_index >= 0 else ".",
        zomb=1 if sname == "Z" else 0, nice=max(-128, min(127, stat.nice)),
        flag=stat.flags & 0xFFFFFFFFFFFFFFFF, uid=uid, gid=gid, pid=stat.pid, ppid=stat.ppid,
        pgrp=stat.pgrp, sid=stat.session, fname=stat.comm[:15], psargs=_psargs(cmdline),
    )
    notes: list[Note] = []
    for i, th in enumerate(threads):
        ctx = CpuContext(
            cpu_id=i, pr_pid=th.tid, pr_ppid=stat.ppid, pr_pgrp=stat.pgrp, pr_sid=stat.session,
            pr_sighold=th.sighold, raw_regs=th.regs, pr_cursig=cursig, si_signo=cursig,
            pr_fpvalid=1 if any(n.type == NT_PRFPREG for n in th.extra) else 0,
        )
        notes.append(prstatus_note(arch, ctx))
        if i == 0:
            notes.append(psinfo)
            notes.append(siginfo_note(endian) if siginfo is None
                         else Note(CORE_NOTE_NAME, NT_SIGINFO, siginfo))
            notes.append(Note(CORE_NOTE_NAME, NT_AUXV, auxv))
            notes.append(file_note(endian, page, _cap_files(files)))
        notes.extend(th.extra)
    if annotations:
        notes.append(Note(DEFAULT_NOTE_VENDOR, CustomNoteType.ANNOTATIONS,
                          annotations_text(annotations)))
    return notes


def _cap_files(files: Sequence[tuple[int, int, int, bytes]]) -> list[tuple[int, int, int, bytes]]:
    size = 16
    out = []
    for f in files:
        size += 24 + len(f[3]) + 1
        if size > MAX_FILE_NOTE_SIZE:
            break
        out.append(f)
    return out

