"""Sessions with open streams on this replica: their readers, turn queues and cancellation.

A `LiveSession` exists while a session has a stream attached here, a turn running here,
or recently had either: it holds the session's readers of the session log
(`events.SessionLog`, shared by every replica), the user messages waiting for their
turn (one turn at a time, in order), and the turn running now. Streams attach to it
and detach from it; it outlives them:

- a stream that half-closes lets the pending turns finish and reads their events, then
  ends;
- a stream that drops (cancelled by the client, or the connection lost) leaves the
  turn running for a grace period (`resume_grace`): a stream resuming within it, here
  or on another replica, receives what it missed and the rest of the answer. When the
  grace period ends with no stream attached here, the running turn is cancelled (its
  partial answer stored as CANCELLED, its admission lease released by the inference
  service) and the waiting messages are dropped; while the replica drains (it is
  stopping), turns are never abandoned: they finish for whoever resumes elsewhere;
- a message sent with SendMessage (the browser's contract) is *detached* from streams:
  its turn runs to its end whether or not anyone watches, since a page that reloads or
  loses its connection takes longer than any grace period to come back, and the
  answer is what the unary call asked for. Only CancelTurn (either form), deleting the
  session or a failure stops it; the grace period's cancellation above spares it, and
  the messages waiting after it. StreamEvents readers are watchers: their leaving
  never cancels anything;
- an idle session without streams is forgotten after `idle_ttl` (its events stay in
  the log, for resumes on any replica).

Turns of one session never overlap, on one replica or across them: a turn runs under
the session's turn lease (`leases`), which a turn of another replica waits for.

Client frames are not checked by the runtime (it checks single requests only): each is
checked here against its contract's constraints (`request_violations`), the first one
before the stream is attached (a bad one ends the stream), every later one on its own
(a bad one is answered with an ErrorFrame). A user message's size limit comes first,
as its own RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any

from buf.validate import validate_pb2
from google.protobuf.message import Message
from switchboard.chat.v1 import chat_pb2 as pb

from services.chat.claims import Claims, LocalClaims
from services.chat.events import Expired, Reader, SessionLog, event_id, start_after
from services.chat.leases import Lease, TurnLeases, TurnRecord
from services.chat.notices import CHANGED_SETTINGS, DELETED, RESUMED, Notices, QuietNotices
from services.chat.sessions import load_session, settings_update, update_session
from services.chat.store import SessionStore, canonical_id
from services.chat.turns import Turn, Turns
from services.runtime import (
    FailedPrecondition,
    FieldViolation,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    SwitchboardError,
    Unavailable,
    invalid,
    request_violations,
)

logger = logging.getLogger(__name__)

RECENT_CLIENT_IDS = 1000
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
    """Seconds an idle session without streams stays live on this replica."""


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


_background: set[asyncio.Task[Any]] = set()


def _spawn(work: Coroutine[Any, Any, Any]) -> None:
    task = asyncio.get_running_loop().create_task(work)
    _background.add(task)
    task.add_done_callback(_background.discard)


class LiveSession:
    def __init__(
        self,
        tenant_id: str,
        session_id: str,
        *,
        turns: Turns,
        limits: Limits,
        log: SessionLog,
        leases: TurnLeases,
        claims: Claims,
    ) -> None:
        self.tenant_id = tenant_id
        self.session_id = session_id
        self.readers: set[Reader] = set()
        self.seen: set[str] = set()
        self.settings = pb.SessionSettings()
        """The session's settings as of the last change through this process (turns read
        them here instead of from the database)."""
        self.draining = False
        """The replica is stopping: turns run to their end, whoever watches."""
        self._limits = limits
        self._turns = turns
        self._log = log
        self._leases = leases
        self._claims = claims
        self._pending: deque[Queued] = deque()
        self._worker: asyncio.Task[None] | None = None
        self._turn: asyncio.Task[None] | None = None
        self._running: Turn | None = None
        self._lease: Lease | None = None
        self._turn_detached = False
        self.turn_message_id = ""  # the assistant message being generated
        self._idle = asyncio.Event()
        self._idle.set()
        self._grace: asyncio.TimerHandle | None = None
        self._attached_at = 0.0
        self._arriving = 0
        self._resumed_elsewhere_at = float("-inf")
        self.idle_since = time.monotonic()
        self.closed: SwitchboardError | None = None

    # ---- streams -----------------------------------------------------------------------

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """A stream is being attached (its resume point checked, its reader made): the
        grace period does not end meanwhile."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1

    def attach(self, reader: Reader) -> None:
        self._stop_grace()
        self.readers.add(reader)
        self._attached_at = time.monotonic()

    def _stop_grace(self) -> None:
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None

    async def detach(self, reader: Reader, *, clean: bool) -> None:
        self.readers.discard(reader)
        await reader.close()
        self.idle_since = time.monotonic()
        if self.readers or clean or self._idle.is_set() or self.draining:
            return
        loop = asyncio.get_running_loop()
        self._grace = loop.call_later(self._limits.resume_grace, self.abandon)

    def abandon(self) -> None:
        """No stream came back: drop the waiting Converse messages, cancel the running
        turn if a Converse stream started it (detached ones go on)."""
        self._grace = None
        if self.readers or self.draining or self._resumed_elsewhere_at >= self._attached_at:
            return  # a stream is here, the replica stops, or the client moved elsewhere
        if self._arriving:  # one is on its way: give it its time
            loop = asyncio.get_running_loop()
            self._grace = loop.call_later(self._limits.resume_grace, self.abandon)
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

    def resumed_elsewhere(self) -> None:
        """A Converse stream of the session resumed on another replica since one last
        attached here: the turn here is not abandoned when that one drops (its client
        moved, or another client follows the turn)."""
        self._resumed_elsewhere_at = time.monotonic()
        self._stop_grace()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    @property
    def running(self) -> bool:
        """Whether a turn of the session runs here now."""
        return self._turn is not None and not self._turn.done()

    @property
    def idle(self) -> bool:
        return self._idle.is_set()

    # ---- frames ------------------------------------------------------------------------

    async def emit(self, frame: pb.ConverseResponse) -> None:
        sequence = await self._log.append(self.session_id, frame)
        if frame.HasField("turn_started") and (lease := self._lease) is not None:
            # where a watcher starting at the turn in progress starts
            sequence.add_done_callback(
                lambda done: done.cancelled() or _spawn(lease.started(done.result()))
            )

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

    def last_event_id(self) -> str:
        """The id of the latest event this replica appended to the session ("" if none)."""
        sequence = self._log.appended(self.session_id)
        return event_id(self._log.epoch, sequence) if sequence else ""

    async def submit(self, message: pb.UserMessage) -> None:
        """Queues a Converse user message for its turn, or answers it with an ErrorFrame."""
        try:
            await self.accept(message)
        except SwitchboardError as problem:
            await self.error(problem, message.client_message_id)

    async def accept(self, message: pb.UserMessage, *, detached: bool = False) -> bool:
        """Queues a user message for its turn; False for one whose client_message_id was
        already accepted, here or on another replica (it is not answered again).

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
            if not await self._claims.claim(self.session_id, message.client_message_id):
                logger.debug("message %s accepted elsewhere", message.client_message_id)
                return False
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
        """Stops the answer being generated here (if it is the one named); whether there
        was one to stop."""
        if self._turn is None or self._turn.done():
            return False
        if assistant_message_id and assistant_message_id != self.turn_message_id:
            return False
        self._turn.cancel()
        return True

    def interrupt(self, error: SwitchboardError) -> None:
        """Ends the running turn as interrupted by `error` (the replica is stopping: its
        partial answer stored FAILED) and drops the waiting messages."""
        self._pending.clear()
        if self._turn is not None and self._running is not None and not self._turn.done():
            self._running.interrupt(error)
            self._turn.cancel()

    async def _work(self) -> None:
        try:
            while self._pending and self.closed is None:
                await self._take_turn(self._pending.popleft())
        finally:
            self._turn = None
            self.idle_since = time.monotonic()
            self._idle.set()

    async def _take_turn(self, queued: Queued) -> None:
        """Runs one message's turn under the session's turn lease."""
        message = queued.message
        turn = self._turns.turn(
            self.tenant_id,
            self.session_id,
            self.settings,
            message,
            emit=self.emit,
            last_event_id=self.last_event_id,
        )
        record = TurnRecord(
            tenant_id=self.tenant_id,
            session_id=self.session_id,
            assistant_id=turn.assistant_id,
            client_message_id=message.client_message_id,
            owner="",
            after=self._log.watermark(),
        )
        try:
            lease = await self._leases.acquire(record)
        except SwitchboardError as problem:
            await self._say(problem, message.client_message_id)
            return
        self._lease, self._running = lease, turn
        self._turn_detached = queued.detached
        self.turn_message_id = turn.assistant_id
        self._turn = asyncio.create_task(turn.run())
        lost = asyncio.create_task(self._stop_when_lost(lease, turn, self._turn))
        try:
            try:
                await asyncio.wait({self._turn})
            except asyncio.CancelledError:  # the session is going: so is its turn
                self._turn.cancel()
                raise
            if not self._turn.cancelled() and (exc := self._turn.exception()) is not None:
                # the turn could not start (the session is gone, the store is down)
                if not isinstance(exc, SwitchboardError):
                    logger.error("turn failed", exc_info=exc)
                    exc = Internal(f"the message failed: {type(exc).__name__}")
                await self._say(exc, message.client_message_id)
                if exc.code == NotFound.code:
                    self.close(exc)
        finally:
            lost.cancel()
            self._lease = self._running = self._turn = None
            self.turn_message_id = ""
            await lease.release()

    @staticmethod
    async def _stop_when_lost(lease: Lease, turn: Turn, task: asyncio.Task[None]) -> None:
        await lease.lost.wait()
        turn.abandon()
        task.cancel()

    async def _say(self, error: SwitchboardError, client_message_id: str) -> None:
        """An ErrorFrame that may not reach the log (it is what failed)."""
        try:
            await self.error(error, client_message_id)
        except SwitchboardError as problem:
            logger.warning("error frame lost: %s", problem, extra={"session_id": self.session_id})

    def close(self, error: SwitchboardError) -> None:
        """Ends the session's streams with `error` (the session was deleted)."""
        self.closed = error
        self._pending.clear()
        if self._turn is not None:
            self._turn.cancel()
        for reader in self.readers:
            reader.fail(error)


