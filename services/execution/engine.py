"""The execution engine: submitting tasks and running their steps from the work queue.

Order of effects, so that a crash anywhere loses nothing and repeats nothing that
completed: a transition is committed to PostgreSQL first; then its events and the work
messages of the steps it unblocked are published (with ids, so repeats are dropped);
then the step's message is acked. A worker that dies before the ack has its message
redelivered (after `ack_wait`); the claim sees what was committed: a completed step is
not run again (its follow-ups are re-published), a step whose lease ran out runs again.

A worker that completes a step runs one of the steps it unblocked itself, at once, in
the same slot (the others go to the queue for any worker): a chain of steps costs no
work-queue round trip per step. The first step's message stays unacked (and heartbeat)
until the chain ends, so a worker that dies mid-chain has that message redelivered,
and its follow-up re-publishes every step the chain had claimed or queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any, Generic, TypeVar

from google.protobuf import json_format, struct_pb2
from google.rpc import status_pb2
from nats.aio.msg import Msg
from switchboard.events.v1 import events_pb2 as ev
from switchboard.execution.v1 import execution_pb2 as pb

from services.execution.bus import Bus
from services.execution.graph import validate_task
from services.execution.steps import StepFailure, StepRunner
from services.execution.store import Claim, ClaimedTask, Progress, TaskRow, TaskStore
from services.runtime import Internal, SwitchboardError, stop_task, validate_request

logger = logging.getLogger(__name__)

DEFAULT_ATTEMPTS = 3
DEFAULT_TIMEOUTS = {
    "generate": timedelta(seconds=60),
    "retrieve": timedelta(seconds=15),
    "code": timedelta(seconds=30),
    "tool": timedelta(seconds=30),
}
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0
_TASK_EVENTS = {
    pb.TASK_STATE_COMPLETED: ev.TASK_EVENT_TYPE_COMPLETED,
    pb.TASK_STATE_FAILED: ev.TASK_EVENT_TYPE_FAILED,
    pb.TASK_STATE_CANCELLED: ev.TASK_EVENT_TYPE_CANCELLED,
}


Submitted = tuple[TaskRow, bool, int]
"""A submitted task, whether it existed (same idempotency key), and for a new task the
sequence of its last event (0 for an existing one: read it from the bus)."""


def step_event(
    task: TaskRow | ClaimedTask | str,
    tenant_id: str,
    step: str,
    kind: int,
    attempt: int,
    *,
    output: Any = None,
    error: status_pb2.Status | None = None,
) -> pb.WatchTaskResponse:
    task_id = task if isinstance(task, str) else task.task_id
    event = ev.StepEvent(
        event_id=f"{task_id}:{step}:{ev.StepEventType.Name(kind)}:{attempt}",
        task_id=task_id,
        tenant_id=tenant_id,
        step_name=step,
        type=kind,
        attempt=attempt,
    )
    if output is not None:
        json_format.ParseDict(output, event.output)
    if error is not None:
        event.error.CopyFrom(error)
    event.time.FromNanoseconds(time.time_ns())
    return pb.WatchTaskResponse(step_event=event)


def task_event(
    task_id: str, tenant_id: str, kind: int, error: status_pb2.Status | None = None
) -> pb.WatchTaskResponse:
    event = ev.TaskEvent(
        event_id=f"{task_id}:{ev.TaskEventType.Name(kind)}",
        task_id=task_id,
        tenant_id=tenant_id,
        type=kind,
    )
    if error is not None:
        event.error.CopyFrom(error)
    event.time.FromNanoseconds(time.time_ns())
    return pb.WatchTaskResponse(task_event=event)


def backoff(attempt: int, rng: random.Random) -> float:
    """Full jitter: uniform in [0, min(max, base * 2^(attempt-1))]."""
    return rng.uniform(0, min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (attempt - 1)))


class Engine:
    """What the service and the workers share: the store, the bus, the event helpers."""

    def __init__(self, store: TaskStore, bus: Bus) -> None:
        self.store = store
        self.bus = bus
        self._creates = _Batcher(self._create_many)

    async def publish(self, event: pb.WatchTaskResponse) -> None:
        """Appends the event to its task's log."""
        await self.publish_all([event])

    async def publish_all(self, events: Sequence[pb.WatchTaskResponse]) -> None:
        """Appends events in this order, their acks awaited together."""
        await self.bus.publish_events(events)

    async def submit(
        self, tenant_id: str, request: pb.SubmitTaskRequest, *, tool_exists: Any
    ) -> Submitted:
        """Validates the graph, stores, and queues the task's first steps; idempotent by
        key. Returns the task, whether it existed, and the sequence of the last event
        this call published (0 for an existing task). The request's contract
        constraints must have been checked (the runtime does, for SubmitTask)."""
        validate_task(request, tool_exists=tool_exists)
        if request.idempotency_key:
            task, existing = await self.store.create(tenant_id, request)
            if existing:
                return task, True, 0
            return task, False, await self.announce(task)
        # shielded: a caller gone while its batch commits must not leave the task unannounced
        return await asyncio.shield(self._submit_new(tenant_id, request))

    async def submit_many(
        self, tenant_id: str, requests: Sequence[pb.SubmitTaskRequest], *, tool_exists: Any
    ) -> list[Submitted | SwitchboardError]:
        """`submit` for each request, all at once (new tasks share one commit, their
        publishes one flush); a request that is refused gets its error as its result.

        Each request's contract constraints are checked here, with the request: the
        runtime checks only the batch's size (SubmitTasksRequest.tasks says so), so that
        one bad task is refused alone, with paths within it (`steps[1].name`)."""

        async def one(request: pb.SubmitTaskRequest) -> Submitted | SwitchboardError:
            try:
                validate_request(request)
                return await self.submit(tenant_id, request, tool_exists=tool_exists)
            except SwitchboardError as error:
                return error
            except Exception:  # a bug: this task's result, not the whole call's
                logger.exception("submitting a task of a batch failed")
                return Internal("internal error")

        return list(await asyncio.gather(*(one(r) for r in requests)))

    async def _submit_new(self, tenant_id: str, request: pb.SubmitTaskRequest) -> Submitted:
        created = await self._creates((tenant_id, request))
        if isinstance(created, BaseException):
            raise created
        return created, False, await self.announce(created)

    async def _create_many(
        self, requests: list[tuple[str, pb.SubmitTaskRequest]]
    ) -> list[TaskRow | BaseException]:
        """New tasks without idempotency keys, submitted concurrently: one statement
        and one commit for all of them; each on its own if that fails (one bad request
        must not fail the others), then an error is its caller's alone."""
        if len(requests) > 1:
            try:
                return list(await self.store.create_many(requests))
            except Exception:  # noqa: BLE001 - retried one by one below
                logger.debug("batched task creation failed; creating one by one", exc_info=True)
        results = await asyncio.gather(
            *(self.store.create(tenant, request) for tenant, request in requests),
            return_exceptions=True,
        )
        return [r[0] if isinstance(r, tuple) else r for r in results]

    async def announce(self, task: TaskRow) -> int:
        """Publishes a new task's SUBMITTED and QUEUED events and its first work;
        returns the last event's sequence (per task: these are its first events, and
        its work is queued only after them, so nothing else of it precedes them)."""
        queued = [s.name for s in task.steps if s.state == pb.STEP_STATE_QUEUED]
        submitted = task_event(task.task_id, task.tenant_id, ev.TASK_EVENT_TYPE_SUBMITTED)
        await self.queue_all(task.task_id, task.tenant_id, queued, before=[submitted])
        return 1 + len(queued)

    async def queue_all(
        self,
        task_id: str,
        tenant_id: str,
        steps: Sequence[str],
        *,
        before: Sequence[pb.WatchTaskResponse] = (),
        after: Sequence[pb.WatchTaskResponse] = (),
        keep: str | None = None,
    ) -> None:
        """Publishes `before`, the steps' QUEUED events and `after`, then (once the
        events are stored, so that no STARTED event can precede its QUEUED one) the
        work messages of the steps other than `keep` (which the caller runs itself)."""
        queued = [step_event(task_id, tenant_id, s, ev.STEP_EVENT_TYPE_QUEUED, 0) for s in steps]
        await self.publish_all([*before, *queued, *after])
        if work := [s for s in steps if s != keep]:
            await self.bus.enqueue_all(task_id, work)

    async def progress(
        self,
        task_id: str,
        tenant_id: str,
        progress: Progress,
        *,
        before: Sequence[pb.WatchTaskResponse] = (),
        after: Sequence[pb.WatchTaskResponse] = (),
        keep: str | None = None,
    ) -> None:
        """Publishes what a transition changed, between the events `before` and `after`;
        the step `keep` gets its QUEUED event but no work message (the caller runs it)."""
        ended = (
            [task_event(task_id, tenant_id, _TASK_EVENTS[progress.task_state])]
            if progress.task_state
            else []
        )
        await self.queue_all(
            task_id, tenant_id, progress.queued, before=before, after=[*ended, *after], keep=keep
        )

    async def cancel(self, task_id: str, tenant_id: str) -> TaskRow:
        task, cancelled = await self.store.cancel(task_id, tenant_id)
        if cancelled:
            for name in cancelled:
                step = next(s for s in task.steps if s.name == name)
                await self.publish(
                    step_event(task, tenant_id, name, ev.STEP_EVENT_TYPE_CANCELLED, step.attempt)
                )
            await self.publish(task_event(task_id, tenant_id, ev.TASK_EVENT_TYPE_CANCELLED))
            await self.bus.broadcast_cancel(task_id)
        return task

    async def republish_stale(self, older_than: timedelta) -> int:
        """Re-sends work for steps QUEUED long ago, or whose lease ran out long ago: a
        crash may have lost their message (the id makes a real duplicate harmless)."""
        stale = await self.store.stale(older_than)
        for task_id, step, state, attempt in stale:
            # a queued step's message may still be in the stream: same id, de-duplicated;
            # a running step's was taken by a worker that vanished: a new id
            again = f"lease-{attempt}" if state == pb.STEP_STATE_RUNNING else ""
            await self.bus.enqueue(task_id, step, again=again)
        return len(stale)


