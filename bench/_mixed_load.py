"""Steady mixed load through the public port, every call counted: what the control
plane's fault and rollout tests (and `make bench-rollout`) run while they kill, scale and
roll out replicas.

Each worker loops over the mix (a Generate stream, a Retrieve, a SubmitTask, a chat turn
over Converse), one call at a time, and records each call's start, end, operation
and status code. `errors(since=...)` then tells the calls that *started* after a moment
and failed (new calls, which must succeed throughout) from those already in flight.

A chat turn is what a chat client does: when its stream breaks (`broken`: UNAVAILABLE,
its replica drained or died; or the INTERNAL gRPC reports for an HTTP/2 RST_STREAM,
which Envoy sends when the replica behind a stream that has already answered dies) it
resumes the session from the last event it saw, through Envoy, on whichever replica;
the turn counts as failed only if it cannot finish. Its tokens must
arrive exactly once each, in order, across resumes (`chat_gaps` counts any that did
not).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Self

import grpc
from switchboard.chat.v1 import chat_pb2, chat_service_pb2_grpc
from switchboard.execution.v1 import execution_pb2, execution_service_pb2_grpc
from switchboard.inference.v1 import inference_pb2, inference_service_pb2_grpc
from switchboard.rag.v1 import rag_pb2, rag_service_pb2_grpc

from services.runtime import error_details

logger = logging.getLogger(__name__)

OPERATIONS = ("generate", "retrieve", "submit", "chat")
CHAT_ATTEMPTS = 5
READ_ATTEMPTS = 5
"""Tries to read a task's state at the end of a run (a replica may be restarting)."""
"""Streams a chat turn may take: the first and its resumes."""
COLLECTION = "load"


def broken(error: grpc.aio.AioRpcError) -> bool:
    """Whether a stream's error says the connection under it broke (resume it), rather
    than that the call was refused."""
    code = error.code()
    return code == grpc.StatusCode.UNAVAILABLE or (
        code == grpc.StatusCode.INTERNAL and "RST_STREAM" in (error.details() or "")
    )


class ChatTurnFailed(Exception):
    """A chat turn ended with an error frame (its status's code), or its stream without
    the turn's end (ABORTED)."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.ABORTED) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class CallRecord:
    operation: str
    started: float
    ended: float
    code: grpc.StatusCode
    detail: str = ""
    """A failure's ErrorInfo reason (if any) and message."""

    @property
    def ok(self) -> bool:
        return self.code == grpc.StatusCode.OK


class LoadWorkers:
    """`workers` callers over one channel to `target`, as the tenant of `metadata`: each
    runs `_worker(index)` while the load is on (`async with`). `prepare` ingests the one
    document (DOCUMENT, in COLLECTION) the callers' Retrieve reads."""

    COLLECTION = COLLECTION
    DOCUMENT = (
        "load-1",
        "Envoy routes each call to a healthy replica; the control plane restarts a replica"
        " that exits and drains one before it stops.",
    )

    def __init__(self, target: str, metadata: Sequence[tuple[str, str]], *, workers: int) -> None:
        self._target = target
        self._metadata = tuple(metadata)
        self._workers = workers
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._channel: grpc.aio.Channel | None = None

    async def prepare(self) -> None:
        """Ingests the document Retrieve reads (once, before the load starts)."""
        document_id, text = self.DOCUMENT
        async with grpc.aio.insecure_channel(self._target) as channel:
            rag = rag_service_pb2_grpc.RagServiceStub(channel)
            document = rag_pb2.Document(
                document_id=document_id, collection=self.COLLECTION, text=text
            )

            async def requests():
                yield rag_pb2.IngestDocumentsRequest(document=document)

            await rag.IngestDocuments(requests(), metadata=self._metadata, timeout=60)

    async def __aenter__(self) -> Self:
        self._stop = asyncio.Event()
        self._channel = grpc.aio.insecure_channel(self._target)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._worker(i)) for i in range(self._workers)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._channel is not None:
            await self._channel.close()

    async def _worker(self, index: int) -> None:
        raise NotImplementedError


