"""The process collector's /proc parsing and dump policy, against a fake procfs tree (no
privileges, no live process). The expected decisions follow fs/coredump.c vma_dump_size()."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from kdumpling.arch import get_arch
from kdumpling.collectors import process as P
from kdumpling.collectors._procfs import (
    FileInfo,
    MapEntry,
    ProcFS,
    parse_maps,
    parse_maps_line,
    parse_smaps,
    parse_stat,
)
from kdumpling.errors import PermissionDeniedError, SourceReadError, TargetGoneError
from kdumpling.notes import iter_notes, parse_annotations, parse_prstatus

PAGE = 4096
PID = 4242

# One line per VMA: maps line, then (Anonymous kB, Rss kB, Swap kB, VmFlags)
LAYOUT = [
    ("55d0c0000000-55d0c0001000 r--p 00000000 fe:00 1001  /usr/bin/app", 0, 4, 0, "rd mr mw me"),
    ("55d0c0001000-55d0c0003000 r-xp 00001000 fe:00 1001  /usr/bin/app", 0, 8, 0,
     "rd ex mr mw me"),
    ("55d0c0003000-55d0c0004000 r--p 00002000 fe:00 1001  /usr/bin/app", 4, 4, 0,
     "rd mr mw me ac"),  # RELRO: COW'd, read-only now
    ("55d0c0004000-55d0c0005000 rw-p 00003000 fe:00 1001  /usr/bin/app", 4, 4, 0,
     "rd wr mr mw me ac"),
    ("55d0c1000000-55d0c1021000 rw-p 00000000 00:00 0     [heap]", 132, 132, 0,
     "rd wr mr mw me ac"),
    ("7f0000000000-7f0000100000 rw-p 00000000 00:00 0 ", 0, 0, 0, "rd wr mr mw me ac dd"),
    ("7f0000100000-7f0000104000 ---p 00000000 00:00 0 ", 16, 16, 0, "mr mw me ac"),
    ("7f0000200000-7f0008200000 rw-p 00000000 00:00 0 ", 0, 0, 0, "rd wr mr mw me ac"),
    ("7f0008200000-7f0008201000 rw-p 00000000 00:00 0 ", 0, 0, 0, "rd wr mr mw me ac"),
    ("7f0008300000-7f0008302000 rw-s 00000000 00:01 77    /dev/zero (deleted)", 0, 8, 0,
     "rd wr sh mr mw me ms"),
    ("7f0008400000-7f0008401000 rw-s 00000000 fe:00 2002  /var/lib/data file.db", 0, 4, 0,
     "rd wr sh mr mw me ms"),
    ("7f0008500000-7f0008501000 r--p 00000000 fe:00 2003  /usr/share/locale.bin", 0, 4, 0,
     "rd mr mw me"),
    ("7f0008600000-7f0008601000 r--p 00000000 fe:00 2004  /usr/lib/libplain.so", 0, 4, 0,
     "rd mr mw me"),
    ("7f0008700000-7f0008900000 rw-p 00000000 00:0f 3000  /anon_hugepage (deleted)", 0, 0, 0,
     "rd wr mr mw me ac ht"),
    ("7f0008a00000-7f0008a04000 r--p 00000000 00:00 0     [vvar]", 0, 0, 0,
     "rd mr pf io de dd"),
    ("7f0008a04000-7f0008a06000 r-xp 00000000 00:00 0     [vdso]", 0, 8, 0,
     "rd ex mr mw me de"),
    ("7f0008b00000-7f0008b01000 rw-p 00000000 00:05 9     /secretmem (deleted)", 0, 0, 0,
     "rd wr mr mw me dd lo"),
    ("7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0     [stack]", 16, 16, 0,
     "rd wr mr mw me gd ac"),
    ("ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0 [vsyscall]", 0, 0, 0, "ex"),
]


def smaps_text(rows: list[tuple[str, int, int, int, str]]) -> bytes:
    out = []
    for line, anon, rss, swap, flags in rows:
        out.append(line)
        start, end = (int(x, 16) for x in line.split()[0].split("-"))
        out += [f"Size:           {(end - start) // 1024:8d} kB", f"Rss:            {rss:8d} kB",
                f"Anonymous:      {anon:8d} kB", "AnonHugePages:         0 kB",
                f"Swap:           {swap:8d} kB", f"VmFlags: {flags} "]
    return ("\n".join(out) + "\n").encode()


@dataclass
class FakeProbe:
    exec_files: set[bytes] = field(default_factory=lambda: {b"/usr/bin/app"})
    elf_magic: set[bytes] = field(default_factory=set)
    anon_pages: dict[int, bool | None] = field(default_factory=dict)
    sizes: dict[bytes, int] = field(default_factory=dict)
    asked: list[int] = field(default_factory=list)

    def file_info(self, entry: MapEntry) -> FileInfo | None:
        mode = 0o100755 if entry.path in self.exec_files else 0o100644
        return FileInfo(mode, self.sizes.get(entry.path, 1 << 30))

    def starts_with_elf_magic(self, entry: MapEntry) -> bool:
        return entry.path in self.elf_magic

    def has_anon_pages(self, entry: MapEntry) -> bool | None:
        self.asked.append(entry.start)
        return self.anon_pages.get(entry.start, False)


def plans_for(mask: int = 0x33, probe: FakeProbe | None = None) -> dict[int, P.MappingPlan]:
    smaps = parse_smaps(smaps_text(LAYOUT))
    entries = [s.map for s in smaps]
    plans = P.plan_mappings(entries, smaps, mask, PAGE, probe or FakeProbe())
    return {p.entry.start: p for p in plans}


# --- parsing -----------------------------------------------------------------------------------
def test_parse_maps_keeps_spaces_and_deleted_marker() -> None:
    e = parse_maps_line(b"7f0008400000-7f0008401000 rw-s 00001000 fe:00 2002    "
                        b"/var/lib/data file.db (deleted)\n")
    assert (e.start, e.end, e.perms, e.offset, e.dev, e.inode) == (
        0x7F0008400000, 0x7F0008401000, "rw-s", 0x1000, "fe:00", 2002)
    assert e.path == b"/var/lib/data file.db (deleted)" and e.deleted and e.is_file
    anon = parse_maps_line(b"7f0000000000-7f0000001000 rw-p 00000000 00:00 0 \n")
    assert anon.path == b"" and not anon.is_file and not anon.is_special
    assert parse_maps_line(b"7f0008a04000-7f0008a06000 r-xp 00000000 00:00 0  [vdso]").is_special
    for name in (b"[heap]", b"[stack]", b"[anon:jemalloc]"):
        assert not parse_maps_line(b"1000-2000 rw-p 00000000 00:00 0 " + name).is_special
    assert len(parse_maps(b"\n".join(row[0].encode() for row in LAYOUT))) == len(LAYOUT)


def test_parse_smaps_counters_and_flags() -> None:
    smaps = parse_smaps(smaps_text(LAYOUT))
    assert len(smaps) == len(LAYOUT)
    heap = smaps[4]
    assert heap.map.path == b"[heap]"
    assert heap.counter("Anonymous") == 132 * 1024 and heap.counter("Rss") == 132 * 1024
    assert heap.vmflags == frozenset({"rd", "wr", "mr", "mw", "me", "ac"})
    assert "dd" in smaps[5].vmflags


def test_parse_stat_with_hostile_comm() -> None:
    st = parse_stat(b"77 (a) b (c)) S 1 77 77 0 -1 4194560 0 0 0 0 0 0 0 0 20 -5 3 0 123 "
                    b"0 0\n")
    assert st.comm == b"a) b (c)" and st.state == "S" and st.ppid == 1 and st.pgrp == 77
    assert st.flags == 4194560 and st.nice == -5 and st.num_threads == 3 and st.starttime == 123


# --- the dump policy ----------------------------------------------------------------------------
def test_default_filter_matches_the_kernel() -> None:
    plans = plans_for()
    size = {s: p.dump for s, p in plans.items()}
    assert size[0x55D0C0000000] == PAGE  # executable file, offset 0: ELF header page
    assert size[0x55D0C0001000] == 0  # text: from the file
    assert size[0x55D0C0003000] == PAGE  # RELRO (COW'd, now r--p): whole
    assert plans[0x55D0C0003000].priority == 1
    assert size[0x55D0C0004000] == PAGE  # .data
    # fully resident heap: read whole; the stack, 16 of 132 kB resident: pagemap picks pages
    assert size[0x55D0C1000000] == 0x21000 and not plans[0x55D0C1000000].sparse
    assert plans[0x7FFD00000000].sparse
    assert size[0x7F0000000000] == 0  # MADV_DONTDUMP
    assert size[0x7F0000100000] == 0x4000  # PROT_NONE after a write: anon_vma, dumped
    assert size[0x7F0000200000] == 0  # 128 MiB never touched: a reservation, not dumped
    assert size[0x7F0008300000] == 0x2000  # shared anonymous: bit 1
    assert size[0x7F0008400000] == 0  # shared file: bit 3 off
    assert size[0x7F0008500000] == 0  # not executable, no ELF magic
    assert size[0x7F0008600000] == 0  # same (the fake says no magic)
    assert size[0x7F0008700000] == 0x200000  # private hugetlb: bit 5
    assert size[0x7F0008A04000] == 0x2000 and plans[0x7F0008A04000].priority == 1  # vdso
    assert size[0x7F0008B00000] == 0  # secretmem
    assert size[0x7FFD00000000] == 0x21000
    # unreadable specials are listed, with no bytes written
    vvar, vsys = plans[0x7F0008A00000], plans[0xFFFFFFFFFF600000]
    assert vvar.dump == 0 and "VM_IO" in vvar.unreadable_reason
    assert vsys.dump == 0 and "2^63" in vsys.unreadable_reason
    assert vvar.unreadable_expected and vsys.unreadable_expected  # the kernel's cores lack them
    assert not plans[0x7F0008B00000].unreadable_expected  # secretmem: unreadable, unexpected
    assert not plans[0x7F0000000000].unreadable_reason  # skipped on purpose, not unreadable


def test_elf_magic_gives_the_header_page_for_non_executable_libraries() -> None:
    plans = plans_for(probe=FakeProbe(elf_magic={b"/usr/lib/libplain.so"}))
    assert plans[0x7F0008600000].dump == PAGE
    assert plans[0x7F0008500000].dump == 0


def test_small_untouched_anonymous_mapping_is_rechecked_while_stopped() -> None:
    probe = FakeProbe(anon_pages={0x7F0008200000: True})
    plans = plans_for(probe=probe)
    assert plans[0x7F0008200000].dump == PAGE  # touched after smaps was read
    assert 0x7F0000200000 not in probe.asked  # 128 MiB: too big to recheck, trusted smaps


@pytest.mark.parametrize(("mask", "dumped", "skipped"), [
    (0x00, [0x7F0008A04000], [0x55D0C1000000, 0x55D0C0000000, 0x7F0008300000, 0x7F0008700000]),
    (0x01, [0x55D0C1000000, 0x55D0C0003000], [0x55D0C0000000, 0x7F0008300000]),
    (0x02, [0x7F0008300000], [0x55D0C1000000, 0x7F0008400000]),
    (0x04, [0x55D0C0001000, 0x7F0008500000], [0x55D0C1000000]),
    (0x08, [0x7F0008400000], [0x7F0008300000]),
    (0x10, [0x55D0C0000000], [0x55D0C0003000]),
    (0x20, [0x7F0008700000], [0x55D0C1000000]),
    (0x1FF, [0x7F0008400000, 0x7F0008500000, 0x55D0C1000000], [0x7F0000000000]),
])
def test_each_filter_bit(mask: int, dumped: list[int], skipped: list[int]) -> None:
    plans = plans_for(mask)
    for start in dumped:
        assert plans[start].dump > 0, (hex(mask), hex(start), plans[start].reason)
    for start in skipped:
        assert plans[start].dump == 0, (hex(mask), hex(start), plans[start].reason)


def test_vmas_seen_only_while_stopped_use_pagemap_or_perms() -> None:
    smaps = parse_smaps(smaps_text(LAYOUT[:3]))
    stopped = [s.map for s in smaps] + [
        parse_maps_line(b"7f1000000000-7f1000001000 r--p 00002000 fe:00 5005 /usr/lib/libnew.so"),
        parse_maps_line(b"7f1000001000-7f1000002000 rw-p 00003000 fe:00 5005 /usr/lib/libnew.so"),
        parse_maps_line(b"7f1000100000-7f1000200000 rw-p 00000000 00:00 0 "),
    ]
    # The executable's r-xp mapping was mprotect'ed to rw-p in between: its smaps flags are
    # stale and must not be used (the probe answers instead).
    stopped[1] = parse_maps_line(b"55d0c0001000-55d0c0003000 rw-p 00001000 fe:00 1001 /usr/bin/app")
    probe = FakeProbe(anon_pages={0x7F1000000000: True, 0x55D0C0001000: True})
    plans = {p.entry.start: p for p in P.plan_mappings(stopped, smaps, 0x33, PAGE, probe)}
    assert plans[0x7F1000000000].dump == PAGE  # pagemap found a COW'd page: new RELRO
    assert plans[0x7F1000001000].dump == 0  # pagemap says no anonymous page
    assert plans[0x7F1000100000].dump == 0  # new anonymous, pagemap: untouched
    assert plans[0x55D0C0001000].dump == 0x2000 and 0x55D0C0001000 in probe.asked

    class Unknown(FakeProbe):
        def has_anon_pages(self, entry: MapEntry) -> bool | None:
            return None

    plans = {p.entry.start: p for p in P.plan_mappings(stopped, smaps, 0x33, PAGE, Unknown())}
    assert plans[0x7F1000001000].dump == PAGE  # no pagemap: writable means written
    assert plans[0x7F1000100000].dump == 0x100000


def test_pages_past_the_end_of_the_file_are_planned_as_zeros() -> None:
    entry = parse_maps_line(b"7f2000000000-7f2000004000 rw-p 00000000 fe:00 7 /tmp/short")
    probe = FakeProbe(sizes={b"/tmp/short": 100}, anon_pages={0x7F2000000000: True})
    (plan,) = P.plan_mappings([entry], [], 0x33, PAGE, probe)
    assert plan.dump == 4 * PAGE and plan.readable == PAGE
    assert plan.unreadable_reason == "beyond the end of the mapped file"
    entry = parse_maps_line(b"7f2000000000-7f2000004000 rw-p 00002000 fe:00 7 /tmp/short")
    (plan,) = P.plan_mappings([entry], [], 0x33, PAGE, probe)
    assert plan.readable == 0


# --- size cap -----------------------------------------------------------------------------------
def test_size_cap_keeps_stacks_then_symbols_then_small_mappings() -> None:
    plans = list(plans_for().values())
    stack = next(p for p in plans if p.entry.path == b"[stack]")
    sp = stack.entry.start + 0x1F000 + 0x80
    P.mark_stacks(plans, [sp, 0x10])  # the second SP is in no VMA
    assert stack.priority == 0 and stack.stack_sp == sp
    total = sum(p.dump for p in plans)
    omitted = P.apply_size_cap(plans, 0x8000, PAGE)
    kept = {p.entry.start: p.dump - p.skip_head for p in plans}
    assert sum(kept.values()) <= 0x8000 and omitted == total - sum(kept.values())
    # the live part of the stack (from SP less the red zone, page aligned) is there first
    assert stack.skip_head == 0x1F000 and kept[stack.entry.start] == 0x2000
    # then what gdb needs: ELF header, RELRO, .data, vdso
    for start in (0x55D0C0000000, 0x55D0C0003000, 0x55D0C0004000, 0x7F0008A04000):
        assert kept[start] > 0
    # the big ones are cut: the heap (0x21000) does not fit
    assert kept[0x55D0C1000000] < 0x21000


def test_size_cap_large_enough_changes_nothing() -> None:
    plans = list(plans_for().values())
    before = [(p.dump, p.skip_head) for p in plans]
    assert P.apply_size_cap(plans, 1 << 40, PAGE) == 0
    assert [(p.dump, p.skip_head) for p in plans] == before


# --- notes -------------------------------------------------------------------------------------
def test_notes_follow_the_kernel_order() -> None:
    arch = get_arch("x86_64")
    regs = bytearray(arch.reg_bytes)
    threads = []
    for tid in (100, 101):
        struct.pack_into("<Q", regs, 8 * 19, 0x7FFD00001000 + tid)  # rsp
        extra = [P.Note(b"CORE", 2, bytes(512)), P.Note(b"LINUX", 0x202, bytes(832))]
        threads.append(P.ThreadState(tid, bytes(regs), extra, sighold=0x4000))
    stat = parse_stat(b"100 (app) S 1 100 100 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 2 0 9 0 0")
    status = {"Uid": "1000\t1000\t1000\t1000", "Gid": "1001\t1001\t1001\t1001"}
    notes = P.build_notes(arch, threads, stat, status, b"app\0--flag\0", b"\x21" + bytes(31),
                          [(0x1000, 0x2000, 0x3000, b"/usr/bin/app")], PAGE, {"pid": "100"})
    assert [(n.name, n.type) for n in notes] == [
        (b"CORE", 1), (b"CORE", 3), (b"CORE", 0x53494749), (b"CORE", 6), (b"CORE", 0x46494C45),
        (b"CORE", 2), (b"LINUX", 0x202), (b"CORE", 1), (b"CORE", 2), (b"LINUX", 0x202),
        (b"KDUMPLING", 0x4B444C02)]
    assert [parse_prstatus(arch, n.desc)[0] for n in notes if n.type == 1] == [100, 101]
    assert parse_prstatus(arch, notes[7].desc)[1]["RSP"] == 0x7FFD00001000 + 101
    assert struct.unpack_from("<i", notes[0].desc, 328)[0] == 1  # pr_fpvalid
    assert struct.unpack_from("<Q", notes[0].desc, 24)[0] == 0x4000  # pr_sighold
    ps = notes[1].desc
    assert len(ps) == 136 and ps[1:2] == b"S" and struct.unpack_from("<II", ps, 16) == (
        1000, 1001)
    assert ps[40:56].rstrip(b"\0") == b"app" and ps[56:136].rstrip(b"\0") == b"app --flag "
    count, page_size = struct.unpack_from("<QQ", notes[4].desc)
    assert (count, page_size) == (1, PAGE)
    assert struct.unpack_from("<QQQ", notes[4].desc, 16) == (0x1000, 0x2000, 3)
    assert parse_annotations(notes[-1].desc) == {"pid": "100"}
    # round trip through the note packer/parser
    from kdumpling.notes import pack_notes
    packed = pack_notes("<", notes).data
    assert [n.type for _, n in iter_notes(packed, "<")] == [n.type for n in notes]


def test_every_arch_with_a_regset_table_has_its_stack_pointer() -> None:
    for name, regsets in P.REGSETS.items():
        arch = get_arch(name)
        assert regsets.sp_register in arch.regs.__members__, name
        assert P.NT_PRSTATUS not in regsets.regsets
    assert P.note_owner(1) == P.note_owner(2) == b"CORE" and P.note_owner(0x202) == b"LINUX"


# --- procfs access and error translation ------------------------------------------------------
def fake_proc(tmp_path: Path, *, tracer: int = 0, yama: int | None = None) -> ProcFS:
    d = tmp_path / "proc" / str(PID)
    (d / "task" / str(PID)).mkdir(parents=True)
    (d / "task" / str(PID + 1)).mkdir()
    (d / "smaps").write_bytes(smaps_text(LAYOUT))
    (d / "maps").write_bytes(b"\n".join(r[0].encode() for r in LAYOUT) + b"\n")
    (d / "coredump_filter").write_bytes(b"00000037\n")
    (d / "status").write_text(f"Name:\tapp\nTgid:\t{PID}\nTracerPid:\t{tracer}\n"
                              "Uid:\t0\t0\t0\t0\n")
    stat = f"{PID} (app) S 1 {PID} {PID} 0 -1 0 0 0 0 0 0 0 0 0 20 0 2 0 5 0 0\n".encode()
    (d / "stat").write_bytes(stat)
    (d / "task" / str(PID) / "stat").write_bytes(stat)
    if tracer:
        (tmp_path / "proc" / str(tracer)).mkdir()
        (tmp_path / "proc" / str(tracer) / "comm").write_bytes(b"gdb\n")
    if yama is not None:
        ydir = tmp_path / "proc" / "sys" / "kernel" / "yama"
        ydir.mkdir(parents=True)
        (ydir / "ptrace_scope").write_text(f"{yama}\n")
    return ProcFS(tmp_path / "proc")


def test_fake_procfs_reads(tmp_path: Path) -> None:
    fs = fake_proc(tmp_path)
    assert fs.coredump_filter(PID) == 0x37
    assert fs.tasks(PID) == [PID, PID + 1]
    assert len(fs.maps(PID)) == len(fs.smaps(PID)) == len(LAYOUT)
    assert fs.stat(PID).comm == b"app"
    assert fs.status(PID)["Tgid"] == str(PID)


def test_missing_process_is_target_gone(tmp_path: Path) -> None:
    fs = fake_proc(tmp_path)
    with pytest.raises(TargetGoneError, match="does not exist"):
        fs.smaps(PID + 7)
    err = fs.translate(OSError(errno.ESRCH, "No such process"), PID, "read x")
    assert isinstance(err, TargetGoneError)
    err = fs.translate(OSError(errno.EIO, "I/O error"), PID, "read x")
    assert isinstance(err, SourceReadError)


def test_permission_messages_name_the_cause(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    fs = fake_proc(tmp_path, tracer=999)
    msg = str(fs.translate(OSError(errno.EPERM, "x"), PID, "trace threads"))
    assert "already traced by process 999 (gdb)" in msg and "\n" not in msg
    assert fs.translate(OSError(errno.EACCES, "x"), PID, "x").exit_code == 77

    fs = fake_proc(tmp_path / "b", yama=2)
    msg = str(fs.permission_error(PID, "trace threads"))
    assert "Yama" in msg and "ptrace_scope=2" in msg

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr("kdumpling.collectors._procfs._has_cap_sys_ptrace", lambda: False)
    err = fs.permission_error(PID, "read the memory map")
    assert isinstance(err, PermissionDeniedError)
    assert "not running as root and no CAP_SYS_PTRACE" in str(err)


def test_permission_denied_while_reading_smaps(tmp_path: Path) -> None:
    fs = fake_proc(tmp_path)
    smaps = tmp_path / "proc" / str(PID) / "smaps"
    smaps.chmod(0)
    if os.access(smaps, os.R_OK):  # root reads anything: simulate the kernel's EACCES
        def refuse(*args: object, **kwargs: object) -> bytes:
            raise PermissionError(errno.EACCES, "Permission denied")
        fs.read = refuse  # type: ignore[method-assign]
    with pytest.raises(PermissionDeniedError):
        fs.smaps(PID)


# --- memory reading helpers ----------------------------------------------------------------
def test_runs_and_sparse_copy() -> None:
    assert P._runs(bytes([0, 1, 1, 0, 1])) == [(1, 3), (4, 5)]
    assert P._runs(bytes(4)) == [] and P._runs(b"\x01" * 3) == [(0, 3)]
    copy = P.SparseCopy(10 * PAGE, [(PAGE, b"a" * PAGE), (5 * PAGE, b"b" * 10)])
    assert copy.read(0, PAGE) == bytes(PAGE)
    assert copy.read(PAGE - 2, 4) == b"\0\0aa"
    assert copy.read(5 * PAGE + 8, 4) == b"bb\0\0"
    assert copy.stored == PAGE + 10


def test_memory_reader_uses_pagemap_and_reports_a_vanished_address_space(tmp_path: Path) -> None:
    # A regular file stands in for /proc/PID/mem (pread returns b"" past its end, as mem does
    # once the mm is gone) and another for pagemap (bit 63: present).
    mem = tmp_path / "mem"
    mem.write_bytes(b"x" * (4 * PAGE))
    pagemap = tmp_path / "pagemap"
    pagemap.write_bytes(struct.pack("<4Q", 1 << 63, 0, 1 << 62, 0))
    fs = fake_proc(tmp_path)
    mfd, pfd = os.open(mem, os.O_RDONLY), os.open(pagemap, os.O_RDONLY)
    try:
        reader = P.MemoryReader(PID, fs, mfd, pfd, PAGE, [])
        assert reader.present_runs(0, 4 * PAGE) == [(0, PAGE), (2 * PAGE, 3 * PAGE)]
        data = reader.read(0, 4 * PAGE, sparse=True)
        assert data == b"x" * PAGE + bytes(PAGE) + b"x" * PAGE + bytes(PAGE)
        assert reader.read(PAGE, PAGE, sparse=True) == bytes(PAGE)
        assert reader.has_anon_pages(0, PAGE) is True  # present, not a file page
        with pytest.raises(TargetGoneError, match="exec"):  # state S: still there
            reader.read(4 * PAGE, PAGE)
    finally:
        os.close(mfd)
        os.close(pfd)


def test_zero_page_mappings_count_as_empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    # A debugger's reads leave pages that map the shared zero page: present in pagemap, but
    # nothing to read. Entries: zero page, real page, swapped, zero page with soft-dirty.
    zero_pfn = 0x3B32
    monkeypatch.setattr("kdumpling.collectors.process.memory._zero_pfn", [zero_pfn])
    mem = tmp_path / "mem"
    mem.write_bytes(b"y" * (4 * PAGE))
    pagemap = tmp_path / "pagemap"
    pagemap.write_bytes(struct.pack("<4Q", 1 << 63 | zero_pfn, 1 << 63 | 0x9999, 1 << 62 | zero_pfn,
                                    1 << 63 | 1 << 55 | zero_pfn))
    fs = fake_proc(tmp_path)
    mfd, pfd = os.open(mem, os.O_RDONLY), os.open(pagemap, os.O_RDONLY)
    try:
        reader = P.MemoryReader(PID, fs, mfd, pfd, PAGE, [])
        assert reader.present_runs(0, 4 * PAGE) == [(PAGE, 3 * PAGE)]
        assert reader.read(0, 4 * PAGE, sparse=True) == bytes(PAGE) + b"y" * 2 * PAGE + bytes(PAGE)
        assert reader.has_anon_pages(0, PAGE) is False
        assert reader.has_anon_pages(0, 2 * PAGE) is True
    finally:
        os.close(mfd)
        os.close(pfd)


def _own_pagemap_pfn(addr: int, page: int) -> int:
    with open("/proc/self/pagemap", "rb", buffering=0) as f:
        entry = int.from_bytes(os.pread(f.fileno(), 8, addr // page * 8), sys.byteorder)
    assert entry >> 63, f"page {addr:#x} is not present"
    return entry & P.PFN_MASK


def test_zero_page_pfn_is_learnt_or_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    # Learnt afresh (not from an earlier test's cache), then checked against our own pagemap:
    # a page that was only read maps the zero page, a written one a page of its own. PFNs read
    # as 0 without CAP_SYS_ADMIN (Documentation/admin-guide/mm/pagemap.rst): then it is None.
    page = os.sysconf("SC_PAGE_SIZE")
    monkeypatch.setattr("kdumpling.collectors.process.memory._zero_pfn", [])
    pfn = P.zero_page_pfn(page)
    m = mmap.mmap(-1, 2 * page, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    anchor = ctypes.c_char.from_buffer(m)
    try:
        addr = ctypes.addressof(anchor)
        m[0] = 1  # written: a page of its own
        assert m[page] == 0  # only read: the zero page
        written = _own_pagemap_pfn(addr, page)
        read_only = _own_pagemap_pfn(addr + page, page)
    finally:
        del anchor
        m.close()
    if written:  # PFNs are visible here
        assert pfn == read_only and pfn != written
    else:
        assert pfn is None
    # learnt once: later calls answer from the cache, whatever it holds
    monkeypatch.setattr("kdumpling.collectors.process.memory._zero_pfn", [0x1234])
    assert P.zero_page_pfn(page) == 0x1234
