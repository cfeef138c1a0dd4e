#!/usr/bin/env python3
"""Process capture vs gcore on the same 1 GiB process, in one run.

For 4 and 200 threads: start the C fixture (tests/fixtures/proc_target.c) with 1 GiB of touched
memory, then alternate runs of ``gcore`` and of our capture (a child Python process running
``capture_process``) in both modes, writing to the same directory. Reports wall time (including
interpreter / gdb start-up), how long the target was stopped, and the capturing process's peak
RSS (``wait4`` rusage of the child), and ratios against gcore measured in this run.
Targets from issue 3: wall <= 0.8x gcore, peak RSS < 100 MB, low-pause pause < 50 ms at 4 threads.
Before each run: ``sync`` (earlier runs' writeback stays out of it) and a wait for other
processes to go quiet; column ``bg`` is the CPU other processes used during the run, in cores
(it includes the kernel writing back our own output): a row with high ``bg`` is suspect.

    .venv/bin/python bench/bench_process.py [--mib 1024] [--threads 4,200] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "tests" / "fixtures" / "proc_target.c"


@dataclass
class Sample:
    wall: float
    pause: float | None
    maxrss_kib: int
    out_bytes: int
    cpu: float  # user + system seconds of the capturing process (less noisy than wall)
    bg: float = 0.0  # CPU cores other processes used meanwhile (this machine's are shared)


@dataclass
class Series:
    name: str
    samples: list[Sample] = field(default_factory=list)

    def median(self, attr: str) -> float:
        values = [getattr(s, attr) for s in self.samples if getattr(s, attr) is not None]
        return statistics.median(values) if values else float("nan")


def child_main(pid: int, out: str, mode: str, fsync: bool) -> None:
    """Runs in the measured child: one capture, JSON result on stdout."""
    from kdumpling.collectors.process import capture_process

    started = time.monotonic()
    snap, result = capture_process(pid, out, mode=mode, fsync=fsync)
    print(json.dumps({"pause": snap.pause_seconds, "elapsed": time.monotonic() - started,
                      "bytes_out": result.bytes_out, "unreadable": len(snap.unreadable)}))


def busy_seconds() -> float:
    """CPU seconds spent busy on all cores since boot (/proc/stat; idle and iowait left out)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def wait_quiet(timeout: float, limit: float = 0.25) -> float:
    """Wait (up to ``timeout`` s) until other processes use under ``limit`` cores; returns
    the last load seen. Other sessions share this machine's two cores."""
    end = time.monotonic() + timeout
    while True:
        b0, t0 = busy_seconds(), time.monotonic()
        time.sleep(0.5)
        load = (busy_seconds() - b0) / (time.monotonic() - t0)
        if load < limit or time.monotonic() > end:
            return load


