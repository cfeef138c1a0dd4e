"""Helpers for the agent tests: run the real ``kdumpling-agent`` entry point, a fixture process
with known memory, and small tmpfs mounts for the disk-full cases."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests import tiers

PAGE = 4096

# The fixture: N MiB of anonymous memory, every page the same 4 KiB pattern derived from the
# PID (so a core can be checked for it without hard-coding bytes), then it answers pings.
FIXTURE = r"""
import mmap, os, sys
mb = int(sys.argv[1])
buf = mmap.mmap(-1, max(mb, 1) << 20)
unit = b"KDLAGENT" + os.getpid().to_bytes(8, "little")
page = unit * (4096 // len(unit))
for off in range(0, len(buf), 4096):
    buf[off:off + 4096] = page
print("ready", flush=True)
for line in sys.stdin:
    print("pong", flush=True)
"""


def agent_argv() -> list[str]:
    """The console script next to this Python, else ``python -m kdumpling.agent.cli``."""
    script = Path(sys.executable).parent / "kdumpling-agent"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "kdumpling.agent.cli"]


def clean_env(tmp: Path, **extra: str) -> dict[str, str]:
    """An environment where no system config and no systemd variables leak into the agent."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM")}
    env["KDUMPLING_AGENT_CONFIG"] = str(tmp / "no-such-agent.toml")
    env["XDG_STATE_HOME"] = str(tmp / "xdg-state")
    env.update(extra)
    return env


def run_agent(args: list[str], tmp: Path, *, env: dict[str, str] | None = None,
              timeout: float = 300, prefix: list[str] | None = None,
              stdout: Any = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*(prefix or []), *agent_argv(), *args], env=env or clean_env(tmp),
                          stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=timeout,
                          check=False)


def json_out(proc: subprocess.CompletedProcess[str]) -> Any:
    assert proc.stdout.strip(), f"no stdout; stderr: {proc.stderr}"
    return json.loads(proc.stdout)


def assert_one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("kdumpling-agent"), lines[0]
    return lines[0]


class Fixture:
    """A running fixture process (our child)."""

    def __init__(self, mb: int = 4, user: int | None = None) -> None:
        pre: list[str] = []
        if user is not None:
            pre = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
        self.mb = mb
        self.proc = subprocess.Popen([*pre, sys.executable, "-c", FIXTURE, str(mb)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        line = self.proc.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            self.stop()
            raise RuntimeError("fixture did not start")

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def pattern_page(self) -> bytes:
        unit = b"KDLAGENT" + self.pid.to_bytes(8, "little")
        return unit * (PAGE // len(unit))

    def ping(self, timeout: float = 10.0) -> bool:
        """Only a running (not stopped, not traced-and-held) process answers."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(b"ping\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return bool(ready) and self.proc.stdout.readline().strip() == b"pong"

    def status(self) -> dict[str, str]:
        out = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            out[key] = value.strip()
        return out

    def assert_untouched(self) -> None:
        st = self.status()
        assert st["TracerPid"] == "0", "the agent left the fixture traced"
        assert not st["State"].startswith(("T", "t")), st["State"]
        assert self.ping(), "the fixture does not answer"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()


@contextlib.contextmanager
def fixture_process(mb: int = 4, user: int | None = None) -> Iterator[Fixture]:
    fx = Fixture(mb, user)
    try:
        yield fx
    finally:
        fx.stop()


@contextlib.contextmanager
def tmpfs(size: str) -> Iterator[Path]:
    """A small tmpfs of our own (root only), unmounted afterwards."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        tiers.missing("root", "mounting a tmpfs needs root and mount(8)")
    path = Path(tempfile.mkdtemp(prefix="kdl-tmpfs-"))
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                          str(path)], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        path.rmdir()
        tiers.missing("root", f"cannot mount a tmpfs: {res.stderr.strip()}")
    try:
        yield path
    finally:
        for _ in range(50):
            if subprocess.run(["umount", str(path)], capture_output=True,
                              check=False).returncode == 0:
                break
            time.sleep(0.1)
        with contextlib.suppress(OSError):
            path.rmdir()


def count_pattern_pages(core: Path, page: bytes) -> int:
    from kdumpling.reader import open_dump

    with open_dump(core) as d:
        return sum(1 for _pfn, data in d.iter_pages() if data == page)


def wait_for(predicate: Any, timeout: float, what: str, step: float = 0.02) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")


def kill_quietly(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(10)


class NotifyListener:
    """A datagram socket standing in for systemd's $NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[dict[str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append(fields)

    def has(self, key: str, value: str | None = None) -> bool:
        return any(key in m and (value is None or m[key] == value) for m in list(self.messages))

    def index(self, key: str) -> int:
        return next(i for i, m in enumerate(list(self.messages)) if key in m)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
