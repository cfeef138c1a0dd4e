"""The collector contract.

A collector is a context manager. Entering it captures the target and returns a ``Snapshot``
whose segments still read lazily from the target (a stopped process, a FIFO from QEMU, an image
file); the caller hands ``snapshot.image`` to a writer *inside* the ``with`` block. Leaving the
block releases the target (detaches ptrace, resumes, closes descriptors), also on errors.

Collectors know nothing about output files: they never open, name or remove one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol

from kdumpling.image import CoreImage

# What a guest collector (QMP, libvirt) can ask the hypervisor to write: its ELF (read as a
# stream, or spooled with zero pages as holes) or its kdump-zlib (QEMU compresses; a flattened
# stream, so spooled and rebuilt before it is read).
GUEST_DUMP_FORMATS = ("elf", "kdump-zlib")


@dataclass
class UnreadableRange:
    start: int
    end: int
    reason: str
    # A hole every dump of this kind has (the kernel's own cores leave it out too, e.g. [vvar],
    # [vsyscall]): listed, but no reason to call the capture incomplete.
    expected: bool = False


@dataclass
class Snapshot:
    """What was captured and how."""

    image: CoreImage
    target: str  # human description, e.g. "process 1234 (nginx)"
    pause_seconds: float | None = None  # how long the target was stopped, when it was
    warnings: list[str] = field(default_factory=list)
    unreadable: list[UnreadableRange] = field(default_factory=list)
    annotations: dict[str, str] = field(default_factory=dict)
    truncated: bool = False
    meta: dict[str, object] = field(default_factory=dict)  # collector-specific facts for --json


class Collector(Protocol):
    def __enter__(self) -> Snapshot: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None: ...
