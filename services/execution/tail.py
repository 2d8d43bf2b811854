"""The event stream read back for WatchTask: one live consumer per process, and bounded
history reads; together they feed `feed.EventFeed`.

JetStream consumers never grow with watchers:
- live: one ephemeral push consumer on every task's events (`EVENT_SUBJECTS`), made
  by this process while it has watchers (the first one's history is read only once it
  exists, so nothing falls between the two; `linger` after the last one leaves it is
  dropped: a process nobody watches through does not read every event), and read in
  order. It is checked as an ordered consumer is: each
  message must carry the next consumer sequence, idle heartbeats must keep coming and
  agree with what arrived; otherwise (a dropped message, a NATS restart, a lost
  consumer) a new consumer resumes at the stream sequence after the last event handed
  on. While it cannot be made for longer than `outage_grace`, watches end (and new
  ones are refused) with UNAVAILABLE `DEPENDENCY_UNAVAILABLE`, their cursors intact.
- history: a task's retained events, read by a short-lived pull consumer filtered on
  its subject and deleted after, at most `history_reads` at once (the others wait their
  turn); a topic reads its history once, however many watch it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from datetime import timedelta

import nats
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import api as js_api

from services.execution.bus import EVENT_STREAM, EVENT_SUBJECTS, Bus, event_subject
from services.execution.feed import EventFeed, History
from services.runtime import dependency_unavailable, stop_task

logger = logging.getLogger(__name__)

__all__ = ["EventTail", "TailSettings"]

_STATUS = "Status"
_CONTROL = "100"
_LAST_CONSUMER = "Nats-Last-Consumer"
_STALLED = "Nats-Consumer-Stalled"
_FETCH_BATCH = 256
_NATS_ERRORS = (nats.errors.Error, TimeoutError, OSError)


@dataclass(frozen=True)
class TailSettings:
    history_reads: int = 8
    """History reads (each one short-lived consumer) at once."""
    history_timeout: timedelta = timedelta(seconds=10)
    """The longest one history read may take."""
    heartbeat: timedelta = timedelta(seconds=1)
    """The live consumer's idle heartbeat; three missed ones mean it is lost."""
    outage_grace: timedelta = timedelta(seconds=5)
    """How long the live consumer may be lost before watches end UNAVAILABLE."""
    inactive_threshold: timedelta = timedelta(seconds=30)
    """NATS deletes a consumer this process left behind (it crashed) after this long."""
    linger: timedelta = timedelta(seconds=10)
    """How long the live consumer is kept once no task is watched."""