def run_measured(cmd: list[str], env: dict[str, str] | None = None) \
        -> tuple[float, int, str, float]:
    """(wall seconds, peak RSS KiB, stdout, CPU seconds) of one child, via wait4 rusage."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    out = proc.stdout.read().decode() if proc.stdout else ""
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}): {err[-2000:]}")
    return wall, usage.ru_maxrss, out, usage.ru_utime + usage.ru_stime


def start_target(exe: Path, mib: int, threads: int) -> subprocess.Popen[bytes]:
    # the fixture has a main and an echo thread besides its workers
    proc = subprocess.Popen([str(exe), "--threads", str(threads - 2), "--big-mib", str(mib)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 1)[0]:
            if proc.stdout.readline().strip() == b"end":
                break
        elif proc.poll() is not None:
            raise SystemExit("fixture exited")
    while len(os.listdir(f"/proc/{proc.pid}/task")) < threads:
        time.sleep(0.01)
    time.sleep(0.2)
    return proc


def check_released(pid: int) -> None:
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            text = f.read()
        assert "TracerPid:\t0\n" in text, f"thread {tid} still traced"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--threads", default="4,200")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--outdir", default="/var/tmp")
    ap.add_argument("--quiet-timeout", type=float, default=30,
                    help="before each run, wait up to S s for the machine to go quiet")
    ap.add_argument("--child", nargs=4, metavar=("PID", "OUT", "MODE", "FSYNC"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(int(args.child[0]), args.child[1], args.child[2], args.child[3] == "1")
        return

    gcore = shutil.which("gcore")
    gcc = shutil.which("gcc")
    if not gcore or not gcc:
        raise SystemExit("needs gcc and gcore (gdb)")
    work = Path(tempfile.mkdtemp(prefix="kdumpling-bench-", dir=args.outdir))
    try:
        exe = work / "proc_target"
        subprocess.run([gcc, "-O2", "-g", "-pthread", "-o", str(exe), str(SOURCE)], check=True)
        print(f"# {args.mib} MiB target, outputs in {work}, runs={args.runs}, "
              f"python {sys.version.split()[0]}; gcore never fsyncs, so the compared runs do "
              f"not either; '+fsync' shows what the agent's default durability costs")
        for threads in (int(t) for t in args.threads.split(",")):
            bench_threads(exe, work, args, gcore, threads)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench_threads(exe: Path, work: Path, args: argparse.Namespace, gcore: str,
                  threads: int) -> None:
    target = start_target(exe, args.mib, threads)
    pid = target.pid
    out = work / "core"
    names = ("gcore", "consistent", "low-pause", "consistent+fsync")
    series = {name: Series(name) for name in names}
    me = [sys.executable, str(Path(__file__).resolve())]
    # An installed agent runs from compiled bytecode (pip writes the .pyc files), as gdb runs
    # compiled: the child caches its bytecode in the work directory (the warm-up run fills it)
    # even where PYTHONDONTWRITEBYTECODE is set, which would make every run compile kdumpling's
    # modules from source (~90 ms here).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    try:
        # warm-up: gdb's first start loads symbols from disk, our first import compiles .pyc
        run_measured([gcore, "-o", str(out), str(pid)])
        for leftover in work.glob("core*"):
            leftover.unlink()
        run_measured([*me, "--child", str(pid), str(out), "consistent", "0"], env)
        for _ in range(args.runs):
            for name in series:
                for leftover in work.glob("core*"):
                    leftover.unlink()
                # the last run's writeback must not land in this one (it costs CPU and disk)
                os.sync()
                wait_quiet(args.quiet_timeout)
                busy0 = busy_seconds()
                if name == "gcore":
                    wall, rss, _, cpu = run_measured([gcore, "-o", str(out), str(pid)])
                    files = list(work.glob("core*"))
                    size = files[0].stat().st_size if files else 0
                    # gcore (gdb attach) keeps the process stopped for its whole run
                    sample = Sample(wall, wall, rss, size, cpu)
                else:
                    mode, _, sync = name.partition("+")
                    wall, rss, text, cpu = run_measured(
                        [*me, "--child", str(pid), str(out), mode, "1" if sync else "0"], env)
                    info = json.loads(text.strip().splitlines()[-1])
                    sample = Sample(wall, info["pause"], rss, info["bytes_out"], cpu)
                # includes the kernel's writeback of our own output, so never quite 0
                sample.bg = max(0.0, (busy_seconds() - busy0 - cpu) / wall)
                series[name].samples.append(sample)
                check_released(pid)
                for leftover in work.glob("core*"):
                    leftover.unlink()
    finally:
        target.kill()
        target.wait()
        for leftover in work.glob("core*"):
            leftover.unlink()

    g_wall = series["gcore"].median("wall")
    print(f"\n## {threads} threads, {args.mib} MiB touched (median of {args.runs})")
    print(f"{'method':<17} {'wall s':>7} {'x gcore':>8} {'CPU s':>6} {'pause ms':>9} "
          f"{'peak RSS MB':>12} {'core MB':>8} {'bg':>5}")
    for s in series.values():
        wall = s.median("wall")
        pause = s.median("pause")
        print(f"{s.name:<17} {wall:7.3f} {wall / g_wall:8.2f} {s.median('cpu'):6.2f} "
              f"{pause * 1000:9.1f} {s.median('maxrss_kib') / 1024:12.1f} "
              f"{s.median('out_bytes') / 2**20:8.1f} {s.median('bg'):5.2f}")
    c, lp = series["consistent"], series["low-pause"]
    verdicts = [
        ("consistent wall <= 0.8x gcore", c.median("wall") <= 0.8 * g_wall),
        ("low-pause wall <= 0.8x gcore", lp.median("wall") <= 0.8 * g_wall),
        ("peak RSS < 100 MB", max(c.median("maxrss_kib"), lp.median("maxrss_kib")) < 100 * 1024),
    ]
    if threads <= 4:
        verdicts.append(("low-pause pause < 50 ms", lp.median("pause") < 0.05))
    for text, ok in verdicts:
        print(f"  {'PASS' if ok else 'MISS'}  {text}")


if __name__ == "__main__":
    main()
