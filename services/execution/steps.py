"""Running one step of a task by its kind: generate, retrieve, code or tool.

Each kind calls what already exists (InferenceService and RagService through the mesh,
the sandbox, the tool executor) with the step's inputs, its references expanded from
earlier outputs. A failure says whether another attempt may succeed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import grpc
from google.protobuf import json_format
from switchboard.common.v1 import common_pb2
from switchboard.execution.v1 import execution_pb2 as pb
from switchboard.inference.v1 import inference_pb2, inference_service_pb2_grpc
from switchboard.rag.v1 import rag_pb2, rag_service_pb2_grpc

from services.execution.code import run_response
from services.execution.graph import expand, expand_value
from services.execution.sandbox import RunRequest, SandboxLimits, SandboxPool, run
from services.execution.tools import ToolExecutor
from services.runtime import (
    TENANT_HEADER,
    FailedPrecondition,
    InvalidArgument,
    RelayedError,
    RetryPolicy,
    SwitchboardError,
    status_of,
    tracing,
)

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUTS = {
    "generate": timedelta(seconds=60),
    "retrieve": timedelta(seconds=15),
    "code": timedelta(seconds=30),
    "tool": timedelta(seconds=30),
}
"""A step's time limit by kind, when it sets none."""
STEP_RETRY = RetryPolicy(
    max_attempts=3, backoff=timedelta(seconds=0.5), max_backoff=timedelta(seconds=30)
)
"""Attempts of a step that sets no `max_attempts`, and the backoff between them (the
work message comes back after it: JetStream's redelivery is the retry loop)."""
RETRYABLE_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
}


NOT_ATTEMPTED_REASONS = frozenset({"TOOL_CIRCUIT_OPEN"})
"""Reasons of failures where the step's call never left the worker (its tool's circuit
is open): the step waits for the circuit (its RetryInfo) without spending an attempt, so
that a dependency's short outage does not fail every task that meets the open circuit."""


class StepFailure(Exception):
    """A failed attempt: its error, and whether another attempt may succeed."""

    def __init__(self, error: SwitchboardError, *, retryable: bool) -> None:
        super().__init__(error.message)
        self.error = error
        self.retryable = retryable

    @property
    def not_attempted(self) -> bool:
        """The call was refused before it was made (see NOT_ATTEMPTED_REASONS)."""
        return self.retryable and self.error.reason in NOT_ATTEMPTED_REASONS


def step_timeout(step: pb.Step) -> timedelta:
    """The step's time limit: its own, or its kind's default."""
    if step.HasField("timeout"):
        return step.timeout.ToTimedelta()
    return DEFAULT_TIMEOUTS[step.WhichOneof("kind")]


def retry_policy(step: pb.Step) -> RetryPolicy:
    """The step's attempts (its own `max_attempts`, or the default) and backoff."""
    if not step.max_attempts:
        return STEP_RETRY
    return dataclasses.replace(STEP_RETRY, max_attempts=step.max_attempts)


def _relayed(error: grpc.aio.AioRpcError) -> StepFailure:
    return StepFailure(
        RelayedError(error.code(), status_of(error)), retryable=error.code() in RETRYABLE_CODES
    )


def _json(message: Any) -> Any:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def _passages(step: pb.GenerateStep, outputs: Mapping[str, Any]) -> list[inference_pb2.Passage]:
    """Earlier outputs as context: a retrieve step's chunks, a generate step's text."""
    passages = []
    for name in step.context_steps:
        output = outputs[name]
        if isinstance(output, Mapping) and isinstance(output.get("chunks"), list):
            passages += [
                inference_pb2.Passage(source_id=str(c.get("chunk_id", name)), text=c["text"])
                for c in output["chunks"]
            ]
        elif isinstance(output, Mapping) and "text" in output:
            passages.append(inference_pb2.Passage(source_id=name, text=str(output["text"])))
        else:
            passages.append(inference_pb2.Passage(source_id=name, text=json.dumps(output)))
    return passages


