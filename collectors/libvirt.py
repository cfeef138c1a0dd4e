"""Capture a libvirt domain's memory, streamed through a FIFO into the writer.

``virDomainCoreDumpWithFormat(path, VIR_DOMAIN_CORE_DUMP_FORMAT_RAW, VIR_DUMP_MEMORY_ONLY)`` makes
the daemon, not us, open ``path``: libvirtd opens a non-regular file with O_WRONLY (no O_CREAT,
no unlink), hands it to its iohelper and lets QEMU's ``dump-guest-memory`` stream the ELF vmcore
into it without ever seeking. So ``path`` is a FIFO we created (0600 in a private 0700 directory)
and we read the dump from its other end while the daemon writes it.

Facts that shape the code (measured with libvirt 9.0 / QEMU 7.2, see the project docs):

* libvirt pauses the guest *before* it opens the path, and open(2) on a FIFO blocks until a
  reader exists: the read end must be open before the call, or the guest stays paused and the
  domain locked. We open it O_RDONLY|O_NONBLOCK, which succeeds at once, and wait with poll(2)
  for the first data (a FIFO reader that never had a writer gets no POLLHUP).
* The guest stays paused until the last byte is read (stream mode: pause = conversion time);
  ``spool=DIR`` copies the stream to an anonymous file first, zero pages as holes (pause = the
  time to read the stream), and converts from there. ``dump_format="kdump-zlib"`` asks libvirt
  for QEMU's compressed dump instead (spool only): the pause is libvirt's own kdump-zlib dump.
* Closing the read end early makes the iohelper die of SIGPIPE; libvirt fails the call and
  resumes the guest. That is how a capture is stopped. ``abortJob()`` is not used: called while
  nobody drained the FIFO it blocked (20 minutes once, in test_libvirt_abort), waiting on the
  very dump it was to stop.

Nothing of dump size is ever left on disk: the FIFO holds no data, and the spool file has no name.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from kdumpling.errors import (
    KdumplingError,
    PermissionDeniedError,
    TargetGoneError,
    UsageError,
)

from ._stream import DumpStream, StreamedDumpCollector
from .base import Snapshot

_UUID = re.compile(r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?"
                   r"[0-9a-fA-F]{12}$")


class LibvirtCaptureError(KdumplingError):
    """libvirt refused or failed the dump."""

    exit_code = 74


def _libvirt() -> Any:
    try:
        import libvirt
    except ImportError as err:
        raise UsageError("the libvirt collector needs libvirt-python: "
                         "pip install 'kdumpling[libvirt]' (or apt install python3-libvirt)"
                         ) from err
    return libvirt


def translate_error(err: BaseException, what: str) -> KdumplingError:
    """A libvirtError as one of our errors (exit codes by class)."""
    lv = _libvirt()
    if not isinstance(err, lv.libvirtError):
        return LibvirtCaptureError(f"{what}: {err}")
    code = err.get_error_code()
    msg = f"{what}: {err.get_error_message() or err}"
    if code in (lv.VIR_ERR_NO_DOMAIN, getattr(lv, "VIR_ERR_NO_DOMAIN_SNAPSHOT", -1)):
        return TargetGoneError(msg)
    if code in (lv.VIR_ERR_ACCESS_DENIED, lv.VIR_ERR_AUTH_FAILED,
                getattr(lv, "VIR_ERR_AUTH_CANCELLED", -1), getattr(lv, "VIR_ERR_AUTH_UNAVAILABLE",
                                                                    -1)):
        return PermissionDeniedError(msg)
    text = str(err)
    if "Permission denied" in text or "authentication" in text.lower():
        return PermissionDeniedError(msg)
    if code == lv.VIR_ERR_OPERATION_INVALID and "not running" in text:
        return TargetGoneError(msg)
    if code in (lv.VIR_ERR_NO_CONNECT, lv.VIR_ERR_SYSTEM_ERROR, lv.VIR_ERR_RPC):
        return TargetGoneError(msg)
    if code in (lv.VIR_ERR_INVALID_ARG, lv.VIR_ERR_OPERATION_UNSUPPORTED, lv.VIR_ERR_NO_SUPPORT,
                lv.VIR_ERR_ARGUMENT_UNSUPPORTED):
        return LibvirtCaptureError(f"{msg} (the hypervisor driver cannot write memory-only dumps)")
    return LibvirtCaptureError(msg)


def _quiet(*_: object) -> None:  # libvirt prints every error to stderr unless told otherwise
    return None


class LibvirtCollector(StreamedDumpCollector):
    """Context manager: ``with LibvirtCollector("vm1") as snap: write_dump(snap.image, out)``.

    ``domain`` is a name or a UUID. ``progress(done, total)`` gets libvirt's job counters from a
    helper thread. After the block ``snap.pause_seconds`` holds the guest's pause: the time the
    dump call took, which libvirt brackets with its own pause and resume.
    """

    def __init__(self, domain: str, uri: str = "qemu:///system", spool: str | None = None, *,
                 progress: Callable[[int, int], None] | None = None,
                 memory_only: bool = True, start_timeout: float = 120.0,
                 dump_format: str = "elf") -> None:
        super().__init__(spool, dump_format)
        self.domain_name = domain
        self.uri = uri
        self.progress = progress
        self.memory_only = memory_only
        self.start_timeout = start_timeout
        self._conn: Any = None
        self._dom: Any = None
        self._tmpdir: str | None = None
        self._fifo: str | None = None
        self._thread: threading.Thread | None = None
        self._call_error: BaseException | None = None
        self._call_started = 0.0
        self._call_ended = 0.0
        self._call_done = threading.Event()
        self._was_running = True

    # -- the capture ----------------------------------------------------------------------------
    def _lookup(self) -> Any:
        lv = _libvirt()
        lv.registerErrorHandler(_quiet, None)
        try:
            self._conn = lv.open(self.uri)
        except lv.libvirtError as err:
            raise translate_error(err, f"cannot connect to {self.uri}") from err
        try:
            if _UUID.match(self.domain_name):
                return self._conn.lookupByUUIDString(self.domain_name)
            return self._conn.lookupByName(self.domain_name)
        except lv.libvirtError as err:
            raise translate_error(err, f"domain {self.domain_name!r} on {self.uri}") from err

    def _enter(self) -> Snapshot:
        lv = _libvirt()
        dom = self._dom = self._lookup()
        try:
            state, _reason = dom.state()
            max_kib = int(dom.maxMemory())
        except lv.libvirtError as err:
            raise translate_error(err, f"domain {self.domain_name!r}") from err
        if state not in (lv.VIR_DOMAIN_RUNNING, lv.VIR_DOMAIN_PAUSED):
            raise TargetGoneError(f"domain {self.domain_name!r} is not running (state {state})")
        self._was_running = state == lv.VIR_DOMAIN_RUNNING
        self._open_spool(max_kib * 1024)

        # Private 0700 directory, 0600 FIFO: only root (libvirtd) and we can open it.
        self._tmpdir = tempfile.mkdtemp(prefix="kdumpling-libvirt-")
        self._fifo = os.path.join(self._tmpdir, "dump.fifo")
        os.mkfifo(self._fifo, 0o600)
        rfd = os.open(self._fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self._stream = DumpStream(rfd, f"libvirt dump of {self.domain_name}")

        flags = lv.VIR_DUMP_MEMORY_ONLY if self.memory_only else 0
        fmt = (lv.VIR_DOMAIN_CORE_DUMP_FORMAT_RAW if self.dump_format == "elf"
               else lv.VIR_DOMAIN_CORE_DUMP_FORMAT_KDUMP_ZLIB)
        self._thread = threading.Thread(target=self._call, args=(fmt, flags), daemon=True,
                                        name="kdumpling-libvirt-dump")
        self._thread.start()
        self._wait_for_writer(rfd)
        os.set_blocking(rfd, True)
        threading.Thread(target=self._watch, daemon=True, name="kdumpling-libvirt-progress"
                         ).start()

        meta: dict[str, object] = {"collector": "libvirt", "uri": self.uri, "domain": dom.name(),
                                   "uuid": dom.UUIDString(),
                                   "mode": "spool" if self.spool else "stream",
                                   "dump_format": self.dump_format}
        snap = self._read_dump(f"libvirt domain {dom.name()} ({self.uri})", meta)
        if not self._was_running:
            snap.warnings.append("the domain was already paused")
        return snap

    def _dump_finished(self) -> float | None:
        self._join_call(raise_error=True)
        return self._pause()

    def _call(self, fmt: int, flags: int) -> None:
        self._call_started = time.monotonic()
        try:
            self._dom.coreDumpWithFormat(self._fifo, fmt, flags)
        except BaseException as err:
            self._call_error = err
        finally:
            self._call_ended = time.monotonic()
            self._call_done.set()

    def _wait_for_writer(self, rfd: int) -> None:
        """Block until the daemon's writer has sent data (or hung up, or the call failed)."""
        poller = select.poll()
        poller.register(rfd, select.POLLIN | select.POLLHUP)
        deadline = time.monotonic() + self.start_timeout
        while True:
            if poller.poll(100):
                return
            if self._call_done.is_set():
                if self._stream is not None and self._stream._abort.is_set():
                    break
                self._join_call(raise_error=True)
                # The call returned without writing anything we could see.
                return
            if self._stream is not None and self._stream._abort.is_set():
                break
            if time.monotonic() > deadline:
                raise LibvirtCaptureError(
                    f"libvirt did not start writing the dump of {self.domain_name} within "
                    f"{self.start_timeout:.0f} s")
        from kdumpling.errors import CaptureInterrupted

        raise CaptureInterrupted("the capture was aborted")

    def _watch(self) -> None:
        """Progress from virDomainGetJobStats until the call returns (helper thread)."""
        lv = _libvirt()
        while not self._call_done.wait(0.25):
            if self.progress is None:
                continue
            try:
                stats = self._dom.jobStats()
            except lv.libvirtError:
                continue
            total = int(stats.get("memory_total") or stats.get("data_total") or 0)
            done = int(stats.get("memory_processed") or stats.get("data_processed") or 0)
            if total:
                self.progress(done, total)

    def _join_call(self, *, raise_error: bool) -> None:
        if self._thread is None:
            return
        self._thread.join()
        err = self._call_error
        self._call_error = None
        if err is not None and raise_error:
            raise translate_error(err, f"dump of domain {self.domain_name!r}") from err

    def _pause(self) -> float | None:
        if not self._was_running or not self._call_done.is_set():
            return None
        return self._call_ended - self._call_started

    # -- release ---------------------------------------------------------------------------------
    def _cleanup(self, *, failed: bool) -> None:
        snap = self._snapshot
        try:
            # Closing early stops the dump: the iohelper gets EPIPE/SIGPIPE if still writing.
            self._end_stream(drain=not failed and bool(self._call_started))
            if self._thread is not None:
                self._thread.join(120)
                err = self._call_error
                self._call_error = None
                if err is not None and not failed:
                    error = translate_error(err, f"dump of domain {self.domain_name!r}")
                    if not self._dump_failure_kept(error):
                        raise error from err
            if not failed:
                self._note_short_stream()
            if snap is not None and snap.pause_seconds is None:
                snap.pause_seconds = self._pause()
        finally:
            self._close_spool()
            if self._tmpdir is not None:
                shutil.rmtree(self._tmpdir, ignore_errors=True)
                self._tmpdir = None
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.close()
                self._conn = None
