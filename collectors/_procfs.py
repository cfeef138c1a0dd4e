"""Reading /proc/PID for the process collector.

Every file read goes through ``ProcFS``, which turns OSErrors into kdumpling errors in one place
(psutil's ``wrap_exceptions`` habit): a vanished process becomes ``TargetGoneError`` and an access
problem a ``PermissionDeniedError`` whose one-line message says which rule refused us. The procfs
root is a constructor argument so unit tests can point it at a fake directory tree.

Formats: proc(5) and Documentation/filesystems/proc.rst (maps, smaps, stat, status, auxv,
coredump_filter, pagemap in Documentation/admin-guide/mm/pagemap.rst).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat as stat_mod
from collections.abc import Iterator
from dataclasses import dataclass, field

from kdumpling.errors import (
    KdumplingError,
    PermissionDeniedError,
    SourceReadError,
    TargetGoneError,
)

# capability number of CAP_SYS_PTRACE (include/uapi/linux/capability.h)
CAP_SYS_PTRACE = 19
PF_EXITING = 0x4  # task->flags while in do_exit (include/linux/sched.h)

# Bracketed maps names that are ordinary anonymous memory, not special mappings. Everything else
# in brackets ([vdso], [vvar], [vvar_vclock], [vsyscall], [uprobes], [sigpage], [vectors]) is a
# special mapping the kernel always dumps (fs/coredump.c always_dump_vma).
_ANON_BRACKET_PREFIXES = (b"[heap]", b"[stack", b"[anon:", b"[anon_shmem:")


@dataclass(frozen=True)
class MapEntry:
    """One line of /proc/PID/maps."""

    start: int
    end: int
    perms: str  # "rwxp" style
    offset: int
    dev: str  # "fe:00"
    inode: int
    path: bytes  # may be empty; special names in brackets; "... (deleted)" kept as shown

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def readable(self) -> bool:
        return self.perms[0] == "r"

    @property
    def writable(self) -> bool:
        return self.perms[1] == "w"

    @property
    def executable(self) -> bool:
        return self.perms[2] == "x"

    @property
    def may_share(self) -> bool:
        """VM_MAYSHARE ('s' in maps); VmFlags 'sh' is the kernel's VM_SHARED."""
        return self.perms[3] == "s"

    @property
    def is_special(self) -> bool:
        """A named special mapping ([vdso], [vvar], [vsyscall], ...), not a file or anon VMA."""
        return (
            self.inode == 0
            and self.path.startswith(b"[")
            and not self.path.startswith(_ANON_BRACKET_PREFIXES)
        )

    @property
    def is_file(self) -> bool:
        """Backed by a file (vma->vm_file != NULL): has an inode, or a named shmem object."""
        return self.inode != 0 or self.path.startswith(b"[anon_shmem:")

    @property
    def deleted(self) -> bool:
        return self.path.endswith(b" (deleted)")

    @property
    def key(self) -> tuple[int, str, int, int]:
        """What identifies a VMA across two reads (its end may move, e.g. [heap])."""
        return (self.start, self.dev, self.inode, self.offset)


@dataclass
class SmapsEntry:
    """One mapping of /proc/PID/smaps: its maps line, the kB counters (in bytes) and VmFlags."""

    map: MapEntry
    counters: dict[str, int] = field(default_factory=dict)
    vmflags: frozenset[str] = frozenset()

    def counter(self, name: str) -> int:
        return self.counters.get(name, 0)


@dataclass(frozen=True)
class ProcStat:
    """The fields of /proc/PID/stat that a core needs (proc(5) field numbers in comments)."""

    pid: int  # 1
    comm: bytes  # 2
    state: str  # 3
    ppid: int  # 4
    pgrp: int  # 5
    session: int  # 6
    flags: int  # 9
    nice: int  # 19
    num_threads: int  # 20
    starttime: int  # 22


def parse_maps_line(line: bytes) -> MapEntry:
    # "start-end perms offset dev inode      path": the path may contain spaces and is
    # everything after the fifth field, with its leading padding removed.
    parts = line.split(None, 5)
    if len(parts) < 5:
        raise ValueError(f"malformed maps line: {line!r}")
    addr, perms, offset, dev, inode = parts[:5]
    start_s, _, end_s = addr.partition(b"-")
    path = parts[5].rstrip(b"\n") if len(parts) > 5 else b""
    return MapEntry(int(start_s, 16), int(end_s, 16), perms.decode("ascii"), int(offset, 16),
                    dev.decode("ascii"), int(inode), path)


def parse_maps(data: bytes) -> list[MapEntry]:
    return [parse_maps_line(line) for line in data.splitlines() if line.strip()]


