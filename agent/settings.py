"""What one capture is told: how to write (options), what to add (annotations), where it goes
(``Destination``), and how the store is kept (retention), merged once from the config for the
command line and the service alike."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from .cancel import Cancel
from .config import AgentConfig, RetentionConfig, TargetConfig
from .options import WriteOptions
from .store import SnapshotStore
from .targets import OpenContext, Opener, open_target

Progress = Callable[[int, int], None]


@dataclass
class Destination:
    """Where a capture goes: a store, one file, or a stream (stdout)."""

    store: SnapshotStore | None = None
    path: str | None = None
    stream: BinaryIO | None = None
    force: bool = False

    @property
    def spool_dir(self) -> str:
        """Guests that spool put their anonymous file on the output's file system."""
        if self.store is not None:
            return self.store.spool_dir
        if self.path is not None:
            return os.path.dirname(self.path)
        return os.environ.get("TMPDIR", "/var/tmp")

    @property
    def open_context(self) -> OpenContext:
        return OpenContext(spool_dir=self.spool_dir)


@dataclass
class CaptureSettings:
    options: WriteOptions = field(default_factory=WriteOptions)
    annotations: dict[str, str] = field(default_factory=dict)
    retention: RetentionConfig | None = None  # None: no retention after the capture
    keep_for: Callable[[str], int] | None = None
    progress: Progress | None = None
    cancel: Cancel | None = None
    opener: Opener = open_target
    retry_on_full: bool = True
    trigger: dict[str, Any] | None = None  # what fired a conditional snapshot: its record says

    @classmethod
    def from_config(cls, config: AgentConfig, target: TargetConfig | None = None, *,
                    options: WriteOptions | None = None,
                    annotations: dict[str, str] | None = None,
                    progress: Progress | None = None,
                    cancel: Cancel | None = None) -> CaptureSettings:
        """[output], then the target's own table, then ``options`` (the command line)."""
        opts = config.output.options
        extra: dict[str, str] = {}
        if target is not None:
            opts = opts.over(target.options)
            extra = {"kdumpling.target": target.name, **target.annotations}
        if options is not None:
            opts = opts.over(options)
        return cls(options=opts, annotations={**extra, **(annotations or {})},
                   retention=config.retention, keep_for=config.keep_for, progress=progress,
                   cancel=cancel)
