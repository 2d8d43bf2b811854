"""The session log in JetStream, shared by every chat replica.

Stream `SB_CHAT`, one subject per session (`sb.chat.<session_id>`), each message a
serialised ConverseResponse; file storage, limits retention: events older than
`max_age`, beyond `max_bytes` in all, or beyond `max_per_session` of one session are
dropped, oldest first. An event's id is `<epoch>.<stream sequence>`, the epoch being
the stream's creation time (a stream made afresh starts its sequences again).

Appends are pipelined: a frame is published without waiting for JetStream's ack, so a
turn streams at the pace of its tokens, not of round trips; acks are awaited in the
background (a failed one fails the session's next append). One NATS connection keeps
the frames of a process in the order they were appended. No reader sees an event
before the stream holds it, so any event a client has seen is there for its resume on
any replica.

A reader is an ordered push consumer on the session's subject from a given sequence
(the server fills any gap: a lost message or a restart makes the client resume it at
the next sequence), so it gets every event after its start, once, in order, and then
live ones. Resume points are checked against the stream's state (`events.Bounds`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass
from datetime import timedelta

import nats
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import NotFoundError
from switchboard.chat.v1 import chat_pb2 as pb

from services.chat.events import Bounds, event_id
from services.runtime import dependency_unavailable

logger = logging.getLogger(__name__)

__all__ = ["STREAM", "LogLimits", "StreamLog", "session_subject"]

STREAM = "SB_CHAT"
SUBJECTS = "sb.chat.>"
ACK_TIMEOUT_S = 5.0
"""How long JetStream may take to acknowledge an append."""
_NATS_ERRORS = (nats.errors.Error, TimeoutError, OSError)


def session_subject(session_id: str) -> str:
    return f"sb.chat.{session_id}"


@dataclass(frozen=True)
class LogLimits:
    max_age: timedelta = timedelta(hours=24)
    """How long an event is kept for resumes."""
    max_bytes: int = 1 << 30
    """Bytes of events kept in all (the oldest go first)."""
    max_per_session: int = 100_000
    """Events kept per session (its oldest go first)."""
    heartbeat: timedelta = timedelta(seconds=5)
    """A reader's consumer's idle heartbeat (a lost consumer is made again)."""
    reader_window: int = 256
    """Events a reader may have received and not yet sent before its consumer waits."""


def _unavailable(exc: BaseException) -> Exception:
    return dependency_unavailable("nats", "session log", exc)


class StreamReader:
    """A reader fed by its consumer's subscription: events wait in a bounded queue, and
    a reader that falls `window` events behind holds its consumer back (JetStream keeps
    the rest)."""

    def __init__(self, epoch: str, start: int, window: int) -> None:
        self._epoch = epoch
        self.position = start
        self._queue: asyncio.Queue[Msg | None] = asyncio.Queue(maxsize=window)
        self._received = start - 1  # the latest stream sequence queued
        self._error: BaseException | None = None
        self._upto: int | None = None
        self._sub: Subscription | None = None

    async def received(self, msg: Msg) -> None:
        """The subscription's callback (one message at a time, in order)."""
        sequence = msg.metadata.sequence.stream
        if sequence <= self._received:
            return  # delivered again after the consumer was made afresh
        self._received = sequence
        await self._queue.put(msg)

    async def next(self) -> pb.ConverseResponse | None:
        while True:
            if self._error is not None:
                raise self._error
            if self._upto is not None and self.position > self._upto:
                return None
            msg = await self._queue.get()
            if msg is None:
                continue  # woken by fail or finish
            sequence = msg.metadata.sequence.stream
            frame = pb.ConverseResponse.FromString(msg.data)
            frame.event_id = event_id(self._epoch, sequence)
            self.position = sequence + 1
            return frame

    def _wake(self) -> None:
        with contextlib.suppress(asyncio.QueueFull):  # a full queue wakes it anyway
            self._queue.put_nowait(None)

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._wake()

    def finish(self, upto: int) -> None:
        self._upto = upto
        self._wake()

    async def close(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(*_NATS_ERRORS):
                await sub.unsubscribe()


class StreamLog:
    """The session log of every replica, in the `SB_CHAT` stream (see the module)."""

    def __init__(self, js: JetStreamContext, limits: LogLimits | None = None) -> None:
        self._js = js
        self.limits = limits or LogLimits()
        self.epoch = ""
        self._first_publish = asyncio.Lock()
        self._acks_ready = False
        self._acks: deque[tuple[float, asyncio.Future[js_api.PubAck]]] = deque()
        self._failed: dict[str, BaseException] = {}
        self._appended: dict[str, int] = {}
        self._watermark = 0

    async def open(self) -> None:
        limits = self.limits
        config = js_api.StreamConfig(
            name=STREAM,
            subjects=[SUBJECTS],
            retention=js_api.RetentionPolicy.LIMITS,
            storage=js_api.StorageType.FILE,
            discard=js_api.DiscardPolicy.OLD,
            max_age=limits.max_age.total_seconds(),
            max_bytes=limits.max_bytes,
            max_msgs_per_subject=limits.max_per_session,
        )
        try:
            try:
                await self._js.stream_info(STREAM)
                info = await self._js.update_stream(config)
            except NotFoundError:
                info = await self._js.add_stream(config)
            if info.created is None:  # older servers leave it out of updates
                info = await self._js.stream_info(STREAM)
        except _NATS_ERRORS as exc:
            raise _unavailable(exc) from exc
        created = info.created
        assert created is not None
        self.epoch = f"{int(created.timestamp() * 1_000_000):x}"
        self._watermark = info.state.last_seq

    async def append(self, session_id: str, frame: pb.ConverseResponse) -> asyncio.Future[int]:
        if (failed := self._failed.pop(session_id, None)) is not None:
            raise _unavailable(failed)
        self._expire_acks()
        subject = session_subject(session_id)
        payload = frame.SerializeToString()
        try:
            if self._acks_ready:
                ack = await self._js.publish_async(subject, payload, wait_stall=ACK_TIMEOUT_S)
            else:
                # nats-py makes its inbox for acks on the first publish, without a lock:
                # two first publishes at once would make two, and lose one's ack
                async with self._first_publish:
                    ack = await self._js.publish_async(subject, payload, wait_stall=ACK_TIMEOUT_S)
                    self._acks_ready = True
        except _NATS_ERRORS as exc:
            raise _unavailable(exc) from exc
        sequence: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._acks.append((time.monotonic() + ACK_TIMEOUT_S, ack))
        ack.add_done_callback(lambda done: self._acked(session_id, done, sequence))
        return sequence

    def _acked(
        self, session_id: str, ack: asyncio.Future[js_api.PubAck], sequence: asyncio.Future[int]
    ) -> None:
        problem = TimeoutError("no ack") if ack.cancelled() else ack.exception()
        if problem is not None:
            logger.warning("an event of session %s was not stored: %r", session_id, problem)
            self._failed[session_id] = problem
            sequence.cancel()
            return
        seq = int(ack.result().seq)
        self._appended[session_id] = max(seq, self._appended.get(session_id, 0))
        self._watermark = max(seq, self._watermark)
        sequence.set_result(seq)

    def _expire_acks(self) -> None:
        """Forgets acked appends; fails those unacked past their time (JetStream or the
        connection is gone: the client would wait for them forever)."""
        now = time.monotonic()
        while self._acks and (self._acks[0][1].done() or self._acks[0][0] < now):
            self._acks.popleft()[1].cancel()

    async def bounds(self, session_id: str) -> Bounds:
        subject = session_subject(session_id)
        try:
            info = await self._js.stream_info(STREAM, subjects_filter=subject)
            state = info.state
            lost_before = state.first_seq - 1
            if (state.subjects or {}).get(subject, 0) >= self.limits.max_per_session:
                first = await self._js.get_msg(STREAM, seq=1, subject=subject, next=True)
                lost_before = max(lost_before, int(first.seq or 0) - 1)
        except _NATS_ERRORS as exc:
            raise _unavailable(exc) from exc
        self._watermark = max(self._watermark, state.last_seq)
        return Bounds(last=state.last_seq, lost_before=lost_before)

    async def latest(self, session_id: str) -> int:
        try:
            msg = await self._js.get_last_msg(STREAM, session_subject(session_id))
        except NotFoundError:
            return 0
        except _NATS_ERRORS as exc:
            raise _unavailable(exc) from exc
        return int(msg.seq or 0)

    def appended(self, session_id: str) -> int:
        return self._appended.get(session_id, 0)

    def watermark(self) -> int:
        return self._watermark

    async def flush(self) -> None:
        """Waits for the appends made so far to be acked; those still unacked after
        ACK_TIMEOUT_S fail. Appends made meanwhile (other sessions go on appending) are
        left to their own acks."""
        pending = [ack for _, ack in self._acks if not ack.done()]
        if pending:
            await asyncio.wait(pending, timeout=ACK_TIMEOUT_S)
        for ack in pending:
            ack.cancel()  # still unacked: failed (a no-op for one acked meanwhile)
        self._expire_acks()

    async def follow(self, session_id: str, start: int) -> StreamReader:
        reader = StreamReader(self.epoch, start, self.limits.reader_window)
        try:
            reader._sub = await self._js.subscribe(
                session_subject(session_id),
                stream=STREAM,
                cb=reader.received,
                ordered_consumer=True,
                deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE,
                config=js_api.ConsumerConfig(opt_start_seq=max(start, 1)),
                idle_heartbeat=self.limits.heartbeat.total_seconds(),
                inactive_threshold=30.0,
            )
        except _NATS_ERRORS as exc:
            raise _unavailable(exc) from exc
        return reader

    async def read(self, session_id: str, start: int) -> list[pb.ConverseResponse]:
        """Reads with a reader up to the session's latest event now."""
        last = await self.latest(session_id)
        if last < start:
            return []
        reader = await self.follow(session_id, start)
        reader.finish(last)
        frames = []
        try:
            async with asyncio.timeout(30):
                while (frame := await reader.next()) is not None:
                    frames.append(frame)
        except TimeoutError as exc:
            raise _unavailable(exc) from exc
        finally:
            await reader.close()
        return frames

    async def forget(self, session_id: str) -> None:
        with contextlib.suppress(*_NATS_ERRORS):
            await self._js.purge_stream(STREAM, subject=session_subject(session_id))
        self._appended.pop(session_id, None)