class _Beat:
    """A chain's heartbeat state: its message, the step running now, when to beat next."""

    __slots__ = ("due", "expired", "msg", "step", "task_id")

    def __init__(self, task_id: str, step: str, msg: Msg, due: float) -> None:
        self.task_id = task_id
        self.step = step
        self.msg = msg
        self.due = due
        self.expired = False

    def expire(self, run: asyncio.Task[Any]) -> None:
        self.expired = True
        run.cancel()


_Item = TypeVar("_Item")
_Result = TypeVar("_Result")


class _Batcher(Generic[_Item, _Result]):
    """Hands `flush` every item submitted while its previous call ran: one round trip
    (and one commit) for many steps when busy, no wait added when idle."""

    def __init__(
        self, flush: Callable[[list[_Item]], Awaitable[list[_Result]]], *, limit: int = 256
    ) -> None:
        self._flush = flush
        self._limit = limit
        self._waiting: list[tuple[_Item, asyncio.Future[_Result]]] = []
        self._flushing: asyncio.Task[None] | None = None

    async def __call__(self, item: _Item) -> _Result:
        future: asyncio.Future[_Result] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._flushing is None:
            self._flushing = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        batch: list[tuple[_Item, asyncio.Future[_Result]]] = []
        try:
            while self._waiting:
                batch = self._waiting[: self._limit]
                del self._waiting[: self._limit]
                try:
                    results = await self._flush([item for item, _ in batch])
                except Exception as exc:  # noqa: BLE001 - each caller gets it
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        finally:
            self._flushing = None
            for _, future in [*batch, *self._waiting]:  # when cancelled: nobody hangs
                if not future.done():
                    future.cancel()
            self._waiting.clear()