class MixedLoad(LoadWorkers):
    """`workers` callers over one channel to `target`, as the tenant of `metadata`."""

    def __init__(
        self,
        target: str,
        metadata: Sequence[tuple[str, str]],
        *,
        workers: int = 4,
        operations: Sequence[str] = OPERATIONS,
        timeout: float = 20.0,
    ) -> None:
        super().__init__(target, metadata, workers=workers)
        self._operations = tuple(operations)
        self._timeout = timeout
        self.records: list[CallRecord] = []
        self.task_ids: list[str] = []
        """Every task SubmitTask accepted (none may be lost)."""
        self.chat_resumes = 0
        """Chat turns' streams that broke and were resumed."""
        self.chat_gaps = 0
        """Chat turns whose tokens came with a gap or a duplicate across resumes."""

    async def wait_calls(self, count: int, *, since: float, timeout: float = 60) -> None:
        """Waits until `count` calls that started after `since` have ended."""
        deadline = time.monotonic() + timeout
        while sum(1 for r in self.records if r.started >= since) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"fewer than {count} calls completed in {timeout}s")
            await asyncio.sleep(0.05)

    def failed(self, *, since: float = 0.0, until: float = float("inf")) -> list[CallRecord]:
        """The calls that started within [since, until) and failed."""
        return [r for r in self.records if since <= r.started < until and not r.ok]

    def completed(self, *, since: float = 0.0, until: float = float("inf")) -> list[CallRecord]:
        return [r for r in self.records if since <= r.started < until and r.ok]

    async def _worker(self, index: int) -> None:
        assert self._channel is not None
        calls = {
            "generate": self._generate,
            "retrieve": self._retrieve,
            "submit": self._submit,
            "chat": self._chat,
        }
        turn = index
        while not self._stop.is_set():
            operation = self._operations[turn % len(self._operations)]
            turn += 1
            started = time.monotonic()
            code, detail = grpc.StatusCode.OK, ""
            try:
                await calls[operation](self._channel)
            except grpc.aio.AioRpcError as exc:
                code, detail = exc.code(), _detail(exc)
            except ChatTurnFailed as exc:
                code, detail = exc.code, str(exc)
            except asyncio.CancelledError:
                raise
            self.records.append(CallRecord(operation, started, time.monotonic(), code, detail))

    async def _generate(self, channel: grpc.aio.Channel) -> None:
        stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
        request = inference_pb2.GenerateRequest(
            prompt="Say something short about replicas.",
            parameters=inference_pb2.GenerationParameters(max_tokens=8),
        )
        async for _ in stub.Generate(request, metadata=self._metadata, timeout=self._timeout):
            pass

    async def _retrieve(self, channel: grpc.aio.Channel) -> None:
        stub = rag_service_pb2_grpc.RagServiceStub(channel)
        await stub.Retrieve(
            rag_pb2.RetrieveRequest(collection=COLLECTION, query="who drains replicas", top_k=2),
            metadata=self._metadata,
            timeout=self._timeout,
        )

    async def _submit(self, channel: grpc.aio.Channel) -> None:
        stub = execution_service_pb2_grpc.ExecutionServiceStub(channel)
        # a tool step (a call through the mesh): cheaper than a sandboxed code step
        step = execution_pb2.Step(name="one", tool=execution_pb2.ToolStep(tool="list_models"))
        reply = await stub.SubmitTask(
            execution_pb2.SubmitTaskRequest(steps=[step]),
            metadata=self._metadata,
            timeout=self._timeout,
        )
        self.task_ids.append(reply.task.task_id)

    async def _chat(self, channel: grpc.aio.Channel) -> None:
        stub = chat_service_pb2_grpc.ChatServiceStub(channel)
        created = await stub.CreateSession(
            chat_pb2.CreateSessionRequest(), metadata=self._metadata, timeout=self._timeout
        )
        session_id = created.session.session_id
        last_event = ""
        indexes: list[int] = []
        for attempt in range(CHAT_ATTEMPTS):
            call = stub.Converse(metadata=self._metadata, timeout=self._timeout)
            if attempt == 0:
                await call.write(
                    chat_pb2.ConverseRequest(open=chat_pb2.OpenSession(session_id=session_id))
                )
                message = chat_pb2.UserMessage(client_message_id="load-1", text="What drains?")
                await call.write(chat_pb2.ConverseRequest(message=message))
            else:
                self.chat_resumes += 1
                resume = chat_pb2.ResumeSession(session_id=session_id, last_event_id=last_event)
                await call.write(chat_pb2.ConverseRequest(resume=resume))
            try:
                async for frame in call:
                    last_event = frame.event_id or last_event
                    if frame.HasField("token"):
                        indexes.append(frame.token.index)
                    elif frame.HasField("error"):
                        details = error_details(frame.error.status)
                        reason = details.error_info.reason if details.error_info else ""
                        raise ChatTurnFailed(f"{reason}: {details.message}", details.code)
                    elif frame.HasField("turn_completed"):
                        await call.done_writing()
                        if indexes != list(range(len(indexes))):
                            self.chat_gaps += 1
                        return
            except grpc.aio.AioRpcError as exc:
                if not broken(exc) or attempt == CHAT_ATTEMPTS - 1:
                    raise
        raise ChatTurnFailed("the stream ended before the turn completed")

    async def unfinished_tasks(self, among: Sequence[str] | None = None) -> dict[str, str]:
        """The accepted tasks (of `among`, by default all) not (yet) COMPLETED, with
        their state and their steps' (`RUNNING one:QUEUED`); a task whose state could
        not be read is reported `UNREAD <code>`, not raised, so a run keeps its figures."""
        async with grpc.aio.insecure_channel(self._target) as channel:
            stub = execution_service_pb2_grpc.ExecutionServiceStub(channel)
            unfinished = {}
            for task_id in self.task_ids if among is None else among:
                if (state := await self._task_state(stub, task_id)) is not None:
                    unfinished[task_id] = state
            return unfinished

    async def _task_state(
        self, stub: execution_service_pb2_grpc.ExecutionServiceStub, task_id: str
    ) -> str | None:
        """None for a COMPLETED task, else its state and its steps'."""
        for attempt in range(READ_ATTEMPTS):
            try:
                reply = await stub.GetTask(
                    execution_pb2.GetTaskRequest(task_id=task_id),
                    metadata=self._metadata,
                    timeout=self._timeout,
                )
                break
            except grpc.aio.AioRpcError as error:
                if attempt == READ_ATTEMPTS - 1:
                    return f"UNREAD {error.code().name}"
                await asyncio.sleep(1.0)  # a replica restarting: try again shortly
        task = reply.task
        if task.state == execution_pb2.TASK_STATE_COMPLETED:
            return None
        steps = " ".join(
            f"{s.name}:{execution_pb2.StepState.Name(s.state).removeprefix('STEP_STATE_')}"
            for s in task.step_statuses
        )
        return f"{execution_pb2.TaskState.Name(task.state).removeprefix('TASK_STATE_')} {steps}"


def _detail(error: grpc.aio.AioRpcError) -> str:
    info = error_details(error).error_info
    return f"{info.reason}: {error.details()}" if info is not None else str(error.details())


async def roomy_load(mesh: Any, tenant: str, **options: Any) -> MixedLoad:
    """A MixedLoad (`options` as it takes them) through `mesh`'s public port, as `tenant`
    (an API key), whose admission policy is above any rate the load reaches (the
    figures are the mesh's, not the default policy's); its document ingested."""
    from switchboard.admission.v1 import admission_service_pb2_grpc

    from bench._common import (
        api_key_metadata,
        give_tenant_room,
        operator_metadata,
        unlimited_policy,
    )

    key = api_key_metadata(mesh, tenant)
    async with grpc.aio.insecure_channel(mesh.envoy_address) as public:
        await give_tenant_room(
            admission_service_pb2_grpc.AdmissionServiceStub(public),
            operator_metadata(mesh),
            unlimited_policy(tenant, in_flight=256),
        )
    load = MixedLoad(mesh.envoy_address, key, **options)
    await load.prepare()
    return load
