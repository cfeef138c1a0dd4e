#!/usr/bin/env python3
"""Snapshots into S3-compatible storage (issue 15): upload throughput and the target's pause.

One process of ``--mib`` MiB (a third random pages, a third text-like, a third zero) is captured
in alternating order each round by the real command line:

* ``local``: ``capture process PID -o DIR/`` into a snapshot directory (the anchor pause);
* ``s3``: ``-o s3://BUCKET/bench/``, streamed: the parts go up while the dump is written, so
  the process stays stopped until the last part is sent;
* ``s3 --spool``: written locally first (the process runs again as soon as it is local), then
  uploaded and the local copy removed;
* ``upload_file``: what ``aws s3 cp`` of the finished local core does (boto3's managed transfer,
  its defaults: 8 MiB parts, 10 threads), timed alone: the anchor for upload throughput.

Reported per row (median of ``--runs``): wall time of the command, the pause from its JSON,
MB/s of dump bytes over the wall time, and the child's peak RSS. The server is moto's standalone
server started here on 127.0.0.1 (in-memory, one Python process: an upper bound on the agent's
cost, not a network benchmark), or any endpoint given with ``--endpoint`` (credentials from the
usual AWS_* environment).

    .venv/bin/python bench/bench_s3.py [--mib 256] [--runs 3] [--endpoint URL --bucket NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

AGENT = Path(sys.executable).parent / "kdumpling-agent"

FIXTURE = r"""
import mmap, os, sys
mb = int(sys.argv[1])
buf = mmap.mmap(-1, mb << 20)
text = (b"kdumpling bench page %d " * 200)[:4096]
for i, off in enumerate(range(0, len(buf), 4096)):
    if i % 3 == 0:
        buf[off:off + 4096] = os.urandom(4096)
    elif i % 3 == 1:
        buf[off:off + 4096] = text
print("ready", flush=True)
sys.stdin.read()
"""


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=2).close()
            return proc, endpoint
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise SystemExit("moto server did not start") from None
            time.sleep(0.1)


def run_rss(argv: list[str], env: dict[str, str]) -> tuple[float, dict[str, Any], int]:
    t0 = time.monotonic()
    proc = subprocess.Popen([str(AGENT), *argv, "--json"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code
    if code != 0:
        raise SystemExit(f"{' '.join(argv)}: exit {code}: {err.decode()}")
    return wall, json.loads(out), usage.ru_maxrss


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--endpoint", help="an S3 endpoint (default: start moto's server here)")
    ap.add_argument("--bucket", help="an existing bucket (with --endpoint)")
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = ap.parse_args()

    import boto3
    from boto3.s3.transfer import TransferConfig

    moto = None
    env = dict(os.environ)
    if args.endpoint is None:
        moto, endpoint = start_moto()
        env.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                   AWS_DEFAULT_REGION="us-east-1")
    else:
        endpoint = args.endpoint
    env["AWS_ENDPOINT_URL"] = endpoint
    work = Path(tempfile.mkdtemp(prefix="kdumpling-bench-s3-"))
    env["KDUMPLING_AGENT_CONFIG"] = str(work / "none.toml")
    env["KDUMPLING_SPOOL_DIR"] = str(work / "spool")
    client = boto3.session.Session().client(
        "s3", endpoint_url=endpoint, region_name=env.get("AWS_DEFAULT_REGION", "us-east-1"),
        aws_access_key_id=env.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"))
    bucket = args.bucket or "kdl-bench-" + uuid.uuid4().hex[:8]
    if args.bucket is None:
        client.create_bucket(Bucket=bucket)

    fixture = subprocess.Popen([sys.executable, "-c", FIXTURE, str(args.mib)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert fixture.stdout is not None
    assert fixture.stdout.readline().strip() == b"ready"
    pid = str(fixture.pid)
    rows: dict[str, list[tuple[float, float | None, int, int]]] = {}
    try:
        for r in range(args.runs):
            order = ["local", "s3", "s3 --spool"]
            if r % 2:
                order.reverse()
            for name in order:
                if name == "local":
                    argv = ["capture", "process", pid, "-o", f"{work}/store/"]
                elif name == "s3":
                    argv = ["capture", "process", pid, "-o", f"s3://{bucket}/bench/"]
                else:
                    argv = ["capture", "process", pid, "-o", f"s3://{bucket}/spool/", "--spool"]
                wall, res, rss = run_rss(argv, env)
                rows.setdefault(name, []).append((wall, res.get("pause_seconds"), rss,
                                                  int(res["bytes_out"])))
                if name == "local":
                    core = str(res["path"])
                    t0 = time.monotonic()
                    client.upload_file(core, bucket, f"cp/{r}.core", Config=TransferConfig())
                    rows.setdefault("upload_file (aws s3 cp)", []).append(
                        (time.monotonic() - t0, None, 0, os.path.getsize(core)))
                    os.unlink(core)
                    os.unlink(core.rsplit(".", 1)[0] + ".json")
    finally:
        fixture.kill()
        fixture.wait()
        if moto is not None:
            moto.terminate()
            moto.wait()

    print(f"\n{args.mib} MiB process, {args.runs} runs, endpoint {endpoint}"
          f"{' (moto, in-memory)' if moto else ''}\n")
    print(f"{'':26} {'wall s':>8} {'pause s':>8} {'MB/s':>7} {'peak RSS MB':>12}")
    out = []
    for name, samples in rows.items():
        wall = statistics.median(s[0] for s in samples)
        pauses = [s[1] for s in samples if s[1] is not None]
        pause = statistics.median(pauses) if pauses else None
        size = samples[0][3]
        rss = max(s[2] for s in samples) / 1024
        print(f"{name:26} {wall:8.2f} {pause if pause is not None else float('nan'):8.3f} "
              f"{size / wall / 1e6:7.0f} {rss if rss else float('nan'):12.0f}")
        out.append({"row": name, "wall": wall, "pause": pause, "bytes": size, "rss_mb": rss})
    by = {o["row"]: o for o in out}
    local, s3, spool = by["local"], by["s3"], by["s3 --spool"]
    cp = by["upload_file (aws s3 cp)"]
    print(f"\ns3 streamed wall vs local write + upload_file: "
          f"{s3['wall'] / (local['wall'] + cp['wall']):.2f}x")
    print(f"pause: s3 streamed {s3['pause'] / local['pause']:.1f}x local, "
          f"s3 --spool {spool['pause'] / local['pause']:.1f}x local")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
