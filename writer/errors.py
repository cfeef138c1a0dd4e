"""One error hierarchy for the whole distribution.

Every error carries the exit code the agent's CLI returns for it (borg's habit), so the CLI turns
any ``KdumplingError`` into one line on stderr and ``sys.exit(err.exit_code)`` without a table.
Codes follow sysexits(3): 69 EX_UNAVAILABLE, 74 EX_IOERR, 77 EX_NOPERM, 78 EX_CONFIG.
"""

from __future__ import annotations

import os
import sys
import warnings


class KdumplingError(Exception):
    """Base class of every error kdumpling raises on purpose."""

    exit_code: int = 1


class UsageError(KdumplingError, ValueError):
    """Bad arguments from the caller (a ValueError too, so seed-API callers keep working)."""

    exit_code = 2


class UnsupportedArchError(UsageError):
    """An architecture name kdumpling does not know."""


class LayoutError(UsageError):
    """Segments that cannot be laid out: overlapping, empty, out of range."""


class CodecUnavailableError(KdumplingError):
    """The Python module behind a compression codec is not installed."""

    exit_code = 2

    def __init__(self, codec: str, module: str, extra: str) -> None:
        super().__init__(
            f"{codec} compression needs the Python module '{module}': "
            f"pip install 'kdumpling[{extra}]'"
        )
        self.codec = codec
        self.module = module
        self.extra = extra


class SourceReadError(KdumplingError):
    """A memory source could not be read at some offset (drgn's FaultError in spirit)."""

    exit_code = 74

    def __init__(self, message: str, address: int | None = None) -> None:
        super().__init__(message if address is None else f"{message} at {address:#x}")
        self.address = address


class DumpWriteError(KdumplingError):
    """Writing the output failed (disk full, broken pipe, ...)."""

    exit_code = 74

    def __init__(self, message: str, path: str | None = None, errno_: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.errno = errno_

    @classmethod
    def from_oserror(cls, err: OSError, path: str | None) -> DumpWriteError:
        where = f" {path}" if path else ""
        reason = os.strerror(err.errno) if err.errno else str(err)
        return cls(f"cannot write{where}: {reason}", path, err.errno)


class FormatError(KdumplingError):
    """A dump file that does not follow its format (raised by the reader)."""

    exit_code = 65  # EX_DATAERR

    def __init__(self, message: str, offset: int | None = None, path: str | None = None) -> None:
        where = ""
        if path:
            where += f"{path}: "
        if offset is not None:
            where += f"offset {offset:#x}: "
        super().__init__(where + message)
        self.offset = offset
        self.path = path


class PermissionDeniedError(KdumplingError):
    """Missing privileges (not root, no CAP_SYS_PTRACE, Yama, another tracer)."""

    exit_code = 77


class TargetGoneError(KdumplingError):
    """The process, domain or socket being captured disappeared."""

    exit_code = 69


class ConfigError(KdumplingError):
    """Invalid agent configuration."""

    exit_code = 78


class CaptureInterrupted(KdumplingError):
    """SIGINT/SIGTERM arrived during a capture; the partial output was removed."""

    exit_code = 130


class KdumplingWarning(UserWarning):
    """Base class of every warning kdumpling issues (``warnings.simplefilter`` one category)."""


class EmptyDumpWarning(KdumplingWarning):
    """A dump written without any memory: valid, but readers will find nothing to read."""


class NoteTypeWarning(KdumplingWarning):
    """A custom note whose type some reader takes for a standard core note."""


def warn(message: str, category: type[KdumplingWarning]) -> None:
    """``warnings.warn`` attributed to the first caller outside this package (the user's line)."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    level = 2
    frame = sys._getframe(1)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(package):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
