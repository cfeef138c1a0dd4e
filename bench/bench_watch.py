#!/usr/bin/env python3
"""What ``kdumpling-agent watch`` costs while nothing happens (issue 13: under 1% of a core at
the default 1 s poll).

Starts the idle watch fixture (tests/fixtures/watch_target.c, built here), then runs the real
command line against it with triggers that never fire, in turn:

* ``polled``: ``--cpu 90 --for 5s --memory 100G --threads 100000 --fds 100000`` at ``--poll``
  (default 1s): one psutil ``oneshot`` sample per poll;
* ``signal``: ``--signal USR1`` (the process is traced; the watcher peeks for ptrace events
  every few milliseconds when idle, see collectors/process/signal_watch.py MAX_POLL_SLEEP);
* ``both``: the two together;
* ``service``: ``kdumpling-agent service`` with one ``when = { cpu = 90, threads = 100000,
  signal = ["USR1"] }`` target (the service turns every 50 ms while it traces a process: it has
  other threads, so SIGCHLD cannot wake it; see agent/service_when.py).

For each it lets the watcher settle (``--settle``, start-up excluded), then reads the watcher's
CPU time (user + system, /proc through psutil) over ``--seconds`` and reports it as a percentage
of one core, with the target's own CPU use over the same window (a watch must not make an idle
process busy). PASS when the watcher stays under 1% of a core. Exit status 0 when every row
passes, 1 otherwise.

    .venv/bin/python bench/bench_watch.py [--seconds 30] [--poll 1s] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "watch_target.c"
LIMIT_PCT = 1.0

CASES = {
    "polled": ["--cpu", "90", "--for", "5s", "--memory", "100G", "--threads", "100000",
               "--fds", "100000"],
    "signal": ["--signal", "USR1"],
    "both": ["--cpu", "90", "--for", "5s", "--memory", "100G", "--threads", "100000",
             "--fds", "100000", "--signal", "USR1"],
    "service": [],
}


def command(case: str, target_pid: int, args: argparse.Namespace, work: Path) -> list[str]:
    if case != "service":
        return [*agent(), "watch", str(target_pid), *CASES[case], "--poll", args.poll, "-o",
                str(work / f"{case}.core"), "-q"]
    cfg = work / "agent.toml"
    cfg.write_text(f'[output]\ndirectory = "{work / "store"}"\n[targets.w]\ntype = "process"\n'
                   f'pid = {target_pid}\npoll = "{args.poll}"\n'
                   'when = { cpu = 90, threads = 100000, signal = ["USR1"] }\n')
    return [*agent(), "service", "--config", str(cfg)]


def agent() -> list[str]:
    script = Path(sys.executable).parent / "kdumpling-agent"
    return [str(script)] if script.exists() else [sys.executable, "-m", "kdumpling.agent.cli"]


def cpu_seconds(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def measure(case: str, target_pid: int, args: argparse.Namespace, work: Path) -> dict[str, object]:
    cmd = command(case, target_pid, args, work)
    env = {**os.environ, "KDUMPLING_AGENT_CONFIG": str(work / "none.toml")}
    # stderr: the watcher's one line when the bench stops it with SIGTERM is expected
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(args.settle)
        if proc.poll() is not None:
            raise SystemExit(f"{case}: the watcher exited early ({proc.returncode})")
        watcher, target = psutil.Process(proc.pid), psutil.Process(target_pid)
        w0, t0, c0 = cpu_seconds(watcher), cpu_seconds(target), time.monotonic()
        time.sleep(args.seconds)
        w1, t1, c1 = cpu_seconds(watcher), cpu_seconds(target), time.monotonic()
        wall = c1 - c0
        row = {"case": case, "poll": args.poll, "seconds": round(wall, 2),
               "watcher_pct": round(100 * (w1 - w0) / wall, 3),
               "target_pct": round(100 * (t1 - t0) / wall, 3),
               "rss_mib": round(watcher.memory_info().rss / 2**20, 1)}
        row["pass"] = bool(row["watcher_pct"] < LIMIT_PCT)  # type: ignore[operator]
        return row
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=30.0, help="measured window per case")
    ap.add_argument("--settle", type=float, default=3.0, help="start-up left out (s)")
    ap.add_argument("--poll", default="1s", help="--poll of the watch (default 1s)")
    ap.add_argument("--cases", default=",".join(CASES), help="which of: " + ", ".join(CASES))
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON (- = stdout)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="kdumpling-bench-watch-") as tmp:
        work = Path(tmp)
        exe = work / "watch_target"
        subprocess.run(["gcc", "-O2", "-pthread", "-o", str(exe), str(FIXTURE)], check=True)
        target = subprocess.Popen([str(exe), "--threads", "4"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE)
        assert target.stdout is not None
        target.stdout.readline()  # "<pid> ready"
        rows = []
        try:
            for case in args.cases.split(","):
                rows.append(measure(case, target.pid, args, work))
                r = rows[-1]
                print(f"{case:7} poll {r['poll']:>5}  watcher {r['watcher_pct']:6.3f}% of a core"
                      f"  target {r['target_pct']:6.3f}%  rss {r['rss_mib']} MiB  "
                      f"{'PASS' if r['pass'] else 'FAIL'} (< {LIMIT_PCT}%)", flush=True)
        finally:
            target.kill()
            target.wait()
    if args.json:
        text = json.dumps(rows, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0 if all(r["pass"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
