"""A session's event log: the frames of its Converse streams, numbered and retained.

Every server frame of a session (turn frames, errors, settings changes) is appended
here once and read by each attached stream through its own cursor, so a stream that
drops and comes back resumes from the last event it saw, without gaps or duplicates.

Flow control: a producer (a turn) appending while the slowest attached reader is
`window` events behind waits until that reader catches up, so a slow client slows its
own session's generation instead of growing a buffer. Detached readers hold nothing
back; what they miss stays retained (the last `retain` events, at most `retain_bytes`
of them) for a resume.

A turn in progress can be held (`append(..., hold=True)` on its first frame, `release`
when it ends): its events are retained until it ends, however many there are, so a
reader can always start at the turn in progress (`attach_held`), as a browser that
reloads mid-answer does.

Event ids are `<incarnation>.<sequence>`: the incarnation changes whenever a session is
loaded afresh (after a restart of the chat service or an idle eviction), so an id from
an earlier incarnation is recognised as no longer retained instead of being confused
with a new event of the same number.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import deque

from switchboard.chat.v1 import chat_pb2 as pb

logger = logging.getLogger(__name__)

__all__ = ["EventLog", "Expired", "Reader"]

_MAX_DIGITS = 18
"""Digits of the largest event number a log gives out (far more than it ever will)."""


class Expired(Exception):
    """The event to resume after is no longer retained (or never existed)."""


class Reader:
    """One stream's cursor into the log."""

    def __init__(self, log: EventLog, position: int) -> None:
        self._log = log
        self.position = position  # the sequence of the next event to read
        self.error: BaseException | None = None
        self.finished = False

    async def next(self) -> pb.ConverseResponse | None:
        """The next event, waiting for it; None once the reader is finished.

        Raises:
            BaseException: the error the reader was failed with (`fail`).
        """
        return await self._log._read(self)

    def fail(self, error: BaseException) -> None:
        """Ends the reader with `error` (raised by `next`)."""
        self.error = error
        self._log._wake()

    def finish(self) -> None:
        """Ends the reader once it has read every event appended so far."""
        self.finished = True
        self._log._wake()


class EventLog:
    def __init__(
        self, *, retain: int = 1024, window: int = 256, retain_bytes: int = 1 << 20
    ) -> None:
        if not 0 < window <= retain:
            raise ValueError("need 0 < window <= retain")
        self.incarnation = secrets.token_hex(4)
        self._retain = retain
        self._retain_bytes = retain_bytes
        self._bytes = 0
        self._window = window
        self._events: deque[pb.ConverseResponse] = deque()
        self._sizes: deque[int] = deque()
        self._first = 1  # sequence of self._events[0]
        self._next = 1  # sequence the next event gets
        self._readers: set[Reader] = set()
        self._held: int | None = None  # first sequence of the turn in progress
        self._changed = asyncio.Condition()

    @property
    def last_event_id(self) -> str:
        return self._id(self._next - 1) if self._next > 1 else ""

    def _id(self, sequence: int) -> str:
        return f"{self.incarnation}.{sequence}"

    def id_before(self, reader: Reader) -> str:
        """The id a reader starts after: resuming from it reads what the reader reads
        (`<incarnation>.0` before the first event)."""
        return self._id(reader.position - 1)

    @property
    def next_id_before(self) -> str:
        """The id the next event comes after (`<incarnation>.0` before the first)."""
        return self._id(self._next - 1)

    def attach_held(self) -> Reader:
        """A reader from the first event of the held turn (see `append`), or of new
        events only when none is held."""
        reader = Reader(self, self._next if self._held is None else self._held)
        self._readers.add(reader)
        return reader

    def release(self) -> None:
        """The held turn ended: its events are retained as any others from now on."""
        self._held = None

    def attach(self, after_event_id: str | None = None) -> Reader:
        """A reader of every event after `after_event_id`; None = only new events,
        "" = every retained event.

        Raises:
            Expired: the id is of another incarnation, or older than what is retained.
        """
        if after_event_id is None:
            start = self._next
        elif after_event_id == "":
            start = self._first
        else:
            start = self._after(after_event_id) + 1
            if not self._first <= start <= self._next:
                raise Expired(after_event_id)
        reader = Reader(self, start)
        self._readers.add(reader)
        return reader

    def _after(self, event_id: str) -> int:
        """The sequence of one of this log's event ids.

        Raises:
            Expired: an id of another incarnation, or none this log could give out
                (its number more than 18 ASCII digits, or not digits at all).
        """
        incarnation, _, number = event_id.partition(".")
        if (
            incarnation != self.incarnation
            or not (number.isascii() and number.isdigit())
            or len(number) > _MAX_DIGITS
        ):
            raise Expired(event_id)
        return int(number)

    def detach(self, reader: Reader) -> None:
        self._readers.discard(reader)
        self._wake()

    def fail_readers(self, error: BaseException) -> None:
        for reader in self._readers:
            reader.error = error
        self._wake()

    @property
    def readers(self) -> int:
        return len(self._readers)

    def lag(self) -> int:
        """Events the slowest attached reader has still to read."""
        return max((self._next - r.position for r in self._readers), default=0)

    async def append(
        self, frame: pb.ConverseResponse, *, hold: bool = False
    ) -> pb.ConverseResponse:
        """Numbers `frame` (sets its event_id), retains it and wakes the readers; waits
        first while an attached reader is `window` events behind. `hold`: the frame
        starts a turn, whose events are all retained until `release`."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.lag() < self._window)
            if hold:
                self._held = self._next
            frame.event_id = self._id(self._next)
            size = frame.ByteSize()
            self._events.append(frame)
            self._sizes.append(size)
            self._bytes += size
            self._next += 1
            # forget the oldest events beyond the budget, never one a reader still needs
            needed = min((r.position for r in self._readers), default=self._next)
            if self._held is not None:
                needed = min(needed, self._held)
            while self._first < needed and (
                len(self._events) > self._retain or self._bytes > self._retain_bytes
            ):
                self._events.popleft()
                self._bytes -= self._sizes.popleft()
                self._first += 1
            self._changed.notify_all()
        return frame

    async def _read(self, reader: Reader) -> pb.ConverseResponse | None:
        async with self._changed:
            await self._changed.wait_for(
                lambda: reader.error is not None or reader.position < self._next or reader.finished
            )
            if reader.error is not None:
                raise reader.error
            if reader.position >= self._next:
                return None
            if reader.position < self._first:  # cannot happen while attached
                raise Expired(self._id(reader.position))
            frame = self._events[reader.position - self._first]
            reader.position += 1
            self._changed.notify_all()  # a producer may wait for this reader
            return frame

    def _wake(self) -> None:
        async def notify() -> None:
            async with self._changed:
                self._changed.notify_all()

        task = asyncio.get_running_loop().create_task(notify())
        _pending.add(task)
        task.add_done_callback(_pending.discard)


_pending: set[asyncio.Task[None]] = set()
