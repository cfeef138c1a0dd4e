"""How bench_writer.py runs and measures one write: each in its own process under a small
launcher (peak RSS, CPU time, the other processes' load meanwhile), plus the bench's constants
and small helpers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

PAGE = 4096
MB = 1_000_000
DEFAULT_WORKDIR = "/tmp/kdumpling-bench"
RSS_TARGET_MB = 100.0


# ------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------
def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = 1
    if t and t[-1] in units:
        mult = units[t[-1]]
        t = t[:-1]
    size = int(float(t) * mult)
    if size <= 0 or size % PAGE:
        raise argparse.ArgumentTypeError(f"size must be a positive multiple of {PAGE}: {text}")
    return size


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def unlink(path: str) -> None:
    for p in (path, path + ".incomplete"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


def fsync_path(path: str) -> float:
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def warm(path: str) -> None:
    """Read a file once so that every measured run reads it from the page cache."""
    with open(path, "rb", buffering=0) as f:
        while f.read(8 << 20):
            pass


def cpu_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0, 0.0
    hz = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields) - idle) / hz, sum(fields) / hz


QUIET_CORES = 0.25  # other processes' load (in cores) below which a measurement may start


def quiesce(timeout: float) -> float:
    """Flush earlier runs' dirty pages (so that their writeback does not land inside the next
    run), then wait up to ``timeout`` s for the machine to be quiet: other engineers' jobs
    share these cores. Returns the background load seen last, in cores."""
    os.sync()
    deadline = time.monotonic() + timeout
    while True:
        b0, _ = cpu_busy()
        time.sleep(0.5)
        b1, _ = cpu_busy()
        load = (b1 - b0) / 0.5
        if load < QUIET_CORES or time.monotonic() >= deadline:
            return load


# ------------------------------------------------------------------------------------------
# Child processes: each measured write runs alone so its peak RSS is its own
# ------------------------------------------------------------------------------------------
@dataclass
class ChildResult:
    rc: int
    wall: float
    maxrss_mb: float
    cpu: float  # the child's user + system CPU seconds
    background: float  # other processes' CPU use during the run, in cores
    out: dict[str, Any]
    stderr: str


# Peak RSS: a process's ru_maxrss also counts what it had before execve, and a child forked
# from this (Python) bench starts as a copy of it. So every command runs under a small launcher
# that forks it and reports its rusage: GNU time when installed, else a bare Python (floor
# ~9 MB, which only matters for small tools such as cp or makedumpfile).
TIME_BIN = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None
LAUNCHER = r"""
import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, st, ru = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write("%d %f %f\n" % (ru.ru_maxrss, ru.ru_utime, ru.ru_stime))
sys.exit(os.waitstatus_to_exitcode(st))
"""


def run_child(argv: Sequence[str], *, cwd: str | None = None) -> ChildResult:
    """Run argv (its stdout's last line may be JSON) and measure it: wall time, peak RSS and
    CPU time of that process alone, and the other processes' load on the machine meanwhile."""
    with tempfile.TemporaryFile() as errf, tempfile.TemporaryDirectory() as td:
        ru_file = os.path.join(td, "rusage")
        if TIME_BIN:
            full = [TIME_BIN, "-f", "%M %U %S", "-o", ru_file, *argv]
        else:
            full = [sys.executable, "-S", "-I", "-c", LAUNCHER, ru_file, *argv]
        busy0, _ = cpu_busy()
        t0 = time.perf_counter()
        proc = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=errf, cwd=cwd)
        assert proc.stdout is not None
        data = proc.stdout.read()
        proc.stdout.close()
        rc = proc.wait()
        wall = time.perf_counter() - t0
        busy1, _ = cpu_busy()
        errf.seek(0)
        err = errf.read().decode("utf-8", "replace")
        try:
            with open(ru_file) as f:
                maxrss_kb, utime, stime = f.read().strip().splitlines()[-1].split()
            rss, cpu = int(maxrss_kb) * 1024 / MB, float(utime) + float(stime)
        except (OSError, ValueError, IndexError):
            rss, cpu = 0.0, 0.0
    out: dict[str, Any] = {}
    lines = data.decode("utf-8", "replace").strip().splitlines()
    if lines:
        try:
            out = json.loads(lines[-1])
        except ValueError:
            out = {}
    background = max(0.0, (busy1 - busy0 - cpu) / wall) if wall > 0 else 0.0
    return ChildResult(rc, wall, rss, cpu, background, out, err)
