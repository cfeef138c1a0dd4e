#!/usr/bin/env python3
"""Guest capture benchmark (issue 4, "Speed"): a real Linux guest under QEMU, booted by the test
rig (tests/guest/rig.py), dumped every way we offer and every way QEMU offers.

1. Guest pause per capture mode, from QEMU's own STOP/RESUME event timestamps:
   QEMU's ELF into a file (``dump-guest-memory file:``), QEMU's kdump-zlib into a file, our QMP
   stream (the writer converts while QEMU writes: ELF, kdump zlib/lzo at dump level 1), our QMP
   spool (stream to /dev/shm first, zero pages as holes, then converted: pause = copy) and our
   spool of QEMU's own kdump-zlib (``dump_format="kdump-zlib"``). With ``--libvirt`` the same
   for a libvirt domain (pause = the dump call, which libvirt brackets with pause/resume).
2. Converting QEMU's ELF dump of that guest: ours (DumpFileCollector -> kdump zlib / lzo, dump
   level 1) against ``makedumpfile -c -d 1`` / ``-l -d 1`` on a copy with the program headers moved
   to offset 64 (makedumpfile 1.7 cannot read QEMU 7.2's layout otherwise), with output sizes and
   each process's peak RSS.

Every capture and conversion of ours runs in its own child process (its wall time, peak RSS and
CPU come from wait4). Each runs --repeat times (default 2) and the fastest
run is kept; the table, ratios and PASS/FAIL per target of issue 4 are printed at the end.

    .venv/bin/python bench/bench_guest.py [--mem 512] [--libvirt] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from writer_elf import fix_qemu_elf  # noqa: E402
from writer_runs import run_child  # noqa: E402

from tests.guest import rig  # noqa: E402

MB = 1_000_000


def log(msg: str) -> None:
    print(f"[bench-guest {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Row:
    section: str
    name: str
    seconds: float  # wall time of the capture or conversion
    pause: float | None = None  # guest pause (QEMU STOP -> RESUME), captures only
    bytes_out: int = 0
    rss_mb: float = 0.0
    cpu: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


# --- what the children do ---------------------------------------------------------------------

def _qemu_file_dump(sock: str, path: str, fmt: str) -> dict[str, Any]:
    from kdumpling.collectors._qmp import QmpClient

    with QmpClient(sock, timeout=600) as client:
        t0 = time.perf_counter()
        client.execute("dump-guest-memory", {"paging": False, "protocol": f"file:{path}",
                                             "format": fmt})
        wall = time.perf_counter() - t0
        stop = client.wait_event({"STOP"}, 10)
        resume = client.wait_event({"RESUME"}, 10)
    pause = resume.timestamp - stop.timestamp if stop and resume else None
    return {"seconds": wall, "pause": pause, "bytes_out": os.stat(path).st_size}


def _libvirt_file_dump(domain: str, path: str, fmt: str) -> dict[str, Any]:
    """libvirt's own dump into a regular file (libvirtd writes it as root); the call is the
    pause: libvirt pauses the domain first and resumes it last."""
    import libvirt

    formats = {"elf": libvirt.VIR_DOMAIN_CORE_DUMP_FORMAT_RAW,
               "kdump-zlib": libvirt.VIR_DOMAIN_CORE_DUMP_FORMAT_KDUMP_ZLIB}
    conn = libvirt.open("qemu:///system")
    try:
        dom = conn.lookupByName(domain)
        t0 = time.perf_counter()
        dom.coreDumpWithFormat(path, formats[fmt], libvirt.VIR_DUMP_MEMORY_ONLY)
        wall = time.perf_counter() - t0
    finally:
        conn.close()
    return {"seconds": wall, "pause": wall, "bytes_out": os.stat(path).st_size}


def _ours_capture(spec: dict[str, Any]) -> dict[str, Any]:
    from kdumpling import write_dump

    if spec["collector"] == "qmp":
        from kdumpling.collectors.qmp import QmpCollector

        collector: Any = QmpCollector(spec["target"], spool=spec.get("spool"),
                                      dump_format=spec.get("dump_format", "elf"))
    else:
        from kdumpling.collectors.libvirt import LibvirtCollector

        collector = LibvirtCollector(spec["target"], spool=spec.get("spool"),
                                     dump_format=spec.get("dump_format", "elf"))
    t0 = time.perf_counter()
    with collector as snap:
        t1 = time.perf_counter()
        res = write_dump(snap.image, spec["out"], format=spec["format"],
                         compression=spec["compression"], dump_level=spec["dump_level"],
                         fsync=False)
    t2 = time.perf_counter()
    return {"seconds": t2 - t0, "convert_seconds": t2 - t1, "pause": snap.pause_seconds,
            "bytes_out": res.bytes_out, "meta": {k: v for k, v in snap.meta.items()
                                                 if isinstance(v, int | float | str)}}


def _ours_convert(spec: dict[str, Any]) -> dict[str, Any]:
    from kdumpling import write_dump
    from kdumpling.collectors.convert import DumpFileCollector

    t0 = time.perf_counter()
    with DumpFileCollector(spec["input"]) as snap:
        res = write_dump(snap.image, spec["out"], format=spec["format"],
                         compression=spec["compression"], dump_level=spec["dump_level"],
                         fsync=False)
    return {"seconds": time.perf_counter() - t0, "bytes_out": res.bytes_out}


def child_main(spec: dict[str, Any]) -> None:
    kind = spec["kind"]
    if kind == "qemu-file":
        out = _qemu_file_dump(spec["target"], spec["out"], spec["format"])
    elif kind == "libvirt-file":
        out = _libvirt_file_dump(spec["target"], spec["out"], spec["format"])
    elif kind == "capture":
        out = _ours_capture(spec)
    elif kind == "convert":
        out = _ours_convert(spec)
    else:
        raise SystemExit(f"unknown child kind {kind}")
    print(json.dumps(out))


# --- the run ----------------------------------------------------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rows: list[Row] = []
        self.info: dict[str, Any] = {}
        self.work = Path(args.workdir)
        self.work.mkdir(parents=True, exist_ok=True)

    def child(self, section: str, name: str, spec: dict[str, Any], keep: bool = False) -> Row:
        """Run ``spec`` --repeat times in fresh children; keep the shortest pause (captures) or
        the fastest run (conversions). The output is removed after each run unless ``keep``
        (then the last run's output stays)."""
        rows = []
        for run in range(self.args.repeat):
            res = run_child([sys.executable, __file__, "--child", json.dumps(spec)])
            if res.rc != 0:
                raise SystemExit(f"{name} failed ({res.rc}):\n{res.stderr[-3000:]}")
            out = res.out
            rows.append(Row(section, name, float(out["seconds"]), out.get("pause"),
                            int(out.get("bytes_out", 0)), res.maxrss_mb, res.cpu,
                            {k: v for k, v in out.items()
                             if k not in ("seconds", "pause", "bytes_out")}))
            if not (keep and run == self.args.repeat - 1):
                with contextlib.suppress(OSError):
                    os.unlink(spec["out"])
        row = min(rows, key=lambda r: r.pause if r.pause is not None else r.seconds)
        row.rss_mb = max(r.rss_mb for r in rows)
        row.extra["runs"] = [round(r.pause if r.pause is not None else r.seconds, 3)
                             for r in rows]
        self.rows.append(row)
        pause = f"pause {row.pause:.2f} s, " if row.pause is not None else ""
        log(f"{section} / {name}: {pause}{row.seconds:.2f} s, {row.bytes_out / MB:.1f} MB, "
            f"RSS {row.rss_mb:.0f} MB, runs {row.extra['runs']}")
        return row

    def command(self, section: str, name: str, argv: list[str], out: Path) -> Row:
        rows = []
        for _ in range(self.args.repeat):
            out.unlink(missing_ok=True)
            res = run_child(argv)
            if res.rc != 0:
                raise SystemExit(f"{' '.join(argv)} failed ({res.rc}):\n{res.stderr[-3000:]}")
            rows.append(Row(section, name, res.wall, None, out.stat().st_size, res.maxrss_mb,
                            res.cpu))
        row = min(rows, key=lambda r: r.seconds)
        row.extra["runs"] = [round(r.seconds, 3) for r in rows]
        self.rows.append(row)
        log(f"{section} / {name}: {row.seconds:.2f} s, {row.bytes_out / MB:.1f} MB, "
            f"RSS {row.rss_mb:.0f} MB, runs {row.extra['runs']}")
        return row

    def captures(self, kind: str, target: str, out_dir: Path) -> None:
        """Every capture mode against one guest; outputs are removed as soon as measured."""
        section = f"pause ({kind})"
        spool = Path(tempfile.mkdtemp(prefix="kdumpling-spool-", dir="/dev/shm"))
        try:
            for fmt in ("elf", "kdump-zlib"):
                out = out_dir / f"{kind}-file.{fmt}"
                keep = fmt == "elf" and kind == "qmp"  # the conversion section's input
                self.child(section, f"{'QEMU' if kind == 'qmp' else 'libvirt'} file {fmt}", {
                    "kind": f"{'qemu' if kind == 'qmp' else 'libvirt'}-file", "target": target,
                    "out": str(out), "format": fmt}, keep=keep)
                if keep:
                    self.info["qemu_elf"] = str(out)
            runs = [("stream", "elf", "none", 0, "elf"), ("stream", "kdump", "zlib", 1, "elf"),
                    ("stream", "kdump", "lzo", 1, "elf"), ("spool", "kdump", "zlib", 1, "elf"),
                    ("spool", "kdump", "lzo", 1, "elf"),
                    ("spool", "kdump", "zlib", 1, "kdump-zlib")]
            for mode, fmt, comp, level, source in runs:
                out = out_dir / f"ours.{fmt}"
                name = f"ours {mode} {fmt}" + (f" {comp} -d {level}" if fmt != "elf" else "")
                if source != "elf":
                    name = f"ours via {source} {fmt} {comp} -d {level}"
                self.child(section, name, {
                    "kind": "capture", "collector": kind, "target": target, "out": str(out),
                    "format": fmt, "compression": comp, "dump_level": level,
                    "spool": str(spool) if mode == "spool" else None, "dump_format": source})
                out.unlink(missing_ok=True)
        finally:
            shutil.rmtree(spool, ignore_errors=True)

    def conversions(self, qemu_elf: Path) -> None:
        section = "convert QEMU ELF"
        fixed = self.work / "qemu-fixed.elf"
        how = fix_qemu_elf(str(qemu_elf), str(fixed))
        log(f"makedumpfile input: {how}")
        self.info["input_bytes"] = qemu_elf.stat().st_size
        for comp, flag in (("zlib", "-c"), ("lzo", "-l")):
            mdf_out = self.work / f"mdf.{comp}"
            mdf = self.command(section, f"makedumpfile {flag} -d 1", [
                "makedumpfile", flag, "-d", "1", str(fixed), str(mdf_out)], mdf_out)
            mdf_out.unlink()
            out = self.work / f"ours.{comp}"
            ours = self.child(section, f"ours kdump {comp} -d 1", {
                "kind": "convert", "input": str(qemu_elf), "out": str(out), "format": "kdump",
                "compression": comp, "dump_level": 1})
            out.unlink(missing_ok=True)
            ours.extra["vs_makedumpfile_time"] = ours.seconds / mdf.seconds
            ours.extra["vs_makedumpfile_size"] = ours.bytes_out / mdf.bytes_out - 1
        fixed.unlink()

    def run(self) -> None:
        a = self.args
        kernel = rig.prepare_kernel()
        spec = rig.new_spec()
        gdir = Path(tempfile.mkdtemp(prefix="kdb-", dir="/tmp"))
        guest = None
        lv_guest = None
        daemons = None
        try:
            initrd = rig.build_initramfs(kernel, gdir / "initramfs.cpio.gz", spec)
            guest = rig.QemuGuest(kernel, initrd, gdir / "vm", spec, mem_mb=a.mem)
            guest.start()
            log(f"guest up in {guest.boot_seconds:.1f} s ({a.mem} MiB, TCG)")
            self.info["guest"] = {"mem_mb": a.mem, "kernel": kernel.version,
                                  "boot_seconds": guest.boot_seconds}
            self.captures("qmp", str(guest.qmp_path), self.work)
            guest.stop()
            guest = None
            self.conversions(Path(self.info["qemu_elf"]))
            Path(self.info["qemu_elf"]).unlink()
            if a.libvirt:
                daemons = rig.LibvirtDaemons(gdir / "libvirt")
                daemons.start()
                lv_guest = rig.LibvirtGuest(kernel, initrd, gdir / "lv", spec, mem_mb=a.mem)
                lv_guest.start()
                self.captures("libvirt", lv_guest.name, self.work)
        finally:
            for thing in (guest, lv_guest, daemons):
                if thing is not None:
                    with contextlib.suppress(Exception):
                        thing.stop()
            shutil.rmtree(gdir, ignore_errors=True)

    def report(self) -> str:
        lines = [f"{'section':<22} {'run':<32} {'pause s':>8} {'wall s':>8} {'MB out':>8} "
                 f"{'RSS MB':>7} {'cpu s':>6}"]
        for r in self.rows:
            pause = f"{r.pause:8.2f}" if r.pause is not None else f"{'':>8}"
            lines.append(f"{r.section:<22} {r.name:<32} {pause} {r.seconds:8.2f} "
                         f"{r.bytes_out / MB:8.1f} {r.rss_mb:7.0f} {r.cpu:6.2f}")
        lines.append("")
        lines += self.ratios()
        lines += ["", "targets (issue 4):"]
        lines += [f"  {'PASS' if ok else 'FAIL'} {what}: {detail}"
                  for what, ok, detail in self.targets()]
        return "\n".join(lines)

    def find(self, section: str, name: str) -> Row | None:
        return next((r for r in self.rows if r.section == section and r.name == name), None)

    def ratios(self) -> list[str]:
        find = self.find
        out = [f"ratios (fastest of {self.args.repeat} runs each):"]
        for kind in ("qmp", "libvirt"):
            sec = f"pause ({kind})"
            who = "QEMU" if kind == "qmp" else "libvirt"
            base = find(sec, f"{who} file elf")
            for r in self.rows:
                if r.section == sec and r.pause is not None and base and base.pause:
                    out.append(f"  {kind}: {r.name:<30} pause {r.pause:6.2f} s = "
                               f"{r.pause / base.pause:5.2f}x {who}'s own ELF file dump")
        for r in self.rows:
            if "vs_makedumpfile_time" in r.extra:
                out.append(f"  convert: {r.name:<27} time {r.extra['vs_makedumpfile_time']:5.2f}x"
                           f" makedumpfile, size {r.extra['vs_makedumpfile_size'] * 100:+5.2f}%")
        qz = find("pause (qmp)", "QEMU file kdump-zlib")
        oz = find("pause (qmp)", "ours stream kdump zlib -d 1")
        if qz and oz:
            out.append(f"  QEMU's own kdump-zlib: {qz.seconds:.2f} s, {qz.bytes_out / MB:.1f} MB;"
                       f" ours streamed: {oz.seconds:.2f} s ({oz.seconds / qz.seconds:.2f}x), "
                       f"{oz.bytes_out / MB:.1f} MB")
        for r in self.rows:
            if "spool_bytes" in r.extra.get("meta", {}):
                meta = r.extra["meta"]
                out.append(f"  {r.section} {r.name}: spool held {meta['spool_bytes'] / MB:.0f} MB"
                           f" of a {meta['stream_bytes'] / MB:.0f} MB stream")
        return out

    def targets(self) -> list[tuple[str, bool, str]]:
        """(what, passed, detail) for every target of issue 4 this run measured."""
        find = self.find
        out: list[tuple[str, bool, str]] = []
        conv = "convert QEMU ELF"
        qz = find("pause (qmp)", "QEMU file kdump-zlib")
        for comp, flag in (("zlib", "-c"), ("lzo", "-l")):
            ours = find(conv, f"ours kdump {comp} -d 1")
            mdf = find(conv, f"makedumpfile {flag} -d 1")
            if not (ours and mdf):
                continue
            ratio = ours.seconds / mdf.seconds
            out.append((f"convert {comp}: time vs makedumpfile {flag} -d 1 (<= 1.0x)",
                        ratio <= 1.0, f"{ratio:.2f}x ({ours.seconds:.2f} s vs "
                        f"{mdf.seconds:.2f} s)"))
            size = ours.bytes_out / mdf.bytes_out - 1
            out.append((f"convert {comp}: size vs makedumpfile (within 2%)", abs(size) <= 0.02,
                        f"{size * 100:+.2f}%"))
            if comp == "zlib" and qz:
                ratio = ours.seconds / qz.seconds
                out.append(("convert zlib: time vs QEMU's own kdump-zlib dump (<= 1.0x)",
                            ratio <= 1.0, f"{ratio:.2f}x ({ours.seconds:.2f} s vs "
                            f"{qz.seconds:.2f} s)"))
        for kind, who in (("qmp", "QEMU"), ("libvirt", "libvirt")):
            base = find(f"pause ({kind})", f"{who} file kdump-zlib")
            ours = [r for r in self.rows if r.section == f"pause ({kind})"
                    and r.name.startswith("ours") and r.name.endswith("-d 1")
                    and r.pause is not None]
            if base and base.pause and ours:
                best = min(ours, key=lambda r: r.pause or 0.0)
                ratio = (best.pause or 0.0) / base.pause
                out.append((f"{kind}: shortest kdump pause we offer vs {who}'s own kdump-zlib "
                            "(<= 1.0x)", ratio <= 1.0,
                            f"{ratio:.2f}x ({best.name}: {best.pause:.2f} s vs "
                            f"{base.pause:.2f} s)"))
        worst = max((r.rss_mb for r in self.rows if r.name.startswith("ours")), default=0.0)
        out.append(("peak RSS of our runs (< 100 MB)", worst < 100, f"{worst:.0f} MB"))
        return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mem", type=int, default=512, help="guest RAM in MiB (default 512)")
    ap.add_argument("--libvirt", action="store_true", help="also capture a libvirt domain")
    ap.add_argument("--workdir", default="/tmp/kdumpling-bench-guest")
    ap.add_argument("--json", help="write rows and info as JSON (- = stdout)")
    ap.add_argument("--repeat", type=int, default=2,
                    help="runs per measurement, the fastest kept (default 2)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child_main(json.loads(a.child))
        return 0
    for tool in ("qemu-system-x86_64", "makedumpfile"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is required")
    bench = Bench(a)
    try:
        bench.run()
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(a.workdir)
    print(bench.report())
    if a.json:
        data = {"rows": [asdict(r) for r in bench.rows], "info": bench.info,
                "targets": [{"target": t, "pass": ok, "detail": d}
                            for t, ok, d in bench.targets()]}
        text = json.dumps(data, indent=1)
        if a.json == "-":
            print(text)
        else:
            Path(a.json).write_text(text)
    return 0 if all(ok for _, ok, _ in bench.targets()) else 1


if __name__ == "__main__":
    sys.exit(main())
