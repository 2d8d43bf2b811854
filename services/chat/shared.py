"""What the chat replicas share, over NATS: each session's events, its owner, and the
way to reach the owner.

A session has one *owner*, the replica that runs its turns (one at a time, in order)
and numbers its events; any replica may serve its streams:

- **events**: the owner publishes every event of the session as it appends it to its
  own log (those appended in the same turn of the event loop in one message,
  `PUBLISH_AFTER_S`), to the JetStream stream `SB_CHAT_EVENTS`
  (subject `sb.chat.events.<session>`, in memory, the last `retain_events` of a session kept for
  `event_retention`). A stream attached to another replica reads them from there
  (`shared_log.SharedReader`), resuming after its last event id as on the owner. JetStream, not
  PostgreSQL: events are many small frames (a token each) that only live streams read,
  for minutes; JetStream keeps them in order, per session, with limits, and pushes them
  to readers without polling, while the history (the messages) stays in PostgreSQL.
- **owner**: the NATS key-value bucket `SB_CHAT_OWNERS` maps a session to its owner's
  *relay subject* (`sb.chat.replica.<nonce>`, one per process). A replica claims a
  session by creating its key, or, when the owner named there does not answer on its
  relay subject (NATS says at once that nobody listens: the process died, its
  connection with it), by replacing the key at the revision it read (compare and set,
  so two replicas never both take a session over). An owner that lets a session go
  (idle, or draining) deletes its key.
- **relay**: what a stream on another replica asks of the session (a user message, a
  cancel, a settings change, "a stream watches", "tell me when you are idle") goes to
  the owner as a NATS request on its relay subject: the operation and session in
  headers, the request as its own contract's message, the reply as its message or a
  `google.rpc.Status`.
- **notices**: UpdateSession and DeleteSession, which any replica serves, are told to
  every replica (`sb.chat.notices`), so the owner's turns use the new settings and
  every stream of a deleted session ends.

The owner publishes its events without waiting for JetStream's ack (they leave in
order on one connection); when it dies, the events it had not yet sent (those of the
moment it died) are lost with its turn, and the new owner numbers its
events in a new incarnation (see `events.EventLog`), so no id is ever given to two
different events. Each incarnation begins in the shared log with a *marker*
(`<incarnation>.0`, a frame with no content, never delivered), stored (JetStream's
ack) before any event of it can reach a client. So a client that resumes after an
event its dead owner never sent still finds that event's incarnation, and goes on at
the next one's events rather than being told its history expired; and a reader drops
what it reads again of an incarnation (events at or before where it stands).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

import nats
from google.rpc import status_pb2
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.js import api as js_api
from nats.js.client import JetStreamContext
from nats.js.errors import (
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NoStreamResponseError,
    NotFoundError,
)
from nats.js.kv import KeyValue
from switchboard.chat.v1 import chat_pb2 as pb

from services.chat.events import Expired
from services.chat.shared_log import EVENT_STREAM, Scan, SharedReader, pack, unpack
from services.runtime import (
    Internal,
    RelayedError,
    SwitchboardError,
    Unavailable,
    connect_nats,
    error_details,
)

logger = logging.getLogger(__name__)

__all__ = ["Moved", "Owner", "Shared"]

EVENT_SUBJECT = "sb.chat.events"
OWNERS = "SB_CHAT_OWNERS"
RELAY_SUBJECT = "sb.chat.replica"
NOTICES = "sb.chat.notices"
OP = "Sb-Op"
SESSION = "Sb-Session"
TENANT = "Sb-Tenant"
RESULT = "Sb-Result"
RELAY_TIMEOUT_S = 5.0
"""How long a relayed request waits for the owner's answer."""
PUBLISH_AFTER_S = 0.0
"""How long an event may wait to go to the shared log with the events after it: 0, the
events appended in the same turn of the event loop go together. Longer batches fewer
messages, but a killed owner takes more of its last events with it: its clients have
them, and the streams reading the shared log never get them."""

Handler = Callable[[str, str, str, bytes, dict[str, str]], Awaitable[bytes]]
"""The owner side of the relay: (op, tenant, session, request, headers) → reply bytes;
raises `SwitchboardError` (sent back as its status) or `Moved`."""


class Moved(Exception):
    """The replica asked does not own the session (any more): claim it again."""


@dataclass(frozen=True)
class Owner:
    """Who owns a session, as `Shared.claim` found it."""

    subject: str
    """The owner's relay subject."""
    mine: bool
    taken_over: bool = False
    """We took the session over from an owner that no longer answered (or from a load
    of ours that failed): its turn in progress, if any, was interrupted."""


