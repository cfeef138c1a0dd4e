"""Finding the process a process target means: by PID, PID file, name or systemd unit.

psutil does the lookup (names, executables, start times, existence). Hand-written reads stay
only where psutil has nothing: the PID file itself, and a unit's cgroup membership
(/proc/PID/cgroup) when no systemd answers for its MainPID.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator

import psutil
from kdumpling.errors import TargetGoneError, UsageError

TASK_COMM_LEN = 15  # /proc/PID/comm keeps the first 15 bytes of the name (include/linux/sched.h)


@contextlib.contextmanager
def _procfs(proc: str) -> Iterator[None]:
    """psutil reads /proc; ``proc`` points it elsewhere (a container's /proc) for a while."""
    if proc == psutil.PROCFS_PATH:
        yield
        return
    old, psutil.PROCFS_PATH = psutil.PROCFS_PATH, proc
    try:
        yield
    finally:
        psutil.PROCFS_PATH = old


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def comm(pid: int, proc: str = "/proc") -> str | None:
    """The process's name (psutil completes a comm cut at 15 bytes from its command line)."""
    with _procfs(proc), contextlib.suppress(psutil.Error):
        return psutil.Process(pid).name()
    return None


def exe(pid: int, proc: str = "/proc") -> str | None:
    """The executable of a process, so ``debug`` can hand it to gdb."""
    with _procfs(proc), contextlib.suppress(psutil.Error):
        return psutil.Process(pid).exe() or None
    return None


def _matches(info: dict[str, object], name: str) -> bool:
    comm_name = str(info.get("name") or "")
    cmdline = info.get("cmdline") or []
    argv0 = os.path.basename(str(cmdline[0])) if isinstance(cmdline, list) and cmdline else ""
    if comm_name == name:
        return True
    # psutil's name is the comm, or the command line's longer name when the comm is its first
    # 15 bytes: those 15 bytes (what ps and /proc/PID/comm show) still name the process
    if len(name) == TASK_COMM_LEN and comm_name[:TASK_COMM_LEN] == name:
        return True
    return argv0 == name


def find_processes(name: str, proc: str = "/proc") -> list[int]:
    """PIDs whose name or argv[0] basename is ``name``, oldest first, never ourselves."""
    me = os.getpid()
    found: list[tuple[float, int]] = []
    with _procfs(proc):
        for p in psutil.process_iter(["name", "cmdline", "create_time"]):
            if p.pid != me and _matches(p.info, name):
                found.append((float(p.info.get("create_time") or 0.0), p.pid))
    return [pid for _t, pid in sorted(found)]


def _oldest_first(pids: list[int], proc: str) -> list[int]:
    def started(pid: int) -> tuple[float, int]:
        try:
            return psutil.Process(pid).create_time(), pid
        except psutil.Error:
            return 0.0, pid

    with _procfs(proc):
        return sorted(pids, key=started)


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
    # psutil has no cgroup membership, so /proc/PID/cgroup is read here.
    found = []
    with _procfs(proc):
        pids = psutil.pids()
    for pid in pids:
        data = _read(f"{proc}/{pid}/cgroup") or b""
        for line in data.decode("utf-8", "replace").splitlines():
            _num, ctrl, path = line.split(":", 2) if line.count(":") >= 2 else ("", "", "")
            if ctrl in ("", "name=systemd") and unit in path.split("/"):
                found.append(pid)
                break
    return _oldest_first(found, proc)


def _alive(pid: int, proc: str) -> bool:
    """It exists (a zombie too: the collector then says it has exited)."""
    with _procfs(proc):
        return psutil.pid_exists(pid)


def running_pid(pid: int, proc: str = "/proc") -> int:
    if not _alive(pid, proc):
        raise TargetGoneError(f"no process with PID {pid}")
    return pid


def pid_from_file(path: str, proc: str = "/proc") -> int:
    data = _read(path)
    if data is None:
        raise TargetGoneError(f"cannot read the PID file {path}")
    text = data.decode("ascii", "replace").strip().split("\n", 1)[0].strip()
    if not text.isdigit():
        raise TargetGoneError(f"the PID file {path} holds no PID")
    pid = int(text)
    if not _alive(pid, proc):
        raise TargetGoneError(f"PID {pid} from {path} is not running")
    return pid


def pid_of_unit(unit: str, select: str, proc: str = "/proc") -> int:
    pids = unit_processes(unit, proc)
    if not pids:
        raise TargetGoneError(f"unit {unit} has no running process")
    return pids[-1] if select == "newest" else pids[0]


def pid_by_name(name: str, select: str, proc: str = "/proc") -> int:
    """``select``: oldest, newest, or only (several matches are a usage error)."""
    pids = find_processes(name, proc)
    if not pids:
        raise TargetGoneError(f"no process named {name!r}")
    if select == "only" and len(pids) > 1:
        listed = ", ".join(f"{pid}" for pid in pids[:10])
        raise UsageError(f"{len(pids)} processes are named {name!r} (PIDs {listed}); "
                         "give a PID, or --oldest / --newest")
    return pids[-1] if select == "newest" else pids[0]
