"""Logging to stderr: plain for terminals, ``<N>`` priority prefixes for journald.

journald turns a leading ``<N>`` into the record's PRIORITY (sd-daemon(3)), which is all the
structure a stderr-logging daemon needs; per-capture facts go into the message as ``key=value``.
"""

from __future__ import annotations

import logging
import sys

from .systemd import stderr_is_journal

LOGGER_NAME = "kdumpling.agent"
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 6)
        text = super().format(record)
        # Every line of a multi-line message needs its own prefix or journald logs it at INFO.
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines() or [""])


class _TerminalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.ERROR:
            return f"kdumpling-agent: error: {text}"
        if record.levelno >= logging.WARNING:
            return f"kdumpling-agent: warning: {text}"
        return f"kdumpling-agent: {text}"


def setup_logging(verbosity: int = 0, journal: bool | None = None) -> logging.Logger:
    """verbosity: -1 quiet (errors only), 0 warnings+info, 1 debug."""
    logger = logging.getLogger(LOGGER_NAME)
    for h in list(logger.handlers):
        logger.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    use_journal = stderr_is_journal() if journal is None else journal
    handler.setFormatter(_JournalFormatter("%(message)s") if use_journal
                         else _TerminalFormatter("%(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.ERROR if verbosity < 0 else
                    logging.DEBUG if verbosity > 0 else logging.INFO)
    return logger


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


def kv(**fields: object) -> str:
    """``key=value`` pairs, quoting values with spaces, for one-line capture records."""
    out = []
    for key, value in fields.items():
        if value is None:
            continue
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        if not text or any(c in text for c in ' "='):
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
        out.append(f"{key}={text}")
    return " ".join(out)