def _is_maps_line(line: bytes) -> bool:
    head = line.split(None, 1)[0] if line.strip() else b""
    if b"-" not in head or head.endswith(b":"):
        return False
    a, _, b = head.partition(b"-")
    try:
        int(a, 16), int(b, 16)
    except ValueError:
        return False
    return True


def parse_smaps(data: bytes) -> list[SmapsEntry]:
    """Parse /proc/PID/smaps: a maps line, then "Key:   N kB" lines and "VmFlags: rd wr ..."."""
    out: list[SmapsEntry] = []
    cur: SmapsEntry | None = None
    for line in data.splitlines():
        if not line.strip():
            continue
        if _is_maps_line(line):
            cur = SmapsEntry(parse_maps_line(line))
            out.append(cur)
            continue
        if cur is None:
            raise ValueError(f"smaps field before the first mapping: {line!r}")
        key, sep, value = line.partition(b":")
        if not sep:
            continue
        name = key.decode("ascii", "replace").strip()
        if name == "VmFlags":
            cur.vmflags = frozenset(value.decode("ascii", "replace").split())
            continue
        fields = value.split()
        if not fields:
            continue
        try:
            number = int(fields[0])
        except ValueError:
            continue
        if len(fields) > 1 and fields[1] == b"kB":
            number *= 1024
        cur.counters[name] = number
    return out


def parse_stat(data: bytes) -> ProcStat:
    # comm is in parentheses and may itself contain ") ": split at the last ')'.
    left, _, right = data.rpartition(b")")
    pid_s, _, comm = left.partition(b" (")
    f = right.split()
    # f[0] is field 3 (state); field n is f[n - 3].
    return ProcStat(int(pid_s), comm, f[0].decode("ascii"), int(f[1]), int(f[2]), int(f[3]),
                    int(f[6]), int(f[16]), int(f[17]), int(f[19]))


