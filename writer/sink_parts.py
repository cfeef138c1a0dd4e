"""A sink that cuts the output file into numbered parts and hands each one over once it is whole.

For object storage multipart uploads (S3 UploadPart / CompleteMultipartUpload): parts may be sent
in any order and are joined by number, so the file is the ordinary one (ELF or kdump-compressed),
not a flattened stream, although no local copy of it ever exists.

Part ``n`` covers a fixed byte range (``PartLayout``). Every part but part 1 is sent as soon as
every byte of it has been written (or declared a hole); part 1 is sent last, in ``finish``,
because both writers rewrite their header at offset 0 when they end (the kdump header's and the
ELF header's "incomplete" flag are cleared only then; diskdump.py, elf.py). The kdump writer's
other out-of-order region, the page descriptor table, fills in offset order while the page data
streams behind it, so its parts complete one after another too. A write into a part already sent
is a DumpWriteError: that writer is not streamable.

Memory is bounded by the parts open at once (part 1, the descriptor table's current part, the
data's current part), the queue (2) and the parts being sent (2 threads): about 7 parts, 56 MiB
at the default 8 MiB. S3 allows 10000 parts, each but the last >= 5 MiB; the layout doubles the
part size every 2000 parts, so 8 MiB parts reach about 496 GiB.
"""

from __future__ import annotations

import bisect
import contextlib
import queue
import threading
import time
from collections.abc import Callable

from .errors import DumpWriteError
from .sinks import Sink

MIN_PART_SIZE = 5 << 20  # S3: every part but the last is at least 5 MiB
DEFAULT_PART_SIZE = 8 << 20
MAX_PARTS = 10000  # S3's limit on part numbers
PARTS_PER_STEP = 2000  # the part size doubles after this many parts

SendPart = Callable[[int, bytes], None]


