"""NATS JetStream: the work queue workers pull steps from, the event log, dead letters.

Streams (file storage; created or updated at start, idempotently):
- `SB_WORK` (`sb.work.step`): work-queue retention, one message per step ready to run;
  one durable pull consumer `workers` shared by every worker (an idle worker pulls the
  next step), explicit acks, `ack_wait` renewed by `in_progress` heartbeats on long
  steps, `max_deliver` bounding a step that kills its worker every time.
- `SB_EVENTS` (`sb.events.<task_id>`): every step and task transition, as a serialised
  `WatchTaskResponse`, kept for `WorkSettings.event_retention`. Clients never see its stream
  sequence (it counts every tenant's events): an event's sequence is its place among
  its subject's messages, counted by WatchTask (see `watch`). WatchTask reads it
  through one live consumer per API process (see `tail`), not one per watcher.
- `SB_DEAD` (`sb.dead.<task_id>`): steps that exhausted their attempts or deliveries.

Every publish carries `Nats-Msg-Id`, so a republish after a crash (the state in
PostgreSQL says what to republish) is de-duplicated within the streams' window.
Publishes to `SB_WORK` and `SB_EVENTS` are coalesced across callers, as atomic batches
when busy (see `publisher`): one disk sync stores many messages.

What NATS holds in memory follows these two settings, not time: measured on NATS 2.x,
about 0.5 KB per task whose events are retained (its subject's index entry) and about
0.2 KB per message id inside the duplicate window. At a steady rate NATS's memory levels
off once both are full (the event retention, 7 days by default, is the long one: size
NATS for the tasks it keeps, or shorten it).

Cancellation is a core-NATS broadcast on `sb.cancel.<task_id>`: the worker running a
step of that task cancels it (the sandbox process is killed with it).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import NotFoundError
from switchboard.execution.v1 import execution_pb2 as pb

from services.execution.publisher import Message, SinglePublishes, StreamPublisher
from services.runtime import connect_nats, dependency_unavailable, tracing

logger = logging.getLogger(__name__)

WORK_STREAM = "SB_WORK"
WORK_SUBJECT = "sb.work.step"
EVENT_STREAM = "SB_EVENTS"
EVENT_SUBJECTS = "sb.events.>"
DEAD_STREAM = "SB_DEAD"
WORKERS = "workers"
CANCEL_SUBJECT = "sb.cancel"
"""Core-NATS subject of CancelTask's broadcast, `sb.cancel.<task_id>` (not a stream)."""
PUBLISH_TIMEOUT_S = 5.0
"""How long JetStream may take to acknowledge a batch of publishes."""
DUPLICATE_WINDOW = timedelta(minutes=10)
"""How long a message id is remembered by default: longer than any crash-to-republish gap."""
EVENT_RETENTION = timedelta(days=7)
"""How long the event stream keeps an event after its publication, by default."""


@dataclass(frozen=True)
class WorkSettings:
    ack_wait: timedelta = timedelta(seconds=10)
    """A step whose worker neither finishes nor heartbeats for this long is redelivered."""
    max_deliver: int = 20
    """Deliveries of one step message before it goes to the dead-letter stream."""
    max_ack_pending: int = 4096
    event_retention: timedelta = EVENT_RETENTION
    """How long an event is kept (WatchTask replays a task's history within it)."""
    duplicate_window: timedelta = DUPLICATE_WINDOW
    """How long a publish's message id is remembered (a republish within it is dropped)."""
    replicas: int = 1
    """Copies JetStream keeps of each stream (on a NATS cluster; 1 on one server)."""


def event_subject(task_id: str) -> str:
    return f"sb.events.{task_id}"


