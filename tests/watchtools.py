"""The watch fixture (tests/fixtures/watch_target.c): build it, run it, talk to it.

A ``WatchTarget`` is our child with a pipe on its stdin (commands) and its stdout (answers and
the lines its signal handler writes), read by a thread so a test can wait for a given line.
"""

from __future__ import annotations

import os
import queue
import resource
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.proctools import need

WATCH_SOURCE = Path(__file__).parent / "fixtures" / "watch_target.c"


def compile_watch_target(outdir: Path) -> Path:
    gcc = need("gcc")
    exe = outdir / "watch_target"
    subprocess.run([gcc, "-O0", "-g", "-pthread", "-o", str(exe), str(WATCH_SOURCE)],
                   check=True, capture_output=True, text=True)
    return exe


@dataclass
class WatchTarget:
    proc: subprocess.Popen[bytes]
    lines: queue.Queue[str] = field(default_factory=queue.Queue)
    seen: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw.decode().strip())

    def expect(self, predicate: Callable[[str], bool], timeout: float = 10.0) -> str:
        """The next line (skipping others, kept in ``seen``) for which ``predicate`` holds."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching line from {self.pid} in {timeout} s; "
                                     f"seen: {self.seen}")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            self.seen.append(line)
            if predicate(line):
                return line

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()

    def ask(self, command: str, answer_prefix: str, timeout: float = 10.0) -> str:
        self.send(command)
        return self.expect(lambda ln: ln.startswith(answer_prefix), timeout)

    def handled(self, timeout: float = 10.0) -> str:
        return self.expect(lambda ln: ln.startswith("handled "), timeout)

    def tids(self) -> set[int]:
        return {int(t) for t in os.listdir(f"/proc/{self.pid}/task")}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()


def _core_unlimited() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def start_watch_target(exe: Path, *args: str, cwd: Path | None = None,
                       core_dumps: bool = False) -> WatchTarget:
    proc = subprocess.Popen([str(exe), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            bufsize=0, cwd=cwd,
                            preexec_fn=_core_unlimited if core_dumps else None)
    target = WatchTarget(proc)
    threading.Thread(target=target._pump, daemon=True).start()
    target.expect(lambda ln: ln.endswith(" ready"))
    return target


def thread_state(pid: int, tid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0].decode()
    except (OSError, IndexError):
        return None


def wait_for(check: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(0.01)
