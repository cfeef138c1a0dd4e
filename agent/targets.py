"""What to capture: target descriptions, process lookup, and lazily imported collectors.

Collectors are imported only when a target of their kind is captured, so the CLI keeps working
when an optional dependency (libvirt-python, qemu.qmp) or a collector module is missing; the error
then says what to install.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from kdumpling.collectors.base import Collector
from kdumpling.errors import TargetGoneError, UsageError

from .config import TargetConfig
from .store import slug


class FeatureUnavailableError(UsageError):
    """An optional part of kdumpling (a collector or its dependency) is not installed."""


@dataclass
class TargetSpec:
    """One thing to capture, resolved far enough to open a collector for it."""

    type: str  # process | libvirt | qmp | raw | convert
    key: str  # groups snapshots for retention, locking and IDs
    label: str  # for humans and logs
    params: dict[str, Any] = field(default_factory=dict)


_EXTRAS = {
    "libvirt": ("libvirt", "pip install 'kdumpling[libvirt]' (or apt install python3-libvirt)"),
    "qmp": ("qemu", "pip install 'kdumpling[qmp]'"),
}


def import_collector(kind: str, module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        dep = _EXTRAS.get(kind)
        if dep and err.name and err.name.split(".")[0] == dep[0]:
            raise FeatureUnavailableError(f"{kind} support needs: {dep[1]}") from None
        raise FeatureUnavailableError(
            f"{kind} capture is not available in this kdumpling install "
            f"(module {module} is missing)") from None


def open_collector(spec: TargetSpec) -> Collector:
    """A collector for ``spec`` (not entered yet)."""
    p = spec.params
    if spec.type == "process":
        pid = resolve_process(p)  # a missing target is 69 even where the collector is missing
        mod = import_collector("process", "kdumpling.collectors.process")
        kwargs = {k: p[k2] for k, k2 in (("mode", "mode"), ("filter_mask", "filter"),
                                         ("size_cap", "size_cap")) if p.get(k2) is not None}
        spec.params["resolved_pid"] = pid
        collector: Collector = mod.ProcessCollector(pid, **kwargs)
        return collector
    if spec.type == "libvirt":
        mod = import_collector("libvirt", "kdumpling.collectors.libvirt")
        lv: Collector = mod.LibvirtCollector(p["domain"], uri=p.get("uri") or "qemu:///system",
                                             spool=p.get("spool") or None,
                                             dump_format=p.get("dump_format") or "elf")
        return lv
    if spec.type == "qmp":
        mod = import_collector("qmp", "kdumpling.collectors.qmp")
        return mod.QmpCollector(  # type: ignore[no-any-return]
            p["socket"], spool=p.get("spool") or None, dump_format=p.get("dump_format") or "elf")
    if spec.type == "raw":
        mod = import_collector("raw", "kdumpling.collectors.raw")
        return mod.RawMemoryCollector(  # type: ignore[no-any-return]
            p["images"], phys_map=p.get("phys_map"), vmcoreinfo=p.get("vmcoreinfo"),
            vmcoreinfo_at=p.get("vmcoreinfo_at"), arch=p.get("arch") or "x86_64")
    if spec.type == "convert":
        mod = import_collector("convert", "kdumpling.collectors.convert")
        return mod.DumpFileCollector(p["path"])  # type: ignore[no-any-return]
    raise UsageError(f"unknown target type {spec.type!r}")


def spec_from_config(t: TargetConfig, spool: str | None = None) -> TargetSpec:
    """``spool``: the directory for targets configured with ``spool = true``."""
    params = dict(t.params)
    if params.get("spool") is True and spool:
        params["spool"] = spool
    else:
        params.pop("spool", None)
    if t.type == "process":
        label = _process_label(params)
    elif t.type == "libvirt":
        label = f"domain {params['domain']}"
    else:
        label = f"qmp {params['socket']}"
    return TargetSpec(t.type, t.name, f"{t.name} ({label})", params)


def _process_label(p: Mapping[str, Any]) -> str:
    for key, what in (("pid", "pid"), ("pid_file", "pid file"), ("process", "process"),
                      ("unit", "unit")):
        if p.get(key) is not None:
            return f"{what} {p[key]}"
    return "process"


def process_spec(target: str, **options: Any) -> TargetSpec:
    """``capture process PID|NAME``: a PID is taken as is, a name must match one process."""
    if target.isdigit():
        pid = int(target)
        comm = _comm(pid) or str(pid)
        return TargetSpec("process", slug(comm), f"process {pid} ({comm})",
                          {"pid": pid, **options})
    return TargetSpec("process", slug(target), f"process {target}",
                      {"process": target, "select": "only", **options})


# -- finding processes ------------------------------------------------------------------------

def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _comm(pid: int, proc: str = "/proc") -> str | None:
    data = _read(f"{proc}/{pid}/comm")
    return data.decode("utf-8", "replace").strip() if data is not None else None


def _start_time(pid: int, proc: str = "/proc") -> int:
    data = _read(f"{proc}/{pid}/stat")
    if not data:
        return 0
    fields = data[data.rfind(b")") + 2:].split()
    return int(fields[19]) if len(fields) > 19 else 0  # field 22: starttime


def _pids(proc: str = "/proc") -> list[int]:
    return [int(n) for n in os.listdir(proc) if n.isdigit()]


def _matches_name(pid: int, name: str, proc: str) -> bool:
    comm = _comm(pid, proc)
    if comm is None:
        return False
    if comm == name or (len(name) > 15 and comm == name[:15]):  # TASK_COMM_LEN truncates
        cmdline = _read(f"{proc}/{pid}/cmdline") or b""
        argv0 = os.path.basename(cmdline.split(b"\0", 1)[0].decode("utf-8", "replace"))
        return len(name) <= 15 or argv0 == name
    cmdline = _read(f"{proc}/{pid}/cmdline") or b""
    argv0 = os.path.basename(cmdline.split(b"\0", 1)[0].decode("utf-8", "replace"))
    return argv0 == name


def find_processes(name: str, proc: str = "/proc") -> list[int]:
    """PIDs whose comm or argv[0] basename is ``name``, oldest first, never ourselves."""
    me = os.getpid()
    found = [pid for pid in _pids(proc) if pid != me and _matches_name(pid, name, proc)]
    return sorted(found, key=lambda pid: (_start_time(pid, proc), pid))


def unit_processes(unit: str, proc: str = "/proc") -> list[int]:
    """PIDs in a systemd unit's cgroup, oldest first (the main process comes first)."""
    if os.path.isdir("/run/systemd/system") and shutil.which("systemctl"):
        try:
            out = subprocess.run(["systemctl", "show", "--property=MainPID", "--value", unit],
                                 capture_output=True, text=True, timeout=10, check=False)
            pid = int(out.stdout.strip() or 0)
            if pid > 0:
                return [pid]
        except (OSError, ValueError, subprocess.TimeoutExpired):
            pass
    # Without a running systemd (containers, tests): the unit's cgroup is ".../UNIT" in either
    # the unified hierarchy ("0::") or systemd's named v1 hierarchy ("name=systemd").
    found = []
    for pid in _pids(proc):
        data = _read(f"{proc}/{pid}/cgroup") or b""
        for line in data.decode("utf-8", "replace").splitlines():
            _num, ctrl, path = line.split(":", 2) if line.count(":") >= 2 else ("", "", "")
            if ctrl in ("", "name=systemd") and unit in path.split("/"):
                found.append(pid)
                break
    return sorted(found, key=lambda pid: (_start_time(pid, proc), pid))


