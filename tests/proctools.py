"""Helpers for the process-collector tests: build and run the C fixture, and judge a core with
readers we did not write (gdb, eu-stack, pyelftools).

The checks follow the recipe in the project's process-core notes: gdb must show every thread's
expected frames and the run-time values with every shared library loaded; eu-stack must list
every thread; the target must still run (it answers a ping) and must not be traced.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests import tiers

FIXTURES = Path(__file__).parent / "fixtures"
TARGET_SOURCE = FIXTURES / "proc_target.c"
WORKER_BASE_ID = 100
ECHO_ID = 99
# gdb < 14 cannot size AMD's compacted XSAVE layout and warns even on the kernel's own cores.
GDB_NOISE = ("too small", "Reading symbols", "warning: Can't open file", "[New LWP",
             "Core was generated", "Program terminated", "[Current thread is",
             "[Thread debugging using", "Using host libthread_db", "No such file or directory")


def pattern(seed: int, length: int) -> bytes:
    """The fixture's fill(): byte i = seed ^ (i * 29) mod 256."""
    return bytes((seed ^ (i * 29)) & 0xFF for i in range(length))


def need(tool: str) -> str:
    return tiers.tool("ptrace", tool)


def compile_target(outdir: Path, *, pie: bool, opt: str = "-O0") -> Path:
    gcc = need("gcc")
    exe = outdir / f"proc_target{'_pie' if pie else '_nopie'}{opt.replace('-', '_')}"
    cmd = [gcc, opt, "-g", "-pthread", "-fno-omit-frame-pointer", "-o", str(exe),
           str(TARGET_SOURCE)]
    cmd.insert(1, "-fPIE" if pie else "-fno-pie")
    cmd.insert(1, "-pie" if pie else "-no-pie")
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return exe


@dataclass
class Target:
    """A running fixture process (our child) with pipes to its echo thread."""

    exe: Path
    proc: subprocess.Popen[bytes]
    regions: dict[str, int] = field(default_factory=dict)
    worker_ids: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tids(self) -> set[int]:
        return {int(t) for t in os.listdir(f"/proc/{self.pid}/task")}

    def ask(self, command: str, timeout: float = 5.0) -> str:
        """Send one command line to the echo thread and return its one-line answer."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise AssertionError(f"target {self.pid} did not answer {command!r} within "
                                 f"{timeout} s")
        return self.proc.stdout.readline().decode().strip()

    def ping(self, timeout: float = 5.0) -> str:
        """Ask the echo thread for a reply: only a running (not stopped) process answers."""
        return self.ask("ping", timeout)

    def unmap_shared(self) -> None:
        """Have the target munmap its shared region itself (no debugger inferior call)."""
        answer = self.ask("unmap-shared")
        assert answer == "unmapped 0", answer

    def tell_exit(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"exit\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()


def start_target(exe: Path | str, *args: str, workers: int = 3) -> Target:
    proc = subprocess.Popen([str(exe), "--threads", str(workers), *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    assert proc.stdout is not None
    target = Target(Path(exe), proc, worker_ids=[WORKER_BASE_ID + i for i in range(workers)])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1)
        if not ready:
            if proc.poll() is not None:
                break
            continue
        line = proc.stdout.readline().decode().strip()
        if line == "end":
            break
        key, sep, value = line.partition("=")
        if sep:
            target.regions[key] = int(value, 16) if value.startswith("0x") else 0
    else:
        proc.kill()
        raise AssertionError("fixture did not become ready")
    if proc.poll() is not None:
        raise AssertionError(f"fixture exited early with {proc.returncode}")
    # Every thread must have reached its blocking call before the test captures: wait until
    # main, the echo thread and each worker sleep in the kernel (state S), not for a fixed
    # time, which a loaded machine may not honour.
    expected = 2 + workers
    deadline = time.monotonic() + 10
    while _sleeping_threads(target.pid) < expected:
        if time.monotonic() > deadline:
            raise AssertionError("fixture threads did not all block within 10 s")
        time.sleep(0.01)
    time.sleep(0.05)  # margin: a --churn thread blocked in pthread_join also counts as S
    return target


def _sleeping_threads(pid: int) -> int:
    count = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                state = f.read().rpartition(b")")[2].split()[0]
        except (OSError, IndexError):
            continue
        count += state == b"S"
    return count


def proc_status(pid: int, tid: int | None = None) -> dict[str, str]:
    path = f"/proc/{pid}/status" if tid is None else f"/proc/{pid}/task/{tid}/status"
    with open(path) as f:
        return {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in f)}


def assert_released(pid: int) -> None:
    """No thread of ``pid`` is traced or stopped."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                status = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in f)}
        except FileNotFoundError:
            continue
        assert status["TracerPid"] == "0", f"thread {tid} is still traced: {status['TracerPid']}"
        assert status["State"][0] not in "tT", f"thread {tid} is stopped: {status['State']}"


