"""A session with open Converse streams, in the process that runs its turns: its event
log, its turn queue and cancellation.

A `LiveSession` exists while a session has a stream attached, a turn running, or
recently had either: it owns the session's event log (`events.EventLog`), the user
messages waiting for their turn (one turn at a time, in order), and the turn running
now. Streams attach to it and detach from it (here, or on another replica, reading the
shared log: `remote_readers`); it outlives them:

- a stream that half-closes lets the pending turns finish and reads their events, then
  ends;
- a stream that drops (cancelled by the client, or the connection lost) leaves the
  turn running for a grace period (`resume_grace`): a stream resuming within it
  receives what it missed and the rest of the answer. When the grace period ends with
  no stream attached, the running turn is cancelled (its partial answer stored as
  CANCELLED, its admission lease released by the inference service) and the waiting
  messages are dropped;
- a message sent with SendMessage (the browser's contract) is *detached* from streams:
  its turn runs to its end whether or not anyone watches, since a page that reloads or
  loses its connection takes longer than any grace period to come back, and the
  answer is what the unary call asked for. Only CancelTurn (either form), deleting the
  session or a failure stops it; the grace period's cancellation above spares it, and
  the messages waiting after it. StreamEvents readers are watchers: their leaving
  never cancels anything;
- on a draining replica, streams leaving cancel nothing: they resume elsewhere while
  the turns finish here.

Client frames are not checked by the runtime (it checks single requests only): each is
checked against its contract's constraints (`request_violations`, `frame_error`), the
first one before the stream is attached (a bad one ends the stream), every later one
on its own (a bad one is answered with an ErrorFrame). A user message's size limit
comes first, as its own RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from buf.validate import validate_pb2
from google.protobuf.message import Message
from switchboard.chat.v1 import chat_pb2 as pb

from services.chat.events import EventLog, Reader
from services.chat.turns import Turns
from services.runtime import (
    FieldViolation,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    SwitchboardError,
    invalid,
    request_violations,
)

logger = logging.getLogger(__name__)

MAX_CLIENT_ID_CHARS = (
    pb.UserMessage.DESCRIPTOR.fields_by_name["client_message_id"]
    .GetOptions()
    .Extensions[validate_pb2.field]
    .string.max_len
)
"""UserMessage.client_message_id's bound, as its contract states it."""


@dataclass(frozen=True)
class Limits:
    max_message_bytes: int = 32 * 1024
    """Largest user message text, in UTF-8 bytes (an ErrorFrame RESOURCE_EXHAUSTED above)."""
    max_pending: int = 8
    """User messages waiting behind the running turn; more get an ErrorFrame."""
    resume_grace: float = 0.5
    """Seconds a turn keeps running after its last stream dropped, for a resume."""
    idle_ttl: float = 120.0
    """Seconds an idle session without streams keeps its events for a resume."""
    retain_events: int = 1024
    """Events kept per session for resumes."""
    retain_bytes: int = 1 << 20
    """Bytes of events kept per session for resumes (the events' encoded size)."""
    flow_window: int = 256
    """Events an attached stream may fall behind before its session's turn waits."""


@dataclass(frozen=True)
class Queued:
    """A user message waiting for its turn."""

    message: pb.UserMessage
    detached: bool = field(default=False)
    """Sent with SendMessage: its turn runs whether or not a stream watches."""


def frame_error(part: Message, where: str) -> InvalidArgument | None:
    """The INVALID_ARGUMENT for a frame's `part` (its `where` field of ConverseRequest)
    that breaks its constraints, with paths from the frame (`message.client_message_id`);
    None if it keeps them."""
    if violations := request_violations(part):
        return invalid(
            [FieldViolation(f"{where}.{v.field}", v.description) for v in violations],
            what="ConverseRequest",
        )
    return None


def out_of_order(what: str) -> InvalidArgument:
    return InvalidArgument(
        f"{what}: the first frame must be `open` or `resume`, and only the first",
        reason="FRAME_OUT_OF_ORDER",
    )


