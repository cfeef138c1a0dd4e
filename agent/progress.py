"""A one-line progress bar (bytes, rate, ETA) for terminals, stdlib only.

Shown only when stderr is a terminal and neither ``--json`` nor ``-q`` was given; under systemd the
service reports progress through ``STATUS=`` instead (see service.py).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from .units import format_duration, format_size


class ProgressBar:
    """Call with ``(done, total)`` bytes; redraws at most ten times a second."""

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.started = time.monotonic()
        self._last_draw = 0.0
        self._shown = False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self._last_draw < 0.1 and done < total:
            return
        self._last_draw = now
        self.stream.write("\r" + self.render(done, total, now - self.started) + "\x1b[K")
        self.stream.flush()
        self._shown = True

    def render(self, done: int, total: int, elapsed: float) -> str:
        import shutil  # imported here: start-up time (issue 12)
        width = shutil.get_terminal_size((80, 20)).columns
        rate = done / elapsed if elapsed > 0 else 0.0
        frac = done / total if total else 1.0
        eta = (total - done) / rate if rate > 0 else 0.0
        text = (f" {frac * 100:5.1f}% {format_size(done)}/{format_size(total)} "
                f"{format_size(rate)}/s ETA {format_duration(eta)}")
        bar_width = max(0, min(30, width - len(self.label) - len(text) - 4))
        filled = int(bar_width * frac)
        bar = f" [{'#' * filled}{'.' * (bar_width - filled)}]" if bar_width >= 5 else ""
        return f"{self.label}{bar}{text}"[: width - 1]

    def close(self) -> None:
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False