class Hub:
    """The live sessions of this replica."""

    def __init__(
        self,
        store: SessionStore,
        turns: Turns,
        limits: Limits,
        *,
        log: SessionLog,
        leases: TurnLeases,
        notices: Notices | None = None,
        claims: Claims | None = None,
        replica: str = "",
    ) -> None:
        self._store = store
        self._turns = turns
        self.limits = limits
        self._log = log
        self._leases = leases
        self._notices = notices or QuietNotices()
        self._claims = claims or LocalClaims()
        self._replica = replica
        self._sessions: dict[str, LiveSession] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._draining = False

    def __len__(self) -> int:
        return len(self._sessions)

    async def start(self) -> None:
        """Starts hearing the other replicas (`notices`)."""
        await self._notices.serve(self._stop_here, self._heard)

    def _id(self, sequence: int) -> str:
        return event_id(self._log.epoch, sequence)

    async def attach(
        self, tenant_id: str, frame: pb.ConverseRequest
    ) -> tuple[LiveSession, Reader, pb.ConverseResponse]:
        """Attaches a stream by its first frame; returns the session, the stream's reader
        and the SessionOpened frame.

        Raises:
            InvalidArgument: `FRAME_OUT_OF_ORDER` (the first frame is not open/resume).
            NotFound: `SESSION_NOT_FOUND` (also another tenant's session).
            FailedPrecondition: `EVENT_HISTORY_EXPIRED`.
        """
        kind = frame.WhichOneof("frame")
        if kind not in ("open", "resume"):
            raise out_of_order(f"got `{kind}` before open" if kind else "got an empty frame")
        if (problem := frame_error(getattr(frame, kind), kind)) is not None:
            raise problem
        session_id = frame.open.session_id if kind == "open" else frame.resume.session_id
        live, session = await self._live(tenant_id, session_id)
        with live.arriving():
            latest = await self._log.latest(live.session_id)
            session.last_event_id = self._id(latest) if latest else ""
            if kind == "open":
                start, opened_id = latest + 1, session.last_event_id
            else:
                after = frame.resume.last_event_id
                start = await self._start_after(live.session_id, after) if after else 1
                opened_id = after
                await self._notices.tell(live.session_id, RESUMED)
            reader = await self._follow(live, start)
        opened = pb.ConverseResponse(
            event_id=opened_id,
            opened=pb.SessionOpened(session=session, resumed=kind == "resume"),
        )
        return live, reader, opened

    async def watch(
        self, tenant_id: str, session_id: str, after_event_id: str
    ) -> tuple[LiveSession, Reader, pb.ConverseResponse]:
        """Attaches a watcher (StreamEvents): after `after_event_id`, or from the turn in
        progress (on any replica) when it is empty. Returns the session, the reader and
        the SessionOpened frame, whose event_id is where the reader starts.

        Raises:
            NotFound: `SESSION_NOT_FOUND` (also another tenant's session).
            FailedPrecondition: `EVENT_HISTORY_EXPIRED`.
        """
        live, session = await self._live(tenant_id, session_id)
        sid = live.session_id
        with live.arriving():
            if after_event_id:
                start = await self._start_after(sid, after_event_id)
            elif (running := self._leases.running(sid)) is not None:
                start = running.start
            else:
                start = (await self._log.bounds(sid)).last + 1
            latest = await self._log.latest(sid)
            session.last_event_id = self._id(latest) if latest else ""
            reader = await self._follow(live, start)
        opened = pb.ConverseResponse(
            event_id=after_event_id or self._id(start - 1),
            opened=pb.SessionOpened(session=session, resumed=bool(after_event_id)),
        )
        return live, reader, opened

    async def _start_after(self, session_id: str, after: str) -> int:
        """Where a reader resuming after `after` starts.

        Raises:
            FailedPrecondition: `EVENT_HISTORY_EXPIRED`.
        """
        try:
            bounds = await self._log.bounds(session_id)
            return start_after(after, epoch=self._log.epoch, bounds=bounds)
        except Expired:
            raise FailedPrecondition(
                f"event {after!r} is no longer retained; read the history with ListMessages"
                " and open the session",
                reason="EVENT_HISTORY_EXPIRED",
                metadata={"session_id": session_id, "last_event_id": after},
            ) from None

    async def _follow(self, live: LiveSession, start: int) -> Reader:
        reader = await self._log.follow(live.session_id, start)
        live.attach(reader)
        return reader

    async def send(self, tenant_id: str, request: pb.SendMessageRequest) -> pb.SendMessageResponse:
        """Queues a SendMessage's message, detached from streams (see the module).

        Raises:
            NotFound: `SESSION_NOT_FOUND` (also another tenant's session).
            ResourceExhausted, InvalidArgument: as `LiveSession.accept`.
        """
        live, _ = await self._live(tenant_id, request.session_id)
        last = self._id((await self._log.bounds(live.session_id)).last)
        accepted = await live.accept(request.message, detached=True)
        return pb.SendMessageResponse(accepted=accepted, last_event_id=last)

    async def cancel(self, tenant_id: str, request: pb.CancelTurnRequest) -> bool:
        """CancelTurn: whether an answer was being generated and is being stopped.

        Raises:
            NotFound: `SESSION_NOT_FOUND` (also another tenant's session).
        """
        row = await self._store.get(tenant_id, request.session_id)  # NOT_FOUND first
        return await self._cancel(row.session_id, request.assistant_message_id)

    async def _cancel(self, session_id: str, assistant_id: str) -> bool:
        """Stops the session's answer `assistant_id` (empty: the current one) on whichever
        replica generates it; whether one was stopped."""
        stopped = self._stop_here(session_id, assistant_id)
        if stopped is not None:
            return stopped
        record = self._leases.running(session_id)
        if (
            record is None
            or record.owner == self._replica
            or (assistant_id and assistant_id != record.assistant_id)
        ):
            return False
        return await self._notices.cancel(session_id, assistant_id)

    def _stop_here(self, session_id: str, assistant_id: str) -> bool | None:
        """Whether the session's turn running here was stopped; None if none runs here."""
        live = self._sessions.get(session_id)
        if live is None or not live.running:
            return None
        return live.cancel(assistant_id)

    async def _heard(self, session_id: str, kind: str) -> None:
        """What another replica said of a session live here."""
        live = self._sessions.get(session_id)
        if live is None:
            return
        if kind == RESUMED:
            live.resumed_elsewhere()
        elif kind == DELETED:
            self._end(session_id)
        elif kind == CHANGED_SETTINGS:
            try:
                live.settings = (await self._store.get(live.tenant_id, session_id)).settings
            except SwitchboardError as problem:
                logger.warning(
                    "settings not reloaded: %s", problem, extra={"session_id": session_id}
                )

    async def _live(self, tenant_id: str, session_id: str) -> tuple[LiveSession, pb.Session]:
        """The tenant's session, live in this process (loaded if it was not).

        Raises:
            NotFound: `SESSION_NOT_FOUND` (also another tenant's session).
        """
        session, seen = await load_session(  # NOT_FOUND first
            self._store, tenant_id, session_id, recent_ids=RECENT_CLIENT_IDS
        )
        session_id = session.session_id
        lock = self._locks.setdefault(session_id, asyncio.Lock())
        async with lock:
            live = self._sessions.get(session_id)
            if live is None or live.closed is not None:
                live = LiveSession(
                    tenant_id,
                    session_id,
                    turns=self._turns,
                    limits=self.limits,
                    log=self._log,
                    leases=self._leases,
                    claims=self._claims,
                )
                live.seen = seen
                live.settings = session.settings
                live.draining = self._draining
                self._sessions[session_id] = live
        return live, session

    async def serve(
        self, live: LiveSession, reader: Reader, frames: AsyncIterator[pb.ConverseRequest]
    ) -> None:
        """Dispatches a stream's frames after the first; on half-close, finishes the
        reader once the session's turns here are done and their events in the log."""
        async for frame in frames:
            kind = frame.WhichOneof("frame")
            if kind == "message":
                await live.submit(frame.message)  # checked after its size limit
            elif kind in ("cancel", "settings") and (
                problem := frame_error(getattr(frame, kind), kind)
            ):
                await live.error(problem)
            elif kind == "cancel":
                await self._cancel(live.session_id, frame.cancel.assistant_message_id)
            elif kind == "settings":
                await self._change_settings(live, frame.settings)
            else:
                got = f"got `{kind}`" if kind else "got an empty frame"
                reader.fail(out_of_order(f"{got} after the stream was attached"))
                return
        await live.wait_idle()
        await self._log.flush()
        reader.finish(self._log.appended(live.session_id))

    async def _change_settings(self, live: LiveSession, change: pb.ChangeSettings) -> None:
        try:
            request = settings_update(live.session_id, change)
            session = await update_session(self._store, live.tenant_id, request)
        except SwitchboardError as error:
            await live.error(error)
            return
        await self.updated(session)
        await live.emit(pb.ConverseResponse(settings_changed=pb.SettingsChanged(session=session)))

    async def updated(self, session: pb.Session) -> None:
        """The session's settings were changed (UpdateSession, a settings frame): later
        turns use them, on every replica."""
        if (live := self._sessions.get(session.session_id)) is not None:
            live.settings = session.settings
        await self._notices.tell(session.session_id, CHANGED_SETTINGS)

    async def delete(self, session_id: str) -> None:
        """Ends the streams of a deleted session on every replica, however its id was
        spelled, and drops its events."""
        try:
            session_id = canonical_id(session_id)
        except NotFound:
            return
        self._end(session_id)
        await self._notices.tell(session_id, DELETED)
        await self._log.forget(session_id)

    def _end(self, session_id: str) -> None:
        live = self._sessions.pop(session_id, None)
        self._locks.pop(session_id, None)
        if live is not None:
            live.close(
                NotFound(
                    f"session {session_id!r} was deleted",
                    reason="SESSION_NOT_FOUND",
                    metadata={"session_id": session_id},
                )
            )

    def collect_idle(self, now: float | None = None) -> int:
        """Forgets idle sessions without streams older than idle_ttl; returns how many."""
        now = time.monotonic() if now is None else now
        stale = [
            sid
            for sid, live in self._sessions.items()
            if live.idle and not live.readers and now - live.idle_since > self.limits.idle_ttl
        ]
        for sid in stale:
            del self._sessions[sid]
            self._locks.pop(sid, None)
        return len(stale)

    def drain(self) -> None:
        """The replica is stopping: running and waiting turns are no longer abandoned
        when their streams drop (their clients resume on another replica)."""
        self._draining = True
        for live in self._sessions.values():
            live.draining = True

    async def finish(self, grace: float, interruption: SwitchboardError) -> None:
        """Lets the turns here end within `grace` seconds, then interrupts the rest with
        `interruption` and waits for them to say so."""
        lives = list(self._sessions.values())
        busy = [asyncio.ensure_future(live.wait_idle()) for live in lives if not live.idle]
        if not busy:
            return
        _, late = await asyncio.wait(busy, timeout=grace)
        if late:
            logger.warning("interrupting %d turns still running", len(late))
            for live in lives:
                live.interrupt(interruption)
            await asyncio.wait(late, timeout=10)

    def close(self) -> None:
        """Ends every stream and turn (the service is stopping)."""
        for live in self._sessions.values():
            live.close(
                Unavailable(
                    "the chat service is restarting; resume shortly", reason="SHUTTING_DOWN"
                )
            )