class EventTail:
    """The live consumer and history reads of one API process, behind `feed`."""

    def __init__(self, bus: Bus, settings: TailSettings | None = None) -> None:
        self._bus = bus
        self.settings = settings or TailSettings()
        self.feed = EventFeed(self.read_history)
        self._reads = asyncio.Semaphore(self.settings.history_reads)
        self._next = 0  # the stream sequence the live consumer must hand on next
        self._delivered = 0  # the consumer sequence of the last message received
        self._generation = 0
        self._consumer = ""
        self._sub: Subscription | None = None
        self._heard = 0.0
        self._broken = asyncio.Event()
        self._down_since: float | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._cleanups: set[asyncio.Task[None]] = set()
        self._making = asyncio.Lock()
        self._unwatched_since: float | None = None

    @property
    def live(self) -> bool:
        """Whether the live consumer exists now."""
        return bool(self._consumer)

    async def start(self) -> None:
        """Keeps the live consumer alive while it is wanted (the first watch makes it)."""
        self._bus.on_connection_change(self._broken.set)
        self._supervisor = asyncio.create_task(self._supervise(), name="event-tail")

    async def shutdown(self) -> None:
        await stop_task(self._supervisor)
        self._supervisor = None
        self._generation += 1
        self._forget(self._sub, self._consumer)
        self._sub, self._consumer = None, ""
        for task in list(self._cleanups):
            await stop_task(task)

    async def __aenter__(self) -> EventTail:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.shutdown()

    # ---- history -------------------------------------------------------------------

    async def read_history(self, task_id: str) -> History:
        """The task's retained events, read by a consumer of its own made for the read.

        Raises:
            Unavailable: `DEPENDENCY_UNAVAILABLE`, NATS cannot be read.
        """
        async with self._reads:
            name = ""
            try:
                async with asyncio.timeout(self.settings.history_timeout.total_seconds()):
                    await self._make_live()  # before the history: no event between them
                    info = await self._bus.js.add_consumer(
                        EVENT_STREAM,
                        js_api.ConsumerConfig(
                            deliver_policy=js_api.DeliverPolicy.ALL,
                            ack_policy=js_api.AckPolicy.NONE,
                            filter_subject=event_subject(task_id),
                            mem_storage=True,
                            num_replicas=1,
                            inactive_threshold=self.settings.inactive_threshold.total_seconds(),
                        ),
                    )
                    name = info.name
                    return await self._fetch(name, int(info.num_pending or 0))
            except _NATS_ERRORS as exc:
                raise dependency_unavailable("nats", "event stream", exc) from exc
            finally:
                if name:
                    await self._delete_consumer(name)

    async def _fetch(self, consumer: str, count: int) -> History:
        """The `count` events the consumer had pending when it was made (fewer if some
        expired meanwhile)."""
        events: list[tuple[int, bytes]] = []
        if count == 0:
            return events
        sub = await self._bus.js.pull_subscribe_bind(consumer=consumer, stream=EVENT_STREAM)
        try:
            while len(events) < count:
                batch = min(count - len(events), _FETCH_BATCH)
                timeout = self.settings.history_timeout.total_seconds()
                for msg in await sub.fetch(batch, timeout=timeout):
                    meta = msg.metadata
                    events.append((meta.sequence.stream, msg.data))
                    if meta.num_pending == 0:
                        return events
            return events
        finally:
            with contextlib.suppress(*_NATS_ERRORS):
                await sub.unsubscribe()

    async def _delete_consumer(self, name: str) -> None:
        """Best effort: a consumer left behind is deleted by NATS when it goes inactive."""
        try:
            async with asyncio.timeout(2):
                await self._bus.js.delete_consumer(EVENT_STREAM, name)
        except (*_NATS_ERRORS, asyncio.CancelledError) as exc:
            logger.debug("history consumer %s left to expire: %r", name, exc)

    # ---- live ----------------------------------------------------------------------

    async def _make_live(self) -> None:
        async with self._making:
            if not self._consumer:
                await self._subscribe()

    def _drop_live(self) -> None:
        """Drops the live consumer (nothing is watched); the next one starts afresh."""
        self._generation += 1
        self._forget(self._sub, self._consumer)
        self._sub, self._consumer, self._next = None, "", 0
        logger.info("live event consumer dropped: no task is watched")

    async def _subscribe(self) -> None:
        """Replaces the live consumer by one starting at `_next`."""
        self._generation += 1
        generation = self._generation
        self._forget(self._sub, self._consumer)
        self._sub, self._consumer = None, ""
        js, nc = self._bus.js, self._bus.nc
        last = int((await js.stream_info(EVENT_STREAM)).state.last_seq)
        if self._next == 0:
            self._next = last + 1  # the first consumer: live from now on
        elif last + 1 < self._next:  # the stream restarted below what was handed on
            error = RuntimeError(f"event stream restarted at {last}, below {self._next - 1}")
            self.feed.fail_all(dependency_unavailable("nats", "event stream", error))
            self._next = last + 1

        async def received(msg: Msg) -> None:
            if generation == self._generation:
                await self._received(msg)

        inbox = nc.new_inbox()
        self._sub = await nc.subscribe(inbox, cb=received, pending_msgs_limit=512 * 1024)
        self._delivered, self._heard = 0, time.monotonic()
        info = await js.add_consumer(
            EVENT_STREAM,
            js_api.ConsumerConfig(
                deliver_subject=inbox,
                deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=self._next,
                ack_policy=js_api.AckPolicy.NONE,
                max_deliver=1,
                filter_subject=EVENT_SUBJECTS,
                flow_control=True,
                idle_heartbeat=self.settings.heartbeat.total_seconds(),
                mem_storage=True,
                num_replicas=1,
                inactive_threshold=self.settings.inactive_threshold.total_seconds(),
            ),
        )
        self._consumer = info.name
        logger.info("live event consumer from stream sequence %d", self._next)

    async def _received(self, msg: Msg) -> None:
        headers = msg.headers or {}
        if not msg.data and headers.get(_STATUS) == _CONTROL:
            self._heard = time.monotonic()
            if msg.reply:  # a flow control request: everything before it was handled
                await self._bus.nc.publish(msg.reply)
            elif stalled := headers.get(_STALLED):
                await self._bus.nc.publish(stalled)
            last = headers.get(_LAST_CONSUMER)
            if last is not None and int(last) != self._delivered:
                self._broken.set()  # a message was lost on the way
            return
        meta = msg.metadata
        if meta.sequence.consumer != self._delivered + 1:
            self._broken.set()
            return
        self._delivered += 1
        self._heard = time.monotonic()
        sequence = meta.sequence.stream
        if sequence < self._next:
            return
        self._next = sequence + 1
        self.feed.deliver(msg.subject.rsplit(".", 1)[-1], sequence, msg.data)

    async def _supervise(self) -> None:
        beat = self.settings.heartbeat.total_seconds()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(beat):
                    await self._broken.wait()
            if not self._consumer or self._making.locked():
                self._broken.clear()
                continue
            now = time.monotonic()
            if self.feed.watched:
                self._unwatched_since = None
            elif self._unwatched_since is None:
                self._unwatched_since = now
            elif now - self._unwatched_since >= self.settings.linger.total_seconds():
                self._unwatched_since = None
                self._drop_live()
                continue
            if self._broken.is_set() or now - self._heard > 3 * beat:
                async with self._making:
                    await self._recover()

    async def _recover(self) -> None:
        delay = 0.1
        self._down_since = self._down_since or time.monotonic()
        while True:
            self._broken.clear()
            try:
                async with asyncio.timeout(self.settings.history_timeout.total_seconds()):
                    await self._subscribe()
            except _NATS_ERRORS as exc:
                self._unavailable(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            self._down_since = None
            self.feed.unavailable = None
            return

    def _unavailable(self, exc: BaseException) -> None:
        logger.warning("live event consumer lost: %r", exc)
        down_for = time.monotonic() - (self._down_since or time.monotonic())
        if self.feed.unavailable is None and down_for >= self.settings.outage_grace.total_seconds():
            error = dependency_unavailable("nats", "event stream", exc)
            self.feed.unavailable = error
            self.feed.fail_all(error)

    def _forget(self, sub: Subscription | None, consumer: str) -> None:
        """Drops a replaced live consumer in the background (NATS may be down)."""
        if sub is None and not consumer:
            return

        async def forget() -> None:
            if sub is not None:
                with contextlib.suppress(*_NATS_ERRORS):
                    await sub.unsubscribe()
            if consumer:
                await self._delete_consumer(consumer)

        task = asyncio.create_task(forget(), name="forget-live-consumer")
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