def _events(session_id: str) -> str:
    return f"{EVENT_SUBJECT}.{session_id}"


@contextlib.asynccontextmanager
async def _reaching_nats(what: str) -> AsyncIterator[None]:
    """NATS not answering (down, or too slow) becomes UNAVAILABLE with its reason."""
    try:
        yield
    except (nats.errors.Error, TimeoutError) as exc:
        if isinstance(exc, NoRespondersError | KeyWrongLastSequenceError | NotFoundError):
            raise
        raise Unavailable(
            f"the chat service cannot reach NATS to {what} ({type(exc).__name__}); retry shortly",
            reason="DEPENDENCY_UNAVAILABLE",
            metadata={"dependency": "nats"},
            retry_after=timedelta(seconds=1),
        ) from exc


class Shared:
    """One process's connection to what the replicas share."""

    def __init__(
        self,
        url: str,
        *,
        retain_events: int = 1024,
        event_retention_s: float = 600.0,
        max_bytes: int = 256 << 20,
        replicas: int = 1,
    ) -> None:
        self._url = url
        self._retain = retain_events
        self._retention = event_retention_s
        self._max_bytes = max_bytes
        self._replicas = replicas
        self.subject = f"{RELAY_SUBJECT}.{secrets.token_hex(8)}"
        """This process's relay subject: what it owns, it answers for here."""
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._kv: KeyValue | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._batches: dict[str, list[bytes]] = {}
        self._outbox: list[tuple[str, bytes]] = []
        self._flush_timer: asyncio.TimerHandle | None = None
        self._sender: asyncio.Future[None] | None = None

    @property
    def nc(self) -> Client:
        assert self._nc is not None, "connect() first"
        return self._nc

    async def connect(self, handler: Handler, notice: Callable[[str, str, bytes], None]) -> None:
        """Connects, makes the stream and the bucket if they are missing, and starts
        answering relayed requests (`handler`) and notices (`notice(op, session, data)`)."""
        self._nc = await connect_nats(self._url, name="switchboard-chat", changed=self._changed)
        self._js = self._nc.jetstream(timeout=5)
        await self._ensure_events()
        self._kv = await self._js.create_key_value(
            bucket=OWNERS, history=1, storage=js_api.StorageType.FILE, replicas=self._replicas
        )

        async def relayed(msg: Msg) -> None:
            self._spawn(self._answer(msg, handler))

        async def noticed(msg: Msg) -> None:
            headers = msg.headers or {}
            with contextlib.suppress(Exception):
                notice(headers.get(OP, ""), headers.get(SESSION, ""), msg.data)

        await self._nc.subscribe(self.subject, cb=relayed)
        await self._nc.subscribe(NOTICES, cb=noticed)

    async def _ensure_events(self) -> None:
        """Makes the event stream, or brings its settings up to date. A NATS server that
        restarted has lost it (it is kept in memory)."""
        assert self._js is not None, "connect() first"
        config = js_api.StreamConfig(
            name=EVENT_STREAM,
            subjects=[f"{EVENT_SUBJECT}.*"],
            retention=js_api.RetentionPolicy.LIMITS,
            storage=js_api.StorageType.MEMORY,
            max_msgs_per_subject=self._retain,
            max_age=self._retention,
            max_bytes=self._max_bytes,
            discard=js_api.DiscardPolicy.OLD,
            num_replicas=self._replicas,
        )
        try:
            await self._js.stream_info(EVENT_STREAM)
            await self._js.update_stream(config)
        except NotFoundError:
            await self._js.add_stream(config)

    async def _changed(self) -> None:
        """The connection to NATS was lost or made again: once it is back, the event
        stream is made again if the server lost it (in the background: this runs on the
        client's reconnecting path)."""
        if self._nc is not None and self._nc.is_connected:
            self._spawn(self._remake_events())

    async def _remake_events(self) -> None:
        try:
            await self._ensure_events()
        except Exception as exc:  # the next session load tries again (`mark`)
            logger.warning("cannot make the chat event stream: %s", exc)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.flush()
        for task in list(self._tasks):
            task.cancel()
        if self._nc is not None and not self._nc.is_closed:
            with contextlib.suppress(Exception):
                await self._nc.drain()

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- events --------------------------------------------------------------------

    async def mark(self, session_id: str, start_id: str) -> None:
        """Begins an incarnation of the session's events in the shared log: its marker
        (`start_id`, `<incarnation>.0`), stored before this returns.

        Raises:
            Unavailable: `DEPENDENCY_UNAVAILABLE` (NATS).
        """
        assert self._js is not None, "connect() first"
        marker = pack([pb.ConverseResponse(event_id=start_id).SerializeToString()])
        async with _reaching_nats("share the session's events"):
            try:
                await self._js.publish(_events(session_id), marker, stream=EVENT_STREAM)
            except NoStreamResponseError:  # NATS restarted, without the stream
                await self._ensure_events()
                await self._js.publish(_events(session_id), marker, stream=EVENT_STREAM)

    def publish(self, session_id: str, frame: pb.ConverseResponse) -> None:
        """Queues one of the session's events for the shared log. The events appended in
        the same turn of the event loop (`PUBLISH_AFTER_S`) go together, one NATS message
        per session (`pack`), off the path of the stream that waits for them here, and
        without waiting for JetStream's ack (they leave in order on this process's one
        connection)."""
        self._batches.setdefault(session_id, []).append(frame.SerializeToString())
        if self._flush_timer is None:
            loop = asyncio.get_running_loop()
            self._flush_timer = loop.call_later(PUBLISH_AFTER_S, self._flush_batches)

    def _flush_batches(self) -> None:
        self._flush_timer = None
        batches, self._batches = self._batches, {}
        self._outbox.extend((_events(sid), pack(frames)) for sid, frames in batches.items())
        if self._sender is None or self._sender.done():
            self._sender = asyncio.ensure_future(self._send())

    async def _send(self) -> None:
        while self._outbox:
            subject, payload = self._outbox.pop(0)
            try:
                await self.nc.publish(subject, payload)
            except Exception as exc:  # NATS away: streams here go on, others miss these
                logger.warning("events not shared: %s", exc, extra={"subject": subject})

    async def flush(self) -> None:
        """Sends every queued event now (a draining replica, before it lets go)."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_batches()
        if self._sender is not None:
            await asyncio.shield(self._sender)

    async def reader(
        self, session_id: str, after_event_id: str | None, *, held: bool = False
    ) -> tuple[SharedReader, str]:
        """A reader of the session's shared events: after `after_event_id` (None: new
        events only; "" every one kept), or, `held`, from the turn in progress's first
        event. Returns (reader, the id it starts after).

        Raises:
            Expired: the id is not among the events kept.
            Unavailable: `DEPENDENCY_UNAVAILABLE` (NATS).
        """
        async with _reaching_nats("read the session's events"):
            return await self._reader(session_id, after_event_id, held=held)

    async def _reader(
        self, session_id: str, after_event_id: str | None, *, held: bool
    ) -> tuple[SharedReader, str]:
        assert self._js is not None, "connect() first"
        subject = _events(session_id)
        try:
            raw = await self._js.get_last_msg(EVENT_STREAM, subject)
        except NotFoundError:
            last_id, caught_up = "", 0
        else:
            last_id = unpack(raw.data or b"")[-1].event_id
            caught_up = raw.seq or 0
        everything = js_api.ConsumerConfig(deliver_policy=js_api.DeliverPolicy.ALL)
        if after_event_id is None or (after_event_id and after_event_id == last_id):
            new = everything  # an empty subject's every event is a new one
            if caught_up:
                new = js_api.ConsumerConfig(
                    deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE,
                    opt_start_seq=caught_up + 1,
                )
            return await SharedReader.open(self._js, subject, new, last_id), last_id
        scan = Scan(after_event_id or "", held=held, caught_up=caught_up)
        reader = await SharedReader.open(self._js, subject, everything, scan.after, scan)
        return reader, after_event_id or ""

    async def interrupted_turn(self, session_id: str) -> tuple[pb.TurnStarted, str] | None:
        """The session's last turn if it started and never ended (its owner died): its
        TurnStarted and the text it had generated."""
        try:
            reader, _ = await self.reader(session_id, "")
        except Expired:
            return None
        await reader.close()
        started: pb.TurnStarted | None = None
        text: list[str] = []
        for frame in reader.waiting:
            kind = frame.WhichOneof("frame")
            if kind == "turn_started":
                started, text = frame.turn_started, []
            elif kind == "turn_completed":
                started = None
            elif kind == "token" and started is not None:
                text.append(frame.token.text)
        return (started, "".join(text)) if started is not None else None

    # ---- owners --------------------------------------------------------------------

    async def claim(self, session_id: str) -> Owner:
        """The session's owner: this process if nobody owned it or its owner no longer
        answers (the key replaced at the revision read), else the live owner.

        Raises:
            Unavailable: `DEPENDENCY_UNAVAILABLE` (NATS).
        """
        async with _reaching_nats("find the session's owner"):
            return await self._claim(session_id)

    async def _claim(self, session_id: str) -> Owner:
        assert self._kv is not None, "connect() first"
        mine = self.subject.encode()
        while True:
            try:
                entry = await self._kv.get(session_id)
            except KeyNotFoundError:
                try:
                    await self._kv.create(session_id, mine)
                    return Owner(self.subject, mine=True)
                except KeyWrongLastSequenceError:
                    continue  # another replica claimed it first
            owner = (entry.value or b"").decode()
            if owner == self.subject:
                # named here but not live here: a load of ours failed after its claim,
                # maybe halfway through a takeover; its interrupted turn is looked for
                return Owner(owner, mine=True, taken_over=True)
            if await self._answers(owner, session_id):
                return Owner(owner, mine=False)
            try:
                await self._kv.update(session_id, mine, last=entry.revision)
            except KeyWrongLastSequenceError:
                continue
            logger.info("took over a session", extra={"session_id": session_id})
            return Owner(self.subject, mine=True, taken_over=True)

    async def owner_of(self, session_id: str) -> str | None:
        """The relay subject of the session's owner if another process owns it.

        Raises:
            Unavailable: `DEPENDENCY_UNAVAILABLE` (NATS).
        """
        assert self._kv is not None, "connect() first"
        try:
            async with _reaching_nats("find the session's owner"):
                entry = await self._kv.get(session_id)
        except KeyNotFoundError:
            return None
        owner = (entry.value or b"").decode()
        return owner if owner and owner != self.subject else None

    async def release(self, session_id: str) -> None:
        """Lets the session go, if this process still owns it."""
        assert self._kv is not None, "connect() first"
        with contextlib.suppress(Exception):
            entry = await self._kv.get(session_id)
            if (entry.value or b"").decode() == self.subject:
                await self._kv.delete(session_id, last=entry.revision)

    async def _answers(self, owner: str, session_id: str) -> bool:
        """Whether `owner` is alive and still owns the session."""
        try:
            await self.request(owner, "owns", "", session_id, b"")
        except (Moved, NoRespondersError):
            return False
        except SwitchboardError:
            return True  # alive but slow: never take a session from a live owner
        return True

    # ---- relay ---------------------------------------------------------------------

    async def request(
        self,
        owner: str,
        op: str,
        tenant_id: str,
        session_id: str,
        data: bytes,
        *,
        timeout: float = RELAY_TIMEOUT_S,
        headers: dict[str, str] | None = None,
    ) -> bytes:
        """Asks the owner; its reply's bytes.

        Raises:
            Moved: it does not own the session.
            NoRespondersError: nobody listens there (the owner died).
            Unavailable: `DEPENDENCY_UNAVAILABLE`: NATS, or the owner, did not answer.
            SwitchboardError: the owner's refusal, as it stated it.
        """
        async with _reaching_nats("reach the session's owner"):
            reply = await self.nc.request(
                owner,
                data,
                timeout=timeout,
                headers={OP: op, TENANT: tenant_id, SESSION: session_id, **(headers or {})},
            )
        result = (reply.headers or {}).get(RESULT, "ok")
        if result == "moved":
            raise Moved(session_id)
        if result == "error":
            status = status_pb2.Status.FromString(reply.data)
            raise RelayedError(error_details(status).code, status)
        return reply.data

    async def _answer(self, msg: Msg, handler: Handler) -> None:
        headers = msg.headers or {}
        try:
            data = await handler(
                headers.get(OP, ""),
                headers.get(TENANT, ""),
                headers.get(SESSION, ""),
                msg.data,
                headers,
            )
            result = "ok"
        except Moved:
            data, result = b"", "moved"
        except SwitchboardError as error:
            data, result = error.to_rpc_status().SerializeToString(), "error"
        except Exception:
            logger.exception("relayed request failed")
            failed = Internal("the session's replica failed the request", reason="INTERNAL")
            data, result = failed.to_rpc_status().SerializeToString(), "error"
        with contextlib.suppress(Exception):
            await self.nc.publish(msg.reply, data, headers={RESULT: result})

    async def notify(self, op: str, session_id: str, data: bytes = b"") -> None:
        """Tells every replica (`updated`, `deleted`)."""
        await self.nc.publish(NOTICES, data, headers={OP: op, SESSION: session_id})