async def _pull(subscription: Any, most: int) -> list[Msg]:
    """The work waiting now (up to `most` messages), else the next message to arrive
    within a second (TimeoutError if none).

    nats-py's `fetch(n)` returns at once what the server has, but once its request has
    to linger for new work it holds the first message until n have come or the request
    expires: a lone step would wait a second. So the lingering pull asks for one.
    """
    try:
        return list(await subscription.fetch(most, timeout=_PROBE_S))
    except TimeoutError:
        pass
    return list(await subscription.fetch(1, timeout=1.0))


_PROBE_S = 0.01
"""How long the probe for waiting work may take (the server answers at once)."""


class Worker:
    """Pulls steps from the work queue and runs them, `concurrency` at a time."""

    def __init__(
        self,
        engine: Engine,
        runner: StepRunner,
        *,
        concurrency: int = 16,
        rng: random.Random | None = None,
    ) -> None:
        self._engine = engine
        self._runner = runner
        self._concurrency = concurrency
        self._rng = rng or random.Random()
        self._running: dict[str, set[asyncio.Task[Any]]] = {}
        self._beats: dict[asyncio.Task[Any], _Beat] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._beat_task: asyncio.Task[None] | None = None
        self._cancel_sub: Any = None
        self.steps_done = 0
        store, lease = engine.store, engine.bus.settings.ack_wait
        self._claims = _Batcher(lambda steps: store.claim_many(steps, lease=lease))
        self._completions = _Batcher(lambda steps: store.complete_many(steps, lease=lease))

    async def start(self) -> None:
        self._cancel_sub = await self._engine.bus.nc.subscribe("sb.cancel.*", cb=self._on_cancel)
        self._loop_task = asyncio.create_task(self._loop(), name="execution-worker")
        self._beat_task = asyncio.create_task(self._heartbeats(), name="execution-heartbeats")

    @property
    def alive(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done()

    async def stop(self) -> None:
        await stop_task(self._loop_task)
        await stop_task(self._beat_task)
        if self._cancel_sub is not None:
            await self._cancel_sub.unsubscribe()
        for tasks in list(self._running.values()):
            for task in tasks:
                task.cancel()

    async def _on_cancel(self, msg: Msg) -> None:
        task_id = msg.subject.rsplit(".", 1)[-1]
        for task in self._running.get(task_id, ()):
            task.cancel()

    async def _loop(self) -> None:
        subscription = await self._engine.bus.work()
        gate = asyncio.Semaphore(self._concurrency)
        handlers: set[asyncio.Task[None]] = set()
        freed = asyncio.Event()
        # when busy, pull a few steps per request rather than one per finished step
        least = max(1, self._concurrency // 8)

        def finished(handler: asyncio.Task[None]) -> None:
            handlers.discard(handler)
            freed.set()

        try:
            while True:
                free = self._concurrency - len(handlers)
                if free < least:
                    freed.clear()
                    await freed.wait()
                    continue
                try:
                    messages = await _pull(subscription, free)
                except TimeoutError:
                    continue
                except Exception as exc:  # the bus reconnecting: try again shortly
                    logger.warning("cannot fetch work: %s", exc)
                    await asyncio.sleep(0.5)
                    continue
                for msg in messages:
                    handler = asyncio.create_task(self._guarded(gate, msg))
                    handlers.add(handler)
                    handler.add_done_callback(finished)
        finally:
            for handler in handlers:
                handler.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)

    async def _guarded(self, gate: asyncio.Semaphore, msg: Msg) -> None:
        async with gate:
            try:
                await self.handle(msg)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug or a dependency outage: the message is redelivered
                logger.exception("step handling failed; it will be redelivered")
                with contextlib.suppress(Exception):
                    await msg.nak(delay=1.0)

    async def handle(self, msg: Msg) -> None:
        body = json.loads(msg.data)
        task_id, name = body["task_id"], body["step"]
        settings = self._engine.bus.settings
        claimed = await self._claims((task_id, name))
        if claimed.claim is Claim.DUPLICATE:
            await msg.ack()
            return
        if claimed.claim is Claim.BUSY:
            await msg.nak(delay=claimed.lease_left + 0.1)
            return
        if claimed.claim is Claim.FOLLOW_UP:
            await self._follow_up(task_id)
            await msg.ack()
            return
        if claimed.claim is Claim.REPORT:
            task = await self._engine.store.get(task_id, None)
            failed = next(s for s in task.steps if s.state == pb.STEP_STATE_FAILED)
            assert failed.error is not None
            await self._report_failure(
                task, failed.name, failed.attempt, status_pb2.Status.FromString(failed.error)
            )
            await msg.ack()
            return
        assert claimed.task is not None
        if msg.metadata.num_delivered >= settings.max_deliver:
            # this step's worker died every time it ran it: stop feeding it to workers
            error = Internal(
                f"step {name!r} was delivered {msg.metadata.num_delivered} times without "
                "finishing; it is moved to the dead-letter stream",
                reason="MAX_DELIVERIES",
            )
            await self._fail(claimed.task, name, claimed.attempt, error, msg)
            return
        await self._engine.publish(
            step_event(claimed.task, claimed.task.tenant_id, name, ev.STEP_EVENT_TYPE_STARTED,
                       claimed.attempt)
        )  # fmt: skip
        # run the step, then the step it unblocked (if any) here too, and so on; one
        # heartbeat schedule for the chain, as one message stands for all of it
        beat = _Beat(task_id, name, msg, time.monotonic() + self._beat_every)
        step: tuple[str, int, Mapping[str, Any]] | None = (
            name,
            claimed.attempt,
            claimed.outputs or {},
        )
        while step is not None:
            step = await self._execute(claimed.task, *step, beat)

    async def _follow_up(self, task_id: str) -> None:
        """After a crash between a commit and its publishes: publishes again what the
        task's completed steps changed (ids drop what did go out), and queues again its
        queued steps and the running ones whose message a dead worker's chain never
        sent (a live holder keeps them: the message waits for its lease)."""
        task = await self._engine.store.get(task_id, None)
        completed = [
            step_event(
                task,
                task.tenant_id,
                s.name,
                ev.STEP_EVENT_TYPE_COMPLETED,
                s.attempt,
                output=s.output,
            )  # fmt: skip
            for s in task.steps
            if s.state == pb.STEP_STATE_COMPLETED
        ]
        progress = await self._engine.store.follow_up(task_id)
        await self._engine.progress(task_id, task.tenant_id, progress, before=completed)

    async def _execute(
        self, task: ClaimedTask, name: str, attempt: int, outputs: Mapping[str, Any], beat: _Beat
    ) -> tuple[str, int, Mapping[str, Any]] | None:
        """Runs a claimed step (its STARTED event published) and records its outcome;
        returns the step it unblocked that this worker claimed to run next (its STARTED
        event published), or None once the chain's message is settled."""
        msg = beat.msg
        step = next(s for s in task.request.steps if s.name == name)
        try:
            output = await self._run(task, step, outputs, beat)
        except StepFailure as failure:
            await self._failed(task, step, attempt, failure, msg)
            return None
        except asyncio.CancelledError:
            if not self.alive:
                raise  # the worker is stopping: the message is redelivered elsewhere
            await msg.ack()  # the task was cancelled: its events are already published
            return None
        done = await self._completions((task.task_id, name, output))
        completed = step_event(task, task.tenant_id, name, ev.STEP_EVENT_TYPE_COMPLETED, attempt,
                               output=output)  # fmt: skip
        following = done.next_step
        started = (
            [
                step_event(
                    task, task.tenant_id, following, ev.STEP_EVENT_TYPE_STARTED, done.next_attempt
                )
            ]  # fmt: skip
            if following
            else []
        )
        await self._engine.progress(
            task.task_id, task.tenant_id, done.progress, before=[completed], after=started,
            keep=following,
        )  # fmt: skip
        self.steps_done += 1
        if following is None:
            await msg.ack()
            return None
        return following, done.next_attempt, done.next_outputs or {}

    async def _run(
        self, task: ClaimedTask, step: pb.Step, outputs: Mapping[str, Any], beat: _Beat
    ) -> Any:
        """Runs the step while `_heartbeats` renews its message and lease; cancellable by
        a CancelTask broadcast."""
        timeout = (
            step.timeout.ToTimedelta()
            if step.HasField("timeout")
            else DEFAULT_TIMEOUTS[step.WhichOneof("kind")]
        )
        run = asyncio.create_task(
            self._runner.run(
                step,
                outputs,
                task_id=task.task_id,
                tenant_id=task.tenant_id,
                timeout=timeout,
                priority=task.request.priority,
            )
        )
        self._running.setdefault(task.task_id, set()).add(run)
        beat.step, beat.expired = step.name, False
        self._beats[run] = beat
        expiry = asyncio.get_running_loop().call_later(
            timeout.total_seconds() + 5, beat.expire, run
        )
        try:
            return await run
        except asyncio.CancelledError:
            if beat.expired:
                raise StepFailure(
                    Internal(f"step {step.name!r} ran past its timeout", reason="STEP_TIMEOUT"),
                    retryable=True,
                ) from None
            raise
        finally:
            expiry.cancel()
            del self._beats[run]
            if not run.done():
                run.cancel()
                with contextlib.suppress(BaseException):
                    await run
            running = self._running.get(task.task_id, set())
            running.discard(run)
            if not running:
                self._running.pop(task.task_id, None)

    @property
    def _beat_every(self) -> float:
        return self._engine.bus.settings.ack_wait.total_seconds() / 3

    async def _heartbeats(self) -> None:
        """One loop for every running step: each one that has run a third of the lease
        since its last beat tells JetStream it is in progress and renews its lease."""
        lease = self._engine.bus.settings.ack_wait
        while True:
            await asyncio.sleep(self._beat_every / 4)
            now = time.monotonic()
            due = [(run, beat) for run, beat in self._beats.items() if beat.due <= now]
            for _, beat in due:
                beat.due = now + self._beat_every
            await asyncio.gather(*(self._beat(run, beat, lease) for run, beat in due))

    async def _beat(self, run: asyncio.Task[Any], beat: _Beat, lease: timedelta) -> None:
        try:
            await beat.msg.in_progress()
            if not await self._engine.store.renew(beat.task_id, beat.step, lease=lease):
                run.cancel()  # the task ended (cancelled) while this step ran
        except Exception as exc:  # noqa: BLE001 - the next beat tries again
            logger.warning("cannot renew step %s of %s: %s", beat.step, beat.task_id, exc)

    async def _failed(
        self, task: ClaimedTask, step: pb.Step, attempt: int, failure: StepFailure, msg: Msg
    ) -> None:
        status = failure.error.to_rpc_status()
        limit = step.max_attempts or DEFAULT_ATTEMPTS
        if failure.retryable and attempt < limit:
            if await self._engine.store.retry(task.task_id, step.name, status.SerializeToString()):
                await self._engine.publish(
                    step_event(task, task.tenant_id, step.name, ev.STEP_EVENT_TYPE_RETRIED,
                               attempt, error=status)
                )  # fmt: skip
                await msg.nak(delay=backoff(attempt, self._rng))
            else:
                await msg.ack()
            return
        await self._fail(task, step.name, attempt, failure.error, msg)

    async def _fail(
        self, task: ClaimedTask, name: str, attempt: int, error: SwitchboardError, msg: Msg
    ) -> None:
        status = error.to_rpc_status()
        if await self._engine.store.fail(task.task_id, name, status.SerializeToString()):
            await self._report_failure(task, name, attempt, status)
        await msg.ack()

    async def _report_failure(
        self, task: ClaimedTask | TaskRow, name: str, attempt: int, status: status_pb2.Status
    ) -> None:
        """Publishes a task's failure (again, after a crash: the ids drop repeats): the
        step's FAILED event, its cancelled successors, the step in the dead-letter
        stream, and the task's FAILED event."""
        await self._engine.publish(
            step_event(task, task.tenant_id, name, ev.STEP_EVENT_TYPE_FAILED, attempt,
                       error=status)
        )  # fmt: skip
        for other in (await self._engine.store.get(task.task_id, None)).steps:
            if other.name != name and other.state == pb.STEP_STATE_CANCELLED:
                await self._engine.publish(
                    step_event(task, task.tenant_id, other.name,
                               ev.STEP_EVENT_TYPE_CANCELLED, other.attempt)
                )  # fmt: skip
        dead = struct_pb2.Struct()
        dead.update({"task_id": task.task_id, "step": name, "attempt": attempt,
                     "error": status.message})  # fmt: skip
        # before the task's FAILED event: whoever sees the task end finds its dead letter
        await self._engine.bus.dead_letter(task.task_id, name, dead.SerializeToString(), attempt)
        await self._engine.publish(
            task_event(task.task_id, task.tenant_id, ev.TASK_EVENT_TYPE_FAILED, status)
        )
