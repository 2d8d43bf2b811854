"""The worker loop: pulling steps from the work queue, running them, settling their messages.

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
from collections.abc import Callable, Mapping
from typing import Any

from google.protobuf import struct_pb2
from google.rpc import status_pb2
from nats.aio.msg import Msg
from switchboard.events.v1 import events_pb2 as ev
from switchboard.execution.v1 import execution_pb2 as pb

from services.execution.batcher import Batcher
from services.execution.bus import WORK_SUBJECT
from services.execution.engine import Engine
from services.execution.events import step_event, task_event
from services.execution.heartbeats import Beat, Heartbeats
from services.execution.metrics import REDELIVERIES
from services.execution.steps import StepFailure, StepRunner, retry_policy, step_timeout
from services.execution.store import Claim, ClaimedTask, TaskRow
from services.runtime import Internal, SwitchboardError, stop_task, tracing

logger = logging.getLogger(__name__)

_PROBE_S = 0.01
"""How long the probe for waiting work may take (the server answers at once)."""

_Next = tuple[str, int, Mapping[str, Any]]
"""The next step of a chain: its name, attempt, and the outputs it reads."""


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


class Worker:
    """Pulls steps from the work queue and runs them, `concurrency` at a time.

    Args:
        engine: the store and bus it works on.
        runner: runs one step.
        concurrency: steps run at once.
        rng: draws the jitter of retried steps' backoff.
        clock: monotonic seconds of the heartbeat schedule.
    """

    def __init__(
        self,
        engine: Engine,
        runner: StepRunner,
        *,
        concurrency: int = 16,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._runner = runner
        self._concurrency = concurrency
        self._rng = rng or random.Random()
        self._running: dict[str, set[asyncio.Task[Any]]] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._beat_task: asyncio.Task[None] | None = None
        self._cancel_sub: Any = None
        self.steps_done = 0
        store, lease = engine.store, engine.bus.settings.ack_wait
        self.heartbeats: Heartbeats[Msg] = Heartbeats(
            lease=lease,
            renew=lambda task_id, step: store.renew(task_id, step, lease=lease),
            clock=clock,
        )
        self._claims = Batcher(lambda steps: store.claim_many(steps, lease=lease))
        self._completions = Batcher(lambda steps: store.complete_many(steps, lease=lease))

    async def start(self) -> None:
        self._cancel_sub = await self._engine.bus.on_cancel(self._cancelled)
        self._loop_task = asyncio.create_task(self._loop(), name="execution-worker")
        self._beat_task = asyncio.create_task(self.heartbeats.run(), name="execution-heartbeats")

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

    async def _cancelled(self, task_id: str) -> None:
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
        if msg.metadata.num_delivered > 1:
            REDELIVERIES.inc()
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
        """`_handle` in the trace of whoever queued the step: what it queues in turn (a
        step after a dead worker's) stays in that trace."""
        with tracing.attached(tracing.extract(msg.headers)):
            await self._handle(msg)

    async def _handle(self, msg: Msg) -> None:
        """Claims the message's step and runs it, and the chain it starts; or settles the
        message of a step already done, held by another worker, or failed."""
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
            self._step_event(
                claimed.task, step=name, kind=ev.STEP_EVENT_TYPE_STARTED, attempt=claimed.attempt
            )
        )
        # run the step, then the step it unblocked (if any) here too, and so on; one
        # heartbeat schedule for the chain, as one message stands for all of it
        beat = self.heartbeats.chain(task_id=task_id, step=name, msg=msg)
        step: _Next | None = (name, claimed.attempt, claimed.outputs or {})
        while step is not None:
            with _step_span(claimed.task, step[0], step[1], msg):
                step = await self._execute(claimed.task, *step, beat)

    @staticmethod
    def _step_event(
        task: ClaimedTask | TaskRow,
        *,
        step: str,
        kind: ev.StepEventType.ValueType,
        attempt: int,
        output: Any = None,
        error: status_pb2.Status | None = None,
    ) -> pb.WatchTaskResponse:
        """`step_event` for a step of `task`."""
        return step_event(
            task_id=task.task_id,
            tenant_id=task.tenant_id,
            step=step,
            kind=kind,
            attempt=attempt,
            output=output,
            error=error,
        )

    async def _follow_up(self, task_id: str) -> None:
        """After a crash between a commit and its publishes: publishes again what the
        task's completed steps changed (ids drop what did go out), and queues again its
        queued steps and the running ones whose message a dead worker's chain never
        sent (a live holder keeps them: the message waits for its lease)."""
        task = await self._engine.store.get(task_id, None)
        completed = [
            self._step_event(
                task,
                step=s.name,
                kind=ev.STEP_EVENT_TYPE_COMPLETED,
                attempt=s.attempt,
                output=s.output,
            )
            for s in task.steps
            if s.state == pb.STEP_STATE_COMPLETED
        ]
        progress = await self._engine.store.follow_up(task_id)
        await self._engine.progress(task_id, task.tenant_id, progress, before=completed)

    async def _execute(
        self,
        task: ClaimedTask,
        name: str,
        attempt: int,
        outputs: Mapping[str, Any],
        beat: Beat[Msg],
    ) -> _Next | None:
        """Runs a claimed step (its STARTED event published) and records its outcome;
        returns the step it unblocked that this worker claimed to run next (its STARTED
        event published), or None once the chain's message is settled."""
        msg = beat.msg
        step = next(s for s in task.request.steps if s.name == name)
        try:
            output = await self._run(task, step, outputs, beat)
        except StepFailure as failure:
            tracing.fail(tracing.current_span(), failure.error.message)
            await self._failed(task, step, attempt, failure, msg)
            return None
        except asyncio.CancelledError:
            if not self.alive:
                raise  # the worker is stopping: the message is redelivered elsewhere
            await msg.ack()  # the task was cancelled: its events are already published
            return None
        done = await self._completions((task.task_id, name, output))
        completed = self._step_event(
            task, step=name, kind=ev.STEP_EVENT_TYPE_COMPLETED, attempt=attempt, output=output
        )
        following = done.next_step
        started = (
            [
                self._step_event(
                    task, step=following, kind=ev.STEP_EVENT_TYPE_STARTED, attempt=done.next_attempt
                )
            ]
            if following
            else []
        )
        await self._engine.progress(
            task.task_id,
            task.tenant_id,
            done.progress,
            before=[completed],
            after=started,
            keep=following,
        )
        self.steps_done += 1
        if following is None:
            await msg.ack()
            return None
        return following, done.next_attempt, done.next_outputs or {}

    async def _run(
        self, task: ClaimedTask, step: pb.Step, outputs: Mapping[str, Any], beat: Beat[Msg]
    ) -> Any:
        """Runs the step while the heartbeats renew its message and lease; cancellable by
        a CancelTask broadcast."""
        timeout = step_timeout(step)
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
        self.heartbeats.track(run, beat)
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
            self.heartbeats.untrack(run)
            if not run.done():
                run.cancel()
                with contextlib.suppress(BaseException):
                    await run
            running = self._running.get(task.task_id, set())
            running.discard(run)
            if not running:
                self._running.pop(task.task_id, None)

    async def _failed(
        self, task: ClaimedTask, step: pb.Step, attempt: int, failure: StepFailure, msg: Msg
    ) -> None:
        """A failed attempt: retried after a backoff, or the RetryInfo its error gave
        (the message comes back then), while it is retryable and attempts are left, else
        the task fails. A call its tool's open circuit refused was no attempt: the step
        waits for the circuit, however many times it meets it (JetStream's delivery
        limit bounds that)."""
        status = failure.error.to_rpc_status()
        policy = retry_policy(step)
        waiting = failure.not_attempted  # for an open circuit: no attempt spent
        if failure.retryable and (waiting or attempt < policy.max_attempts):
            retry_after = failure.error.retry_after
            delay = policy.delay(
                attempt,
                rng=self._rng,
                retry_after=retry_after.total_seconds() if retry_after is not None else None,
            )
            if waiting:  # the steps that met the open circuit come back spread out
                delay += self._rng.uniform(0, policy.ceiling(1))
            if await self._engine.store.retry(
                task.task_id, step.name, status.SerializeToString(), counted=not waiting
            ):
                await self._engine.publish(
                    self._step_event(
                        task,
                        step=step.name,
                        kind=ev.STEP_EVENT_TYPE_RETRIED,
                        attempt=attempt,
                        error=status,
                    )
                )
                await msg.nak(delay=delay)
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
            self._step_event(
                task, step=name, kind=ev.STEP_EVENT_TYPE_FAILED, attempt=attempt, error=status
            )
        )
        for other in (await self._engine.store.get(task.task_id, None)).steps:
            if other.name != name and other.state == pb.STEP_STATE_CANCELLED:
                await self._engine.publish(
                    self._step_event(
                        task,
                        step=other.name,
                        kind=ev.STEP_EVENT_TYPE_CANCELLED,
                        attempt=other.attempt,
                    )
                )
        dead = struct_pb2.Struct()
        dead.update(
            {"task_id": task.task_id, "step": name, "attempt": attempt, "error": status.message}
        )
        # before the task's FAILED event: whoever sees the task end finds its dead letter
        await self._engine.bus.dead_letter(task.task_id, name, dead.SerializeToString(), attempt)
        await self._engine.publish(
            task_event(
                task_id=task.task_id,
                tenant_id=task.tenant_id,
                kind=ev.TASK_EVENT_TYPE_FAILED,
                error=status,
            )
        )


def _step_span(task: ClaimedTask, name: str, attempt: int, msg: Msg) -> Any:
    """The step attempt's span: a child of the span that queued the step (its message's
    traceparent), linked to the attempt before it, whose span id is a function of the
    task, step and attempt (no store holds it: its worker may have died with it)."""
    parent = tracing.extract(msg.headers)
    links = ()
    if attempt > 1 and parent is not None:
        trace_id = tracing.current_span(parent).get_span_context().trace_id
        earlier = tracing.derived_span_id(task.task_id, name, attempt - 1)
        links = (tracing.link_to(trace_id, earlier, **{"switchboard.attempt": attempt - 1}),)
    return tracing.span(
        f"execution.step {name}",
        kind=tracing.SpanKind.CONSUMER,
        parent=parent,
        links=links,
        span_id=tracing.derived_span_id(task.task_id, name, attempt),
        attributes={
            "messaging.system": "nats",
            "messaging.destination.name": WORK_SUBJECT,
            "messaging.message.delivery_count": msg.metadata.num_delivered,
            "switchboard.task_id": task.task_id,
            "switchboard.tenant": task.tenant_id,
            "switchboard.step": name,
            "switchboard.attempt": attempt,
        },
    )
