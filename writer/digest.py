"""The sha256 of the bytes a sink writes, computed while it writes, on a second thread.

A sink reports every write (``data``), every hole (``zeros``) and every range it filled without
the bytes passing through Python (``copied``), in the order it made them; the digest thread
hashes them in file order behind a cursor. Bytes at the cursor are hashed from the buffer the
writer handed over (hashlib releases the GIL on buffers over 2 KiB, so this runs on the other
core while the writer reads and writes the next chunk); holes hash as zeros without being read.

Writers do not always write in file order: both write a provisional header at offset 0 first
and rewrite it at the end (its "incomplete" flag is cleared only then), and the kdump writer
fills the page descriptor table while the page data streams behind it. So:

* a provisional write names the bytes the range will finally hold (``final``); they are hashed,
  and the rewrite is accepted when it brings exactly those bytes;
* a write ahead of the cursor is hashed when the cursor reaches it: read back from the output
  when the sink can (``read_back``, a regular file: page cache), else kept in memory up to
  ``budget`` bytes;
* ranges never written are zeros (a sparse file, a zero-filled part buffer).

When that fails (a rewrite with other bytes, a write straddling the cursor, overlapping writes
ahead, more held back than ``budget`` with no read-back), the digest is lost: with a read-back
the whole output is read back at ``finish``, else ``finish`` returns None.

The digest never slows the writer down when it can read back: data it has no room for
(``budget``) is dropped from the queue and read back from the output when its turn comes.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

Buffer = bytes | bytearray | memoryview
# read_back(offset, buffer) fills ``buffer`` from the output at ``offset``; returns the count.
ReadBack = Callable[[int, memoryview], int]
# views(offset, length) yields buffers that cover the range in order (e.g. mmap windows of the
# page cache: no copy); each is used before the next is asked for.
ReadViews = Callable[[int, int], Iterator[Buffer]]

_BLOCK = 4 << 20  # read-back and zero-hashing granule
_ZEROS = bytes(_BLOCK)
_SMALL = 64 << 10
DEFAULT_BUDGET = 16 << 20  # bytes held for the digest thread: ~16 MB of RSS at most
# Held while the digest waits for the writing to end (defer): buffers kept alive make the
# reader allocate fresh memory (page faults) while a stopped process waits (16 MiB cost ~10 ms
# of a 256 MiB process's pause); the page cache hashes nearly as fast later.
DEFERRED_BUDGET = 4 << 20
# The digest thread gives way to the threads that read the source and write the output: a
# process stays stopped while they run, the digest can catch up after (from the page cache).
DIGEST_NICE = 10


@dataclass
class _Range:
    """[start, end) of the output: ``data`` held, or None (read back, or zeros if ``zero``)."""

    start: int
    end: int
    data: Buffer | None = None
    zero: bool = False


class WriteDigest:
    """sha256 of an output built from positioned writes; see the module docstring.

    Feed it in the order the bytes reached the output (``data``, ``zeros``, ``copied``), from
    any thread; ``finish(size)`` waits for the digest thread and returns the hex digest of the
    output's first ``size`` bytes, or None when it could not be computed.
    """

    def __init__(self, read_back: ReadBack | None = None, *, budget: int = DEFAULT_BUDGET,
                 nice: int = DIGEST_NICE, views: ReadViews | None = None,
                 defer: bool = False) -> None:
        self._read_back = read_back
        self._views = views
        self._budget = min(budget, DEFERRED_BUDGET) if (read_back is not None and defer) \
            else budget
        # Without a read-back the writer waits for the digest: no reason to hold it back.
        self._nice = nice if read_back is not None else 0
        self._tid: int | None = None
        # With a read-back, hashing waits for ``hurry`` (the writing is over): a second Python
        # thread hashing meanwhile took the GIL from the threads that read and write, which
        # doubled a stopped process's pause; afterwards the page cache holds what it needs.
        self._go = threading.Event()
        if read_back is None or not defer:
            self._go.set()
        self._sha = hashlib.sha256()
        self._pos = 0  # bytes [0, pos) are hashed
        self._ahead: list[_Range] = []  # written beyond the cursor, sorted, disjoint
        self._ahead_starts: list[int] = []
        self._ahead_held = 0  # bytes of data kept in _ahead (no read-back only)
        self._final: dict[int, bytes] = {}  # provisional writes: offset -> final bytes
        self._valid = True
        self._events: deque[_Range | None] = deque()
        self._held = 0  # bytes of data referenced by queued events
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="kdump-digest", daemon=True)
        self._thread.start()

    # -- the writer's side --------------------------------------------------------------------

    def data(self, offset: int, data: Buffer, final: bytes | None = None) -> None:
        """``data`` reached the output at ``offset`` (the caller does not change it after).
        ``final``: the bytes a later write will put there instead (hashed in place of
        ``data``)."""
        if final is not None:
            if len(final) != len(data):
                raise ValueError("final bytes must be as long as the provisional ones")
            self._put(_Range(offset, offset + len(final), bytes(final)), held=len(final),
                      final=True)
            return
        length = len(data)
        with self._cond:
            # Small writes are always kept: a header rewritten behind the cursor must be seen.
            keep = (self._read_back is None or length <= _SMALL
                    or self._held + length <= self._budget)
        self._put(_Range(offset, offset + length, data if keep else None),
                  held=length if keep else 0, wait=self._read_back is None)

    def zeros(self, offset: int, length: int) -> None:
        """[offset, offset + length) of the output is zeros (a hole)."""
        if length > 0:
            self._put(_Range(offset, offset + length, zero=True), held=0)

    def copied(self, offset: int, length: int) -> None:
        """[offset, offset + length) was filled without passing through Python (read back)."""
        if length <= 0:
            return
        if self._read_back is None:
            self._invalidate()
            return
        self._put(_Range(offset, offset + length), held=0)

    def _put(self, item: _Range, held: int, final: bool = False, wait: bool = False) -> None:
        if item.end <= item.start:
            return
        with self._cond:
            if wait:
                # Nothing to read back from: the writer waits for room rather than lose it.
                while self._held and self._held + held > self._budget and not self._stopped:
                    self._cond.wait()
            if final:
                self._final[item.start] = bytes(item.data or b"")
            self._held += held
            self._events.append(item)
            self._cond.notify_all()

    def _invalidate(self) -> None:
        with self._cond:
            self._valid = False

    def finish(self, size: int) -> str | None:
        """Hash up to ``size`` (gaps as zeros) and return the hex digest, or None."""
        self._go.set()
        with self._cond:
            self._events.append(None)
            self._cond.notify_all()
        self._thread.join()
        if self._valid:
            try:
                self._advance_to(size)
            except OSError:
                self._valid = False
        if not self._valid:
            if self._read_back is None:
                return None
            try:
                self._sha = hashlib.sha256()
                self._pos = 0
                self._hash_read_back(0, size)
            except OSError:
                return None
        return self._sha.hexdigest()

    def close(self) -> None:
        """Stop the digest thread without finishing (error paths)."""
        self._go.set()
        with self._cond:
            self._stopped = True
            self._events.clear()
            self._events.append(None)
            self._held = 0
            self._cond.notify_all()
        self._thread.join()

    # -- the digest thread --------------------------------------------------------------------

    def hurry(self) -> None:
        """The writing is over (a stopped process runs again): the digest thread gets its
        normal priority back, where this process may raise it (CAP_SYS_NICE, root), so other
        processes on the machine do not keep it waiting."""
        self._go.set()
        if self._nice and self._tid is not None:
            with contextlib.suppress(OSError, AttributeError):
                os.setpriority(os.PRIO_PROCESS, self._tid, 0)

    def _run(self) -> None:
        self._tid = threading.get_native_id()
        if self._nice:
            # Linux: the nice value is per thread (setpriority on the thread's id).
            with contextlib.suppress(OSError, AttributeError):
                os.setpriority(os.PRIO_PROCESS, self._tid, self._nice)
        self._go.wait()
        while True:
            with self._cond:
                while not self._events:
                    self._cond.wait()
                item = self._events.popleft()
                if item is None:
                    return
                if item.data is not None:
                    self._held -= len(item.data)
                self._cond.notify_all()
            if self._valid:
                try:
                    self._apply(item)
                except OSError:
                    self._valid = False

    def _apply(self, item: _Range) -> None:
        if item.start < self._pos:
            # Behind the cursor: only a provisional range's final bytes may come again.
            if item.data is None or not self._is_final(item.start, item.data):
                self._valid = False
            return
        if item.start > self._pos:
            self._hold(item)
            return
        self._consume(item)
        while self._valid and self._ahead and self._ahead[0].start <= self._pos:
            nxt = self._ahead.pop(0)
            self._ahead_starts.pop(0)
            if nxt.data is not None and self._read_back is None:
                self._ahead_held -= len(nxt.data)
            if nxt.start < self._pos:
                self._valid = False  # a later write covered part of it: order unknown
                return
            self._consume(nxt)

    def _is_final(self, offset: int, data: Buffer) -> bool:
        """``data`` at ``offset`` is (part of) the final bytes named by a provisional write."""
        for start, final in self._final.items():
            if start <= offset and offset + len(data) <= start + len(final):
                return final[offset - start : offset - start + len(data)] == bytes(data)
        return False

    def _hold(self, item: _Range) -> None:
        i = bisect.bisect_left(self._ahead_starts, item.start)
        overlaps = (i > 0 and self._ahead[i - 1].end > item.start) or \
            (i < len(self._ahead) and self._ahead[i].start < item.end)
        if overlaps:
            self._valid = False
            return
        if self._read_back is not None and not item.zero and item.start not in self._final:
            item.data = None  # read back when the cursor gets here: holds no memory
        elif item.data is not None and item.start not in self._final:
            self._ahead_held += len(item.data)
            if self._ahead_held > self._budget:
                self._valid = False
                self._ahead.clear()
                self._ahead_starts.clear()
                return
        self._ahead.insert(i, item)
        self._ahead_starts.insert(i, item.start)

    def _consume(self, item: _Range) -> None:
        length = item.end - item.start
        if item.data is not None:
            self._sha.update(item.data)
        elif item.zero:
            self._hash_zeros(length)
        else:
            if self._read_back is None:
                self._valid = False
                return
            self._hash_read_back(item.start, length)
            return
        self._pos = item.end

    def _hash_zeros(self, length: int) -> None:
        view = memoryview(_ZEROS)
        left = length
        while left:
            n = min(left, _BLOCK)
            self._sha.update(view[:n])
            left -= n

    def _hash_read_back(self, offset: int, length: int) -> None:
        assert self._read_back is not None
        if self._views is not None:
            got = 0
            for view in self._views(offset, length):
                self._sha.update(view)
                got += len(view)
            if got != length:
                raise OSError(f"read back {got} bytes at {offset:#x}, expected {length}")
            self._pos = offset + length
            return
        buf = bytearray(min(_BLOCK, length))
        view = memoryview(buf)
        end = offset + length
        while offset < end:
            want = min(len(buf), end - offset)
            n = self._read_back(offset, view[:want])
            if n <= 0:
                raise OSError(f"output ended at {offset:#x}, expected {end:#x}")
            self._sha.update(view[:n])
            offset += n
        self._pos = end

    def _advance_to(self, size: int) -> None:
        """After the last event: hash what was held ahead and the gaps (zeros) up to ``size``."""
        for item in self._ahead:
            if item.start < self._pos:
                self._valid = False
                return
            if item.start > self._pos:
                self._hash_zeros(item.start - self._pos)
                self._pos = item.start
            self._consume(item)
            if not self._valid:
                return
        self._ahead.clear()
        self._ahead_starts.clear()
        if size > self._pos:
            self._hash_zeros(size - self._pos)
            self._pos = size
        elif size < self._pos:
            self._valid = False  # hashed more than the output holds
