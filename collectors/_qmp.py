"""A small synchronous QMP client (standard library only).

QMP (docs/interop/qmp-spec.rst in QEMU) is one JSON object per line over a socket: a greeting,
then for each command either ``{"return": ...}`` or ``{"error": ...}``, with asynchronous
``{"event": ..., "timestamp": {"seconds", "microseconds"}}`` lines in between. File descriptors
for ``getfd`` travel as SCM_RIGHTS ancillary data on the command that uses them; QEMU reads its
monitor byte by byte, so the descriptor must ride on the ``getfd`` message itself.

One lock serialises commands, so a progress thread can poll ``query-dump`` while another thread
waits for events.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from kdumpling.errors import KdumplingError, PermissionDeniedError, TargetGoneError


class QmpError(KdumplingError):
    """QEMU answered a command with an error."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QMP {command}: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


@dataclass
class QmpEvent:
    name: str
    data: dict[str, Any]
    timestamp: float  # QEMU's wall-clock time of the event (seconds since the epoch)
    received: float  # our time.monotonic() when we read it


class QmpClient:
    def __init__(self, path: str, *, timeout: float = 30.0) -> None:
        self.path = path
        self._timeout = timeout
        self._lock = threading.Lock()
        self._events: list[QmpEvent] = []
        self._events_cv = threading.Condition(self._lock)
        self._buf = b""
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(path)
        except FileNotFoundError as err:
            self._sock.close()
            raise TargetGoneError(f"no QMP socket at {path}") from err
        except ConnectionRefusedError as err:
            self._sock.close()
            raise TargetGoneError(f"nobody listens on the QMP socket {path}") from err
        except PermissionError as err:
            self._sock.close()
            raise PermissionDeniedError(f"cannot connect to the QMP socket {path}") from err
        except OSError as err:
            self._sock.close()
            raise TargetGoneError(f"cannot connect to {path}: {err.strerror}") from err
        try:
            try:
                greeting = self._read_message()
            except TargetGoneError as err:
                if isinstance(err.__cause__, TimeoutError):
                    raise TargetGoneError(
                        f"no QMP greeting on {path} within {timeout:.0f} s: QEMU serves one "
                        "client per QMP socket, is another one connected?") from err
                raise
            if "QMP" not in greeting:
                raise QmpError("greeting", "Protocol", f"unexpected greeting {greeting!r}")
            self.version = greeting["QMP"].get("version", {}).get("qemu", {})
            self.execute("qmp_capabilities")
        except BaseException:
            self._sock.close()
            raise

    # -- framing --------------------------------------------------------------------------------
    def _read_message(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError as err:
                raise TargetGoneError(f"QEMU did not answer on {self.path}") from err
            except OSError as err:
                raise TargetGoneError(f"QMP connection {self.path} failed: {err}") from err
            if not chunk:
                raise TargetGoneError(f"QEMU closed the QMP connection {self.path}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def _queue_event(self, msg: dict[str, Any]) -> None:
        ts = msg.get("timestamp", {})
        stamp = ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6
        self._events.append(QmpEvent(msg["event"], msg.get("data", {}), stamp, time.monotonic()))
        self._events_cv.notify_all()

    # -- commands -------------------------------------------------------------------------------
    def execute(self, command: str, arguments: dict[str, Any] | None = None,
                *, fds: list[int] | None = None) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        raw = json.dumps(msg).encode() + b"\n"
        with self._lock:
            try:
                if fds:
                    socket.send_fds(self._sock, [raw], fds)
                else:
                    self._sock.sendall(raw)
            except OSError as err:
                if err.errno in (errno.EPIPE, errno.ECONNRESET):
                    raise TargetGoneError(f"QEMU closed the QMP connection {self.path}") from err
                raise
            while True:
                reply = self._read_message()
                if "event" in reply:
                    self._queue_event(reply)
                    continue
                if "error" in reply:
                    info = reply["error"]
                    raise QmpError(command, info.get("class", "?"), info.get("desc", ""))
                if "return" in reply:
                    return reply["return"]

    def wait_event(self, names: set[str], timeout: float) -> QmpEvent | None:
        """Pop the first queued or arriving event whose name is in ``names``."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                for i, ev in enumerate(self._events):
                    if ev.name in names:
                        return self._events.pop(i)
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._sock.settimeout(min(left, 0.2))
                try:
                    msg = self._read_message()
                except TargetGoneError as err:
                    if isinstance(err.__cause__, TimeoutError):
                        continue
                    raise
                finally:
                    self._sock.settimeout(self._timeout)
                if "event" in msg:
                    self._queue_event(msg)

    def events(self, name: str) -> list[QmpEvent]:
        with self._lock:
            return [e for e in self._events if e.name == name]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def set_pipe_size(fd: int, size: int) -> int:
    """F_SETPIPE_SZ (fcntl(2)); returns the size in effect (unchanged on failure)."""
    import fcntl

    setsz = getattr(fcntl, "F_SETPIPE_SZ", 1031)
    getsz = getattr(fcntl, "F_GETPIPE_SZ", 1032)
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, setsz, size)
    try:
        return int(fcntl.fcntl(fd, getsz))
    except OSError:
        return 0


def pipe_cloexec() -> tuple[int, int]:
    return os.pipe2(os.O_CLOEXEC)
