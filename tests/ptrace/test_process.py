"""Process collector on live processes: capture, then judge the core with gdb, eu-stack and
pyelftools, and check the target still runs untraced (tier: ptrace).

Every fixture is a C program compiled in this session (PIE and non-PIE) with threads blocked in
known call chains and values set at run time (proctools.py has the checks)."""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kdumpling import write_dump
from kdumpling.collectors.process import EAGER_LIMIT, ProcessCollector, capture_process
from kdumpling.errors import PermissionDeniedError, TargetGoneError, UsageError
from kdumpling.notes import NT_AUXV, NT_PRSTATUS, Note, parse_annotations

from tests import proctools as pt
from tests import tiers

elftools = tiers.module("ptrace", "elftools.elf.elffile", "pip install pyelftools")
PAGE = os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="session")
def binaries(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("proc_fixtures")
    return {"pie": pt.compile_target(out, pie=True), "nopie": pt.compile_target(out, pie=False)}


@pytest.fixture
def mapped_file(tmp_path: Path) -> Path:
    path = tmp_path / "mapped.txt"
    path.write_bytes(b"mapped-file-content:" + pt.pattern(0x11, 80))
    return path


@pytest.fixture
def target(binaries: dict[str, Path], mapped_file: Path) -> Iterator[pt.Target]:
    t = pt.start_target(binaries["pie"], "--file", str(mapped_file), "--big-mib", "8")
    yield t
    t.stop()


def _no_output(core: Path) -> None:
    assert not core.exists(), "a partial core was left behind"
    assert not Path(str(core) + ".incomplete").exists(), "the .incomplete file was left behind"


# --- reading a core back with pyelftools -------------------------------------------------------
class Core:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = open(path, "rb")  # noqa: SIM115 - closed in close()
        self.elf = elftools.ELFFile(self._f)
        self.phdrs = [seg.header for seg in self.elf.iter_segments()]
        self.loads = [h for h in self.phdrs if h["p_type"] == "PT_LOAD"]
        note_seg = next(s for s in self.elf.iter_segments() if s["p_type"] == "PT_NOTE")
        self.notes = list(note_seg.iter_notes())

    def close(self) -> None:
        self._f.close()

    def notes_of(self, ntype: str | int) -> list[dict[str, object]]:
        return [n for n in self.notes if n["n_type"] == ntype]

    def load_at(self, addr: int) -> dict[str, int]:
        for h in self.loads:
            if h["p_vaddr"] <= addr < h["p_vaddr"] + h["p_memsz"]:
                return h
        raise AssertionError(f"no PT_LOAD covers {addr:#x}")

    def read(self, addr: int, length: int) -> bytes:
        h = self.load_at(addr)
        off = addr - h["p_vaddr"]
        assert off + length <= h["p_filesz"], f"{addr:#x} is not in the file part of its PT_LOAD"
        self._f.seek(h["p_offset"] + off)
        return self._f.read(length)

    def annotations(self) -> dict[str, str]:
        (note,) = [n for n in self.notes if n["n_name"] == "KDUMPLING"]
        return parse_annotations(note["n_descdata"])  # type: ignore[arg-type]

    def pr_pids(self) -> list[int]:
        return [struct.unpack_from("<i", n["n_descdata"], 32)[0]  # type: ignore[arg-type]
                for n in self.notes_of("NT_PRSTATUS")]


# --- the main checks ---------------------------------------------------------------------------
# consistent: copied while stopped (small), or read by the writer while stopped (copy_limit 0)
@pytest.mark.parametrize(("mode", "copy_limit"), [
    ("consistent", EAGER_LIMIT), ("consistent", 0), ("low-pause", EAGER_LIMIT)])
@pytest.mark.parametrize("kind", ["pie", "nopie"])
def test_gdb_and_eu_stack_see_every_thread_and_value(
    binaries: dict[str, Path], mapped_file: Path, tmp_path: Path, kind: str, mode: str,
    copy_limit: int,
) -> None:
    t = pt.start_target(binaries[kind], "--file", str(mapped_file), "--big-mib", "4")
    try:
        tids = t.tids()
        core = tmp_path / "core"
        snap, result = capture_process(t.pid, core, mode=mode, copy_limit=copy_limit)
        copied = snap.meta["copied_while_stopped"]
        assert copied > 4 << 20 if mode == "consistent" and copy_limit else copied == 0
        assert result.path == str(core)
        assert sorted(snap.meta["threads"]) == sorted(tids)  # type: ignore[arg-type]
        assert snap.pause_seconds is not None and snap.pause_seconds > 0
        assert pt.run_gdb(t.exe, core).problems(t.pid, tids, t.worker_ids) == []
        assert pt.eu_stack_problems(t.exe, core, tids, t.pid) == []
        # still running (the echo thread answers) and nobody traces or stops it
        assert t.ping().startswith("pong")
        pt.assert_released(t.pid)
        ann = snap.annotations
        if mode == "low-pause":
            assert "inconsistent" in ann["consistency"]
        else:
            assert "consistency" not in ann
        if mode == "low-pause" or copy_limit:  # the target resumed before the notes were made
            assert float(ann["pause_seconds"]) == pytest.approx(snap.pause_seconds, abs=1e-5)
        else:
            assert "pause_seconds" not in ann
    finally:
        t.stop()


def test_core_structure_and_memory_policy(target: pt.Target, tmp_path: Path,
                                          mapped_file: Path) -> None:
    core_path = tmp_path / "core"
    tids = target.tids()
    with open(f"/proc/{target.pid}/auxv", "rb") as f:
        auxv = f.read()
    # Host details read from the host, not assumed: which unreadable special mappings exist
    # (vsyscall=none removes [vsyscall]; [vvar_vclock] is 6.x only) and whether the CPU has
    # an XSAVE area (QEMU's qemu64 model has none).
    specials = _special_unreadable_mappings(target.pid)
    snap, _ = capture_process(target.pid, core_path)
    core = Core(core_path)
    try:
        assert core.elf["e_type"] == "ET_CORE"
        assert core.elf["e_machine"] == {"x86_64": "EM_X86_64", "aarch64": "EM_AARCH64"}.get(
            os.uname().machine)
        assert specials, "no [vvar] in the target's maps"
        assert core.phdrs[0]["p_type"] == "PT_NOTE"
        assert sum(h["p_type"] == "PT_NOTE" for h in core.phdrs) == 1
        size = core_path.stat().st_size
        prev_end = 0
        for h in core.loads:
            assert h["p_vaddr"] >= prev_end, "PT_LOADs overlap or are out of order"
            prev_end = h["p_vaddr"] + h["p_memsz"]
            assert h["p_filesz"] in (0, PAGE, h["p_memsz"])
            assert h["p_offset"] + h["p_filesz"] <= size
            assert h["p_paddr"] == 0
        # notes: order and content
        types = [n["n_type"] for n in core.notes]
        assert types[:5] == ["NT_PRSTATUS", "NT_PRPSINFO", "NT_SIGINFO", "NT_AUXV", "NT_FILE"]
        pids = core.pr_pids()
        assert pids[0] == target.pid and sorted(pids) == sorted(tids)
        assert len(set(pids)) == len(pids)
        assert len(core.notes_of("NT_FPREGSET")) == len(tids)
        assert len(core.notes_of(0x202)) == (len(tids) if _cpu_has("xsave") else 0)  # x86 only
        (aux,) = core.notes_of("NT_AUXV")
        assert aux["n_descdata"] == auxv
        (ps,) = core.notes_of("NT_PRPSINFO")
        assert ps["n_desc"]["pr_pid"] == target.pid
        assert ps["n_desc"]["pr_fname"].rstrip(b"\0") == target.exe.name[:15].encode()
        (fn,) = core.notes_of("NT_FILE")
        names = fn["n_desc"]["filename"]
        assert str(mapped_file).encode() in names and str(target.exe).encode() in names
        # memory policy, region by region
        r = target.regions
        assert core.load_at(r["dontdump"])["p_filesz"] == 0
        blob = core_path.read_bytes()
        assert pt.pattern(0xC3, 64) not in blob, "MADV_DONTDUMP memory was written"
        prot = core.load_at(r["protnone"])
        assert prot["p_flags"] == 0 and core.read(r["protnone"], 64) == pt.pattern(0x5A, 64)
        assert core.read(r["shared"], 64) == pt.pattern(0x3C, 64)
        assert core.load_at(r["file"])["p_filesz"] == 0  # private, never written: NT_FILE only
        for page in (0, 1, 1000, 2047):
            data = core.read(r["big"] + page * PAGE, PAGE)
            assert struct.unpack_from("<Q", data)[0] == 0x5EED000000000000 | page
            assert data[8:] == bytes([(page & 0x7F) | 1]) * (PAGE - 8)
        assert core.read(r["heap"], 14) == b"heap-value-42\0"
        vdso = [h for h in core.loads if h["p_vaddr"] == _vdso_start(auxv)]
        assert vdso and vdso[0]["p_filesz"] > 0
        # the mapping past the end of its file: page 0 (COW'd) is real, the rest zeros, listed
        past = core.load_at(r["pastend"])
        assert past["p_filesz"] == past["p_memsz"] == 4 * PAGE
        assert core.read(r["pastend"], 8)[:2] == b"mW"
        assert core.read(r["pastend"] + PAGE, 3 * PAGE) == bytes(3 * PAGE)
        ann = core.annotations()
        listed = [v for k, v in ann.items() if k.startswith("unreadable.")]
        assert f"{r['pastend'] + PAGE:#x}-{r['pastend'] + 4 * PAGE:#x} beyond the end " \
               "of the mapped file" in listed
        assert {name for name in specials if any(name in v for v in listed)} == specials
        assert int(ann["unreadable_count"]) == len(listed) == len(snap.unreadable)
        # only the special mappings the kernel cannot read either are flagged expected
        flagged = {r.reason.split(":")[0] for r in snap.unreadable if r.expected}
        assert flagged == specials
        assert not [r for r in snap.unreadable if r.expected != r.reason.startswith("[v")]
        assert ann["pid"] == str(target.pid) and ann["coredump_filter"] == "0x33"
        assert "truncated" not in ann and not snap.truncated
    finally:
        core.close()
    pt.assert_released(target.pid)


def test_late_unreadable_ranges_become_warnings(target: pt.Target, tmp_path: Path) -> None:
    # Unmap a region the plan expects to read (shared memory: read in full, no pagemap), while
    # the target runs in low-pause mode: the writer meets EIO, writes zeros, and the snapshot
    # says so (the notes were already written).
    core = tmp_path / "core"
    shared = target.regions["shared"]
    calls: list[int] = []

    def progress(done: int, total: int) -> None:
        if not calls:
            calls.append(done)
            target.unmap_shared()  # the target unmaps it itself: no gdb inferior call

    snap, _ = capture_process(target.pid, core, mode="low-pause", progress=progress)
    late = [r for r in snap.unreadable if shared <= r.start < shared + 2 * PAGE]
    assert late and all("EIO" in r.reason and "while the process ran" in r.reason for r in late)
    assert any("could not be read and were written as zeros" in w for w in snap.warnings)
    c = Core(core)
    try:
        assert c.read(shared, 2 * PAGE) == bytes(2 * PAGE)
        assert f"{shared:#x}" not in str(c.annotations())
    finally:
        c.close()
    pt.assert_released(target.pid)


def test_reader_zero_fills_pages_it_cannot_read(target: pt.Target) -> None:
    # Read past the end of the file behind a mapping without the planner's help: the pages
    # past EOF raise EIO in /proc/PID/mem and must come back as zeros, recorded, not as errors.
    from kdumpling.collectors._procfs import ProcFS
    from kdumpling.collectors.process import MemoryReader

    fs = ProcFS()
    fd = fs.open_mem(target.pid)
    try:
        unreadable: list[object] = []
        reader = MemoryReader(target.pid, fs, fd, None, PAGE, unreadable)  # type: ignore[arg-type]
        start = target.regions["pastend"]
        data = reader.read(start, 4 * PAGE)
        assert data[:2] == b"mW" and data[PAGE:] == bytes(3 * PAGE)
        (bad,) = unreadable
        assert (bad.start, bad.end) == (start + PAGE, start + 4 * PAGE)  # type: ignore[attr-defined]
        assert "EIO" in bad.reason  # type: ignore[attr-defined]
    finally:
        os.close(fd)


@pytest.mark.parametrize("stopped", [True, False])
def test_reader_falls_back_to_proc_mem_where_process_vm_readv_stops(stopped: bool) -> None:
    # process_vm_readv cannot read PROT_NONE pages (no forced access): a read that runs into
    # them must finish through /proc/PID/mem with the real bytes. Our own process serves as
    # the target: both interfaces accept it.
    import ctypes
    import mmap

    from kdumpling.collectors._procfs import ProcFS
    from kdumpling.collectors.process import MemoryReader, vm_read

    m = mmap.mmap(-1, 3 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    content = pt.pattern(0x3C, 3 * PAGE)
    m[:] = content
    anchor = ctypes.c_char.from_buffer(m)
    addr = ctypes.addressof(anchor)
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mprotect(ctypes.c_void_p(addr + PAGE), ctypes.c_size_t(2 * PAGE), 0) == 0
    fs = ProcFS()
    fd = fs.open_mem(os.getpid())
    try:
        assert vm_read(os.getpid(), addr, 3 * PAGE) == content[:PAGE]  # short read
        unreadable: list[object] = []
        reader = MemoryReader(os.getpid(), fs, fd, None, PAGE, unreadable)  # type: ignore[arg-type]
        reader.stopped = stopped
        assert reader.read_raw(addr, 3 * PAGE) == content and not unreadable
    finally:
        os.close(fd)
        libc.mprotect(ctypes.c_void_p(addr + PAGE), ctypes.c_size_t(2 * PAGE), 3)
        del anchor
        m.close()


def _special_unreadable_mappings(pid: int) -> set[str]:
    """The special mappings of ``pid`` that /proc/PID/mem cannot read (fs/coredump.c dumps
    them, the kernel's own core has holes there): [vvar], [vvar_vclock], [vsyscall]."""
    with open(f"/proc/{pid}/maps") as f:
        names = {line.split()[-1] for line in f if line.rstrip().endswith("]")}
    return names & {"[vvar]", "[vvar_vclock]", "[vsyscall]"}


def _cpu_has(flag: str) -> bool:
    with open("/proc/cpuinfo") as f:
        return any(line.startswith("flags") and flag in line.split() for line in f)


def _vdso_start(auxv: bytes) -> int:
    for i in range(0, len(auxv), 16):
        key, value = struct.unpack_from("<QQ", auxv, i)
        if key == 33:  # AT_SYSINFO_EHDR
            return int(value)
    raise AssertionError("no AT_SYSINFO_EHDR")


# --- negative controls: the checks above can fail -----------------------------------------------
def _write_altered(pid: int, core: Path, alter: Callable[[list[Note]], list[Note]]) -> None:
    with ProcessCollector(pid) as snap:
        snap.image.notes = alter(list(snap.image.notes))
        write_dump(snap.image, core)


def _same_pr_pid(pid: int) -> Callable[[list[Note]], list[Note]]:
    def alter(notes: list[Note]) -> list[Note]:
        out = []
        for n in notes:
            if n.type == NT_PRSTATUS:
                desc = bytearray(n.desc)
                struct.pack_into("<i", desc, 32, pid)
                n = Note(n.name, n.type, bytes(desc))
            out.append(n)
        return out
    return alter


def _without_auxv(notes: list[Note]) -> list[Note]:
    return [n for n in notes if n.type != NT_AUXV]


def test_negative_controls_fail_the_same_checks(target: pt.Target, tmp_path: Path) -> None:
    tids = target.tids()
    good, dup, noaux = tmp_path / "good", tmp_path / "dup", tmp_path / "noaux"
    _write_altered(target.pid, good, lambda n: n)  # same path, unaltered: must pass
    _write_altered(target.pid, dup, _same_pr_pid(target.pid))
    _write_altered(target.pid, noaux, _without_auxv)
    assert pt.run_gdb(target.exe, good).problems(target.pid, tids, target.worker_ids) == []
    assert pt.eu_stack_problems(target.exe, good, tids, target.pid) == []
    dup_problems = pt.run_gdb(target.exe, dup).problems(target.pid, tids, target.worker_ids)
    assert dup_problems, "a core whose PRSTATUS notes share one pr_pid passed the gdb check"
    assert pt.eu_stack_problems(target.exe, dup, tids, target.pid) != []
    noaux_problems = pt.run_gdb(target.exe, noaux).problems(target.pid, tids, target.worker_ids)
    assert noaux_problems, "a PIE core without NT_AUXV passed the gdb check"
    pt.assert_released(target.pid)


# --- policy overrides --------------------------------------------------------------------------
def test_filter_mask_override(target: pt.Target, tmp_path: Path) -> None:
    r = target.regions
    core_path = tmp_path / "core"
    capture_process(target.pid, core_path, filter_mask=0x37)  # + private file mappings
    core = Core(core_path)
    try:
        assert core.read(r["file"], 20) == b"mapped-file-content:"
    finally:
        core.close()
    capture_process(target.pid, core_path, filter_mask=0x31)  # no shared anonymous memory
    core = Core(core_path)
    try:
        assert core.load_at(r["shared"])["p_filesz"] == 0
        assert core.annotations()["coredump_filter"] == "0x31"
    finally:
        core.close()
    pt.assert_released(target.pid)


def test_size_cap_truncates_but_keeps_stacks(binaries: dict[str, Path], tmp_path: Path) -> None:
    t = pt.start_target(binaries["pie"], "--big-mib", "32")
    try:
        tids = t.tids()
        core_path = tmp_path / "core"
        cap = 3 << 20
        snap, _ = capture_process(t.pid, core_path, size_cap=cap)
        assert snap.truncated
        core = Core(core_path)
        try:
            assert sum(h["p_filesz"] for h in core.loads) <= cap
            ann = core.annotations()
            assert ann["truncated"] == "yes" and ann["size_cap"] == str(cap)
            assert int(ann["omitted_bytes"]) >= 29 << 20
        finally:
            core.close()
        report = pt.run_gdb(t.exe, core_path)
        problems = report.problems(t.pid, tids, t.worker_ids)
        # stacks and the executable's data come first; the heap may be cut
        assert [p for p in problems if "heap_string" not in p] == [], problems
        pt.assert_released(t.pid)
    finally:
        t.stop()


# --- threads coming and going ------------------------------------------------------------------
def test_threads_created_during_capture(binaries: dict[str, Path], tmp_path: Path) -> None:
    t = pt.start_target(binaries["pie"], "--churn")
    try:
        core_path = tmp_path / "core"
        for _ in range(5):
            _snap, _ = capture_process(t.pid, core_path)
            core = Core(core_path)
            try:
                pids = core.pr_pids()
            finally:
                core.close()
            assert len(pids) == len(set(pids)) and 0 not in pids
            assert pids[0] == t.pid
            assert len(pids) >= 2 + len(t.worker_ids) + 1  # + the churning thread
            pt.assert_released(t.pid)
        report = pt.run_gdb(t.exe, core_path)
        assert pt._subsequence(["leaf_wait", "level3", "level2", "level1", "main"],
                               report.threads[t.pid])
        assert t.ping().startswith("pong")
    finally:
        t.stop()


def test_stopped_target_stays_stopped(target: pt.Target, tmp_path: Path) -> None:
    # A process stopped by SIGSTOP (job control) is captured and left stopped, not resumed.
    tids = target.tids()
    os.kill(target.pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while pt.proc_status(target.pid)["State"][0] != "T":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        core = tmp_path / "core"
        snap, _ = capture_process(target.pid, core)
        assert sorted(snap.meta["threads"]) == sorted(tids)  # type: ignore[arg-type]
        # Every thread, at once: detach wakes a group-stopped tracee, and the capture must
        # not return before each one is back in its job-control stop.
        states = {tid: pt.proc_status(target.pid, tid) for tid in tids}
        assert {t: (s["State"][0], s["TracerPid"]) for t, s in states.items()} == {
            t: ("T", "0") for t in tids}
        assert pt.run_gdb(target.exe, core).problems(target.pid, tids, target.worker_ids) == []
    finally:
        os.kill(target.pid, signal.SIGCONT)
    assert target.ping().startswith("pong")
    pt.assert_released(target.pid)


def test_target_killed_during_consistent_capture(target: pt.Target, tmp_path: Path) -> None:
    core = tmp_path / "core"

    def progress(done: int, total: int) -> None:
        os.kill(target.pid, signal.SIGKILL)

    with pytest.raises(TargetGoneError, match="exited"):
        capture_process(target.pid, core, progress=progress, copy_limit=0)
    _no_output(core)
    assert target.proc.wait(timeout=10) == -signal.SIGKILL  # reapable: not held by a tracer


def test_small_target_resumes_before_the_writer_runs(target: pt.Target, tmp_path: Path) -> None:
    # Consistent mode copies a small process while stopped: it runs again (and may even die)
    # while the core is written, and the core still holds the stopped state.
    tids = target.tids()
    core = tmp_path / "core"
    with ProcessCollector(target.pid) as snap:
        pt.assert_released(target.pid)
        assert target.ping().startswith("pong")
        target.stop()
        write_dump(snap.image, core)
    assert snap.meta["copied_while_stopped"] > 8 << 20
    assert pt.run_gdb(target.exe, core).problems(target.pid, tids, target.worker_ids) == []


def test_big_target_resumes_before_the_writers_fsync(target: pt.Target, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # Read by the writer while stopped, then released as soon as the writer closes the memory
    # sources: the fsync and the rename happen while the target runs.
    tracer_at: dict[str, set[str]] = {"write": set(), "fsync": set()}
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        tracer_at["fsync"].add(pt.proc_status(target.pid)["TracerPid"])
        real_fsync(fd)

    def progress(done: int, total: int) -> None:
        tracer_at["write"].add(pt.proc_status(target.pid)["TracerPid"])

    monkeypatch.setattr(os, "fsync", fsync)
    snap, _ = capture_process(target.pid, tmp_path / "core", progress=progress, copy_limit=0)
    assert tracer_at == {"write": {str(os.getpid())}, "fsync": {"0"}}
    assert snap.pause_seconds is not None and snap.meta["copied_while_stopped"] == 0
    pt.assert_released(target.pid)


def test_target_exits_during_low_pause_capture(target: pt.Target, tmp_path: Path) -> None:
    core = tmp_path / "core"

    def progress(done: int, total: int) -> None:
        if target.proc.poll() is None:
            target.tell_exit()
            target.proc.wait(timeout=10)

    with pytest.raises(TargetGoneError, match="exited"):
        capture_process(target.pid, core, mode="low-pause", progress=progress)
    _no_output(core)
    assert target.proc.returncode == 0


def test_target_execs_during_low_pause_capture(tmp_path: Path) -> None:
    sh = subprocess.Popen(["/bin/sh", "-c", "read x; exec sleep 60"], stdin=subprocess.PIPE)
    assert sh.stdin is not None
    core = tmp_path / "core"
    exe_before = os.readlink(f"/proc/{sh.pid}/exe")
    time.sleep(0.2)

    def progress(done: int, total: int) -> None:
        if os.readlink(f"/proc/{sh.pid}/exe") == exe_before:
            sh.stdin.write(b"go\n")  # type: ignore[union-attr]
            sh.stdin.flush()  # type: ignore[union-attr]
            deadline = time.monotonic() + 10
            while os.readlink(f"/proc/{sh.pid}/exe") == exe_before:
                assert time.monotonic() < deadline
                time.sleep(0.005)

    try:
        with pytest.raises(TargetGoneError, match="exec"):
            capture_process(sh.pid, core, mode="low-pause", progress=progress)
        _no_output(core)
        pt.assert_released(sh.pid)
    finally:
        pt.kill_quietly(sh)


# --- being interrupted -------------------------------------------------------------------------
CAPTURE_CHILD = textwrap.dedent("""
    import sys, time
    from kdumpling.collectors.process import capture_process
    from kdumpling.errors import KdumplingError
    first = True
    def progress(done, total):
        global first
        if first:
            print("writing", flush=True)
            first = False
        time.sleep(0.05)
    try:
        capture_process(int(sys.argv[1]), sys.argv[2], progress=progress)
    except KdumplingError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    print("finished", flush=True)
""")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_capturing_process_releases_target(
    binaries: dict[str, Path], tmp_path: Path, signum: int
) -> None:
    t = pt.start_target(binaries["pie"], "--big-mib", "256")
    core = tmp_path / "core"
    child = subprocess.Popen([sys.executable, "-c", CAPTURE_CHILD, str(t.pid), str(core)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "writing"
        # consistent mode: the target is held right now
        assert pt.proc_status(t.pid)["TracerPid"] == str(child.pid)
        child.send_signal(signum)
        out, err = child.communicate(timeout=30)
        assert child.returncode == 128 + signum, (out, err)
        assert "interrupted by" in err and "finished" not in out
        _no_output(core)
        pt.assert_released(t.pid)
        assert t.ping().startswith("pong")
    finally:
        pt.kill_quietly(child)
        t.stop()


# --- permissions and missing targets ----------------------------------------------------------
SEIZE_CHILD = textwrap.dedent("""
    import sys, time
    from kdumpling.collectors.process import tracer
    tracer.seize(int(sys.argv[1]))
    print("seized", flush=True)
    time.sleep(60)
""")


def test_another_tracer_is_reported(target: pt.Target, tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", SEIZE_CHILD, str(target.pid)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "seized"
        with pytest.raises(PermissionDeniedError, match=f"already traced by process "
                                                        f"{holder.pid}") as info:
            capture_process(target.pid, tmp_path / "core")
        assert info.value.exit_code == 77
        assert "\n" not in str(info.value)
        _no_output(tmp_path / "core")
    finally:
        pt.kill_quietly(holder)
    time.sleep(0.05)
    pt.assert_released(target.pid)


NOBODY_CHILD = textwrap.dedent("""
    import sys
    from kdumpling.collectors.process import ProcessCollector
    from kdumpling.errors import KdumplingError
    try:
        with ProcessCollector(int(sys.argv[1])):
            pass
    except KdumplingError as err:
        print(err)
        sys.exit(err.exit_code)
""")


def _world_readable_package() -> str:
    """A directory the unprivileged user can import kdumpling from: symlinks to the sources
    (the venv's interpreter may sit under root's home, so the child runs the system Python)."""
    import kdumpling
    import kdumpling.collectors

    root = tempfile.mkdtemp(prefix="kdumpling-nobody-", dir="/tmp")
    os.chmod(root, 0o755)
    pkg = Path(root, "kdumpling")
    pkg.mkdir(mode=0o755)
    writer = Path(kdumpling.__file__).parent
    for src in writer.glob("*.py"):
        (pkg / src.name).symlink_to(src)
    (pkg / "collectors").symlink_to(Path(kdumpling.collectors.__file__).parent)
    return root


def test_unprivileged_user_is_told_what_to_do(target: pt.Target) -> None:
    if os.geteuid() != 0:
        tiers.missing("ptrace", "needs root to switch to an unprivileged user")
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        tiers.missing("ptrace", "no system python3 for the unprivileged child")

    def drop() -> None:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)

    root = _world_readable_package()
    try:
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": root, "PYTHONDONTWRITEBYTECODE": "1"}
        child = subprocess.run([python, "-c", NOBODY_CHILD, str(target.pid)],
                               capture_output=True, text=True, preexec_fn=drop, env=env,
                               timeout=60, cwd="/")
    finally:
        shutil.rmtree(root)
    if "ModuleNotFoundError" in child.stderr or "ImportError" in child.stderr:
        tiers.missing("ptrace", "the unprivileged user cannot import kdumpling here: "
                      f"{child.stderr[-300:]}")
    assert child.returncode == 77, child.stdout + child.stderr
    message = child.stdout.strip()
    assert "not running as root" in message and "CAP_SYS_PTRACE" in message, message
    assert len(message.splitlines()) == 1
    pt.assert_released(target.pid)


def test_missing_and_unusable_targets(tmp_path: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    with pytest.raises(TargetGoneError, match="does not exist"):
        capture_process(gone.pid, tmp_path / "core")
    zombie = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 10
        while pt.proc_status(zombie.pid)["State"][0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(TargetGoneError, match="zombie"):
            capture_process(zombie.pid, tmp_path / "core")
    finally:
        zombie.wait()
    with pytest.raises(UsageError, match="itself"):
        ProcessCollector(os.getpid())
    with pytest.raises(UsageError, match="mode"):
        ProcessCollector(1, mode="fast")
    _no_output(tmp_path / "core")


# --- a Python target ---------------------------------------------------------------------------
PY_TARGET = textwrap.dedent("""
    import sys, threading, time
    marker = "kdumpling-" + "python-marker-" + str(40000 + 2)
    def worker(n):
        while True:
            time.sleep(1000)
    for i in range(2):
        threading.Thread(target=worker, args=(i,), daemon=True).start()
    print("ready", flush=True)
    while True:
        time.sleep(1000)
""")


@pytest.mark.parametrize("mode", ["consistent", "low-pause"])
def test_python_target(tmp_path: Path, mode: str) -> None:
    python = os.path.realpath("/usr/bin/python3")
    if not os.path.exists(python):
        tiers.missing("ptrace", "no system python3 at /usr/bin/python3")
    proc = subprocess.Popen([python, "-c", PY_TARGET], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(0.1)
        tids = {int(t) for t in os.listdir(f"/proc/{proc.pid}/task")}
        core_path = tmp_path / "core"
        snap, _ = capture_process(proc.pid, core_path, mode=mode)
        assert len(tids) == 3 and sorted(snap.meta["threads"]) == sorted(tids)  # type: ignore
        report = pt.run_gdb(python, core_path)
        assert set(report.threads) == tids, report.output[-2000:]
        # The oracle: gdb attached to the live process shows the same frames (python3 is
        # stripped, so its static functions are ?? either way).
        live = pt.run_gdb(python, str(proc.pid), attach=True)
        assert set(live.threads) == tids
        for tid, frames in report.threads.items():
            assert any("clock_nanosleep" in f for f in frames[:2]), frames
            assert ("_PyEval_EvalFrameDefault" in frames and "Py_RunMain" in frames[-6:]) or \
                tid != proc.pid, frames
            assert frames == live.threads[tid], (tid, frames, live.threads[tid])
        _rc, eu_threads, text = pt.run_eu_stack(python, core_path)
        assert set(eu_threads) == tids, text
        assert b"kdumpling-python-marker-40002" in core_path.read_bytes()
        pt.assert_released(proc.pid)
        assert proc.poll() is None
    finally:
        pt.kill_quietly(proc)
