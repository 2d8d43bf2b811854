"""WatchTask's stream: a task's events numbered per task, after a cursor.

The event stream holds every tenant's events in one sequence, so its stream sequence
would tell a client how many events other tasks produce. A client sees per-task
numbers instead: an event's sequence is its place among its task's events, 1, 2, 3,
..., counted as the task's events are read back from its first one (a task has a few
hundred at most). The number of an event never changes while the events before it are
retained, and they are: the stream keeps each event for `EVENT_RETENTION` after its
publication, and every event of a task is published after the task was created, so
nothing of a task younger than that has expired. Of an older task, only a history that
still starts with its first event (SUBMITTED) is numbered; otherwise the stream says
`EVENT_HISTORY_EXPIRED` instead of numbering what is left wrongly.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

from switchboard.events.v1 import events_pb2 as ev
from switchboard.execution.v1 import execution_pb2 as pb

from services.runtime import FailedPrecondition

logger = logging.getLogger(__name__)

FINAL_EVENTS = frozenset(
    {ev.TASK_EVENT_TYPE_COMPLETED, ev.TASK_EVENT_TYPE_FAILED, ev.TASK_EVENT_TYPE_CANCELLED}
)


def history_expired(task_id: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"the events of task {task_id!r} are no longer all retained; GetTask has its outcome",
        reason="EVENT_HISTORY_EXPIRED",
        metadata={"task_id": task_id},
    )


def may_have_expired(create_time: datetime, now: datetime, retention: timedelta) -> bool:
    """Whether some of the events of a task created at `create_time` may have expired."""
    return now - create_time >= retention


async def numbered(
    task_id: str, payloads: AsyncIterator[bytes], *, after: int, whole: bool
) -> AsyncIterator[pb.WatchTaskResponse]:
    """The task's events read from `payloads` (every retained one, in order, then live
    ones), numbered per task, those after `after` only; ends after the task's final
    event, so a cursor at or past it ends the stream as soon as the history is read.

    `whole`: the history must start with the task's first event (its older events may
    have expired).

    Raises:
        FailedPrecondition: `EVENT_HISTORY_EXPIRED`, `whole` and it does not.
    """
    sequence = 0
    async for data in payloads:
        sequence += 1
        event = pb.WatchTaskResponse.FromString(data)
        if sequence == 1 and whole and event.task_event.type != ev.TASK_EVENT_TYPE_SUBMITTED:
            raise history_expired(task_id)
        final = event.HasField("task_event") and event.task_event.type in FINAL_EVENTS
        if sequence > after:
            which = event.step_event if event.HasField("step_event") else event.task_event
            which.sequence = sequence
            yield event
        if final:
            return
