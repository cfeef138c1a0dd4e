"""The snapshot directory: the first back end of the storage interface (agent/store.py).

Layout (flat, like /var/lib/systemd/coredump)::

    /var/lib/kdumpling/            0700, never a symlink
      web-20261126T033900Z.core    0600 dump, written by write_dump as NAME.incomplete + rename
      web-20261126T033900Z.json    0600 record: target, time, format, codec, sizes, sha256, ...
      .locks/web.lock              flock: one capture of a target at a time, across processes

Ownership rule: the store only ever deletes a dump that a record of ours describes *and* whose
lstat() still matches the device, inode, size and mtime recorded when it was written; anything
else in the directory (a file someone copied in, a dump replaced or edited behind our back, a
symlink) is left alone. Every name is opened relative to the directory's descriptor with
O_NOFOLLOW, so a symlink swapped in later cannot redirect a write or a delete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import stat
import threading
from collections.abc import Iterator

from kdumpling.errors import DumpWriteError, KdumplingError, PermissionDeniedError

from .record import SCHEMA, SnapshotRecord, slug
from .store import (
    ABANDONED,
    CAPTURING,
    MISSING,
    MODIFIED,
    PRESENT,
    SIDECAR_SUFFIX,
    Record,
    Reservation,
    SnapshotStore,
    name_candidates,
    reservation_time,
    reserved_record,
)

_MAX_RECORD = 1 << 20


class DirectoryStore(SnapshotStore):
    """A snapshot directory opened without following symlinks."""

    def __init__(self, directory: str, create: bool = True) -> None:
        self.directory = os.path.abspath(directory)
        self.location = self.directory
        self._fd = self._open(create)

    # -- opening ------------------------------------------------------------------------------

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

    def path_of(self, name: str) -> str:
        return os.path.join(self.directory, name)

    @property
    def spool_dir(self) -> str:
        return self.directory  # the spool file is anonymous (O_TMPFILE) on our file system

    # -- locking ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock_target(self, key: str) -> Iterator[bool]:
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

    # -- writing ------------------------------------------------------------------------------

    def _exists(self, name: str) -> bool:
        try:
            os.lstat(name, dir_fd=self._fd)
        except FileNotFoundError:
            return False
        return True

    def reserve(self, target_key: str, ext: str, record: SnapshotRecord,
                when: float | None = None) -> Reservation:
        when = reservation_time(when)
        for ident, file, sidecar in name_candidates(target_key, ext, when):
            if self._exists(file) or self._exists(file + ".incomplete"):
                continue
            reserved = reserved_record(record, ident, file, target_key, when)
            try:
                self._write_json(sidecar, reserved, exclusive=True)
            except FileExistsError:
                continue
            return Reservation(ident, file, self.path_of(file), sidecar, reserved)
        raise DumpWriteError(f"cannot find a free snapshot name for {target_key} in "
                             f"{self.directory}")

    def commit(self, res: Reservation, record: SnapshotRecord) -> SnapshotRecord:
        """The dump's identity (dev, inode, size, mtime) makes it ours to delete."""
        st = os.lstat(res.file, dir_fd=self._fd)
        r = res.record
        done = dataclasses.replace(
            record, schema=r.schema, id=r.id, file=r.file, host=r.host, time=r.time,
            time_unix=r.time_unix, state="complete", agent_pid=None, dev=st.st_dev,
            inode=st.st_ino, size=st.st_size, mtime_ns=st.st_mtime_ns)
        self._write_json(res.sidecar, done, exclusive=False)
        return done

    def abandon(self, res: Reservation) -> None:
        for name in (res.file + ".incomplete", res.file):
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(name, dir_fd=self._fd)
                if stat.S_ISREG(st.st_mode):
                    os.unlink(name, dir_fd=self._fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(res.sidecar, dir_fd=self._fd)

    def _write_json(self, name: str, record: SnapshotRecord, exclusive: bool) -> None:
        """Write a record whole under a temporary name, then put it in place: link() for a new
        (exclusive) name, which fails if the name exists, rename() otherwise. Readers never see
        a half-written or empty record."""
        payload = (json.dumps(record.to_json(), indent=2, sort_keys=True) + "\n").encode()
        tmp = f"{name}.{os.getpid()}.{threading.get_ident()}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(tmp, flags, 0o600, dir_fd=self._fd)
        except OSError as err:
            raise DumpWriteError.from_oserror(err, self.path_of(tmp)) from err
        try:
            try:
                view = memoryview(payload)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            if exclusive:
                os.link(tmp, name, src_dir_fd=self._fd, dst_dir_fd=self._fd,
                        follow_symlinks=False)
            else:
                os.rename(tmp, name, src_dir_fd=self._fd, dst_dir_fd=self._fd)
        except FileExistsError:
            raise
        except OSError as err:
            raise DumpWriteError.from_oserror(err, self.path_of(name)) from err
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=self._fd)
        with contextlib.suppress(OSError):
            os.fsync(self._fd)

    # -- reading ------------------------------------------------------------------------------

    def records(self) -> list[Record]:
        out: list[Record] = []
        for name in os.listdir(self._fd):
            if not name.endswith(SIDECAR_SUFFIX) or name.startswith("."):
                continue
            rec = self._read_record(name)
            if rec is not None:
                out.append(rec)
        out.sort(key=lambda r: (r.time, r.id))
        return out

    def _read_record(self, name: str) -> Record | None:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._fd)
        except OSError:
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            with os.fdopen(os.dup(fd), "rb") as f:
                data = json.loads(f.read(_MAX_RECORD))
        except (OSError, ValueError):
            return None
        finally:
            os.close(fd)
        return record_from_json(data, name)

    def status(self, rec: Record) -> str:
        if rec.state == CAPTURING:
            pid = rec.snapshot.agent_pid
            return CAPTURING if pid is not None and _pid_alive(pid) else ABANDONED
        try:
            st = os.lstat(rec.file, dir_fd=self._fd)
        except FileNotFoundError:
            return MISSING
        return PRESENT if self._owned(rec, st) else MODIFIED

    @staticmethod
    def _owned(rec: Record, st: os.stat_result) -> bool:
        s = rec.snapshot
        # Inode numbers are reused at once after an unlink; the mtime tells a new file apart.
        return (stat.S_ISREG(st.st_mode) and st.st_ino == s.inode and st.st_dev == s.dev
                and st.st_size == s.size and st.st_mtime_ns == s.mtime_ns)

    # -- deleting and space -------------------------------------------------------------------

    def remove(self, rec: Record) -> bool:
        freed = False
        state = self.status(rec)
        if state == CAPTURING:
            return False
        if state == PRESENT:
            os.unlink(rec.file, dir_fd=self._fd)
            freed = True
        elif state == ABANDONED:
            self.abandon(Reservation(rec.id, rec.file, self.path_of(rec.file), rec.sidecar,
                                     rec.snapshot))
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(rec.sidecar, dir_fd=self._fd)
        return freed

    def capacity(self) -> tuple[int, int]:
        st = os.statvfs(self._fd)
        return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize

    def usage(self) -> int:
        """Allocated blocks of our present snapshots, as du counts them."""
        total = 0
        for rec in self.records():
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(rec.file, dir_fd=self._fd)
                if self._owned(rec, st):
                    total += st.st_blocks * 512
        return total


def record_from_json(data: object, name: str) -> Record | None:
    """A record of ours named ``name``, or None for any other JSON."""
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        return None
    snap = SnapshotRecord.from_json(data)
    ident = snap.id or ""
    if ident + SIDECAR_SUFFIX != name or "/" in (snap.file or "/"):
        return None
    return Record(ident, snap, name)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


Store = DirectoryStore  # the name the store had before the storage interface
