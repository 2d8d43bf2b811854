"""A session's events: the log every server frame goes through, its ids, and what makes a
resume point good.

Every server frame of a session (turn frames, errors, settings changes) is appended to
the session's log once and read by each attached stream through its own `Reader`, so a
stream that drops and comes back, to this chat replica or to another one, resumes from
the last event it saw, without gaps or duplicates.

The log is shared by every replica (`stream.StreamLog`, a JetStream stream), or, for a
single chat process without NATS, kept in its memory (`local.LocalLog`). Either numbers
events with one sequence for all sessions: a session's events have increasing numbers,
not consecutive ones. An event id is `<epoch>.<sequence>`; the epoch names the log (the
JetStream stream's creation, or the process), so an id from an earlier log is known to
be no longer retained instead of being confused with an event of the same number.

A resume point W (the last event a client saw, or where a stream started, which need
not be an event of the session) is good when the log gave it out (`W <= last`) and
every event of the session after it is still retained. Logs drop a session's oldest
events first, so that is `W >= lost_before` (`Bounds`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Protocol

from switchboard.chat.v1 import chat_pb2 as pb

logger = logging.getLogger(__name__)

__all__ = ["Bounds", "Expired", "Reader", "SessionLog", "event_id", "start_after"]

_MAX_DIGITS = 18
"""Digits of the largest event number a log gives out (far more than it ever will)."""


class Expired(Exception):
    """The event to resume after is no longer retained (or was never given out)."""


@dataclass(frozen=True)
class Bounds:
    """What a log holds of one session, for checking a resume point."""

    last: int
    """The log's latest sequence (of any session): no later one was given out."""
    lost_before: int = 0
    """The session's events up to this sequence may have been dropped."""


def event_id(epoch: str, sequence: int) -> str:
    return f"{epoch}.{sequence}"


def start_after(after: str, *, epoch: str, bounds: Bounds) -> int:
    """The sequence a reader resuming after the id `after` starts at.

    Raises:
        Expired: an id of another log, one whose events after it are not all retained,
            or one the log never gave out (not `<epoch>.<digits>`, or beyond its last).
    """
    prefix, _, number = after.partition(".")
    if prefix != epoch or not (number.isascii() and number.isdigit()) or len(number) > _MAX_DIGITS:
        raise Expired(after)
    sequence = int(number)
    if not bounds.lost_before <= sequence <= bounds.last:
        raise Expired(after)
    return sequence + 1


class Reader(Protocol):
    """One stream's cursor into a session's events."""

    @property
    def position(self) -> int:
        """The sequence after the last event read (where a resume from here starts)."""
        ...

    async def next(self) -> pb.ConverseResponse | None:
        """The next event (its event_id set), waiting for it; None once finished.

        Raises:
            BaseException: the error the reader was failed with (`fail`).
        """
        ...

    def fail(self, error: BaseException) -> None:
        """Ends the reader with `error` (raised by `next`)."""
        ...

    def finish(self, upto: int) -> None:
        """Ends the reader once it has read every event up to sequence `upto`."""
        ...

    async def close(self) -> None:
        """Stops reading (idempotent)."""
        ...


class SessionLog(Protocol):
    """Where a session's events are appended and read back, by any replica."""

    epoch: str

    async def append(self, session_id: str, frame: pb.ConverseResponse) -> asyncio.Future[int]:
        """Appends `frame` after every frame appended before it by this process; returns
        when it is on its way, with a future of its sequence once the log holds it.

        Raises:
            Unavailable: `DEPENDENCY_UNAVAILABLE`, an earlier append of the session failed
                (once; the next one tries again).
        """
        ...

    async def bounds(self, session_id: str) -> Bounds: ...

    async def latest(self, session_id: str) -> int:
        """The sequence of the session's latest event (0 if it has none retained)."""
        ...

    def appended(self, session_id: str) -> int:
        """The sequence of the latest event this process appended to the session and the
        log holds (0 if none)."""
        ...

    def watermark(self) -> int:
        """A sequence no later event of any session can have: the latest this process
        knows the log holds (0 before it knows any)."""
        ...

    async def flush(self) -> None:
        """Waits until the log holds every frame appended so far (or failed to)."""
        ...

    async def follow(self, session_id: str, start: int) -> Reader:
        """A reader of the session's events from sequence `start` on, then live ones."""
        ...

    async def read(self, session_id: str, start: int) -> list[pb.ConverseResponse]:
        """The session's events from sequence `start` to the latest one, now."""
        ...

    async def forget(self, session_id: str) -> None:
        """Drops every event of the session (it was deleted)."""
        ...
