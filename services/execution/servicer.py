"""ExecutionService servicer: proto in, engine / store / sandbox call, proto out."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import datetime

import grpc
from google.protobuf import json_format
from google.rpc import status_pb2
from switchboard.execution.v1 import execution_pb2 as pb
from switchboard.execution.v1 import execution_service_pb2_grpc

from services.execution.code import run_request, run_response
from services.execution.engine import Engine
from services.execution.graph import validate_batch
from services.execution.sandbox import SandboxLimits, SandboxPool, run
from services.execution.store import TaskRow
from services.execution.tools import ToolExecutor
from services.runtime import (
    SwitchboardError,
    page_size,
    page_token,
    read_page_token,
    require_tenant,
)

logger = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 50
_TERMINAL_EVENTS = {2, 3, 4}  # TaskEventType COMPLETED, FAILED, CANCELLED


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


def _task_cursor(parts: list[str]) -> tuple[datetime, str]:
    when, task_id = parts
    return datetime.fromisoformat(when), task_id


class ExecutionServicer(execution_service_pb2_grpc.ExecutionServiceServicer):
    def __init__(
        self,
        engine: Engine,
        tools: ToolExecutor,
        *,
        sandbox: SandboxPool | None,
        sandbox_limits: SandboxLimits,
    ) -> None:
        self._engine = engine
        self._tools = tools
        self._sandbox = sandbox
        self._limits = sandbox_limits

    async def _message(self, task: TaskRow) -> pb.Task:
        return task_message(task, await self._engine.bus.last_sequence(task.task_id))

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
        validate_batch(request)
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
        size = page_size(request.page_size, what=what, default=DEFAULT_PAGE_SIZE, maximum=500)
        tasks = await self._engine.store.list(
            tenant,
            state=request.state,
            labels=dict(request.labels),
            before=read_page_token(request.page_token, _task_cursor, what=what),
            limit=size + 1,
        )
        response = pb.ListTasksResponse(tasks=[await self._message(t) for t in tasks[:size]])
        if len(tasks) > size:
            last = tasks[size - 1]
            response.next_page_token = page_token(last.create_time.isoformat(), last.task_id)
        return response

    async def WatchTask(  # noqa: N802 - gRPC method name
        self, request: pb.WatchTaskRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchTaskResponse]:
        task = await self._engine.store.get(request.task_id, require_tenant())
        async for sequence, msg in self._engine.bus.events(
            task.task_id, after=request.after_sequence
        ):
            event = pb.WatchTaskResponse.FromString(msg.data)
            if event.HasField("step_event"):
                event.step_event.sequence = sequence
                yield event
            else:
                event.task_event.sequence = sequence
                yield event
                if event.task_event.type in _TERMINAL_EVENTS:
                    return

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
