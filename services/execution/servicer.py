"""ExecutionService servicer: proto in, engine / store / sandbox call, proto out."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from datetime import UTC, datetime, timedelta

import grpc
from google.protobuf import json_format
from google.rpc import status_pb2
from switchboard.execution.v1 import execution_pb2 as pb
from switchboard.execution.v1 import execution_service_pb2_grpc

from services.execution.bus import EVENT_RETENTION
from services.execution.code import run_request, run_response
from services.execution.engine import Engine
from services.execution.graph import nul_problems
from services.execution.sandbox import SandboxLimits, SandboxPool, run
from services.execution.store import TaskRow
from services.execution.tools import ToolExecutor
from services.execution.watch import history_expired, may_have_expired, numbered
from services.runtime import (
    SwitchboardError,
    Unavailable,
    invalid,
    page_size,
    page_token,
    read_page_token,
    require_tenant,
)

logger = logging.getLogger(__name__)

TaskEvents = Callable[[str], AsyncIterator[bytes]]
"""A task's events (serialised `WatchTaskResponse`s), every retained one in order, then
new ones as they come (`feed.EventFeed.events`)."""


def task_message(task: TaskRow, last_sequence: int = 0) -> pb.Task:
    message = pb.Task(
        last_sequence=last_sequence,
        task_id=task.task_id,
        idempotency_key=task.idempotency_key,
        state=task.state,
        steps=task.request.steps,
        labels=task.labels,
        priority=task.priority,
    )
    for row in task.steps:
        status = pb.StepStatus(name=row.name, state=row.state, attempt=row.attempt)
        if row.output is not None:
            json_format.ParseDict(row.output, status.output)
        if row.error:
            status.error.CopyFrom(status_pb2.Status.FromString(row.error))
        if row.start_time:
            status.start_time.FromDatetime(row.start_time)
        if row.end_time:
            status.end_time.FromDatetime(row.end_time)
        message.step_statuses.append(status)
    if task.error:
        message.error.CopyFrom(status_pb2.Status.FromString(task.error))
    message.create_time.FromDatetime(task.create_time)
    message.update_time.FromDatetime(task.update_time)
    if task.end_time:
        message.end_time.FromDatetime(task.end_time)
    return message


def task_cursor(parts: list[str]) -> tuple[datetime, str]:
    """Where a ListTasks page token says the next page starts (ValueError for a token
    no response gave out)."""
    when, task_id = parts
    return datetime.fromisoformat(when), str(uuid.UUID(task_id))


class ExecutionServicer(execution_service_pb2_grpc.ExecutionServiceServicer):
    def __init__(
        self,
        engine: Engine,
        tools: ToolExecutor,
        *,
        sandbox: SandboxPool | None,
        sandbox_limits: SandboxLimits,
        task_events: TaskEvents,
        event_retention: timedelta = EVENT_RETENTION,
    ) -> None:
        self._engine = engine
        self._event_retention = event_retention
        self._task_events = task_events
        self._tools = tools
        self._sandbox = sandbox
        self._limits = sandbox_limits

    async def _message(self, task: TaskRow) -> pb.Task:
        """The task, with its last event's sequence when the event log can say it (0,
        not known, while it cannot: the task itself is PostgreSQL's)."""
        try:
            sequence = await self._engine.bus.event_count(task.task_id)
        except Unavailable:
            sequence = 0
        return task_message(task, sequence)

    async def _submitted(
        self, task: TaskRow, existing: bool, sequence: int
    ) -> pb.SubmitTaskResponse:
        # a new task's last event is the one just published: no lookup needed
        message = await self._message(task) if existing else task_message(task, sequence)
        return pb.SubmitTaskResponse(task=message, existing=existing)

    async def SubmitTask(  # noqa: N802 - gRPC method name
        self, request: pb.SubmitTaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.SubmitTaskResponse:
        return await self._submitted(
            *await self._engine.submit(
                require_tenant(), request, tool_exists=self._tools.names.__contains__
            )
        )

    async def SubmitTasks(  # noqa: N802 - gRPC method name
        self, request: pb.SubmitTasksRequest, context: grpc.aio.ServicerContext
    ) -> pb.SubmitTasksResponse:
        # the runtime checked the batch's size; each task is checked on its own
        outcomes = await self._engine.submit_many(
            require_tenant(), request.tasks, tool_exists=self._tools.names.__contains__
        )
        response = pb.SubmitTasksResponse()
        for outcome in outcomes:
            if isinstance(outcome, SwitchboardError):
                response.results.add(error=outcome.to_rpc_status())
            else:
                response.results.add(submitted=await self._submitted(*outcome))
        return response

    async def GetTask(  # noqa: N802 - gRPC method name
        self, request: pb.GetTaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetTaskResponse:
        task = await self._engine.store.get(request.task_id, require_tenant())
        return pb.GetTaskResponse(task=await self._message(task))

    async def ListTasks(  # noqa: N802 - gRPC method name
        self, request: pb.ListTasksRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListTasksResponse:
        tenant = require_tenant()
        what = "ListTasksRequest"
        if problems := nul_problems(request.labels, "labels"):
            raise invalid(problems, what=what)
        size = page_size(request.page_size, what=what)
        tasks = await self._engine.store.list(
            tenant,
            state=request.state,
            labels=dict(request.labels),
            before=read_page_token(request.page_token, task_cursor, what=what),
            limit=size + 1,
        )
        messages = await asyncio.gather(*(self._message(t) for t in tasks[:size]))
        response = pb.ListTasksResponse(tasks=messages)
        if len(tasks) > size:
            last = tasks[size - 1]
            response.next_page_token = page_token(last.create_time.isoformat(), last.task_id)
        return response

    async def WatchTask(  # noqa: N802 - gRPC method name
        self, request: pb.WatchTaskRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchTaskResponse]:
        task = await self._engine.store.get(request.task_id, require_tenant())
        bus = self._engine.bus
        old = may_have_expired(task.create_time, datetime.now(UTC), self._event_retention)
        if old and await bus.event_count(task.task_id) == 0:
            raise history_expired(task.task_id)
        async with aclosing(self._task_events(task.task_id)) as payloads:
            async for event in numbered(
                task.task_id, payloads, after=request.after_sequence, whole=old
            ):
                yield event

    async def CancelTask(  # noqa: N802 - gRPC method name
        self, request: pb.CancelTaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelTaskResponse:
        task = await self._engine.cancel(request.task_id, require_tenant())
        return pb.CancelTaskResponse(task=await self._message(task))

    async def RunCode(  # noqa: N802 - gRPC method name
        self, request: pb.RunCodeRequest, context: grpc.aio.ServicerContext
    ) -> pb.RunCodeResponse:
        sandbox_request = run_request(request, self._limits)
        if self._sandbox is not None:
            result = await self._sandbox.run(sandbox_request)
        else:
            result = await run(sandbox_request, self._limits)
        return run_response(result)