class PartLayout:
    """Which bytes part ``n`` (1-based) holds: ``PARTS_PER_STEP`` parts of ``size``, then as many
    of twice that, and so on up to ``MAX_PARTS``."""

    def __init__(self, part_size: int = DEFAULT_PART_SIZE) -> None:
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part size {part_size} is below the 5 MiB minimum")
        self.part_size = part_size
        self._starts: list[int] = []  # first offset of each step
        pos = 0
        for step in range(-(-MAX_PARTS // PARTS_PER_STEP)):
            self._starts.append(pos)
            pos += PARTS_PER_STEP * (part_size << step)
        self.limit = pos

    def part_of(self, offset: int) -> int:
        if offset >= self.limit:
            raise DumpWriteError(f"the dump is larger than {self.limit} bytes, the most "
                                 f"{MAX_PARTS} parts of this size can hold")
        step = bisect.bisect_right(self._starts, offset) - 1
        size = self.part_size << step
        return step * PARTS_PER_STEP + (offset - self._starts[step]) // size + 1

    def span(self, number: int) -> tuple[int, int]:
        """(first offset, size) of part ``number``."""
        step, index = divmod(number - 1, PARTS_PER_STEP)
        size = self.part_size << step
        return self._starts[step] + index * size, size


class _Part:
    """One part's bytes and which of them have been written (sorted, merged intervals)."""

    def __init__(self, size: int) -> None:
        self.buf = bytearray(size)  # zero-filled: holes and never-written gaps read as zeros
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.covered = 0

    def cover(self, start: int, end: int) -> None:
        i = bisect.bisect_left(self.ends, start)  # first interval that may touch [start, end)
        j = i
        while j < len(self.starts) and self.starts[j] <= end:
            start, end = min(start, self.starts[j]), max(end, self.ends[j])
            self.covered -= self.ends[j] - self.starts[j]
            j += 1
        self.starts[i:j] = [start]
        self.ends[i:j] = [end]
        self.covered += end - start


class PartsSink(Sink):
    """Writes addressed by final file offset, delivered as whole parts to ``send`` on sending
    threads (``senders`` of them, each one part at a time: parts may arrive in any order).

    An exception from ``send``
    fails the next write or ``finish``. ``stall_timeout``: the longest a write may wait for the
    sending thread before the dump fails (so a stalled upload cannot keep a stopped target
    waiting). ``finish`` sends what is left (part 1 last) and waits for every part; ``parts``
    then lists the numbers sent. ``close`` (error paths) stops the thread without waiting for a
    stuck send.
    """

    seekable = True  # positioned writes, as a file: the writers keep their seekable layout

    def __init__(self, name: str, send: SendPart, *, part_size: int = DEFAULT_PART_SIZE,
                 queue_depth: int = 2, senders: int = 2, stall_timeout: float = 300.0) -> None:
        super().__init__(name)
        self.layout = PartLayout(part_size)
        self._send = send
        self._stall_timeout = stall_timeout
        self._open: dict[int, _Part] = {}
        self.sent: set[int] = set()
        self._queue: queue.Queue[tuple[int, bytes] | None] = queue.Queue(queue_depth)
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._sender, name="parts-sender", daemon=True)
                         for _ in range(senders)]
        for thread in self._threads:
            thread.start()

    @property
    def parts(self) -> list[int]:
        return sorted(self.sent)

    # -- the sending thread ---------------------------------------------------------------------

    def _sender(self) -> None:
        while True:
            item = self._queue.get()
            if item is None or self._stop.is_set():
                return
            if self._error is not None:
                continue  # drain, so the writer never blocks behind a failed upload
            try:
                self._send(*item)
            except BaseException as err:  # reported to the writer thread
                self._error = err

    def _raise_error(self) -> None:
        err = self._error
        if err is None:
            return
        if isinstance(err, DumpWriteError):
            raise err
        raise DumpWriteError(f"{self.name}: {err}") from err

    def _enqueue(self, item: tuple[int, bytes] | None) -> None:
        deadline = time.monotonic() + self._stall_timeout
        while True:
            self._raise_error()
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                if time.monotonic() > deadline:
                    raise DumpWriteError(
                        f"{self.name}: the upload has not taken a part for "
                        f"{self._stall_timeout:g} s; giving up") from None

    # -- writing ------------------------------------------------------------------------------

    def _part(self, number: int) -> _Part:
        part = self._open.get(number)
        if part is None:
            if number in self.sent:
                raise DumpWriteError(f"{self.name}: a write into part {number}, already "
                                     "uploaded (this writer cannot be streamed)")
            part = self._open[number] = _Part(self.layout.span(number)[1])
        return part

    def _cover(self, offset: int, length: int,
               data: bytes | bytearray | memoryview | None) -> None:
        view = memoryview(data).cast("B") if data is not None else None
        done = 0
        while done < length:
            number = self.layout.part_of(offset + done)
            start, size = self.layout.span(number)
            at = offset + done - start
            n = min(length - done, size - at)
            part = self._part(number)
            if view is not None:
                part.buf[at : at + n] = view[done : done + n]
            part.cover(at, at + n)
            done += n
            if part.covered == size and number != 1:
                self._ship(number)

    def _ship(self, number: int) -> None:
        part = self._open.pop(number, None)
        # immutable from here: a sender may wrap it (io.BytesIO shares bytes, copies bytearray)
        data = bytes(part.buf) if part is not None else bytes(self.layout.span(number)[1])
        del part
        self.sent.add(number)
        self._enqueue((number, data))

    def _write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._raise_error()
        self._cover(offset, len(data), data)

    def _hole(self, offset: int, length: int) -> bool:
        """For ``Sink.hole``: nothing to copy, the part's buffer is zero there already; True: no
        bytes were written (a digest of the output hashes zeros for them)."""
        self._raise_error()
        self._cover(offset, length, None)
        return True

    def finish(self) -> None:
        """Send every part not sent yet (never-written gaps as zeros), part 1 last; the last
        part is cut at the file's size."""
        last = self.layout.part_of(self.size - 1) if self.size else 1
        for number in range(2, last + 1):
            if number not in self.sent:
                self._ship_trimmed(number, last)
        self._ship_trimmed(1, last)
        deadline = time.monotonic() + self._stall_timeout
        for _ in self._threads:
            self._enqueue(None)
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if any(thread.is_alive() for thread in self._threads):
            raise DumpWriteError(f"{self.name}: the upload of the last parts has not finished "
                                 f"in {self._stall_timeout:g} s; giving up")
        self._raise_error()

    def _ship_trimmed(self, number: int, last: int) -> None:
        if number == last:
            part = self._open.get(number)
            start = self.layout.span(number)[0]
            if part is not None:
                del part.buf[max(0, self.size - start):]
            else:
                self._open[number] = _Part(max(0, self.size - start))
        self._ship(number)

    def close(self) -> None:
        """Stop the sending thread (error paths): queued parts are dropped, a send in progress
        is not waited for beyond a moment."""
        self._stop.set()
        self._open.clear()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        for _ in self._threads:
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(None)
        for thread in self._threads:
            thread.join(1.0 / len(self._threads))