class StepRunner:
    """Runs steps for the workers of one process."""

    def __init__(
        self,
        *,
        channel: grpc.aio.Channel,
        tools: ToolExecutor,
        sandbox: SandboxPool | None = None,
        sandbox_limits: SandboxLimits | None = None,
    ) -> None:
        self._inference = inference_service_pb2_grpc.InferenceServiceStub(channel)
        self._rag = rag_service_pb2_grpc.RagServiceStub(channel)
        self._tools = tools
        self._sandbox = sandbox
        self._limits = sandbox_limits or SandboxLimits()

    async def run(
        self,
        step: pb.Step,
        outputs: Mapping[str, Any],
        *,
        task_id: str,
        tenant_id: str,
        timeout: timedelta,
        priority: int = 0,
    ) -> Any:
        """The step's output (JSON-compatible).

        Raises:
            StepFailure: the attempt failed.
        """
        kind = step.WhichOneof("kind")
        metadata = ((TENANT_HEADER, tenant_id),)
        seconds = timeout.total_seconds()
        try:
            if kind == "generate":
                return await self._generate(step.generate, outputs, metadata, seconds, priority)
            if kind == "retrieve":
                return await self._retrieve(step.retrieve, outputs, metadata, seconds)
            if kind == "code":
                return await self._code(step.code, outputs, timeout)
            if kind == "tool":
                return await self._tools.call(
                    step.tool.tool,
                    expand_value(_json(step.tool.arguments), outputs),
                    tenant_id=tenant_id,
                    idempotency_key=f"{task_id}:{step.name}",
                    deadline=time.monotonic() + seconds,
                )
        except grpc.aio.AioRpcError as error:
            raise _relayed(error) from None
        except KeyError as missing:
            raise StepFailure(
                InvalidArgument(
                    f"step {step.name!r} refers to {missing} that an earlier output lacks",
                    reason="MISSING_INPUT",
                ),
                retryable=False,
            ) from None
        except SwitchboardError as error:
            retryable = error.code in RETRYABLE_CODES
            raise StepFailure(error, retryable=retryable) from None
        raise StepFailure(InvalidArgument(f"unknown step kind {kind!r}"), retryable=False)

    async def _generate(
        self,
        step: pb.GenerateStep,
        outputs: Mapping[str, Any],
        metadata: Any,
        seconds: float,
        priority: int,
    ) -> Any:
        request = inference_pb2.GenerateRequest(
            priority=priority or common_pb2.PRIORITY_BATCH,
            prompt=expand(step.prompt, outputs),
            model=step.model,
            tier=step.tier,
            parameters=step.parameters,
            context=_passages(step, outputs),
        )
        text: list[str] = []
        complete = None
        async for reply in self._inference.Generate(request, metadata=metadata, timeout=seconds):
            if reply.HasField("token"):
                text.append(reply.token.text)
            else:
                complete = reply.complete
        result: dict[str, Any] = {"text": "".join(text)}
        if complete is not None:
            result.update(
                model=complete.model.name,
                usage=_json(complete.usage),
                citations=[_json(c) for c in complete.citations],
            )
        return result

    async def _retrieve(
        self, step: pb.RetrieveStep, outputs: Mapping[str, Any], metadata: Any, seconds: float
    ) -> Any:
        request = rag_pb2.RetrieveRequest(
            collection=step.collection,
            query=expand(step.query, outputs),
            top_k=step.top_k,
            mode=step.mode,
            metadata_filter=step.metadata_filter,
        )
        reply = await self._rag.Retrieve(request, metadata=metadata, timeout=seconds)
        return {"chunks": [_json(c) for c in reply.chunks]}

    async def _code(self, step: pb.CodeStep, outputs: Mapping[str, Any], timeout: timedelta) -> Any:
        inputs = {k: expand(v, outputs) for k, v in step.inputs.items()}
        request = RunRequest(
            # one line ahead of the code: tracebacks count lines from 2
            code="inputs = __import__('json').load(open('.inputs.json'))\n" + step.code,
            files={".inputs.json": json.dumps(inputs).encode()},
            timeout=min(timeout, self._limits.max_timeout),
        )
        with tracing.span("sandbox.run") as span:
            if self._sandbox is not None:
                result = await self._sandbox.run(request)
            else:
                result = await run(request, self._limits)
            span.set_attributes(
                {
                    "switchboard.sandbox.exit_code": result.exit_code,
                    "switchboard.sandbox.termination": int(result.termination),
                }
            )
            if result.exit_code != 0 or result.termination != 1:
                tracing.fail(span, f"exit code {result.exit_code}")
        response = _json(run_response(result))
        response.pop("files", None)  # outputs stay small; files are for RunCode callers
        if result.exit_code != 0 or result.termination != 1:
            raise StepFailure(
                FailedPrecondition(
                    f"the code ended with {result.exception or response.get('termination')}",
                    reason="CODE_FAILED",
                    metadata={"exit_code": str(result.exit_code)},
                ),
                retryable=False,
            )
        return response
