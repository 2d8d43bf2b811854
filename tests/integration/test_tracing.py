"""Traces end to end: a chat turn with retrieval and a tool step, and a three-step task
whose worker is killed mid-way, each one trace across every process, read back from the
run directory's store (what `switchboard trace` reads)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import grpc
import pytest
from switchboard.chat.v1 import chat_pb2, chat_service_pb2_grpc
from switchboard.execution.v1 import execution_pb2 as pb
from switchboard.execution.v1 import execution_service_pb2_grpc
from switchboard.rag.v1 import rag_pb2, rag_service_pb2_grpc

from services.demo import handbook
from services.launcher.traces import Span, load_spans
from services.runtime import error_details, tracing
from tests.integration.conftest import as_tenant
from tests.polling import eventually

pytestmark = pytest.mark.timeout(300)
SWITCHBOARD = str(Path(sys.executable).with_name("switchboard"))


def new_tenant() -> str:
    return f"tenant-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def channel(envoy_target: str):
    async with grpc.aio.insecure_channel(envoy_target) as channel:
        yield channel


async def polled(check, *, timeout: float, what: str):
    """What `check` returned once it returned something true (polled)."""
    found = []

    def holds() -> bool:
        if value := check():
            found.append(value)
        return bool(value)

    await eventually(holds, timeout=timeout, what=what)
    return found[-1]


def spans_of(mesh, trace_id: str) -> list[Span]:
    return [s for s in load_spans(mesh.config.traces_dir).spans if s.trace_id == trace_id]


def find(mesh, check) -> list[Span]:
    return [s for s in load_spans(mesh.config.traces_dir).spans if check(s)]


def connected(spans: list[Span]) -> bool:
    """One root; every other span's parent is in the trace (Envoy's spans, for one,
    arrive in batches: a trace is whole once they have)."""
    ids = {s.span_id for s in spans}
    roots = [s for s in spans if s.parent_id is None]
    orphans = [s for s in spans if s.parent_id is not None and s.parent_id not in ids]
    return len(roots) == 1 and not orphans


def ancestors(spans: list[Span], span: Span) -> list[Span]:
    """`span`, its parent, and so on up to the root."""
    by_id = {s.span_id: s for s in spans}
    line = [span]
    while span.parent_id is not None:
        span = by_id[span.parent_id]
        line.append(span)
    return line


async def test_a_chat_turn_with_retrieval_and_a_tool_is_one_trace(mesh, channel):
    tenant = new_tenant()
    rag = rag_service_pb2_grpc.RagServiceStub(channel)
    reply = await rag.IngestDocuments(
        iter(handbook("handbook", 3)), metadata=as_tenant(tenant), timeout=120
    )
    assert reply.documents_failed == 0
    chat = chat_service_pb2_grpc.ChatServiceStub(channel)
    session = (
        await chat.CreateSession(
            chat_pb2.CreateSessionRequest(
                settings=chat_pb2.SessionSettings(collection="handbook", code_enabled=True)
            ),
            metadata=as_tenant(tenant),
            timeout=10,
        )
    ).session

    async def frames():
        yield chat_pb2.ConverseRequest(open=chat_pb2.OpenSession(session_id=session.session_id))
        yield chat_pb2.ConverseRequest(
            message=chat_pb2.UserMessage(client_message_id="m1", text="/code\nprint(6 * 7)")
        )
        await done.wait()

    done = asyncio.Event()
    completed = None
    call = chat.Converse(frames(), metadata=as_tenant(tenant), timeout=120)
    async for frame in call:
        if frame.HasField("turn_completed"):
            completed = frame.turn_completed
            done.set()
            break
    call.cancel()
    assert completed is not None and completed.status == chat_pb2.MESSAGE_STATUS_COMPLETED

    def turn() -> list[Span]:
        return find(
            mesh,
            lambda s: (
                s.name == "chat.turn"
                and s.attributes.get("switchboard.session_id") == session.session_id
            ),
        )

    (root,) = await polled(turn, timeout=10, what="the turn's span is stored")

    def whole() -> list[Span]:
        spans = spans_of(mesh, root.trace_id)
        names = {(s.service, s.name) for s in spans}
        needed = {
            ("chat", "chat.turn"),
            ("execution", "switchboard.execution.v1.ExecutionService/SubmitTask"),
            ("worker", "execution.step call"),
            ("worker", "sandbox.run"),
            ("rag", "switchboard.rag.v1.RagService/Retrieve"),
            ("inference", "switchboard.inference.v1.InferenceService/Embed"),
            # the generation: the router chat embeds, called in-process
            ("chat", "switchboard.inference.v1.InferenceService/Generate"),
            ("chat", "admission.admit"),
        }
        return spans if needed <= names and connected(spans) else []

    spans = await polled(whole, timeout=20, what="every hop's span is stored, connected")
    assert root.parent_id is None and root.status != "error"
    # a call's server span by its name (a client span of the same call shares the name)
    by_name = {s.name: s for s in spans if s.kind != "client"}
    # the hops: turn → Generate (in chat) → Triton; turn → Retrieve → Embed (inference); turn →
    # SubmitTask → the step (worker, over JetStream) → the sandbox
    generate = by_name["switchboard.inference.v1.InferenceService/Generate"]
    assert ancestors(spans, generate)[-1] == root
    assert generate.attributes["gen_ai.usage.output_tokens"] == completed.usage.completion_tokens
    assert generate.attributes["gen_ai.usage.input_tokens"] == completed.usage.prompt_tokens
    assert generate.attributes["gen_ai.request.model"] == completed.model.name
    assert generate.attributes["gen_ai.server.time_to_first_token"] > 0
    assert generate.attributes["switchboard.tier"]
    triton = [s for s in spans if s.name == f"generate {completed.model.name}"]
    assert triton and triton[0].attributes["switchboard.breaker"] == "closed"
    assert by_name["admission.admit"].attributes["switchboard.admission.decision"] == "admitted"
    retrieve = by_name["switchboard.rag.v1.RagService/Retrieve"]
    assert retrieve.attributes["switchboard.retrieval.mode"] == "hybrid"
    assert retrieve.attributes["switchboard.retrieval.rows"] > 0
    embed = by_name["switchboard.inference.v1.InferenceService/Embed"]
    assert retrieve in ancestors(spans, embed)
    assert embed.attributes["gen_ai.operation.name"] == "embeddings"
    assert embed.attributes["gen_ai.usage.input_tokens"] > 0
    step = by_name["execution.step call"]
    assert step.attributes["switchboard.attempt"] == 1
    assert {"worker", "execution", "chat"} <= {
        s.service for s in ancestors(spans, by_name["sandbox.run"])
    }
    assert any(s.attributes.get("db.system") == "postgresql" for s in spans)
    assert {s.service for s in spans} >= {"chat", "execution", "worker", "rag", "inference"}


async def test_a_task_is_one_trace_across_a_worker_restart(mesh, channel):
    tenant = new_tenant()
    execution = execution_service_pb2_grpc.ExecutionServiceStub(channel)
    steps = [
        pb.Step(name="first", code=pb.CodeStep(code="print('one')")),
        pb.Step(
            name="slow", depends_on=["first"], code=pb.CodeStep(code="import time\ntime.sleep(8)")
        ),
        pb.Step(name="last", depends_on=["slow"], code=pb.CodeStep(code="print('three')")),
    ]
    task = (
        await execution.SubmitTask(
            pb.SubmitTaskRequest(steps=steps), metadata=as_tenant(tenant), timeout=10
        )
    ).task

    def step_spans(name: str) -> list[Span]:
        return find(
            mesh,
            lambda s: (
                s.name == f"execution.step {name}"
                and s.attributes.get("switchboard.task_id") == task.task_id
            ),
        )

    async def slow_running() -> bool:
        got = await execution.GetTask(
            pb.GetTaskRequest(task_id=task.task_id), metadata=as_tenant(tenant), timeout=5
        )
        states = {s.name: s.state for s in got.task.step_statuses}
        return states["slow"] == pb.STEP_STATE_RUNNING and step_spans("first")

    await eventually(slow_running, timeout=30, what="the slow step runs, the first is traced")
    (worker,) = [r for r in mesh.records() if r.name == "worker-0"]
    os.kill(worker.pid, signal.SIGKILL)
    # killed mid-step (it sleeps 8 s): its first attempt never ends, so never has a span
    assert not step_spans("slow"), "the slow step ended before the kill: nothing tested"
    await asyncio.to_thread(mesh.start_service, "worker-0")

    async def finished() -> bool:
        got = await execution.GetTask(
            pb.GetTaskRequest(task_id=task.task_id), metadata=as_tenant(tenant), timeout=5
        )
        return got.task.state == pb.TASK_STATE_COMPLETED and step_spans("last")

    await eventually(finished, timeout=90, what="the task completes after the restart")
    (first,) = step_spans("first")
    (slow,) = step_spans("slow")  # the killed attempt's span died with its process
    (last,) = step_spans("last")
    spans = spans_of(mesh, first.trace_id)
    submit = next(s for s in spans if s.name.endswith("ExecutionService/SubmitTask"))
    assert slow.trace_id == last.trace_id == submit.trace_id
    assert slow.attributes["switchboard.attempt"] == 2
    assert slow.process == first.process == "worker-0"
    assert slow.attributes["messaging.system"] == "nats"
    # the retry's link: the killed attempt, by the span id every attempt derives
    (link,) = slow.links
    assert link.trace_id == slow.trace_id
    assert link.span_id == f"{tracing.derived_span_id(task.task_id, 'slow', 1):016x}"
    assert link.attributes["switchboard.attempt"] == 1
    assert first.span_id == f"{tracing.derived_span_id(task.task_id, 'first', 1):016x}"
    for step in (first, slow, last):
        assert submit in ancestors(spans, step)


async def test_an_error_a_client_saw_leads_to_its_trace(mesh, channel):
    tenant = new_tenant()
    rag = rag_service_pb2_grpc.RagServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await rag.Retrieve(
            rag_pb2.RetrieveRequest(collection="nothing-here", query="anything", top_k=3),
            metadata=as_tenant(tenant),
            timeout=10,
        )
    assert raised.value.code() is grpc.StatusCode.NOT_FOUND
    info = error_details(raised.value).error_info
    trace_id, request_id = info.metadata["trace_id"], info.metadata["request_id"]

    def failed() -> list[Span]:
        return [
            s
            for s in spans_of(mesh, trace_id)
            if s.name == "switchboard.rag.v1.RagService/Retrieve" and s.status == "error"
        ]

    (span,) = await polled(failed, timeout=10, what="the failed call's span")
    assert span.attributes[tracing.REQUEST_ID] == request_id
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    # the CLI finds it by either id
    for ident in (trace_id, request_id):
        shown = await asyncio.to_thread(switchboard_trace, mesh, ident)
        assert shown.returncode == 0, shown.stderr
        assert f"trace {trace_id}" in shown.stdout
        assert "RagService/Retrieve" in shown.stdout and "NOT_FOUND" in shown.stdout
    unknown = await asyncio.to_thread(switchboard_trace, mesh, "no-such-id")
    assert unknown.returncode == 1
    assert "no trace with id or request id 'no-such-id'" in unknown.stderr


def switchboard_trace(mesh, ident: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SWITCHBOARD, "trace", ident],
        capture_output=True,
        text=True,
        env={**os.environ, "SWITCHBOARD_RUN_DIR": str(mesh.config.run_dir)},
        timeout=60,
    )
