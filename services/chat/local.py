"""A session log and turn leases kept in one chat process's memory.

For a chat service that runs as one process without NATS (nothing to share with), and
for unit tests. They keep the contracts of `events.SessionLog` and `leases.TurnLeases`
within the process: every session's events numbered with one sequence, the last
`retain` events (at most `retain_bytes` of them) of each session kept for resumes, and
those of its turn in progress however many; one turn at a time per session, whose
owner (this process) never dies while it runs.

Flow control: appending while a reader of the session is `window` events behind waits
until it catches up, so a slow client slows its own session's generation instead of
growing a buffer; the events a reader still needs are never dropped.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import secrets
from dataclasses import dataclass, field, replace

from switchboard.chat.v1 import chat_pb2 as pb

from services.chat.events import Bounds, event_id
from services.chat.leases import TurnRecord

logger = logging.getLogger(__name__)

__all__ = ["LocalLeases", "LocalLog"]


@dataclass
class _Events:
    sequences: list[int] = field(default_factory=list)
    frames: list[pb.ConverseResponse] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    size: int = 0
    lost_before: int = 0
    held: int | None = None  # the TurnStarted of the turn in progress
    readers: set[LocalReader] = field(default_factory=set)


class LocalReader:
    def __init__(self, log: LocalLog, events: _Events, start: int) -> None:
        self._log = log
        self._events = events
        self.position = start
        self._error: BaseException | None = None
        self._upto: int | None = None

    async def next(self) -> pb.ConverseResponse | None:
        return await self._log._read(self)

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._log._wake()

    def finish(self, upto: int) -> None:
        self._upto = upto
        self._log._wake()

    async def close(self) -> None:
        self._events.readers.discard(self)
        self._log._wake()

    def _ready(self) -> bool:
        events = self._events
        return (
            self._error is not None
            or (bool(events.sequences) and events.sequences[-1] >= self.position)
            or (self._upto is not None and self.position > self._upto)
        )


class LocalLog:
    def __init__(
        self, *, retain: int = 1024, retain_bytes: int = 1 << 20, window: int = 256
    ) -> None:
        if not 0 < window <= retain:
            raise ValueError("need 0 < window <= retain")
        self.epoch = secrets.token_hex(4)
        self._retain = retain
        self._retain_bytes = retain_bytes
        self._window = window
        self._last = 0
        self._sessions: dict[str, _Events] = {}
        self._appended: dict[str, int] = {}
        self._changed = asyncio.Condition()

    def _session(self, session_id: str) -> _Events:
        return self._sessions.setdefault(session_id, _Events())

    def _lag(self, events: _Events) -> int:
        slowest = min((r.position for r in events.readers), default=self._last + 1)
        return len(events.sequences) - bisect.bisect_left(events.sequences, slowest)

    async def append(self, session_id: str, frame: pb.ConverseResponse) -> asyncio.Future[int]:
        events = self._session(session_id)
        async with self._changed:
            await self._changed.wait_for(lambda: self._lag(events) < self._window)
            self._last += 1
            frame.event_id = event_id(self.epoch, self._last)
            size = frame.ByteSize()
            events.sequences.append(self._last)
            events.frames.append(frame)
            events.sizes.append(size)
            events.size += size
            self._appended[session_id] = self._last
            if frame.HasField("turn_started"):
                events.held = self._last
            elif frame.HasField("turn_completed"):
                events.held = None
            self._trim(events)
            self._changed.notify_all()
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        done.set_result(self._last)
        return done

    def _trim(self, events: _Events) -> None:
        """Forgets the oldest events beyond the budget, never one a reader still needs
        nor one of the turn in progress (a watcher may start at its TurnStarted)."""
        needed = min((r.position for r in events.readers), default=self._last + 1)
        if events.held is not None:
            needed = min(needed, events.held)
        drop = 0
        size = events.size
        while (
            drop < len(events.sequences)
            and events.sequences[drop] < needed
            and (len(events.sequences) - drop > self._retain or size > self._retain_bytes)
        ):
            size -= events.sizes[drop]
            drop += 1
        if drop:
            events.lost_before = events.sequences[drop - 1]
            del events.sequences[:drop], events.frames[:drop], events.sizes[:drop]
            events.size = size

    async def bounds(self, session_id: str) -> Bounds:
        return Bounds(last=self._last, lost_before=self._session(session_id).lost_before)

    async def latest(self, session_id: str) -> int:
        sequences = self._session(session_id).sequences
        return sequences[-1] if sequences else 0

    def appended(self, session_id: str) -> int:
        return self._appended.get(session_id, 0)

    def watermark(self) -> int:
        return self._last

    async def flush(self) -> None:
        return None

    async def follow(self, session_id: str, start: int) -> LocalReader:
        events = self._session(session_id)
        reader = LocalReader(self, events, start)
        events.readers.add(reader)
        return reader

    async def read(self, session_id: str, start: int) -> list[pb.ConverseResponse]:
        events = self._session(session_id)
        return events.frames[bisect.bisect_left(events.sequences, start) :]

    async def forget(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)
        self._appended.pop(session_id, None)

    async def _read(self, reader: LocalReader) -> pb.ConverseResponse | None:
        async with self._changed:
            await self._changed.wait_for(reader._ready)
            if reader._error is not None:
                raise reader._error
            events = reader._events
            at = bisect.bisect_left(events.sequences, reader.position)
            if at == len(events.sequences):
                return None  # finished
            frame = events.frames[at]
            reader.position = events.sequences[at] + 1
            self._changed.notify_all()  # an append may wait for this reader
            return frame

    def _wake(self) -> None:
        async def notify() -> None:
            async with self._changed:
                self._changed.notify_all()

        task = asyncio.get_running_loop().create_task(notify())
        _pending.add(task)
        task.add_done_callback(_pending.discard)


_pending: set[asyncio.Task[None]] = set()


class LocalLease:
    def __init__(self, leases: LocalLeases, record: TurnRecord) -> None:
        self._leases = leases
        self.record = record
        self.lost = asyncio.Event()  # never set: this process is the only owner

    async def started(self, sequence: int) -> None:
        self.record = replace(self.record, started=sequence)
        self._leases._running[self.record.session_id] = self.record

    async def release(self) -> None:
        if self._leases._running.get(self.record.session_id) is not None:
            del self._leases._running[self.record.session_id]


class LocalLeases:
    """Turns of this process; its sessions run one turn at a time already."""

    def __init__(self) -> None:
        self._running: dict[str, TurnRecord] = {}

    async def acquire(self, record: TurnRecord) -> LocalLease:
        self._running[record.session_id] = record
        return LocalLease(self, record)

    def running(self, session_id: str) -> TurnRecord | None:
        return self._running.get(session_id)

    async def close(self) -> None:
        self._running.clear()
