"""Where snapshots are kept: the storage interface, retention over it, and opening a location.

A store holds snapshots (a dump plus its record, ``ID.EXT`` and ``ID.json``) and knows which of
them are its own. The interface below is what the commands, ``capture`` and the service use;
``DirectoryStore`` (agent/store_dir.py) is its first back end, an object store the next (issue
15). Retention (``enforce``) and disk-full recovery (``prune_oldest_of``) are written once, here,
on the interface.

A capture first reserves a name (a record with ``state = "capturing"``), then writes the dump,
then commits the record as ``complete``; a ``capturing`` record whose agent is gone marks an
abandoned capture, whose reserved names ``prune`` may clean up.
"""

from __future__ import annotations

import dataclasses
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kdumpling.errors import KdumplingError

from .record import SCHEMA, SnapshotRecord, iso_time, slug, utc_stamp

if TYPE_CHECKING:  # config imports the target registry, which imports the record module
    from kdumpling.sinks import Sink

    from .cancel import Cancel
    from .config import RetentionConfig

SIDECAR_SUFFIX = ".json"
DEFAULT_STORE = "/var/lib/kdumpling"

# What ``status`` says about a record.
PRESENT, MISSING, MODIFIED, CAPTURING, ABANDONED = (
    "present", "missing", "modified", "capturing", "abandoned")


def default_store_dir(configured: str | None) -> str:
    """The configured location; unset: /var/lib/kdumpling for root, else the XDG state dir."""
    if configured:
        return configured
    if os.geteuid() == 0:
        return DEFAULT_STORE
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                            "state")
    return os.path.join(base, "kdumpling")



def name_candidates(target_key: str, ext: str, when: float) -> Iterator[tuple[str, str, str]]:
    """(ID, dump name, record name) to try in turn when reserving: ``KEY-STAMP``, then
    ``KEY-STAMP-1`` ... (the same names in every back end)."""
    base = f"{slug(target_key)}-{utc_stamp(when)}"
    for n in range(1000):
        ident = base if n == 0 else f"{base}-{n}"
        yield ident, f"{ident}.{ext}", ident + SIDECAR_SUFFIX


def reserved_record(record: SnapshotRecord, ident: str, file: str, target_key: str,
                    when: float) -> SnapshotRecord:
    """The record a reservation writes: ``capturing``, by this host and agent."""
    import socket  # imported here: start-up time (issue 12)
    return dataclasses.replace(
        record, schema=SCHEMA, id=ident, file=file, state=CAPTURING, target_key=target_key,
        time=iso_time(when), time_unix=round(when, 3), host=socket.gethostname(),
        agent_pid=os.getpid())


def reservation_time(when: float | None) -> float:
    return time.time() if when is None else when

@dataclass
class Record:
    """One snapshot's record, as the store holds it."""

    id: str
    snapshot: SnapshotRecord
    sidecar: str  # the record's name within the store

    @property
    def file(self) -> str:
        return self.snapshot.file or ""

    @property
    def target_key(self) -> str:
        return self.snapshot.target_key or ""

    @property
    def time(self) -> float:
        return self.snapshot.time_or_zero

    @property
    def state(self) -> str:
        return self.snapshot.state or ""

    @property
    def bytes_out(self) -> int:
        return self.snapshot.bytes_out or 0


@dataclass
class Reservation:
    """Names reserved for one capture in progress."""

    id: str
    file: str  # dump name within the store
    path: str  # where write_dump writes the dump
    sidecar: str
    record: SnapshotRecord
    # A store that takes the dump as a stream (an object store's multipart upload) gives the
    # writer's sink here and how to hash what it stored; a directory leaves them None (a file).
    sink: Sink | None = None
    sha256: Callable[[], str] | None = None


