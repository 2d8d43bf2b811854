"""A task's events as WatchTask streams them: what happened to the task and its steps.

Each event's id names what it reports (task, step, type, attempt), so publishing the
same event again, after a crash, is dropped by the event log's de-duplication.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from google.protobuf import json_format
from google.rpc import status_pb2
from switchboard.events.v1 import events_pb2 as ev
from switchboard.execution.v1 import execution_pb2 as pb

logger = logging.getLogger(__name__)

TASK_END_EVENTS: dict[pb.TaskState.ValueType, ev.TaskEventType.ValueType] = {
    pb.TASK_STATE_COMPLETED: ev.TASK_EVENT_TYPE_COMPLETED,
    pb.TASK_STATE_FAILED: ev.TASK_EVENT_TYPE_FAILED,
    pb.TASK_STATE_CANCELLED: ev.TASK_EVENT_TYPE_CANCELLED,
}
"""The event that announces a task's end state."""


def step_event(
    *,
    task_id: str,
    tenant_id: str,
    step: str,
    kind: ev.StepEventType.ValueType,
    attempt: int,
    output: Any = None,
    error: status_pb2.Status | None = None,
) -> pb.WatchTaskResponse:
    """A step's event: QUEUED (attempt 0), STARTED, COMPLETED with its JSON `output`,
    RETRIED or FAILED with its `error`, CANCELLED."""
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
    *,
    task_id: str,
    tenant_id: str,
    kind: ev.TaskEventType.ValueType,
    error: status_pb2.Status | None = None,
) -> pb.WatchTaskResponse:
    """A task's event: SUBMITTED, then COMPLETED, FAILED (with its `error`) or CANCELLED."""
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
