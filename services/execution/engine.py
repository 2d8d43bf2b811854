"""The execution engine: submitting tasks, publishing what their transitions changed,
cancelling them, and re-sending work a crash may have lost.

The same order of effects as the workers' (see `worker_loop`): a task or a transition
is committed to PostgreSQL first, then its events are published, then the work
messages of the steps it queued (after the events, so that no STARTED event can
precede its QUEUED one). A crash between the commit and the publishes loses nothing:
`republish_stale` re-sends the work of steps queued long ago, and the ids of events
and work messages make repeats harmless.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from datetime import timedelta

from switchboard.events.v1 import events_pb2 as ev
from switchboard.execution.v1 import execution_pb2 as pb

from services.execution.batcher import Batcher
from services.execution.bus import Bus
from services.execution.events import TASK_END_EVENTS, step_event, task_event
from services.execution.graph import validate_task
from services.execution.store import Progress, TaskRow, TaskStore
from services.runtime import (
    Internal,
    RetriesExhausted,
    RetryPolicy,
    SwitchboardError,
    Unavailable,
    validate_request,
)

logger = logging.getLogger(__name__)

ANNOUNCE_WAIT_S = 1.0
"""How long a submission waits for its task's announcement (events, first work) once
the task is committed; past it the call answers and the announcement goes on."""
ANNOUNCE_RETRY = RetryPolicy(
    max_attempts=120, backoff=timedelta(milliseconds=250), max_backoff=timedelta(seconds=5)
)
"""How an announcement the bus refused is tried again (about 10 minutes: within the
streams' de-duplication window, so that a repeat is harmless)."""

Submitted = tuple[TaskRow, bool, int]
"""A submitted task, whether it existed (same idempotency key), and for a new task the
sequence of its last event (0 for an existing one: read it from the bus)."""


class Engine:
    """Tasks over the store and the bus: submitted, announced, progressed, cancelled.
    The API process and the workers share it."""

    def __init__(self, store: TaskStore, bus: Bus) -> None:
        self.store = store
        self.bus = bus
        self._creates = Batcher(self._create_many)
        self._announcing: set[asyncio.Task[int]] = set()

    async def close(self) -> None:
        """Stops announcements still waiting for the bus (another process's
        `republish_stale` sends their work)."""
        for job in list(self._announcing):
            job.cancel()
        await asyncio.gather(*self._announcing, return_exceptions=True)

    async def publish(self, event: pb.WatchTaskResponse) -> None:
        """Appends the event to its task's log."""
        await self.publish_all([event])

    async def publish_all(self, events: Sequence[pb.WatchTaskResponse]) -> None:
        """Appends events in this order, their acks awaited together."""
        await self.bus.publish_events(events)

    async def submit(
        self,
        tenant_id: str,
        request: pb.SubmitTaskRequest,
        *,
        tool_exists: Callable[[str], bool],
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
            return task, False, await self._announced(task)
        # shielded: a caller gone while its batch commits must not leave the task unannounced
        return await asyncio.shield(self._submit_new(tenant_id, request))

    async def submit_many(
        self,
        tenant_id: str,
        requests: Sequence[pb.SubmitTaskRequest],
        *,
        tool_exists: Callable[[str], bool],
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
        return created, False, await self._announced(created)

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

    async def _announced(self, task: TaskRow) -> int:
        """`announce`, waited for at most ANNOUNCE_WAIT_S: the task is committed, so a
        bus that is slow or down must not hold its submission (nor make a client retry
        it as if it had failed). Past the wait the call answers with sequence 0 (not
        known yet) and the announcement goes on, tried again until the bus takes it."""
        job = asyncio.ensure_future(self._announce_until_sent(task))
        self._announcing.add(job)
        job.add_done_callback(self._announcing.discard)
        try:
            return await asyncio.wait_for(asyncio.shield(job), ANNOUNCE_WAIT_S)
        except TimeoutError:
            logger.warning(
                "task committed; its announcement waits for the message bus",
                extra={"task_id": task.task_id},
            )
            return 0

    async def _announce_until_sent(self, task: TaskRow) -> int:
        try:
            return await ANNOUNCE_RETRY.call(lambda _: self.announce(task), retry_on=Unavailable)
        except RetriesExhausted:
            logger.error(
                "a task's announcement was not taken by the message bus; its work is re-sent"
                " by the sweeper",
                extra={"task_id": task.task_id},
            )
            raise

    async def announce(self, task: TaskRow) -> int:
        """Publishes a new task's SUBMITTED and QUEUED events and its first work;
        returns the last event's sequence (per task: these are its first events, and
        its work is queued only after them, so nothing else of it precedes them)."""
        queued = [s.name for s in task.steps if s.state == pb.STEP_STATE_QUEUED]
        submitted = task_event(
            task_id=task.task_id, tenant_id=task.tenant_id, kind=ev.TASK_EVENT_TYPE_SUBMITTED
        )
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
        queued = [
            step_event(
                task_id=task_id,
                tenant_id=tenant_id,
                step=step,
                kind=ev.STEP_EVENT_TYPE_QUEUED,
                attempt=0,
            )
            for step in steps
        ]
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
            [
                task_event(
                    task_id=task_id,
                    tenant_id=tenant_id,
                    kind=TASK_END_EVENTS[progress.task_state],
                )
            ]
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
                    step_event(
                        task_id=task_id,
                        tenant_id=tenant_id,
                        step=name,
                        kind=ev.STEP_EVENT_TYPE_CANCELLED,
                        attempt=step.attempt,
                    )
                )
            await self.publish(
                task_event(task_id=task_id, tenant_id=tenant_id, kind=ev.TASK_EVENT_TYPE_CANCELLED)
            )
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