# --- gdb ---------------------------------------------------------------------------------------
@dataclass
class GdbReport:
    output: str
    threads: dict[int, list[str]]  # LWP -> function names, innermost first
    blocks: dict[int, str]  # LWP -> its backtrace text
    values: dict[str, str]
    libraries_all_loaded: bool

    def problems(self, target_pid: int, tids: set[int], worker_ids: list[int]) -> list[str]:
        """Everything this core gets wrong for the fixture; empty when gdb sees it all."""
        out: list[str] = []
        if set(self.threads) != tids:
            out.append(f"gdb threads {sorted(self.threads)} != expected {sorted(tids)}")
        main = self.threads.get(target_pid, [])
        chain = ["leaf_wait", "level3", "level2", "level1", "main"]
        if not _subsequence(chain, main):
            out.append(f"main thread frames {main} lack {chain}")
        seen_ids: set[int] = set()
        for tid, frames in self.threads.items():
            if tid == target_pid:
                continue
            if _subsequence(["thread_leaf", "thread_fn"], frames):
                ids = re.findall(r"thread_leaf \(id=(\d+)\)", self.blocks.get(tid, ""))
                seen_ids.update(int(i) for i in ids)
        for wid in [*worker_ids, ECHO_ID]:
            if wid not in seen_ids:
                out.append(f"no thread shows thread_leaf(id={wid}) -> thread_fn")
        if self.values.get("magic_global") != "0x1234abcd":
            out.append(f"magic_global = {self.values.get('magic_global')!r}")
        if '"runtime-magic"' not in self.values.get("magic_string", ""):
            out.append(f"magic_string = {self.values.get('magic_string')!r}")
        if '"heap-value-42"' not in self.values.get("heap_string", ""):
            out.append(f"heap_string = {self.values.get('heap_string')!r}")
        if not self.libraries_all_loaded:
            out.append("a shared library is not loaded")
        if "Cannot access memory" in self.output:
            out.append("gdb: Cannot access memory")
        return out


def _subsequence(needle: list[str], hay: list[str]) -> bool:
    """``needle`` appears in ``hay`` in order and contiguously."""
    return any(hay[i:i + len(needle)] == needle for i in range(len(hay) - len(needle) + 1))


def run_gdb(exe: Path | str, core: Path | str, *, attach: bool = False) -> GdbReport:
    """gdb's view of a core (or, with ``attach``, of the live process whose pid is ``core``)."""
    gdb = need("gdb")
    values = ["-ex", "p/x magic_global", "-ex", "p magic_string", "-ex", "p heap_string"]
    cmd = [gdb, "-nx", "-batch", "-ex", "set pagination off", "-ex", "set width 0",
           "-ex", "info threads", "-ex", "thread apply all bt",
           *([] if attach else values),
           "-ex", "info sharedlibrary", str(exe), *(["-p", str(core)] if attach else [str(core)])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    text = proc.stdout + proc.stderr
    threads: dict[int, list[str]] = {}
    blocks: dict[int, str] = {}
    current: list[str] | None = None
    lwp = 0
    for line in proc.stdout.splitlines():
        m = re.match(r"Thread \d+ \(.*?LWP (\d+)\)", line)
        if m:
            lwp = int(m.group(1))
            current = threads.setdefault(lwp, [])
            blocks[lwp] = ""
            continue
        m = re.match(r"#\d+\s+(?:0x[0-9a-f]+ in )?([\w.@]+|\?\?)\s*\(", line)
        if m and current is not None:
            current.append(m.group(1))
            blocks[lwp] += line + "\n"
    values: dict[str, str] = {}
    names = iter(["magic_global", "magic_string", "heap_string"])
    for line in proc.stdout.splitlines():
        if re.match(r"\$\d+ = ", line):
            values[next(names, "extra")] = line.split(" = ", 1)[1]
    libs = [ln for ln in proc.stdout.splitlines() if re.match(r"0x[0-9a-f]+\s+0x[0-9a-f]+\s+", ln)]
    loaded = bool(libs) and all(" Yes" in ln for ln in libs) and "(*)" not in "".join(
        ln for ln in libs if " No " in ln)
    if not libs and "No shared libraries loaded" not in proc.stdout:
        loaded = False
    return GdbReport(text, threads, blocks, values, loaded)


# --- eu-stack ----------------------------------------------------------------------------------
def run_eu_stack(exe: Path | str, core: Path | str) -> tuple[int, dict[int, list[str]], str]:
    """(exit code, TID -> function names, raw output) of ``eu-stack --core``."""
    eu = need("eu-stack")
    proc = subprocess.run([eu, f"--core={core}", "-e", str(exe)], capture_output=True,
                          text=True, timeout=120)
    threads: dict[int, list[str]] = {}
    current: list[str] | None = None
    for line in proc.stdout.splitlines():
        m = re.match(r"TID (\d+):", line)
        if m:
            current = threads.setdefault(int(m.group(1)), [])
            continue
        m = re.match(r"#\d+\s+0x[0-9a-f]+\s+(\S+)", line)
        if m and current is not None:
            current.append(m.group(1))
    return proc.returncode, threads, proc.stdout + proc.stderr


def eu_stack_problems(exe: Path | str, core: Path | str, tids: set[int],
                      target_pid: int) -> list[str]:
    rc, threads, text = run_eu_stack(exe, core)
    out = []
    if set(threads) != tids:
        out.append(f"eu-stack TIDs {sorted(threads)} != {sorted(tids)} (rc {rc}): {text[:300]}")
    main = threads.get(target_pid, [])
    if not _subsequence(["leaf_wait", "level3", "level2", "level1", "main"], main):
        out.append(f"eu-stack main thread frames {main}")
    return out


def kill_quietly(proc: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
