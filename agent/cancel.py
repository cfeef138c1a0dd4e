"""Cooperative cancellation: a signal handler sets ``Cancel``; the capture checks it.

The next progress callback inside ``write_dump`` raises CaptureInterrupted, which ``write_dump``
answers by removing its ``.incomplete`` file and the collector by releasing the target (resuming
the process), so a process is never left stopped by an exception thrown at a random point of the
ptrace code.
"""

from __future__ import annotations

import signal
import threading

from kdumpling.errors import CaptureInterrupted


class Cancel:
    """Set by signal handlers; checked at every progress step of a capture."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum = 0

    def set(self, signum: int) -> None:
        self.signum = signum
        self.event.set()

    @property
    def is_set(self) -> bool:
        return self.event.is_set()

    def check(self) -> None:
        if self.event.is_set():
            raise interrupted(self.signum)


def interrupted(signum: int) -> CaptureInterrupted:
    """The error for a capture stopped by ``signum`` (exit code 128 + N)."""
    name = signal.Signals(signum).name if signum else "a signal"
    err = CaptureInterrupted(f"interrupted by {name}; the partial dump was removed")
    if signum:
        err.exit_code = 128 + signum
    return err