class SnapshotStore(ABC):
    """A place that keeps snapshots and their records."""

    location: str  # what a user names it by (a directory path, later a URL)

    # -- capture ------------------------------------------------------------------------------

    @abstractmethod
    def lock_target(self, key: str) -> AbstractContextManager[bool]:
        """Yield True with the target's lock held, False if another capture holds it."""

    @abstractmethod
    def reserve(self, target_key: str, ext: str, record: SnapshotRecord,
                when: float | None = None) -> Reservation:
        """Pick a fresh ID and store the ``capturing`` record that reserves it."""

    @abstractmethod
    def commit(self, res: Reservation, record: SnapshotRecord) -> SnapshotRecord:
        """Store the finished capture's record (with what makes the dump ours); return it."""

    @abstractmethod
    def abandon(self, res: Reservation) -> None:
        """Remove what a failed or interrupted capture reserved."""

    @property
    @abstractmethod
    def spool_dir(self) -> str:
        """A local directory for temporary files of a capture into this store."""

    # -- reading ------------------------------------------------------------------------------

    @abstractmethod
    def records(self) -> list[Record]:
        """Every record of ours, oldest first."""

    @abstractmethod
    def path_of(self, name: str) -> str:
        """Where a name within the store is, for people and for readers."""

    @abstractmethod
    def status(self, rec: Record) -> str:
        """present, missing, modified (not the dump we wrote), capturing or abandoned."""

    # -- deleting and space -------------------------------------------------------------------

    @abstractmethod
    def remove(self, rec: Record) -> bool:
        """Delete a snapshot (the dump only if it is still ours); True when bytes were freed."""

    @abstractmethod
    def usage(self) -> int:
        """Bytes our present snapshots occupy."""

    @abstractmethod
    def capacity(self) -> tuple[int, int] | None:
        """(size, bytes available) of the file system; None where there is none to measure."""

    @abstractmethod
    def close(self) -> None:
        """Release what the store holds open."""

    def __enter__(self) -> SnapshotStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- written once for every back end ------------------------------------------------------

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
        raise KdumplingError(f"no snapshot {ident!r} in {self.location}")

    def enforce(self, retention: RetentionConfig, target_key: str | None = None,
                keep_for: Callable[[str], int] | None = None,
                protect: frozenset[str] = frozenset(), dry_run: bool = False) -> list[Record]:
        """Apply ``keep`` per target, then ``max_use`` and ``keep_free``; return what went.

        ``keep_for(target_key)`` gives a target's own keep (default: ``retention.keep``; 0 means
        no count limit). Victims for the size limits are the oldest snapshots of ``target_key``
        first, then the oldest of any target; IDs in ``protect`` (the snapshot just written) are
        never removed.
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

        cap = self.capacity()
        fs_size = cap[0] if cap is not None else 0
        # a percentage needs a file system to be a percentage of (an object store has none)
        max_use = (retention.max_use.resolve(fs_size) if retention.max_use
                   and (cap is not None or retention.max_use.bytes is not None) else None)
        keep_free = (retention.keep_free.resolve(fs_size)
                     if retention.keep_free and cap is not None else None)
        if max_use is None and keep_free is None:
            return removed

        def order() -> list[Record]:
            left = [r for r in complete if r.id not in gone]
            mine = [r for r in left if target_key is not None and r.target_key == target_key]
            return mine + [r for r in left if r not in mine]

        def available() -> int:
            now = self.capacity()
            return now[1] if now is not None else 0

        use, avail = self.usage(), available()
        for rec in order():
            if not ((max_use is not None and use > max_use)
                    or (keep_free is not None and avail < keep_free)):
                break
            drop(rec)
            if dry_run:  # simulate: count sizes instead of deleting
                use -= rec.bytes_out
                avail += rec.bytes_out
            else:
                use, avail = self.usage(), available()
        return removed

    def prune_oldest_of(self, target_key: str, protect: frozenset[str] = frozenset()) -> \
            Record | None:
        """Remove the oldest complete snapshot of one target (disk-full recovery)."""
        for rec in self.records():
            if rec.target_key == target_key and rec.state == "complete" and rec.id not in protect:
                self.remove(rec)
                return rec
        return None


def open_store(location: str, create: bool = False, spool: bool = False,
               cancel: Cancel | None = None) -> SnapshotStore:
    """The store at ``location``: a directory path, or ``s3://BUCKET/PREFIX/`` (agent/store_s3.py;
    ``spool``: write the dump locally first, then upload it; ``cancel`` also stops the upload
    and the read-back that follow the write)."""
    if location.startswith("s3://"):
        from .store_s3 import S3Store

        return S3Store(location, create=create, spool=spool, cancel=cancel)
    from .store_dir import DirectoryStore  # the back end imports this module's interface

    return DirectoryStore(location, create=create)