class LiveSession:
    def __init__(
        self,
        tenant_id: str,
        session_id: str,
        *,
        turns: Turns,
        limits: Limits,
        publish: Callable[[str, pb.ConverseResponse], None] | None = None,
    ) -> None:
        self.tenant_id = tenant_id
        self.session_id = session_id
        self.log = EventLog(
            retain=limits.retain_events,
            window=limits.flow_window,
            retain_bytes=limits.retain_bytes,
        )
        self.seen: set[str] = set()
        self.settings = pb.SessionSettings()
        """The session's settings as of the last change through this process (turns read
        them here instead of from the database)."""
        self._limits = limits
        self._turns = turns
        self._pending: deque[Queued] = deque()
        self._worker: asyncio.Task[None] | None = None
        self._turn: asyncio.Task[None] | None = None
        self._turn_detached = False
        self.turn_message_id = ""  # the assistant message being generated
        self._idle = asyncio.Event()
        self._idle.set()
        self._grace: asyncio.TimerHandle | None = None
        self.idle_since = time.monotonic()
        self.closed: SwitchboardError | None = None
        self._publish = publish
        self.remote_readers = 0
        """Streams of this session on other replicas (they read the shared log)."""
        self.draining = False
        """The replica is stopping: its streams were told to resume elsewhere, and their
        leaving cancels nothing (the turns finish here, read from the shared log)."""

    # ---- streams -----------------------------------------------------------------------

    def attach(self, after_event_id: str | None) -> Reader:
        self._stop_grace()
        return self.log.attach(after_event_id)

    def attach_held(self) -> Reader:
        """A reader from the turn in progress's first event (new events if none)."""
        self._stop_grace()
        return self.log.attach_held()

    def _stop_grace(self) -> None:
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None

    def detach(self, reader: Reader, *, clean: bool) -> None:
        self.log.detach(reader)
        self.left(clean=clean)

    def attach_remote(self) -> None:
        self._stop_grace()
        self.remote_readers += 1

    def detach_remote(self, *, clean: bool) -> None:
        self.remote_readers = max(0, self.remote_readers - 1)
        self.left(clean=clean)

    @property
    def watched(self) -> bool:
        return bool(self.log.readers or self.remote_readers)

    def left(self, *, clean: bool) -> None:
        """A stream left; one that dropped starts the grace period if it was the last."""
        self.idle_since = time.monotonic()
        if self.watched or clean or self.draining or self._idle.is_set():
            return
        loop = asyncio.get_running_loop()
        self._grace = loop.call_later(self._limits.resume_grace, self.abandon)

    def abandon(self) -> None:
        """No stream came back: drop the waiting Converse messages, cancel the running
        turn if a Converse stream started it (detached ones go on)."""
        self._grace = None
        if self.watched or self.draining:
            return
        kept = deque(q for q in self._pending if q.detached)
        running = self._turn is not None and not self._turn_detached
        if running or len(kept) < len(self._pending):
            logger.info(
                "client gone, cancelling the answer",
                extra={"session_id": self.session_id, "pending": len(self._pending) - len(kept)},
            )
        self._pending = kept
        if running and self._turn is not None:
            self._turn.cancel()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    @property
    def idle(self) -> bool:
        return self._idle.is_set()

    # ---- frames ------------------------------------------------------------------------

    async def emit(self, frame: pb.ConverseResponse) -> pb.ConverseResponse:
        # a turn's events are kept while it runs, for a watcher starting at its start
        frame = await self.log.append(frame, hold=frame.HasField("turn_started"))
        if self._publish is not None:
            self._publish(self.session_id, frame)
        return frame

    async def error(self, error: SwitchboardError, client_message_id: str = "") -> None:
        await self.emit(
            pb.ConverseResponse(
                error=pb.ErrorFrame(
                    status=error.to_rpc_status(),
                    # an id over its bound is refused; what is echoed stays within it
                    client_message_id=client_message_id[:MAX_CLIENT_ID_CHARS],
                )
            )
        )

    async def submit(self, message: pb.UserMessage) -> None:
        """Queues a Converse user message for its turn, or answers it with an ErrorFrame."""
        try:
            self.accept(message)
        except SwitchboardError as problem:
            await self.error(problem, message.client_message_id)

    def accept(self, message: pb.UserMessage, *, detached: bool = False) -> bool:
        """Queues a user message for its turn; False for one whose client_message_id was
        already accepted (it is not answered again).

        Raises:
            ResourceExhausted: `MESSAGE_TOO_LARGE`, `TOO_MANY_PENDING_MESSAGES`.
            InvalidArgument: the message breaks its constraints.
        """
        problem = self._check(message)
        if problem is not None:
            raise problem
        if message.client_message_id:
            if message.client_message_id in self.seen:
                logger.debug("duplicate message %s ignored", message.client_message_id)
                return False
            self.seen.add(message.client_message_id)
        self._pending.append(Queued(message, detached))
        self._idle.clear()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work())
        return True

    def _check(self, message: pb.UserMessage) -> SwitchboardError | None:
        size = len(message.text.encode())
        if size > self._limits.max_message_bytes:
            return ResourceExhausted(
                f"the message is {size} bytes; the limit is {self._limits.max_message_bytes}",
                reason="MESSAGE_TOO_LARGE",
                metadata={"limit_bytes": str(self._limits.max_message_bytes)},
            )
        if (problem := frame_error(message, "message")) is not None:
            return problem
        if len(self._pending) >= self._limits.max_pending:
            return ResourceExhausted(
                f"{len(self._pending)} messages are already waiting for their turn",
                reason="TOO_MANY_PENDING_MESSAGES",
                metadata={"limit": str(self._limits.max_pending)},
            )
        return None

    def cancel(self, assistant_message_id: str) -> bool:
        """Stops the answer being generated (if it is the one named); whether there was
        one to stop."""
        if self._turn is None or self._turn.done():
            return False
        if assistant_message_id and assistant_message_id != self.turn_message_id:
            return False
        self._turn.cancel()
        return True

    async def _work(self) -> None:
        try:
            while self._pending and self.closed is None:
                queued = self._pending.popleft()
                message = queued.message
                self._turn_detached = queued.detached
                turn = self._turns.turn(
                    self.tenant_id,
                    self.session_id,
                    self.settings,
                    message,
                    emit=self.emit,
                    last_event_id=lambda: self.log.last_event_id,
                )
                self.turn_message_id = turn.assistant_id
                self._turn = asyncio.create_task(turn.run())
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait({self._turn})
                if not self._turn.cancelled() and (exc := self._turn.exception()) is not None:
                    # the turn could not start (the session is gone, the store is down)
                    if not isinstance(exc, SwitchboardError):
                        logger.error("turn failed", exc_info=exc)
                        exc = Internal(f"the message failed: {type(exc).__name__}")
                    await self.error(exc, message.client_message_id)
                    if exc.code == NotFound.code:
                        self.close(exc)
                self._turn = None
                self.turn_message_id = ""
                self.log.release()
        finally:
            self.log.release()
            self._turn = None
            self.idle_since = time.monotonic()
            self._idle.set()

    def close(self, error: SwitchboardError) -> None:
        """Ends the session's streams with `error` (the session was deleted)."""
        self.closed = error
        self._pending.clear()
        if self._turn is not None:
            self._turn.cancel()
        self.log.fail_readers(error)
