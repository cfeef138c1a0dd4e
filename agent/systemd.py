"""The two bits of systemd integration the agent needs, without python-systemd.

sd_notify(3) is one datagram of ``KEY=VALUE`` lines to ``$NOTIFY_SOCKET`` (a path, or an abstract
socket when it starts with ``@``); every call is a no-op when the variable is unset, so the same
code runs under systemd, in a terminal and in tests. Journal detection follows systemd.exec(5):
``$JOURNAL_STREAM`` holds ``DEVICE:INODE`` of the stream stderr is connected to.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import socket


class Notifier:
    """Sends sd_notify messages; silent no-op without ``$NOTIFY_SOCKET``."""

    def __init__(self, address: str | None = None) -> None:
        addr = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        self._addr: str | bytes | None = None
        if addr.startswith("@"):
            self._addr = b"\0" + addr[1:].encode()
        elif addr.startswith("/"):
            self._addr = addr
        self._sock: socket.socket | None = None
        if self._addr is not None:  # made once, here: the watchdog thread shares it
            import socket  # imported here: start-up time (issue 12)
            with contextlib.suppress(OSError):
                self._sock = socket.socket(socket.AF_UNIX,
                                           socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.watchdog_usec = _watchdog_usec()
        self._last_watchdog = 0.0

    @property
    def enabled(self) -> bool:
        return self._addr is not None

    def notify(self, **fields: str | int) -> None:
        if self._addr is None or self._sock is None:
            return
        msg = "\n".join(f"{k.upper()}={v}" for k, v in fields.items()).encode()
        with contextlib.suppress(OSError):  # the manager went away: a daemon must not die
            self._sock.sendto(msg, self._addr)

    def ready(self, status: str = "") -> None:
        self.notify(READY=1, **({"STATUS": status} if status else {}))

    def status(self, text: str) -> None:
        self.notify(STATUS=text)

    def stopping(self, status: str = "") -> None:
        self.notify(STOPPING=1, **({"STATUS": status} if status else {}))

    def reloading(self) -> None:
        self.notify(RELOADING=1, MONOTONIC_USEC=int(time.monotonic() * 1e6))

    def extend_timeout(self, seconds: float) -> None:
        self.notify(EXTEND_TIMEOUT_USEC=int(seconds * 1e6))

    @property
    def watchdog_interval(self) -> float | None:
        """How often to ping: half of WatchdogSec=, as sd_watchdog_enabled(3) advises."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    def watchdog(self, force: bool = False) -> None:
        """Ping the watchdog, at most every quarter period unless ``force``."""
        if not self.watchdog_usec:
            return
        now = time.monotonic()
        if force or now - self._last_watchdog >= self.watchdog_usec / 4e6:
            self._last_watchdog = now
            self.notify(WATCHDOG=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _watchdog_usec() -> int:
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or (pid and pid != str(os.getpid())):
        return 0
    return int(usec)


def stderr_is_journal() -> bool:
    """True when stderr is the journal stream systemd connected (systemd.exec(5) JOURNAL_STREAM)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return dev.isdigit() and ino.isdigit() and st.st_dev == int(dev) and st.st_ino == int(ino)
