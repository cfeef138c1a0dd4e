"""``capture process|libvirt|qmp|raw``: one snapshot now."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from kdumpling.collectors.base import GUEST_DUMP_FORMATS
from kdumpling.errors import UsageError

from .capture import CaptureSettings, Destination, capture
from .common import Context, add_common, add_write_options, write_options
from .progress import ProgressBar
from .store import Store
from .targets import TargetSpec, import_collector, process_spec
from .units import format_duration, format_size, parse_size


def register(sub: argparse._SubParsersAction[Any]) -> None:
    cap = sub.add_parser("capture", help="take one snapshot now",
                         description="Take one snapshot of a process, a guest or a memory image.")
    kinds = cap.add_subparsers(dest="kind", metavar="KIND", required=True,
                               parser_class=type(cap))

    p = kinds.add_parser("process", help="a live process (PID or name)",
                         description="Snapshot a live process into an ELF core gdb can open. "
                                     "Needs ptrace rights over it (same user, or CAP_SYS_PTRACE).")
    p.add_argument("target", metavar="PID|NAME")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--oldest", dest="select", action="store_const", const="oldest",
                       help="if several processes have that name, take the oldest")
    which.add_argument("--newest", dest="select", action="store_const", const="newest",
                       help="... the newest")
    p.add_argument("--mode", choices=("consistent", "low-pause"),
                   help="consistent: stopped for the whole read (default); low-pause: "
                        "stopped only for registers and stacks (exit 1: memory may be torn)")
    p.add_argument("--filter", type=lambda s: int(s, 0), metavar="MASK",
                   help="coredump_filter bits (default: the process's own)")
    p.add_argument("--size-cap", metavar="SIZE", help="stop after SIZE bytes (truncated core)")
    _finish(p)

    lv = kinds.add_parser("libvirt", help="a libvirt domain",
                          description="Snapshot a libvirt domain's memory (the guest pauses "
                                      "while it is read). Needs access to the libvirt socket.")
    lv.add_argument("domain", metavar="DOMAIN")
    lv.add_argument("--connect", metavar="URI", default="qemu:///system",
                    help="libvirt URI (default qemu:///system)")
    _guest_options(lv)
    _finish(lv)

    q = kinds.add_parser("qmp", help="a QEMU guest through its QMP socket",
                         description="Snapshot a bare QEMU guest through its QMP socket.")
    q.add_argument("socket", metavar="SOCKET")
    _guest_options(q)
    _finish(q)

    r = kinds.add_parser("raw", help="raw physical memory images",
                         description="Turn raw physical memory images into a kernel dump.")
    r.add_argument("images", metavar="IMAGE", nargs="+",
                   help="raw memory image or LiME file")
    r.add_argument("--phys-map", metavar="PHYS:SIZE[@IMAGE[+OFFSET]],...",
                   help="where the images sit in physical memory (default: image 0 at 0)")
    vm = r.add_mutually_exclusive_group(required=True)
    vm.add_argument("--vmcoreinfo", metavar="FILE", help="VMCOREINFO text file")
    vm.add_argument("--vmcoreinfo-at", metavar="ADDR,SIZE",
                    help="VMCOREINFO's physical address and size inside the images")
    r.add_argument("--arch", default="x86_64", help="architecture (default x86_64)")
    _finish(r)


def _guest_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spool", action="store_true",
                   help="copy the guest to an anonymous temporary file first, zero pages as "
                        "holes, and convert after (shorter pause)")
    p.add_argument("--qemu-format", choices=GUEST_DUMP_FORMATS, default="elf",
                   help="what QEMU writes: its ELF (default) or its kdump-zlib (QEMU "
                        "compresses on one core: the pause is QEMU's own; implies --spool)")


def _finish(p: argparse.ArgumentParser) -> None:
    add_write_options(p)
    add_common(p, "print the result as one JSON object on stdout")
    p.set_defaults(func=run)


def _spec(ctx: Context) -> TargetSpec:
    a = ctx.args
    if a.kind == "process":
        opts: dict[str, Any] = {}
        if a.mode:
            opts["mode"] = a.mode
        if a.filter is not None:
            opts["filter"] = a.filter
        if a.size_cap:
            try:
                opts["size_cap"] = parse_size(a.size_cap)
            except ValueError as err:
                raise UsageError(f"--size-cap: {err}") from None
        spec = process_spec(a.target, **opts)
        if a.select:
            spec.params["select"] = a.select
        return spec
    if a.kind == "libvirt":
        return TargetSpec("libvirt", a.domain, f"domain {a.domain}",
                          {"domain": a.domain, "uri": a.connect,
                           "spool": a.spool or a.qemu_format != "elf",
                           "dump_format": a.qemu_format})
    if a.kind == "qmp":
        base = os.path.basename(a.socket.rstrip("/")) or "qmp"
        return TargetSpec("qmp", "qmp-" + base, f"qmp {a.socket}",
                          {"socket": a.socket, "spool": a.spool or a.qemu_format != "elf",
                           "dump_format": a.qemu_format})
    images = list(a.images)
    phys_map = None
    if a.phys_map:
        phys_map = import_collector("raw", "kdumpling.collectors.raw").parse_phys_map(
            a.phys_map)
    at = None
    if a.vmcoreinfo_at:
        try:
            addr_s, size_s = a.vmcoreinfo_at.split(",")
            at = (int(addr_s, 0), int(size_s, 0))
        except ValueError:
            raise UsageError(f"--vmcoreinfo-at wants ADDR,SIZE, got {a.vmcoreinfo_at!r}") from None
    base = os.path.basename(images[0]) or "raw"
    return TargetSpec("raw", "raw-" + base, f"raw {', '.join(images)}",
                      {"images": images, "phys_map": phys_map, "vmcoreinfo": a.vmcoreinfo,
                       "vmcoreinfo_at": at, "arch": a.arch})


def destination(ctx: Context, output: str | None) -> Destination:
    """``-o``: '-' = stdout, an existing directory or 'DIR/' = a store, else one file."""
    force = bool(getattr(ctx.args, "force", False))
    if output == "-":
        if ctx.json:
            raise UsageError("--json cannot share stdout with -o -")
        if sys.stdout.isatty():
            raise UsageError("refusing to write a dump to a terminal; redirect stdout")
        return Destination(stream=sys.stdout.buffer)
    if output and not (os.path.isdir(output) or output.endswith("/")):
        return Destination(path=os.path.abspath(output), force=force)
    directory = os.path.abspath(output) if output else ctx.store_dir()
    return Destination(store=Store(directory, create=True))


def run_capture(ctx: Context, spec: TargetSpec, output: str | None,
                fmt: str | None = None) -> int:
    dest = destination(ctx, output)
    if spec.params.get("spool") is True:
        # The spool file is anonymous (O_TMPFILE); put it on the output's file system.
        spec.params["spool"] = (dest.store.directory if dest.store is not None else
                                os.path.dirname(dest.path) if dest.path else
                                os.environ.get("TMPDIR", "/var/tmp"))
    elif not spec.params.get("spool"):
        spec.params.pop("spool", None)
    bar = None
    if not ctx.json and not ctx.quiet and sys.stderr.isatty():
        bar = ProgressBar(spec.label)
    settings = CaptureSettings(
        options=write_options(ctx, fmt=fmt),
        annotations=dict(getattr(ctx.args, "annotate", []) or []),
        retention=ctx.config.retention if dest.store is not None else None,
        keep_for=ctx.keep_for(), progress=bar, cancel=ctx.cancel,
    )
    ctx.capturing = True
    try:
        record = capture(spec, dest, settings)
    finally:
        ctx.capturing = False
        if bar:
            bar.close()
        if dest.store is not None:
            dest.store.close()
    report(ctx, record)
    return int(record["exit_code"])


def report(ctx: Context, record: dict[str, Any]) -> None:
    if ctx.json:
        ctx.emit(record)
        return
    for w in record.get("warnings", []):
        sys.stderr.write(f"kdumpling-agent: warning: {w}\n")
    for u in record.get("unreadable", []):
        if u.get("expected") and not ctx.args.verbose:
            continue
        sys.stderr.write(f"kdumpling-agent: warning: unreadable {u['start']:#x}-{u['end']:#x}: "
                         f"{u['reason']}\n")
    if record.get("truncated"):
        sys.stderr.write("kdumpling-agent: warning: the dump is truncated (size cap)\n")
    if ctx.quiet or record.get("path") is None:
        return
    pause = record.get("pause_seconds")
    lines = [
        f"{record['target']} -> {record['path']}",
        f"  {record['format']}"
        + (f"/{record['codec']}" if record["codec"] != "none" else "")
        + f", {format_size(record['bytes_in'])} of memory in {format_size(record['bytes_out'])}"
        + (f", paused {pause:.3f}s" if isinstance(pause, int | float) else "")
        + f", {format_duration(record['total_seconds'])} in all",
        f"  sha256 {record['sha256']}",
    ]
    if record.get("pruned"):
        lines.append(f"  pruned {', '.join(record['pruned'])}")
    lines.append("  open it: " + how_to_open(record))
    ctx.say("\n".join(lines))


def how_to_open(record: dict[str, Any]) -> str:
    path = record["path"]
    if record.get("kind") == "process":
        exe = record.get("exe")
        cmd = f"gdb {exe} {path}" if exe else f"gdb -c {path}"
    else:
        cmd = f"drgn -c {path}   (or: crash VMLINUX {path})"
    if record.get("id"):
        return f"kdumpling-agent debug {record['id']}   ({cmd})"
    return cmd


def run(ctx: Context) -> int:
    return run_capture(ctx, _spec(ctx), ctx.args.output)
