"""One turn of a conversation: a user message in, a streamed, stored answer out.

The pipeline, each stage a call to another Switchboard service with the session's
tenant (through the mesh; the generation to the InferenceService this process embeds):

1. store the user message (PostgreSQL, gapless history) and announce the turn;
2. if the message asks for a tool or code (see `commands`), run it as an execution task
   and relay its step events as ToolProgress; its output becomes a context passage;
3. if the session has a collection, retrieve passages from it (RagService);
4. generate (InferenceService.Generate, which admits the request with the session's
   priority and reports the queue position, routes with the session id as affinity key,
   and releases the admission lease with the actual usage when the stream ends), relaying
   queue positions and tokens as they come;
5. store the answer with its citations, passages, usage and model, then end the turn.

A failure at any stage becomes an ErrorFrame and a FAILED answer holding what was
generated so far; a cancellation (CancelTurn, or the client gone) stores the partial
answer as CANCELLED. Either way the session stays usable.

The history shows what became of every stored user message: when the answer cannot be
stored as the turn ends (the session store is down), the client is told (an ErrorFrame,
the turn FAILED), and the turn keeps trying to store the answer, as FAILED with that
error, for a while (`LATE_STORE`), before the session's next turn starts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2
from google.rpc import status_pb2
from switchboard.chat.v1 import chat_pb2 as pb
from switchboard.common.v1 import common_pb2
from switchboard.events.v1 import events_pb2
from switchboard.execution.v1 import execution_pb2, execution_service_pb2_grpc
from switchboard.inference.v1 import inference_pb2, inference_service_pb2_grpc
from switchboard.rag.v1 import rag_pb2, rag_service_pb2_grpc

from services.chat.commands import RUN_CODE, ToolRequest, check_allowed, parse_tool_request
from services.chat.sessions import session_priority
from services.chat.store import SessionStore
from services.runtime import (
    TENANT_HEADER,
    Internal,
    RetriesExhausted,
    RetryPolicy,
    SwitchboardError,
    Unavailable,
    channel,
    clear_deadline,
    count_tokens,
    current_request_id,
    propagated_metadata,
    status_of,
    tracing,
)

logger = logging.getLogger(__name__)

Emit = Callable[[pb.ConverseResponse], Awaitable[object]]
DEFAULT_TOP_K = 5
# What a failing backend is called in errors without details of their own (Envoy's
# "no healthy upstream", a connection refused).
_BARE_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
LATE_STORE = RetryPolicy(
    max_attempts=40, backoff=timedelta(milliseconds=500), max_backoff=timedelta(seconds=15)
)
"""How an answer that could not be stored when its turn ended is tried again: for up to
about eight minutes of a store outage."""


class Backends:
    """The chat service's clients of the other services: RAG and execution through the
    mesh; inference in this process (see `ChatService`)."""

    def __init__(
        self,
        *,
        inference: inference_service_pb2_grpc.InferenceServiceStub,
        rag: str,
        execution: str,
    ) -> None:
        # turns outlive the stream that started them: each call says its tenant itself
        self._channels = {
            t: channel(t, default_timeout=None, propagate=False) for t in {rag, execution}
        }
        self.inference = inference
        self.rag = rag_service_pb2_grpc.RagServiceStub(self._channels[rag])
        self.execution = execution_service_pb2_grpc.ExecutionServiceStub(self._channels[execution])

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()


class StageFailed(Exception):
    """A stage of the turn failed; `status` is what the client is told."""

    def __init__(self, status: status_pb2.Status) -> None:
        super().__init__(status.message)
        self.status = status


def _failure(error: grpc.aio.AioRpcError, dependency: str) -> StageFailed:
    status = status_of(error)
    if not status.details and error.code() in _BARE_CODES:
        status = Unavailable(
            f"the {dependency} service is unavailable ({error.details()}); retry shortly",
            reason="DEPENDENCY_UNAVAILABLE",
            metadata={"dependency": dependency},
            retry_after=timedelta(seconds=1),
        ).to_rpc_status()
    return StageFailed(status)


def tool_passage_text(output: struct_pb2.Value, tool: str) -> str:
    """A tool's output as passage text the model can quote.

    For code, its output and the value of its final expression; a value of None (that of
    a final `print(...)`) is left out, as the interactive interpreter leaves it out.
    """
    value = json_format.MessageToDict(output)
    if tool == RUN_CODE and isinstance(value, dict):
        result = value.get("result")
        parts = [value.get("stdout"), None if result == repr(None) else result]
        return "\n".join(str(p).strip() for p in parts if p not in (None, "")) or "(no output)"
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


@dataclass
class Answer:
    """What the turn has produced so far."""

    assistant_id: str
    text: list[str] = field(default_factory=list)
    passages: list[rag_pb2.RetrievedChunk] = field(default_factory=list)
    complete: inference_pb2.GenerationComplete | None = None
    prompt_tokens: int = 0

    def usage(self) -> common_pb2.TokenUsage:
        if self.complete is not None:
            return self.complete.usage
        completion = len(self.text)
        return common_pb2.TokenUsage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion,
            total_tokens=self.prompt_tokens + completion,
        )


class Turn:
    def __init__(
        self,
        *,
        tenant_id: str,
        session_id: str,
        settings: pb.SessionSettings,
        message: pb.UserMessage,
        store: SessionStore,
        backends: Backends,
        emit: Emit,
        last_event_id: Callable[[], str],
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self.tenant_id = tenant_id
        self.session_id = session_id
        self.settings = settings
        self.message = message
        self._store = store
        self._backends = backends
        self._emit_frame = emit
        self._last_event_id = last_event_id
        self.answer = Answer(assistant_id=str(uuid.uuid4()))
        # the tenant, and the request id of the stream that started the turn
        self._metadata = tuple(propagated_metadata([(TENANT_HEADER, tenant_id)]))
        self._task_id = ""
        self._user: asyncio.Future[pb.Message] | None = None
        self._finished = False
        self._sleep = sleep

    @property
    def assistant_id(self) -> str:
        return self.answer.assistant_id

    async def _emit(self, **frame: object) -> None:
        await self._emit_frame(pb.ConverseResponse(message_id=self.assistant_id, **frame))

    async def _store_message(self, message: pb.Message) -> pb.Message:
        """Appends to the history, after the turn's user message."""
        if self._user is not None:
            await self._user
        return await self._append(message)

    async def _append(self, message: pb.Message) -> pb.Message:
        return await self._store.append(
            self.tenant_id, self.session_id, message, last_event_id=self._last_event_id()
        )

    async def run(self) -> None:
        clear_deadline()  # a turn outlives the stream that started it
        # a turn is a trace of its own, linked to the session stream's span (a stream
        # lives for many turns)
        stream = tracing.current_span().get_span_context()
        with tracing.span(
            "chat.turn",
            parent=tracing.NEW_TRACE,
            attributes={
                "switchboard.session_id": self.session_id,
                "switchboard.tenant": self.tenant_id,
                "gen_ai.operation.name": "chat",
                "gen_ai.request.model": self.settings.model,
            },
            links=[tracing.link_to(stream.trace_id, stream.span_id)] if stream.is_valid else (),
        ) as span:
            if rid := current_request_id():
                span.set_attribute(tracing.REQUEST_ID, rid)
            self._metadata = tuple(propagated_metadata([(TENANT_HEADER, self.tenant_id)]))
            await self._run()
            if self.answer.complete.ByteSize():
                usage = self.answer.complete.usage
                span.set_attributes(
                    {
                        "gen_ai.response.model": self.answer.complete.model.name,
                        "gen_ai.usage.input_tokens": usage.prompt_tokens,
                        "gen_ai.usage.output_tokens": usage.completion_tokens,
                    }
                )

    async def _run(self) -> None:
        try:
            await self._answer()
        except asyncio.CancelledError:
            await asyncio.shield(self._cancelled())
            raise
        except StageFailed as failed:
            await self._fail(failed.status)
        except SwitchboardError as error:
            await self._fail(error.to_rpc_status())
        except Exception as exc:
            logger.exception("turn failed", extra={"session_id": self.session_id})
            await self._fail(Internal(f"the answer failed: {type(exc).__name__}").to_rpc_status())
        else:
            await self._finish(pb.MESSAGE_STATUS_COMPLETED)

    async def _begin(self) -> None:
        """Announces the turn and stores its user message (once per turn).

        The generation call is sent first when the turn goes straight to it, so that
        neither is on the way to the first token. The user message is stored in the
        background, and it is in the history before anything of the answer is.
        """
        if self._user is not None:
            return
        user_id = str(uuid.uuid4())
        self._user = asyncio.ensure_future(
            self._append(
                pb.Message(
                    message_id=user_id,
                    role=pb.MESSAGE_ROLE_USER,
                    status=pb.MESSAGE_STATUS_COMPLETED,
                    text=self.message.text,
                    client_message_id=self.message.client_message_id,
                )
            )
        )
        await self._emit(
            turn_started=pb.TurnStarted(
                client_message_id=self.message.client_message_id,
                user_message_id=user_id,
                assistant_message_id=self.assistant_id,
            )
        )

    async def _answer(self) -> None:
        settings = self.settings
        request = parse_tool_request(self.message.text)
        if request is not None or settings.collection:
            await self._begin()
        if request is not None:
            check_allowed(request, settings)
            await self._call_tool(request)
        if settings.collection:
            await self._retrieve(settings)
        await self._generate(settings)

    # ---- stages ------------------------------------------------------------------------

    async def _call_tool(self, request: ToolRequest) -> None:
        call_id = f"call-{self.assistant_id[:8]}"
        arguments = struct_pb2.Struct()
        arguments.update(request.arguments)
        step = execution_pb2.Step(name="call")
        if request.tool == RUN_CODE:
            step.code.code = request.code
        else:
            step.tool.tool = request.tool
            step.tool.arguments.CopyFrom(arguments)
        try:
            submitted = await self._backends.execution.SubmitTask(
                execution_pb2.SubmitTaskRequest(
                    idempotency_key=f"chat:{self.session_id}:{self.assistant_id}",
                    steps=[step],
                    labels={"session_id": self.session_id},
                    priority=session_priority(self.settings),
                ),
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as error:
            raise _failure(error, "execution") from None
        self._task_id = submitted.task.task_id
        tool_call = pb.ToolCall(
            tool_call_id=call_id, tool=request.tool, arguments=arguments, task_id=self._task_id
        )
        await self._store_message(
            pb.Message(
                role=pb.MESSAGE_ROLE_TOOL_CALL,
                status=pb.MESSAGE_STATUS_COMPLETED,
                tool_call=tool_call,
            )
        )
        await self._emit(tool_call=tool_call)
        outcome = await self._watch(call_id)
        result = pb.ToolResult(tool_call_id=call_id)
        if outcome.HasField("error"):
            result.error.CopyFrom(outcome.error)
        else:
            result.output.CopyFrom(outcome.output)
        await self._store_message(
            pb.Message(
                role=pb.MESSAGE_ROLE_TOOL_RESULT,
                status=pb.MESSAGE_STATUS_COMPLETED
                if not result.HasField("error")
                else pb.MESSAGE_STATUS_FAILED,
                tool_result=result,
            )
        )
        self._task_id = ""
        if result.HasField("error"):
            raise StageFailed(result.error)
        self.answer.passages.append(
            rag_pb2.RetrievedChunk(
                chunk_id=call_id,
                document_id=f"tool:{request.tool}",
                text=tool_passage_text(result.output, request.tool),
            )
        )

    async def _watch(self, call_id: str) -> execution_pb2.StepStatus:
        """Relays the task's step events until it ends; returns the step's outcome."""
        try:
            async for reply in self._backends.execution.WatchTask(
                execution_pb2.WatchTaskRequest(task_id=self._task_id), metadata=self._metadata
            ):
                if reply.HasField("step_event"):
                    await self._emit(
                        tool_progress=pb.ToolProgress(tool_call_id=call_id, event=reply.step_event)
                    )
                elif reply.task_event.type != events_pb2.TASK_EVENT_TYPE_SUBMITTED:
                    break
            task = await self._backends.execution.GetTask(
                execution_pb2.GetTaskRequest(task_id=self._task_id), metadata=self._metadata
            )
        except grpc.aio.AioRpcError as error:
            raise _failure(error, "execution") from None
        (status,) = task.task.step_statuses
        if status.state != execution_pb2.STEP_STATE_COMPLETED and not status.HasField("error"):
            status.error.CopyFrom(task.task.error)
        return status

    async def _retrieve(self, settings: pb.SessionSettings) -> None:
        try:
            reply = await self._backends.rag.Retrieve(
                rag_pb2.RetrieveRequest(
                    collection=settings.collection,
                    query=self.message.text,
                    top_k=settings.retrieval_top_k or DEFAULT_TOP_K,
                ),
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as error:
            raise _failure(error, "rag") from None
        self.answer.passages.extend(reply.chunks)

    async def _generate(self, settings: pb.SessionSettings) -> None:
        answer = self.answer
        request = inference_pb2.GenerateRequest(
            model=settings.model,
            tier=settings.tier,
            prompt=self.message.text,
            context=[
                inference_pb2.Passage(source_id=p.chunk_id, text=p.text) for p in answer.passages
            ],
            parameters=settings.parameters,
            session_id=self.session_id,
            priority=session_priority(settings),
            report_queue_position=True,
        )
        answer.prompt_tokens = count_tokens(request.prompt) + sum(
            count_tokens(p.text) for p in request.context
        )
        call = self._backends.inference.Generate(request, metadata=self._metadata)
        try:
            await self._begin()
            async for reply in call:
                kind = reply.WhichOneof("event")
                if kind == "token":
                    answer.text.append(reply.token.text)
                    await self._emit(token=reply.token)
                elif kind == "queued":
                    await self._emit(queued=reply.queued)
                elif kind == "complete":
                    answer.complete = reply.complete
        except grpc.aio.AioRpcError as error:
            raise _failure(error, "inference") from None
        finally:
            call.cancel()  # stops generation at Triton and frees admission when cut short

    # ---- endings -----------------------------------------------------------------------

    async def _finish(
        self, status: int, *, error: status_pb2.Status | None = None, finish: int = 0
    ) -> None:
        if self._finished:  # cancelled after its answer was stored (or refused)
            return
        await self._begin()  # when the turn ended before any stage
        answer = self.answer
        complete = answer.complete
        message = pb.Message(
            message_id=self.assistant_id,
            role=pb.MESSAGE_ROLE_ASSISTANT,
            status=status,
            text="".join(answer.text),
            passages=answer.passages,
            usage=answer.usage(),
        )
        if complete is not None:
            message.citations.extend(complete.citations)
            message.model.CopyFrom(complete.model)
            finish = finish or complete.finish_reason
        if error is not None:
            message.error.CopyFrom(error)
        if status == pb.MESSAGE_STATUS_COMPLETED and (answer.passages or message.citations):
            await self._emit(
                citations=pb.Citations(citations=message.citations, passages=answer.passages)
            )
        lost: SwitchboardError | None = None
        try:
            await self._store_message(message)
        except Exception as exc:  # the history is unavailable: say so, and end the turn
            lost = exc if isinstance(exc, SwitchboardError) else Internal("storing failed")
            logger.warning("answer not stored: %s", exc, extra={"session_id": self.session_id})
            await self._emit(
                error=pb.ErrorFrame(
                    status=lost.to_rpc_status(), client_message_id=self.message.client_message_id
                )
            )
            status = pb.MESSAGE_STATUS_FAILED
        self._finished = True
        await self._emit(
            turn_completed=pb.TurnCompleted(
                assistant_message_id=self.assistant_id,
                status=status,
                finish_reason=finish,
                usage=message.usage,
                model=message.model,
            )
        )
        if lost is not None and self._user_stored():
            message.status = pb.MESSAGE_STATUS_FAILED
            message.error.CopyFrom(lost.to_rpc_status())
            await asyncio.shield(self._store_late(message))

    def _user_stored(self) -> bool:
        user = self._user
        return user is not None and user.done() and not user.cancelled() and not user.exception()

    async def _store_late(self, message: pb.Message) -> None:
        """Stores an answer the store refused when its turn ended, trying again while the
        store is unavailable (`LATE_STORE`), so that its user message is not left
        unanswered in the history."""
        try:
            await LATE_STORE.call(
                lambda _: self._append(message),
                retry_on=Unavailable,
                sleep=self._sleep,
            )
        except RetriesExhausted:
            logger.error("answer lost: the store stayed unavailable", extra=self._where())
        except SwitchboardError as error:  # the session was deleted meanwhile
            logger.info("answer not stored: %s", error.reason, extra=self._where())
        else:
            logger.info("answer stored late", extra=self._where())

    def _where(self) -> dict[str, str]:
        return {"session_id": self.session_id, "message_id": self.assistant_id}

    async def _fail(self, error: status_pb2.Status) -> None:
        await self._begin()
        await self._emit(
            error=pb.ErrorFrame(status=error, client_message_id=self.message.client_message_id)
        )
        await self._finish(pb.MESSAGE_STATUS_FAILED, error=error)

    async def _cancelled(self) -> None:
        if self._task_id:
            try:
                await self._backends.execution.CancelTask(
                    execution_pb2.CancelTaskRequest(task_id=self._task_id),
                    metadata=self._metadata,
                    timeout=5,
                )
            except grpc.aio.AioRpcError as error:
                logger.warning("cancelling task %s failed: %s", self._task_id, error.code().name)
        await self._finish(
            pb.MESSAGE_STATUS_CANCELLED, finish=inference_pb2.FINISH_REASON_CANCELLED
        )


async def end_interrupted(
    store: SessionStore,
    tenant_id: str,
    session_id: str,
    started: pb.TurnStarted,
    text: str,
    *,
    emit: Emit,
) -> None:
    """Ends a turn whose replica died while it ran (found by the session's next owner):
    its answer is stored FAILED with the text generated before, and the session's
    streams get an ErrorFrame ANSWER_INTERRUPTED and the turn's end."""
    answer_id = started.assistant_message_id
    error = Unavailable(
        "the chat replica generating this answer stopped; what it had generated is stored"
        " as a failed answer: send the message again for a new one",
        reason="ANSWER_INTERRUPTED",
        metadata={"session_id": session_id, "message_id": answer_id},
    ).to_rpc_status()
    message = pb.Message(
        message_id=answer_id,
        role=pb.MESSAGE_ROLE_ASSISTANT,
        status=pb.MESSAGE_STATUS_FAILED,
        text=text,
        error=error,
    )
    try:
        await store.append(tenant_id, session_id, message)
    except SwitchboardError as problem:  # the store is down, or the session deleted
        logger.warning(
            "interrupted answer not stored: %s",
            problem.reason,
            extra={"session_id": session_id, "message_id": answer_id},
        )
    logger.info("ended an interrupted turn", extra={"session_id": session_id})
    await emit(
        pb.ConverseResponse(
            message_id=answer_id,
            error=pb.ErrorFrame(status=error, client_message_id=started.client_message_id),
        )
    )
    await emit(
        pb.ConverseResponse(
            message_id=answer_id,
            turn_completed=pb.TurnCompleted(
                assistant_message_id=answer_id, status=pb.MESSAGE_STATUS_FAILED
            ),
        )
    )


class Turns:
    """Makes the turns of this process's sessions: the store, and the clients of the
    other services, which `open` creates on the serving event loop."""

    def __init__(self, store: SessionStore, *, rag: str, execution: str) -> None:
        self._store = store
        self._targets = {"rag": rag, "execution": execution}
        self._backends: Backends | None = None

    def open(self, inference: inference_service_pb2_grpc.InferenceServiceStub) -> None:
        """Creates the clients (on the serving event loop); `inference` is the generating
        service's stub."""
        self._backends = Backends(inference=inference, **self._targets)

    async def close(self) -> None:
        if self._backends is not None:
            await self._backends.close()

    def turn(
        self,
        tenant_id: str,
        session_id: str,
        settings: pb.SessionSettings,
        message: pb.UserMessage,
        *,
        emit: Emit,
        last_event_id: Callable[[], str],
    ) -> Turn:
        """The turn answering `message`; `emit` sends its frames to the session's log."""
        assert self._backends is not None, "open() first"
        return Turn(
            tenant_id=tenant_id,
            session_id=session_id,
            settings=settings,
            message=message,
            store=self._store,
            backends=self._backends,
            emit=emit,
            last_event_id=last_event_id,
        )
