"""Collectors: read memory from live processes, QEMU guests and images into Snapshots."""

from .base import Collector, Snapshot, UnreadableRange

__all__ = ["Collector", "Snapshot", "UnreadableRange"]