def parse_status(data: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in data.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def _has_cap_sys_ptrace() -> bool:
    try:
        with open("/proc/self/status", "rb") as f:
            status = parse_status(f.read())
        return bool(int(status.get("CapEff", "0"), 16) >> CAP_SYS_PTRACE & 1)
    except (OSError, ValueError):
        return os.geteuid() == 0


@dataclass(frozen=True)
class FileInfo:
    mode: int
    size: int


class ProcFS:
    """Access to one procfs mount (``/proc`` by default; a fake tree in unit tests)."""

    def __init__(self, root: str | os.PathLike[str] = "/proc") -> None:
        self.root = os.fspath(root)

    def path(self, pid: int, *parts: str) -> str:
        return os.path.join(self.root, str(pid), *parts)

    # --- the one place that turns OSError into kdumpling errors --------------------------------
    @contextlib.contextmanager
    def errors(self, pid: int, what: str) -> Iterator[None]:
        try:
            yield
        except KdumplingError:
            raise
        except OSError as err:
            raise self.translate(err, pid, what) from err

    def translate(self, err: OSError, pid: int, what: str) -> KdumplingError:
        if err.errno in (errno.ENOENT, errno.ESRCH):
            if not os.path.exists(self.path(pid)):
                return TargetGoneError(f"process {pid} does not exist (or exited)")
            return TargetGoneError(f"process {pid}: {what} vanished: {err.strerror}")
        if err.errno in (errno.EACCES, errno.EPERM):
            return self.permission_error(pid, what)
        return SourceReadError(f"process {pid}: cannot read {what}: {err.strerror}")

    def permission_error(self, pid: int, what: str) -> PermissionDeniedError:
        """Say which rule refused access to ``pid`` and what to do about it, in one line."""
        status: dict[str, str] = {}
        with contextlib.suppress(OSError):
            status = self.status(pid)
        tracer = int(status.get("TracerPid", "0") or 0)
        if tracer and tracer != os.getpid():
            name = b""
            with contextlib.suppress(OSError):
                name = self.read(tracer, "comm").strip()
            return PermissionDeniedError(
                f"cannot {what} of process {pid}: it is already traced by process {tracer}"
                f" ({name.decode('utf-8', 'replace') or '?'}); detach that debugger first"
            )
        uid = status.get("Uid", "").split()
        owner = uid[1] if len(uid) > 1 else "?"
        if os.geteuid() != 0 and not _has_cap_sys_ptrace():
            return PermissionDeniedError(
                f"cannot {what} of process {pid} (owned by uid {owner}): not running as root and "
                f"no CAP_SYS_PTRACE; run as root or grant CAP_SYS_PTRACE"
            )
        scope = self._yama_scope()
        if scope is not None and scope >= 1:
            hint = ("ptrace is disabled until reboot" if scope == 3 else
                    "run with CAP_SYS_PTRACE or set kernel.yama.ptrace_scope=0")
            return PermissionDeniedError(
                f"cannot {what} of process {pid}: refused by Yama (kernel.yama.ptrace_scope="
                f"{scope}); {hint}"
            )
        return PermissionDeniedError(
            f"cannot {what} of process {pid}: permission denied (an LSM such as SELinux or "
            f"AppArmor, a user namespace boundary, or a non-dumpable target owned by another "
            f"user); run as root in the target's namespace with CAP_SYS_PTRACE"
        )

    def _yama_scope(self) -> int | None:
        try:
            with open(os.path.join(self.root, "sys/kernel/yama/ptrace_scope"), "rb") as f:
                return int(f.read().strip() or b"0")
        except (OSError, ValueError):
            return None

    # --- plain reads ------------------------------------------------------------------------
    def read(self, pid: int, *parts: str) -> bytes:
        """Read a whole /proc/PID file (raises OSError; callers wrap with ``errors``)."""
        with open(self.path(pid, *parts), "rb", buffering=0) as f:
            chunks = []
            while True:
                chunk = f.read(1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
        return b"".join(chunks)

    def read_file(self, pid: int, name: str) -> bytes:
        with self.errors(pid, f"/proc/{pid}/{name}"):
            return self.read(pid, name)

    def exists(self, pid: int) -> bool:
        return os.path.isdir(self.path(pid))

    def status(self, pid: int, tid: int | None = None) -> dict[str, str]:
        parts = ("task", str(tid), "status") if tid is not None else ("status",)
        return parse_status(self.read(pid, *parts))

    def stat(self, pid: int) -> ProcStat:
        with self.errors(pid, "read /proc/PID/stat"):
            return parse_stat(self.read(pid, "stat"))

    def maps(self, pid: int) -> list[MapEntry]:
        with self.errors(pid, "read the memory map"):
            return parse_maps(self.read(pid, "maps"))

    def smaps(self, pid: int) -> list[SmapsEntry]:
        with self.errors(pid, "read the memory map (smaps)"):
            return parse_smaps(self.read(pid, "smaps"))

    def coredump_filter(self, pid: int) -> int:
        with self.errors(pid, "read coredump_filter"):
            return int(self.read(pid, "coredump_filter").strip() or b"0", 16)

    def auxv(self, pid: int) -> bytes:
        with self.errors(pid, "read the auxiliary vector"):
            return self.read(pid, "auxv")

    def cmdline(self, pid: int) -> bytes:
        with self.errors(pid, "read the command line"):
            return self.read(pid, "cmdline")

    def tasks(self, pid: int) -> list[int]:
        with self.errors(pid, "list threads"):
            return sorted(int(t) for t in os.listdir(self.path(pid, "task")) if t.isdigit())

    def thread_state(self, pid: int, tid: int) -> str | None:
        """State letter of one thread, or None when it is gone."""
        try:
            return parse_stat(self.read(pid, "task", str(tid), "stat")).state
        except (OSError, ValueError, IndexError):
            return None

    def has_running_thread(self, pid: int) -> bool:
        """Does any thread of ``pid`` live without PF_EXITING (include/linux/sched.h)?"""
        try:
            tids = os.listdir(self.path(pid, "task"))
        except OSError:
            return False
        for tid in tids:
            try:
                st = parse_stat(self.read(pid, "task", tid, "stat"))
            except (OSError, ValueError, IndexError):
                continue
            if st.state not in "ZX" and not st.flags & PF_EXITING:
                return True
        return False

    def open_mem(self, pid: int) -> int:
        with self.errors(pid, "open the memory (/proc/PID/mem)"):
            return os.open(self.path(pid, "mem"), os.O_RDONLY | os.O_CLOEXEC)

    def open_pagemap(self, pid: int) -> int | None:
        """pagemap descriptor, or None when it cannot be used (then every page is read)."""
        try:
            return os.open(self.path(pid, "pagemap"), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None

    def file_info(self, pid: int, entry: MapEntry) -> FileInfo | None:
        """Mode and size of the file behind a mapping: map_files/ needs CAP_SYS_ADMIN, so fall
        back to the path as seen from the target's root. None when neither works."""
        candidates = [self.path(pid, "map_files", f"{entry.start:x}-{entry.end:x}")]
        if entry.path.startswith(b"/") and not entry.deleted:
            candidates.append(self.path(pid, "root") + os.fsdecode(entry.path))
        for cand in candidates:
            try:
                st = os.stat(cand)
            except (OSError, ValueError):
                continue
            if stat_mod.S_ISREG(st.st_mode) or stat_mod.S_ISCHR(st.st_mode):
                return FileInfo(st.st_mode, st.st_size)
        return None
