"""An S3-compatible bucket as a snapshot store: the second back end of agent/store.py (issue 15).

Layout under ``s3://BUCKET/PREFIX/`` (flat, as the snapshot directory)::

    PREFIX/web-20261126T033900Z.core   the dump: the ordinary ELF or kdump-compressed file
    PREFIX/web-20261126T033900Z.json   its record, the same JSON as on disk (sha256 of the
                                       object's bytes; size and ETag instead of inode and mtime)

A capture reserves its name with a ``capturing`` record that also names the open multipart
upload (``upload_id``), so ``prune`` can abort the upload of an agent that was killed. The dump
is streamed into the upload while it is written (agent/s3_client.MultipartUpload), or, with
``spool``, written to a local file first (the target is released as soon as it is local), then
uploaded and the local copy removed. ``SingleObjectStore`` is ``-o s3://BUCKET/KEY``: one
object, no record, as ``-o FILE``.

Ownership: only an object whose size and ETag match its record is deleted. There is no free
space to keep in a bucket (``capacity`` is None): ``keep`` and ``max_use`` apply, ``keep_free``
does not; bucket lifecycle rules are the usual retention there (README).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

from kdumpling.dump import INCOMPLETE_SUFFIX
from kdumpling.errors import UsageError

from .cancel import Cancel
from .record import SnapshotRecord
from .s3_client import (
    MultipartUpload,
    S3Url,
    abort_upload,
    check_bucket,
    head,
    make_client,
    not_found,
    s3_errors,
    sha256_object,
    translate,
    upload_file,
)
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
    default_store_dir,
    name_candidates,
    reservation_time,
    reserved_record,
)
from .store_dir import record_from_json

# A capturing record from another host cannot be checked for a live agent: after this long it
# counts as abandoned.
FOREIGN_CAPTURE_LIMIT = 24 * 3600.0


def spool_directory() -> str:
    """Where ``--spool`` keeps the dump until it is uploaded: KDUMPLING_SPOOL_DIR, else the local
    snapshot directory (/var/lib/kdumpling for root), never TMPDIR (it may be small)."""
    return os.environ.get("KDUMPLING_SPOOL_DIR") or default_store_dir(None)


def _spool_path(ident: str, pid: int) -> str:
    return os.path.join(spool_directory(), f".{ident}.{pid}.spool")


class S3Store(SnapshotStore):
    """Snapshots under one prefix of a bucket."""

    def __init__(self, url: str, create: bool = False, spool: bool = False,
                 client: Any = None, cancel: Cancel | None = None) -> None:
        parsed = S3Url.parse(url if url.endswith("/") else url + "/")
        self.url = parsed
        self.prefix = parsed.key
        self.location = str(parsed)
        self.spool = spool
        # SIGTERM/SIGINT also stop what follows the write: the spool's upload, the read-back
        self.check_cancel: Callable[[], None] = cancel.check if cancel else lambda: None
        self.client = client if client is not None else make_client()
        check_bucket(self.client, parsed)  # 73/77/69 now, before any target stops

    def _url(self, name: str) -> S3Url:
        return S3Url(self.url.bucket, self.prefix + name)

    def path_of(self, name: str) -> str:
        return str(self._url(name))

    @property
    def spool_dir(self) -> str:
        path = spool_directory()
        os.makedirs(path, mode=0o700, exist_ok=True)
        return path

    def close(self) -> None:
        pass

    # -- locking: one capture of a target at a time on this host -----------------------------

    @contextlib.contextmanager
    def lock_target(self, key: str) -> Iterator[bool]:
        digest = hashlib.sha256(f"{self.location}\0{key}".encode()).hexdigest()[:24]
        # beside the spool (the local snapshot directory), as the directory store keeps them
        directory = os.path.join(self.spool_dir, ".locks")
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(directory, digest + ".lock"),
                     os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    # -- writing ------------------------------------------------------------------------------

    def _put_record(self, name: str, record: SnapshotRecord) -> None:
        payload = (json.dumps(record.to_json(), indent=2, sort_keys=True) + "\n").encode()
        url = self._url(name)
        with s3_errors(f"cannot store the record {url}"):
            self.client.put_object(Bucket=url.bucket, Key=url.key, Body=payload,
                                   ContentType="application/json")

    def _delete(self, name: str) -> None:
        url = self._url(name)
        with s3_errors(f"cannot delete {url}"):
            self.client.delete_object(Bucket=url.bucket, Key=url.key)

    def reserve(self, target_key: str, ext: str, record: SnapshotRecord,
                when: float | None = None) -> Reservation:
        if ext == "kdump-flat":
            raise UsageError("an object store holds the kdump file itself; use --format kdump")
        when = reservation_time(when)
        for ident, file, sidecar in name_candidates(target_key, ext, when):
            if head(self.client, self._url(sidecar)) or head(self.client, self._url(file)):
                continue
            reserved = reserved_record(record, ident, file, target_key, when)
            return self._open(ident, file, sidecar, reserved)
        raise UsageError(f"cannot find a free snapshot name for {target_key} in {self.location}")

    def _open(self, ident: str, file: str, sidecar: str, reserved: SnapshotRecord) \
            -> Reservation:
        if self.spool:
            os.makedirs(spool_directory(), mode=0o700, exist_ok=True)
            path = _spool_path(ident, os.getpid())
            self._put_record(sidecar, reserved)
            return Reservation(ident, file, path, sidecar, reserved)
        upload = MultipartUpload(self.client, self._url(file))
        reserved.extra["upload_id"] = upload.upload_id
        try:
            self._put_record(sidecar, reserved)
        except BaseException:
            upload.abort()
            raise
        res = Reservation(ident, file, self.path_of(file), sidecar, reserved)
        res.sink = upload
        res.sha256 = lambda: sha256_object(self.client, upload.url, self.check_cancel)[0]
        return res

    def commit(self, res: Reservation, record: SnapshotRecord) -> SnapshotRecord:
        """Upload a spooled dump (then remove it); store the record with the object's size and
        ETag, what makes the object ours to delete. On failure or cancellation nothing of the
        capture stays."""
        try:
            return self._commit(res, record)
        except BaseException:
            self.abandon(res)
            if self.spool:  # the object may be whole already
                with contextlib.suppress(Exception):
                    self._delete(res.file)
            raise

    def _commit(self, res: Reservation, record: SnapshotRecord) -> SnapshotRecord:
        url = self._url(res.file)
        if self.spool:
            upload_file(self.client, res.path, url, self.check_cancel)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(res.path)
        meta = head(self.client, url)
        if meta is None:
            raise UsageError(f"{url} vanished before its record was written")
        r = res.record
        extra = {k: v for k, v in record.extra.items() if k != "upload_id"}
        extra["etag"] = str(meta.get("ETag", ""))
        done = dataclasses.replace(
            record, schema=r.schema, id=r.id, file=r.file, host=r.host, time=r.time,
            time_unix=r.time_unix, state="complete", agent_pid=None,
            size=int(meta.get("ContentLength", 0)), extra=extra)
        self._put_record(res.sidecar, done)
        return done

    def abandon(self, res: Reservation) -> None:
        sink = res.sink
        if isinstance(sink, MultipartUpload):
            sink.abort()
            if sink.completed:  # the error came after the object was whole: it goes too
                with contextlib.suppress(Exception):
                    self._delete(res.file)
        upload_id = res.record.extra.get("upload_id")
        if isinstance(upload_id, str) and sink is None:
            abort_upload(self.client, self._url(res.file), upload_id)
        spooled = [res.path] if self.spool else []
        pid = res.record.agent_pid
        if pid is not None and res.record.host == socket.gethostname():
            spooled.append(_spool_path(res.id, pid))  # a killed agent's spooled copy
        for path in spooled:
            for name in (path, path + INCOMPLETE_SUFFIX):
                with contextlib.suppress(OSError):
                    os.unlink(name)
        with contextlib.suppress(Exception):
            self._delete(res.sidecar)

    # -- reading ------------------------------------------------------------------------------

    def _list(self) -> Iterator[dict[str, Any]]:
        with s3_errors(f"cannot list {self.location}"):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.url.bucket, Prefix=self.prefix, Delimiter="/")
            for page in pages:
                yield from page.get("Contents", [])

    def records(self) -> list[Record]:
        out: list[Record] = []
        for obj in self._list():
            name = str(obj["Key"])[len(self.prefix):]
            if not name.endswith(SIDECAR_SUFFIX) or name.startswith("."):
                continue
            rec = self._read_record(name)
            if rec is not None:
                out.append(rec)
        out.sort(key=lambda r: (r.time, r.id))
        return out

    def _read_record(self, name: str) -> Record | None:
        url = self._url(name)
        try:
            reply = self.client.get_object(Bucket=url.bucket, Key=url.key)
            data = json.loads(reply["Body"].read(1 << 20))
        except ValueError:
            return None
        except Exception as err:
            if not_found(err):
                return None
            raise translate(err, str(url)) from err
        return record_from_json(data, name)

    def status(self, rec: Record) -> str:
        snap = rec.snapshot
        if rec.state == CAPTURING:
            return ABANDONED if _abandoned(snap) else CAPTURING
        meta = head(self.client, self._url(rec.file))
        if meta is None:
            return MISSING
        return PRESENT if _owned(snap, meta) else MODIFIED

    # -- deleting and space -------------------------------------------------------------------

    def remove(self, rec: Record) -> bool:
        state = self.status(rec)
        if state == CAPTURING:
            return False
        if state == ABANDONED:
            self.abandon(Reservation(rec.id, rec.file, self.path_of(rec.file), rec.sidecar,
                                     rec.snapshot))
            return False
        freed = state == PRESENT
        if freed:
            self._delete(rec.file)
        self._delete(rec.sidecar)
        return freed

    def usage(self) -> int:
        """Bytes of our present snapshots (what the bucket bills)."""
        sizes = {str(o["Key"])[len(self.prefix):]: (int(o.get("Size", 0)), str(o.get("ETag")))
                 for o in self._list()}
        total = 0
        for rec in self.records():
            size, etag = sizes.get(rec.file, (None, None))
            if size is not None and size == rec.snapshot.size and \
                    etag == rec.snapshot.extra.get("etag"):
                total += size
        return total

    def capacity(self) -> tuple[int, int] | None:
        return None  # a bucket has no size to keep free


def _owned(snap: SnapshotRecord, meta: dict[str, Any]) -> bool:
    return (int(meta.get("ContentLength", -1)) == snap.size
            and str(meta.get("ETag")) == snap.extra.get("etag"))


def _abandoned(snap: SnapshotRecord) -> bool:
    """A capturing record whose agent is gone (this host), or too old (another host)."""
    if snap.host == socket.gethostname() and snap.agent_pid is not None:
        try:
            os.kill(snap.agent_pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    return time.time() - snap.time_or_zero > FOREIGN_CAPTURE_LIMIT


class SingleObjectStore(S3Store):
    """``-o s3://BUCKET/KEY``: the dump is that one object, without a record (as ``-o FILE``)."""

    def __init__(self, url: str, force: bool = False, spool: bool = False,
                 client: Any = None, cancel: Cancel | None = None) -> None:
        target = S3Url.parse(url)
        directory, _, self.key_name = target.key.rpartition("/")
        super().__init__(f"s3://{target.bucket}/{directory}", spool=spool, client=client,
                         cancel=cancel)
        self.force = force

    def reserve(self, target_key: str, ext: str, record: SnapshotRecord,
                when: float | None = None) -> Reservation:
        if ext == "kdump-flat":
            raise UsageError("an object store holds the kdump file itself; use --format kdump")
        if not self.force and head(self.client, self._url(self.key_name)) is not None:
            raise UsageError(f"{self.path_of(self.key_name)} exists; use --force to replace it")
        return self._open("", self.key_name, "", record)

    def _put_record(self, name: str, record: SnapshotRecord) -> None:
        pass  # one object, no record

    def _delete(self, name: str) -> None:
        if name:
            super()._delete(name)

    def commit(self, res: Reservation, record: SnapshotRecord) -> SnapshotRecord:
        done = super().commit(res, record)
        done.state = done.id = done.file = done.schema = None
        done.extra.pop("etag", None)
        return done

    def records(self) -> list[Record]:
        return []


def locate_object(url: str) -> tuple[Record | None, S3Store]:
    """``s3://BUCKET/PREFIX/ID.EXT`` (or ``.../ID``): its record, if it has one, and its store."""
    target = S3Url.parse(url)
    if target.is_prefix:
        raise UsageError(f"{url}: name one object (s3://BUCKET/KEY), not a prefix")
    directory, _, name = target.key.rpartition("/")
    store = S3Store(f"s3://{target.bucket}/{directory}")
    ident = name.rsplit(".", 1)[0] if "." in name else name
    rec = store._read_record(ident + SIDECAR_SUFFIX)
    if rec is not None and name in (rec.file, ident):
        return rec, store
    if head(store.client, target) is None:
        raise UsageError(f"no such object: {url}")
    return None, store
