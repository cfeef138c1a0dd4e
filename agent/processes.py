"""Finding the process a process target means: by PID, PID file, name or systemd unit.

Plain /proc reads for now; issue 13 moves the lookup and the process metrics onto psutil.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from kdumpling.errors import TargetGoneError, UsageError

TASK_COMM_LEN = 15  # /proc/PID/comm keeps the first 15 bytes of the name (include/linux/sched.h)


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def comm(pid: int, proc: str = "/proc") -> str | None:
    data = _read(f"{proc}/{pid}/comm")
    return data.decode("utf-8", "replace").strip() if data is not None else None


def exe(pid: int, proc: str = "/proc") -> str | None:
    """The executable of a process, so ``debug`` can hand it to gdb."""
    try:
        return os.readlink(f"{proc}/{pid}/exe")
    except OSError:
        return None


def _start_time(pid: int, proc: str) -> int:
    data = _read(f"{proc}/{pid}/stat")
    if not data:
        return 0
    fields = data[data.rfind(b")") + 2:].split()
    return int(fields[19]) if len(fields) > 19 else 0  # field 22: starttime


def _pids(proc: str) -> list[int]:
    return [int(n) for n in os.listdir(proc) if n.isdigit()]


def _oldest_first(pids: list[int], proc: str) -> list[int]:
    return sorted(pids, key=lambda pid: (_start_time(pid, proc), pid))


def _argv0(pid: int, proc: str) -> str:
    cmdline = _read(f"{proc}/{pid}/cmdline") or b""
    return os.path.basename(cmdline.split(b"\0", 1)[0].decode("utf-8", "replace"))


def _matches_name(pid: int, name: str, proc: str) -> bool:
    got = comm(pid, proc)
    if got is None:
        return False
    if got == name or (len(name) > TASK_COMM_LEN and got == name[:TASK_COMM_LEN]):
        return len(name) <= TASK_COMM_LEN or _argv0(pid, proc) == name
    return _argv0(pid, proc) == name


def find_processes(name: str, proc: str = "/proc") -> list[int]:
    """PIDs whose comm or argv[0] basename is ``name``, oldest first, never ourselves."""
    me = os.getpid()
    return _oldest_first([pid for pid in _pids(proc)
                          if pid != me and _matches_name(pid, name, proc)], proc)


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
    return _oldest_first(found, proc)


def running_pid(pid: int, proc: str = "/proc") -> int:
    if not os.path.exists(f"{proc}/{pid}"):
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
    if not os.path.exists(f"{proc}/{pid}"):
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
