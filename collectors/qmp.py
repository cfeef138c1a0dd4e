"""Capture a QEMU guest's memory over QMP, streamed through a pipe into the writer.

``dump-guest-memory`` (QEMU qapi/dump.json) with ``protocol: "fd:NAME"`` writes into a descriptor
handed over earlier with ``getfd`` (SCM_RIGHTS). We hand it the write end of a pipe, close our
copy of that end (otherwise the read end never sees EOF) and read the ELF vmcore from the other
end while QEMU writes it: ``paging: false`` (physical memory, one PT_LOAD per guest RAM block,
ascending), ``format: "elf"``, ``detach: true`` so the monitor stays free for ``query-dump``.

QEMU stops the guest (STOP event, run state ``save-vm``) when the command is accepted and resumes
it (RESUME) right after DUMP_COMPLETED, which comes only after the last byte was written, so
the guest's pause is as long as our reading (dump/dump.c: dump_init vm_stop, dump_cleanup
vm_start). Two modes:

* stream (default): the Snapshot's segments read the pipe itself; the caller's ``write_dump``
  converts while QEMU streams, and the pause is the conversion time. No copy on disk.
* spool (``spool=DIR``): the stream is copied into an anonymous file in DIR first, zero pages left
  as holes (pause = reading the stream), then converted from there while the guest runs; the
  spool file never has a name, so it is gone when the collector exits, however it exits.
  With ``dump_format="kdump-zlib"`` QEMU compresses (zero pages excluded) and the spool holds
  its rebuilt flattened kdump: the pause is exactly QEMU's own kdump-zlib dump, and the spool
  only the compressed size.

The guest's pause is measured from QEMU's own STOP/RESUME event timestamps.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from kdumpling.errors import KdumplingError, TargetGoneError, UsageError

from ._qmp import QmpClient, QmpError, QmpEvent, pipe_cloexec, set_pipe_size
from ._stream import DumpStream, StreamedDumpCollector
from .base import Snapshot

PIPE_SIZE = 1 << 20  # a 1 MiB pipe halves the pause against the 64 KiB default (measured)


class DumpFailedError(KdumplingError):
    """QEMU reported that the guest-memory dump failed."""

    exit_code = 74


class QmpCollector(StreamedDumpCollector):
    """Context manager: ``with QmpCollector(sock) as snap: write_dump(snap.image, out)``.

    After the block, ``snap.pause_seconds`` holds the guest's pause (in stream mode it is only
    known once the writer has read the last byte). ``progress(done, total)`` is called with
    QEMU's ``query-dump`` counters from a helper thread.
    """

    def __init__(self, socket_path: str | os.PathLike[str], *, spool: str | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 pipe_size: int = PIPE_SIZE, timeout: float = 60.0,
                 dump_format: str = "elf") -> None:
        super().__init__(spool, dump_format)
        self.socket_path = os.fspath(socket_path)
        self.progress = progress
        self.pipe_size = pipe_size
        self.timeout = timeout
        self._client: QmpClient | None = None
        self._monitor: threading.Thread | None = None
        self._done = threading.Event()
        self._stop_monitor = threading.Event()
        self._final: dict[str, Any] = {}
        self._completed: QmpEvent | None = None
        self._monitor_error: BaseException | None = None
        self._was_running = True
        self._started = 0.0
        self._finished = False
        self._pause_measured = False

    # -- the capture ----------------------------------------------------------------------------
    def _enter(self) -> Snapshot:
        client = self._client = QmpClient(self.socket_path, timeout=self.timeout)
        status = client.execute("query-status")
        self._was_running = bool(status.get("running"))
        dump_state = client.execute("query-dump")
        if dump_state.get("status") == "active":
            raise UsageError(f"a dump of the guest at {self.socket_path} is already running")
        need = None
        if self.spool is not None:
            with contextlib.suppress(QmpError):
                need = int(client.execute("query-memory-size-summary")["base-memory"])
            self._open_spool(need)

        rfd, wfd = pipe_cloexec()
        self._stream = DumpStream(rfd, f"QEMU dump from {self.socket_path}")
        effective_pipe = set_pipe_size(rfd, self.pipe_size)
        fdname = f"kdumpling-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            client.execute("getfd", {"fdname": fdname}, fds=[wfd])
        finally:
            os.close(wfd)  # QEMU holds the only write end now: its close is our EOF
        self._started = time.monotonic()
        try:
            client.execute("dump-guest-memory", {
                "paging": False, "protocol": f"fd:{fdname}", "format": self.dump_format,
                "detach": True,
            })
        except QmpError as err:
            # A refused command leaves the descriptor registered in QEMU (and our pipe without
            # EOF): take it back.
            with contextlib.suppress(KdumplingError):
                client.execute("closefd", {"fdname": fdname})
            raise DumpFailedError(f"QEMU refused the dump: {err.desc}") from err
        self._monitor = threading.Thread(target=self._watch, name="kdumpling-qmp-progress",
                                         daemon=True)
        self._monitor.start()

        meta: dict[str, object] = {
            "collector": "qmp", "socket": self.socket_path, "mode": "spool" if self.spool
            else "stream", "pipe_size": effective_pipe, "qemu_version": client.version,
            "dump_format": self.dump_format,
        }
        snap = self._read_dump(f"QEMU guest at {self.socket_path}", meta)
        if not self._was_running:
            snap.warnings.append("the guest was already paused; it was not resumed")
        return snap

    def _dump_finished(self) -> float | None:
        self._finish_dump()
        pause = self._pause()
        # A QMP socket serves one client at a time: give the monitor back now.
        if self._client is not None:
            self._client.close()
            self._client = None
        return pause

    def _watch(self) -> None:
        """Progress from query-dump until the dump ends (runs in a helper thread)."""
        client = self._client
        assert client is not None
        try:
            while not self._stop_monitor.is_set():
                state = client.execute("query-dump")
                if self.progress and state.get("total"):
                    self.progress(int(state["completed"]), int(state["total"]))
                if state.get("status") in ("completed", "failed", "none"):
                    self._final = state
                    break
                ev = client.wait_event({"DUMP_COMPLETED"}, 0.2)
                if ev is not None:
                    self._completed = ev
            if self._completed is None and not self._stop_monitor.is_set():
                self._completed = client.wait_event({"DUMP_COMPLETED"}, 5.0)
        except BaseException as err:  # reported by _finish_dump
            self._monitor_error = err
        finally:
            self._done.set()

    def _finish_dump(self) -> None:
        """Wait until QEMU has closed its end and reported the end of the dump."""
        if self._monitor is None or self._finished:
            return
        self._finished = True
        if not self._done.wait(self.timeout):
            self._stop_monitor.set()
        self._monitor.join(self.timeout)
        if self._monitor_error is not None:
            err = self._monitor_error
            if isinstance(err, KdumplingError):
                raise err
            raise TargetGoneError(f"lost QEMU during the dump: {err}") from err
        if self._final.get("status") == "failed" or (
                self._completed is not None and "error" in self._completed.data):
            reason = self._completed.data.get("error", "") if self._completed else ""
            raise DumpFailedError(f"QEMU reported the dump failed {reason}".strip())

    def _pause(self) -> float | None:
        """RESUME - STOP from QEMU's event timestamps (None if the guest was not running)."""
        client = self._client
        if client is None or not self._was_running or self._pause_measured:
            return None
        self._pause_measured = True
        stop = client.events("STOP")
        try:
            resume = client.wait_event({"RESUME"}, 5.0)
        except TargetGoneError:
            return None  # QEMU died during the dump: there was no resume
        if not stop or resume is None:
            return None
        return max(0.0, resume.timestamp - stop[0].timestamp)

    # -- release ---------------------------------------------------------------------------------
    def _cleanup(self, *, failed: bool) -> None:
        snap = self._snapshot
        try:
            # Closing early makes QEMU's next write fail with EPIPE: it ends the dump as failed
            # and resumes the guest.
            self._end_stream(drain=not failed)
            try:
                self._finish_dump()
            except KdumplingError as err:
                if not failed and not self._dump_failure_kept(err):
                    raise
            if not failed:
                self._note_short_stream()
            if snap is not None and snap.pause_seconds is None:
                snap.pause_seconds = self._pause()
                if self._started:
                    snap.meta["capture_seconds"] = time.monotonic() - self._started
        finally:
            self._stop_monitor.set()
            self._close_spool()
            if self._client is not None:
                self._client.close()
                self._client = None