def resolve_process(p: Mapping[str, Any], proc: str = "/proc") -> int:
    """The PID a process target means right now (TargetGoneError when there is none)."""
    select = p.get("select", "oldest")
    if p.get("pid") is not None:
        pid = int(p["pid"])
        if not os.path.exists(f"{proc}/{pid}"):
            raise TargetGoneError(f"no process with PID {pid}")
        return pid
    if p.get("pid_file"):
        path = str(p["pid_file"])
        data = _read(path)
        if data is None:
            raise TargetGoneError(f"cannot read the PID file {path}")
        text = data.decode("ascii", "replace").strip().split("\n", 1)[0].strip()
        if not text.isdigit():
            raise TargetGoneError(f"the PID file {path} holds no PID")
        pid = int(text)
        if not os.path.exists(f"{proc}/{pid}"):
            raise TargetGoneError(f"PID {pid} from {path} is not running")
        return pid
    if p.get("unit"):
        pids = unit_processes(str(p["unit"]), proc)
        if not pids:
            raise TargetGoneError(f"unit {p['unit']} has no running process")
        return pids[-1] if select == "newest" else pids[0]
    name = str(p.get("process", ""))
    pids = find_processes(name, proc)
    if not pids:
        raise TargetGoneError(f"no process named {name!r}")
    if select == "only" and len(pids) > 1:
        listed = ", ".join(f"{pid}" for pid in pids[:10])
        raise UsageError(f"{len(pids)} processes are named {name!r} (PIDs {listed}); "
                         "give a PID, or --oldest / --newest")
    return pids[-1] if select == "newest" else pids[0]


Opener = Callable[[TargetSpec], Collector]

__all__ = ["FeatureUnavailableError", "Opener", "TargetSpec", "open_collector",
           "process_spec", "resolve_process", "spec_from_config"]