class Bus:
    """One NATS connection with the streams the execution service uses."""

    def __init__(self, url: str, settings: WorkSettings | None = None) -> None:
        self._url = url
        self.settings = settings or WorkSettings()
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._publishers: dict[str, StreamPublisher] = {}
        self._connection_listeners: list[Callable[[], object]] = []

    @property
    def js(self) -> JetStreamContext:
        assert self._js is not None, "connect() first"
        return self._js

    @property
    def nc(self) -> Client:
        assert self._nc is not None, "connect() first"
        return self._nc

    async def connect(self) -> None:
        self._nc = await connect_nats(
            self._url, name="switchboard-execution", changed=self._connection_changed
        )
        self._js = self._nc.jetstream(timeout=5)
        atomic = await self._ensure_streams()
        singles = SinglePublishes(self._js)
        self._publishers = {
            stream: StreamPublisher(
                self._nc, singles, atomic=atomic.get(stream, False), timeout=PUBLISH_TIMEOUT_S
            )
            for stream in (WORK_STREAM, EVENT_STREAM, DEAD_STREAM)
        }

    async def close(self) -> None:
        """Closes the connection. Publishes are awaited when made (JetStream acks them),
        so nothing is pending; unacked work is redelivered to another worker."""
        if self._nc is not None and not self._nc.is_closed:
            await self._nc.close()

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    def on_connection_change(self, changed: Callable[[], object]) -> None:
        """Calls `changed` whenever the connection is lost or made again (subscriptions
        survive a reconnection; the consumers they read may not)."""
        self._connection_listeners.append(changed)

    async def _connection_changed(self) -> None:
        for changed in self._connection_listeners:
            changed()

    async def _ensure_streams(self) -> dict[str, bool]:
        """Creates or updates the streams; says which accept atomic batches (a NATS
        older than 2.12 drops the setting)."""
        window = self.settings.duplicate_window.total_seconds()
        streams = [
            js_api.StreamConfig(
                name=WORK_STREAM,
                subjects=[WORK_SUBJECT],
                retention=js_api.RetentionPolicy.WORK_QUEUE,
                storage=js_api.StorageType.FILE,
                duplicate_window=window,
                num_replicas=self.settings.replicas,
                allow_atomic=True,
            ),
            js_api.StreamConfig(
                name=EVENT_STREAM,
                subjects=[EVENT_SUBJECTS],
                retention=js_api.RetentionPolicy.LIMITS,
                storage=js_api.StorageType.FILE,
                max_age=self.settings.event_retention.total_seconds(),
                duplicate_window=window,
                num_replicas=self.settings.replicas,
                allow_atomic=True,
            ),
            js_api.StreamConfig(
                name=DEAD_STREAM,
                subjects=["sb.dead.>"],
                retention=js_api.RetentionPolicy.LIMITS,
                storage=js_api.StorageType.FILE,
                max_age=30 * 24 * 3600.0,
                duplicate_window=window,
                num_replicas=self.settings.replicas,
            ),
        ]
        atomic = {}
        for config in streams:
            try:
                await self.js.stream_info(config.name)
                info = await self.js.update_stream(config)
            except NotFoundError:
                info = await self.js.add_stream(config)
            atomic[config.name] = bool(info.config.allow_atomic)
        consumer = js_api.ConsumerConfig(
            durable_name=WORKERS,
            ack_policy=js_api.AckPolicy.EXPLICIT,
            ack_wait=self.settings.ack_wait.total_seconds(),
            max_deliver=self.settings.max_deliver,
            max_ack_pending=self.settings.max_ack_pending,
            filter_subject=WORK_SUBJECT,
        )
        await self.js.add_consumer(WORK_STREAM, consumer)
        return atomic

    # ---- publishing ------------------------------------------------------------------

    async def _publish(self, subject: str, payload: bytes, msg_id: str) -> int:
        (sequence,) = await self._publish_all([(subject, payload, msg_id)])
        return sequence

    async def _publish_all(self, messages: Sequence[tuple[str, bytes, str]]) -> list[int]:
        """Publishes (subject, payload, id) messages of one stream in this order, with
        those of other callers meanwhile (see `publisher`); returns their sequences
        once all are stored."""
        traced = contextlib.ExitStack()
        if tracing.in_trace():  # the producer's span: what its messages' consumers continue
            traced.enter_context(
                tracing.span(
                    "nats publish",
                    kind=tracing.SpanKind.PRODUCER,
                    attributes={
                        "messaging.system": "nats",
                        "messaging.operation.type": "publish",
                        "messaging.batch.message_count": len(messages),
                        "messaging.destination.name": messages[0][0] if messages else "",
                    },
                )
            )
        with traced:
            # the trace context travels with the step (to its worker) and with the event
            marked: list[Message] = [
                (subject, payload, tracing.inject({"Nats-Msg-Id": msg_id}))
                for subject, payload, msg_id in messages
            ]
            return await self._publisher(messages[0][0]).publish(marked) if marked else []

    def _publisher(self, subject: str) -> StreamPublisher:
        assert self._publishers, "connect() first"
        if subject == WORK_SUBJECT:
            return self._publishers[WORK_STREAM]
        if subject.startswith("sb.events."):
            return self._publishers[EVENT_STREAM]
        return self._publishers[DEAD_STREAM]

    async def enqueue(self, task_id: str, step: str, *, again: str = "") -> None:
        """Queues a step to run, once per task and step (the id de-duplicates), or once
        more under the label `again`."""
        await self.enqueue_all(task_id, [step], again=again)

    async def enqueue_all(self, task_id: str, steps: Sequence[str], *, again: str = "") -> None:
        """`enqueue` for each of a task's steps, their acks awaited together."""
        suffix = f":{again}" if again else ""
        await self._publish_all(
            [
                (
                    WORK_SUBJECT,
                    json.dumps({"task_id": task_id, "step": step}).encode(),
                    f"run:{task_id}:{step}{suffix}",
                )
                for step in steps
            ]
        )

    async def publish_events(self, events: Sequence[pb.WatchTaskResponse]) -> None:
        """Appends transitions to their tasks' event logs in this order, each under its
        `event_id` as message id."""
        messages = []
        for event in events:
            which = event.step_event if event.HasField("step_event") else event.task_event
            messages.append(
                (event_subject(which.task_id), event.SerializeToString(), which.event_id)
            )
        await self._publish_all(messages)

    async def event_count(self, task_id: str) -> int:
        """How many of the task's events the stream holds: the per-task sequence of its
        latest event, while none has expired (0 if it has none)."""
        subject = event_subject(task_id)
        try:
            info = await self.js.stream_info(EVENT_STREAM, subjects_filter=subject)
        except (nats.errors.Error, TimeoutError) as exc:
            raise dependency_unavailable("nats", "message bus", exc) from exc
        return int((info.state.subjects or {}).get(subject, 0))

    async def dead_letter(self, task_id: str, step: str, payload: bytes, attempt: int) -> None:
        await self._publish(f"sb.dead.{task_id}", payload, f"dead:{task_id}:{step}:{attempt}")

    async def broadcast_cancel(self, task_id: str) -> None:
        await self.nc.publish(f"{CANCEL_SUBJECT}.{task_id}", b"")

    # ---- consuming -------------------------------------------------------------------

    async def on_cancel(self, cancelled: Callable[[str], Awaitable[None]]) -> Any:
        """Calls `cancelled` with the task id of every cancellation broadcast; returns the
        subscription (`unsubscribe()` ends it)."""

        async def received(msg: Msg) -> None:
            await cancelled(msg.subject.rsplit(".", 1)[-1])

        return await self.nc.subscribe(f"{CANCEL_SUBJECT}.*", cb=received)

    async def work(self) -> JetStreamContext.PullSubscription:
        """The shared pull subscription on the work queue."""
        return await self.js.pull_subscribe_bind(WORKERS, stream=WORK_STREAM)
