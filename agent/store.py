"""The snapshot directory: names, JSON sidecars, locks and retention.

Layout (flat, like /var/lib/systemd/coredump)::

    /var/lib/kdumpling/            0700, never a symlink
      web-20261126T033900Z.core    0600 dump, written by write_dump as NAME.incomplete + rename
      web-20261126T033900Z.json    0600 sidecar: target, time, format, codec, sizes, sha256, ...
      .locks/web.lock              flock: one capture of a target at a time, across processes

Ownership rule: the store only ever deletes a dump that a sidecar of ours describes *and* whose
lstat() still matches the device, inode, size and mtime recorded when it was written; anything
else in the directory (a file someone copied in, a dump replaced or edited behind our back, a
symlink) is left alone.
A capture first writes its sidecar with ``state = "capturing"`` (O_EXCL: that reserves the name),
then the dump, then rewrites the sidecar as ``complete``; a sidecar left ``capturing`` by a process
that no longer exists marks an abandoned capture, whose reserved names ``prune`` may clean up.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import socket
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kdumpling.errors import DumpWriteError, KdumplingError, PermissionDeniedError

from .config import DEFAULT_STORE, RetentionConfig

SIDECAR_SUFFIX = ".json"
SCHEMA = "kdumpling-snapshot/1"
_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def default_store_dir(configured: str | None) -> str:
    """The configured directory; unset: /var/lib/kdumpling for root, else the XDG state dir."""
    if configured:
        return configured
    if os.geteuid() == 0:
        return DEFAULT_STORE
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                            "state")
    return os.path.join(base, "kdumpling")


def slug(text: str) -> str:
    """A file-name-safe version of a target name."""
    out = _SAFE.sub("_", text).strip("._-")
    return out[:64] or "target"


def utc_stamp(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y%m%dT%H%M%SZ")


def iso_time(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class Record:
    """One sidecar, as read from disk."""

    id: str
    data: dict[str, Any]
    sidecar: str  # file name of the sidecar within the store

    @property
    def file(self) -> str:
        return str(self.data.get("file", ""))

    @property
    def target_key(self) -> str:
        return str(self.data.get("target_key", ""))

    @property
    def time(self) -> float:
        value = self.data.get("time_unix", 0)
        return float(value) if isinstance(value, int | float) else 0.0

    @property
    def state(self) -> str:
        return str(self.data.get("state", ""))

    @property
    def bytes_out(self) -> int:
        value = self.data.get("bytes_out", 0)
        return int(value) if isinstance(value, int) else 0


@dataclass
class Reservation:
    """Names reserved for one capture in progress."""

    id: str
    file: str  # dump file name within the store
    path: str  # absolute dump path handed to write_dump
    sidecar: str
    data: dict[str, Any] = field(default_factory=dict)


class Store:
    """A snapshot directory opened without following symlinks."""

    def __init__(self, directory: str, create: bool = True) -> None:
        self.directory = os.path.abspath(directory)
        self._fd = self._open(create)

    # -- opening -------------------------------------------------------------------------------

    def _open(self, create: bool) -> int:
        path = self.directory
        if create:
            parent = os.path.dirname(path)
            try:
                os.makedirs(parent, mode=0o755, exist_ok=True)
                os.mkdir(path, 0o700)
            except FileExistsError:
                pass
            except PermissionError as err:
                raise PermissionDeniedError(
                    f"cannot create the snapshot directory {path}: permission denied "
                    "(run as root, or pick another with -o DIR or output.directory)") from err
            except OSError as err:
                raise DumpWriteError.from_oserror(err, path) from err
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            raise KdumplingError(f"no snapshot directory at {path}") from None
        except PermissionError as err:
            raise PermissionDeniedError(f"cannot open the snapshot directory {path}: "
                                        "permission denied") from err
        except OSError as err:
            if err.errno in (errno.ELOOP, errno.ENOTDIR):
                raise PermissionDeniedError(
                    f"refusing the snapshot directory {path}: it is a symlink or not a "
                    "directory") from None
            raise DumpWriteError.from_oserror(err, path) from err
        st = os.fstat(fd)
        if create and st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) & 0o077:
            os.fchmod(fd, 0o700)  # dumps hold secrets: nobody else may even list them
        return fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def path_of(self, name: str) -> str:
        return os.path.join(self.directory, name)

    # -- locking -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock_target(self, key: str) -> Iterator[bool]:
        """Yield True with the target's lock held, False if another capture holds it."""
        with contextlib.suppress(FileExistsError):
            os.mkdir(".locks", 0o700, dir_fd=self._fd)
        dfd = os.open(".locks", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                      dir_fd=self._fd)
        try:
            fd = os.open(slug(key) + ".lock",
                         os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        finally:
            os.close(dfd)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)  # closing drops the flock

    # -- writing -------------------------------------------------------------------------------

    def _exists(self, name: str) -> bool:
        try:
            os.lstat(name, dir_fd=self._fd)
        except FileNotFoundError:
            return False
        return True

    def reserve(self, target_key: str, ext: str, data: dict[str, Any],
                when: float | None = None) -> Reservation:
        """Pick a fresh ID and write the ``capturing`` sidecar that reserves it."""
        when = time.time() if when is None else when
        base = f"{slug(target_key)}-{utc_stamp(when)}"
        for n in range(1000):
            ident = base if n == 0 else f"{base}-{n}"
            file = f"{ident}.{ext}"
            sidecar = ident + SIDECAR_SUFFIX
            if self._exists(file) or self._exists(file + ".incomplete"):
                continue
            record = {
                "schema": SCHEMA, "id": ident, "file": file, "state": "capturing",
                "target_key": target_key, "time": iso_time(when), "time_unix": round(when, 3),
                "host": socket.gethostname(), "agent_pid": os.getpid(), **data,
            }
            try:
                self._write_json(sidecar, record, exclusive=True)
            except FileExistsError:
                continue
            return Reservation(ident, file, self.path_of(file), sidecar, record)
        raise DumpWriteError(f"cannot find a free snapshot name for {base} in {self.directory}")

    def commit(self, res: Reservation, data: dict[str, Any]) -> dict[str, Any]:
        """Record the finished dump: its identity (dev, inode, size) makes it ours to delete."""
        st = os.lstat(res.file, dir_fd=self._fd)
        record = {**res.data, **data, "state": "complete", "dev": st.st_dev, "inode": st.st_ino,
                  "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        record.pop("agent_pid", None)
        self._write_json(res.sidecar, record, exclusive=False)
        return record

    def abandon(self, res: Reservation) -> None:
        """Remove what a failed or interrupted capture reserved (its names are ours)."""
        for name in (res.file + ".incomplete", res.file):
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(name, dir_fd=self._fd)
                if stat.S_ISREG(st.st_mode):
                    os.unlink(name, dir_fd=self._fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(res.sidecar, dir_fd=self._fd)

    def _write_json(self, name: str, data: dict[str, Any], exclusive: bool) -> None:
        payload = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
        target = name if exclusive else name + ".tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        if not exclusive:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(target, dir_fd=self._fd)
        try:
            fd = os.open(target, flags, 0o600, dir_fd=self._fd)
        except FileExistsError:
            raise
        except OSError as err:
            raise DumpWriteError.from_oserror(err, self.path_of(target)) from err
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as err:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(target, dir_fd=self._fd)
            raise DumpWriteError.from_oserror(err, self.path_of(target)) from err
        os.close(fd)
        if not exclusive:
            os.rename(target, name, src_dir_fd=self._fd, dst_dir_fd=self._fd)
        with contextlib.suppress(OSError):
            os.fsync(self._fd)

    # -- reading -------------------------------------------------------------------------------

    def records(self) -> list[Record]:
        """Every sidecar of ours, oldest first."""
        out: list[Record] = []
        for name in os.listdir(self._fd):
            if not name.endswith(SIDECAR_SUFFIX) or name.startswith("."):
                continue
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._fd)
            except OSError:
                continue
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    continue
                with os.fdopen(os.dup(fd), "rb") as f:
                    data = json.loads(f.read(1 << 20))
            except (OSError, ValueError):
                continue
            finally:
                os.close(fd)
            if not isinstance(data, dict) or data.get("schema") != SCHEMA:
                continue
            ident = str(data.get("id", ""))
            if ident + SIDECAR_SUFFIX != name or "/" in str(data.get("file", "/")):
                continue
            out.append(Record(ident, data, name))
        out.sort(key=lambda r: (r.time, r.id))
        return out

    def find(self, ident: str) -> Record:
        """A record by ID, unique ID prefix, or the dump's file name."""
        records = self.records()
        for r in records:
            if ident in (r.id, r.file):
                return r
        matches = [r for r in records if r.id.startswith(ident)]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise KdumplingError(f"{ident!r} matches {len(matches)} snapshots; be more specific")
        raise KdumplingError(f"no snapshot {ident!r} in {self.directory}")

    def status(self, rec: Record) -> str:
        """present, missing, modified, capturing, abandoned."""
        if rec.state == "capturing":
            pid = rec.data.get("agent_pid")
            alive = isinstance(pid, int) and _pid_alive(pid)
            return "capturing" if alive else "abandoned"
        try:
            st = os.lstat(rec.file, dir_fd=self._fd)
        except FileNotFoundError:
            return "missing"
        return "present" if self._owned(rec, st) else "modified"

    @staticmethod
    def _owned(rec: Record, st: os.stat_result) -> bool:
        d = rec.data
        # Inode numbers are reused at once after an unlink; the mtime tells a new file apart.
        return (stat.S_ISREG(st.st_mode) and st.st_ino == d.get("inode")
                and st.st_dev == d.get("dev") and st.st_size == d.get("size")
                and st.st_mtime_ns == d.get("mtime_ns"))

    # -- deleting ------------------------------------------------------------------------------

    def remove(self, rec: Record) -> bool:
        """Delete a snapshot; the dump only if it is still the very file we wrote.

        Returns True when dump bytes were freed.
        """
        freed = False
        state = self.status(rec)
        if state == "capturing":
            return False
        if state == "present":
            os.unlink(rec.file, dir_fd=self._fd)
            freed = True
        elif state == "abandoned":
            self.abandon(Reservation(rec.id, rec.file, self.path_of(rec.file), rec.sidecar))
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(rec.sidecar, dir_fd=self._fd)
        return freed

    def disk(self) -> tuple[int, int]:
        """(file system size, bytes available to us)."""
        st = os.statvfs(self._fd)
        return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize

    def usage(self, records: list[Record] | None = None) -> int:
        """Bytes our present snapshots occupy (allocated blocks, as du counts)."""
        total = 0
        for rec in records if records is not None else self.records():
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(rec.file, dir_fd=self._fd)
                if self._owned(rec, st):
                    total += st.st_blocks * 512
        return total

    def enforce(self, retention: RetentionConfig, target_key: str | None = None,
                keep_for: Callable[[str], int] | None = None,
                protect: frozenset[str] = frozenset(), dry_run: bool = False) -> list[Record]:
        """Apply ``keep`` per target, then ``max_use`` and ``keep_free``; return what went.

        ``keep_for(target_key)`` gives a target's own keep (default: ``retention.keep``; 0 means
        no count limit). Victims for the size limits are the oldest snapshots of ``target_key``
        first, then the oldest of any target, as the issue asks; IDs in ``protect`` (the snapshot
        just written) are never removed.
        """
        removed: list[Record] = []
        records = [r for r in self.records() if r.state == "complete"]
        gone: set[str] = set()

        def drop(rec: Record) -> None:
            if not dry_run:
                self.remove(rec)
            removed.append(rec)
            gone.add(rec.id)

        groups: dict[str, list[Record]] = {}
        for rec in records:
            groups.setdefault(rec.target_key, []).append(rec)
        for key, recs in groups.items():
            limit = keep_for(key) if keep_for else retention.keep
            if limit > 0:
                for rec in recs[: max(0, len(recs) - limit)]:  # oldest first
                    if rec.id not in protect:
                        drop(rec)
        complete = [r for r in records if r.id not in protect]

        fs_size, _avail = self.disk()
        max_use = retention.max_use.resolve(fs_size) if retention.max_use else None
        keep_free = retention.keep_free.resolve(fs_size) if retention.keep_free else None
        if max_use is None and keep_free is None:
            return removed

        def order() -> list[Record]:
            left = [r for r in complete if r.id not in gone]
            mine = [r for r in left if target_key is not None and r.target_key == target_key]
            return mine + [r for r in left if r not in mine]

        def over() -> bool:
            if max_use is not None and self.usage() > max_use:
                return True
            return keep_free is not None and self.disk()[1] < keep_free

        if dry_run:
            # Simulate: count sizes instead of deleting.
            use = self.usage()
            avail = self.disk()[1]
            for rec in order():
                if not ((max_use is not None and use > max_use)
                        or (keep_free is not None and avail < keep_free)):
                    break
                size = rec.bytes_out
                use -= size
                avail += size
                drop(rec)
            return removed
        for rec in order():
            if not over():
                break
            drop(rec)
        return removed

    def prune_oldest_of(self, target_key: str, protect: frozenset[str] = frozenset()) -> \
            Record | None:
        """Remove the oldest complete snapshot of one target (disk-full recovery)."""
        for rec in self.records():
            if rec.target_key == target_key and rec.state == "complete" and rec.id not in protect:
                self.remove(rec)
                return rec
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
