"""ChatService.Converse end to end: Envoy → chat → admission, RAG, inference, execution
→ Triton and PostgreSQL, with the generated Python client."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2
from prometheus_client.parser import text_string_to_metric_families
from switchboard.admission.v1 import admission_pb2, admission_service_pb2_grpc
from switchboard.chat.v1 import chat_pb2 as pb
from switchboard.chat.v1 import chat_service_pb2_grpc
from switchboard.events.v1 import events_pb2
from switchboard.inference.v1 import inference_pb2
from switchboard.rag.v1 import rag_service_pb2_grpc

from services.demo import handbook
from services.inference.balancer import Balancer
from services.launcher._services import SERVICES
from services.runtime import error_details
from tests.integration.conftest import as_operator
from tests.polling import eventually

COLLECTION = "handbook"
QUESTION = "How long is an on-call shift and when does it hand over?"


def new_tenant() -> str:
    return f"tenant-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def tenant() -> str:
    return new_tenant()


@pytest.fixture(scope="module")
def auth(credentials):
    return credentials.metadata


@pytest.fixture
async def channel(envoy_target: str):
    async with grpc.aio.insecure_channel(envoy_target) as channel:
        yield channel


@pytest.fixture
def chat(channel):
    return chat_service_pb2_grpc.ChatServiceStub(channel)


@pytest.fixture
def admission(channel):
    return admission_service_pb2_grpc.AdmissionServiceStub(channel)


@pytest.fixture(scope="module")
async def collection(envoy_target, tenant, auth) -> str:
    """The handbook's first documents, ingested once per tenant."""
    async with grpc.aio.insecure_channel(envoy_target) as channel:
        await _ingest(rag_service_pb2_grpc.RagServiceStub(channel), auth(tenant))
    return COLLECTION


async def _ingest(rag, metadata) -> None:
    requests = handbook(COLLECTION, 6)
    reply = await rag.IngestDocuments(iter(requests), metadata=metadata, timeout=120)
    assert reply.documents_ingested == len(requests) and reply.documents_failed == 0


async def create(chat, auth, tenant: str, **settings) -> pb.Session:
    reply = await chat.CreateSession(
        pb.CreateSessionRequest(settings=pb.SessionSettings(**settings)),
        metadata=auth(tenant),
        timeout=10,
    )
    return reply.session


def opening(session_id: str) -> pb.ConverseRequest:
    return pb.ConverseRequest(open=pb.OpenSession(session_id=session_id))


def say(text: str, client_id: str = "") -> pb.ConverseRequest:
    return pb.ConverseRequest(
        message=pb.UserMessage(client_message_id=client_id or uuid.uuid4().hex, text=text)
    )


class Conversation:
    """A Converse stream driven frame by frame."""

    def __init__(self, chat, metadata, first: pb.ConverseRequest) -> None:
        self.outbox: asyncio.Queue[pb.ConverseRequest | None] = asyncio.Queue()
        self.outbox.put_nowait(first)
        self.call = chat.Converse(self._frames(), metadata=metadata, timeout=120)
        self.frames: list[pb.ConverseResponse] = []

    async def _frames(self):
        while (frame := await self.outbox.get()) is not None:
            yield frame

    def send(self, frame: pb.ConverseRequest) -> None:
        self.outbox.put_nowait(frame)

    def close(self) -> None:
        self.outbox.put_nowait(None)

    async def next(self, timeout: float = 30) -> pb.ConverseResponse:
        frame = await asyncio.wait_for(self.call.read(), timeout)
        assert frame is not grpc.aio.EOF, "the stream ended"
        self.frames.append(frame)
        return frame

    async def until(self, kind: str, timeout: float = 60) -> list[pb.ConverseResponse]:
        """Frames up to and including the next one of `kind`."""
        seen = []
        while True:
            frame = await self.next(timeout)
            seen.append(frame)
            if frame.WhichOneof("frame") == kind:
                return seen


def kinds(frames) -> list[str]:
    return [f.WhichOneof("frame") for f in frames]


def text_of(frames) -> str:
    return "".join(f.token.text for f in frames if f.WhichOneof("frame") == "token")


async def history(chat, auth, tenant, session_id) -> list[pb.Message]:
    reply = await chat.ListMessages(
        pb.ListMessagesRequest(session_id=session_id), metadata=auth(tenant), timeout=10
    )
    return list(reply.messages)


async def test_a_turn_streams_tokens_then_citations_and_is_stored(chat, auth, tenant, collection):
    session = await create(chat, auth, tenant, collection=collection)
    talk = Conversation(chat, auth(tenant), opening(session.session_id))
    opened = await talk.next()
    assert opened.opened.session.session_id == session.session_id and not opened.opened.resumed
    talk.send(say(QUESTION, "q1"))
    frames = await talk.until("turn_completed")
    assert kinds(frames)[0] == "turn_started" and kinds(frames)[-2:] == [
        "citations",
        "turn_completed",
    ]
    started, done = frames[0].turn_started, frames[-1].turn_completed
    assert started.client_message_id == "q1"
    tokens = [f for f in frames if f.WhichOneof("frame") == "token"]
    assert len(tokens) > 5
    assert [t.token.index for t in tokens] == list(range(len(tokens)))
    assert "seven days" in text_of(frames) or "Tuesday" in text_of(frames)
    citations = frames[-2].citations
    assert citations.passages and citations.citations
    assert any(p.document_id == "hb-001" for p in citations.passages)
    assert done.status == pb.MESSAGE_STATUS_COMPLETED
    assert done.usage.completion_tokens == len(tokens) and done.usage.prompt_tokens > 0
    assert done.model.name.startswith("generator")
    assert {f.message_id for f in frames} == {started.assistant_message_id}
    ids = [f.event_id for f in [opened, *frames]]
    assert len(set(ids)) == len(ids)
    talk.close()
    assert await talk.call.read() is grpc.aio.EOF
    assert await talk.call.code() == grpc.StatusCode.OK

    stored = await history(chat, auth, tenant, session.session_id)
    assert [(m.sequence, m.role) for m in stored] == [
        (1, pb.MESSAGE_ROLE_USER),
        (2, pb.MESSAGE_ROLE_ASSISTANT),
    ]
    user, answer = stored
    assert user.text == QUESTION and user.client_message_id == "q1"
    assert answer.message_id == started.assistant_message_id
    assert answer.status == pb.MESSAGE_STATUS_COMPLETED
    assert answer.text == text_of(frames)
    assert list(answer.citations) == list(citations.citations)
    assert answer.usage == done.usage
    got = await chat.GetSession(
        pb.GetSessionRequest(session_id=session.session_id), metadata=auth(tenant)
    )
    assert got.session.message_count == 2
    assert got.session.usage.completion_tokens == done.usage.completion_tokens


async def test_messages_sent_during_an_answer_wait_their_turn(chat, auth, tenant, collection):
    session = await create(chat, auth, tenant, collection=collection)
    talk = Conversation(chat, auth(tenant), opening(session.session_id))
    await talk.next()
    questions = [QUESTION, "Who approves expense reports?", "What is the on-call escalation?"]
    for i, question in enumerate(questions):
        talk.send(say(question, f"m{i}"))
    talk.send(say(questions[0], "m0"))  # a resent id is not processed twice
    talk.close()  # half-close: the pending turns still finish
    frames = []
    while (frame := await talk.call.read()) is not grpc.aio.EOF:
        frames.append(frame)
    assert await talk.call.code() == grpc.StatusCode.OK
    started = [f.turn_started.client_message_id for f in frames if f.HasField("turn_started")]
    assert started == ["m0", "m1", "m2"]
    # turns do not interleave: each turn's frames are contiguous
    owners = [f.message_id for f in frames if f.message_id]
    runs = [m for i, m in enumerate(owners) if i == 0 or owners[i - 1] != m]
    assert len(runs) == 3
    stored = await history(chat, auth, tenant, session.session_id)
    assert [m.sequence for m in stored] == list(range(1, 7))
    assert [m.role for m in stored] == [pb.MESSAGE_ROLE_USER, pb.MESSAGE_ROLE_ASSISTANT] * 3


def _cancelled_in_triton(mesh) -> int:
    logs = (mesh.config.run_dir / "logs").glob("triton-*.log")
    return sum(p.read_text(errors="replace").count("tokens: cancelled") for p in logs)


LONG = {
    "model": "generator_large",
    "parameters": inference_pb2.GenerationParameters(max_tokens=4000),
}


async def test_cancel_stops_generation_and_keeps_the_partial_answer(
    mesh, chat, auth, tenant, collection
):
    session = await create(chat, auth, tenant, collection=collection, retrieval_top_k=20, **LONG)
    talk = Conversation(chat, auth(tenant), opening(session.session_id))
    await talk.next()
    before = _cancelled_in_triton(mesh)
    talk.send(say("Tell me everything about on-call, rotations, escalation and expenses"))
    frames = await talk.until("token")
    talk.send(pb.ConverseRequest(cancel=pb.CancelTurn()))
    frames += await talk.until("turn_completed")
    done = frames[-1].turn_completed
    assert done.status == pb.MESSAGE_STATUS_CANCELLED
    assert done.finish_reason == inference_pb2.FINISH_REASON_CANCELLED
    assert "citations" not in kinds(frames)

    async def triton_cancelled() -> bool:
        return _cancelled_in_triton(mesh) > before

    await eventually(triton_cancelled)
    answer = (await history(chat, auth, tenant, session.session_id))[-1]
    assert answer.status == pb.MESSAGE_STATUS_CANCELLED
    assert answer.text == text_of(frames) and answer.text
    # the session goes on
    talk.send(say(QUESTION))
    after = await talk.until("turn_completed")
    assert after[-1].turn_completed.status == pb.MESSAGE_STATUS_COMPLETED
    talk.close()


async def test_a_dropped_client_resumes_and_gets_the_rest_without_duplicates(
    chat, auth, tenant, collection
):
    session = await create(chat, auth, tenant, collection=collection, retrieval_top_k=20, **LONG)
    first = Conversation(chat, auth(tenant), opening(session.session_id))
    await first.next()
    first.send(say("Tell me everything about on-call, rotations and escalation"))
    seen = await first.until("token")
    seen += [await first.next() for _ in range(3)]
    first.call.cancel()  # the connection drops mid-answer
    resume = pb.ConverseRequest(
        resume=pb.ResumeSession(session_id=session.session_id, last_event_id=seen[-1].event_id)
    )
    second = Conversation(chat, auth(tenant), resume)
    opened = await second.next()
    assert opened.opened.resumed
    rest = await second.until("turn_completed")
    second.close()
    tokens = [f.token for f in seen + rest if f.HasField("token")]
    assert [t.index for t in tokens] == list(range(len(tokens)))  # no gap, no repeat
    ids = [f.event_id for f in seen + rest]
    assert len(set(ids)) == len(ids)
    assert rest[-1].turn_completed.status == pb.MESSAGE_STATUS_COMPLETED
    answer = (await history(chat, auth, tenant, session.session_id))[-1]
    assert answer.text == "".join(t.text for t in tokens)

    stale = pb.ConverseRequest(
        resume=pb.ResumeSession(session_id=session.session_id, last_event_id="0000.1")
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await Conversation(chat, auth(tenant), stale).next()
    details = error_details(err.value)
    assert details.code == grpc.StatusCode.FAILED_PRECONDITION
    assert details.error_info.reason == "EVENT_HISTORY_EXPIRED"


async def test_a_client_that_goes_away_frees_generation_and_admission_within_a_second(
    mesh, chat, admission, auth, collection, tenant
):
    # The demo answers last well under the default resume grace (0.5 s), so this runs
    # the chat service without one, to catch the answer while it is generating.
    await asyncio.to_thread(
        mesh.start_service, "chat", env={"SWITCHBOARD_CHAT_RESUME_GRACE_S": "0"}
    )
    try:
        session = await create(
            chat, auth, tenant, collection=collection, retrieval_top_k=20, **LONG
        )
        before = _cancelled_in_triton(mesh)
        talk = Conversation(chat, auth(tenant), opening(session.session_id))
        await talk.next()
        talk.send(say("Tell me everything about on-call, rotations, escalation and expenses"))
        await talk.until("token")

        async def in_flight() -> int:
            reply = await admission.GetQuota(admission_pb2.GetQuotaRequest(), metadata=auth(tenant))
            return reply.quota.in_flight

        assert await in_flight() == 1
        talk.call.cancel()

        async def released() -> bool:
            return await in_flight() == 0

        took = await eventually(released, timeout=5)
        assert took <= 1.0, f"admission freed {took:.2f}s after the client left"

        async def triton_cancelled() -> bool:
            return _cancelled_in_triton(mesh) > before

        await eventually(triton_cancelled)

        async def stored() -> bool:
            messages = await history(chat, auth, tenant, session.session_id)
            return messages[-1].status == pb.MESSAGE_STATUS_CANCELLED

        await eventually(stored)
    finally:
        await asyncio.to_thread(mesh.start_service, "chat")


async def test_a_client_gone_while_queued_leaves_the_admission_queue(chat, admission, auth):
    tenant = new_tenant()
    await admission.UpdatePolicy(
        admission_pb2.UpdatePolicyRequest(
            policy=admission_pb2.Policy(tenant_id=tenant, max_in_flight=1),
            update_mask=field_mask_pb2.FieldMask(paths=["max_in_flight"]),
        ),
        metadata=as_operator(tenant),
        timeout=5,
    )
    held = await admission.Admit(admission_pb2.AdmitRequest(), metadata=auth(tenant), timeout=5)
    session = await create(chat, auth, tenant)
    talk = Conversation(chat, auth(tenant), opening(session.session_id))
    await talk.next()
    talk.send(say("What do cats do?"))
    await talk.until("queued")
    talk.call.cancel()

    async def left_queue() -> bool:
        reply = await admission.GetQuota(admission_pb2.GetQuotaRequest(), metadata=auth(tenant))
        return sum(q.waiting for q in reply.quota.queued) == 0

    took = await eventually(left_queue, timeout=5)
    assert took <= 1.0, f"the queue place was freed {took:.2f}s after the client left"
    await admission.Release(
        admission_pb2.ReleaseRequest(lease_id=held.lease.lease_id), metadata=auth(tenant)
    )


async def test_queue_position_is_shown_and_a_refusal_is_a_frame_with_retry(
    chat, admission, auth, collection
):
    tenant = new_tenant()
    await admission.UpdatePolicy(
        admission_pb2.UpdatePolicyRequest(
            policy=admission_pb2.Policy(tenant_id=tenant, max_in_flight=1, max_queued=1),
            update_mask=field_mask_pb2.FieldMask(paths=["max_in_flight", "max_queued"]),
        ),
        metadata=as_operator(tenant),
        timeout=5,
    )
    held = await admission.Admit(admission_pb2.AdmitRequest(), metadata=auth(tenant), timeout=5)
    one = await create(chat, auth, tenant)
    two = await create(chat, auth, tenant)
    waiting = Conversation(chat, auth(tenant), opening(one.session_id))
    refused = Conversation(chat, auth(tenant), opening(two.session_id))
    await waiting.next()
    await refused.next()
    waiting.send(say("What do cats do?", "w"))
    frames = await waiting.until("queued")
    assert frames[-1].queued.position == 0

    refused.send(say("What do dogs do?", "r"))
    frames = await refused.until("turn_completed")
    assert kinds(frames) == ["turn_started", "error", "turn_completed"]
    error = frames[1].error
    assert error.client_message_id == "r"
    assert error.status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert frames[-1].turn_completed.status == pb.MESSAGE_STATUS_FAILED
    retry = [d for d in error.status.details if d.type_url.endswith("google.rpc.RetryInfo")]
    assert retry, "the refusal says when to retry"

    await admission.Release(
        admission_pb2.ReleaseRequest(lease_id=held.lease.lease_id), metadata=auth(tenant)
    )
    frames = await waiting.until("turn_completed")
    assert frames[-1].turn_completed.status == pb.MESSAGE_STATUS_COMPLETED
    # the refused stream stays open and works once there is room
    refused.send(say("What do dogs do?", "r2"))
    frames = await refused.until("turn_completed")
    assert frames[-1].turn_completed.status == pb.MESSAGE_STATUS_COMPLETED
    waiting.close()
    refused.close()


async def test_bad_frames_and_messages(chat, auth, tenant):
    session = await create(chat, auth, tenant)
    # a message before open ends the stream
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await Conversation(chat, auth(tenant), say("hi")).next()
    details = error_details(err.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.error_info.reason == "FRAME_OUT_OF_ORDER"
    # another tenant's session, and a malformed id: NOT_FOUND, never PERMISSION_DENIED
    for tenant_id, session_id in ((new_tenant(), session.session_id), (tenant, "nope")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await Conversation(chat, auth(tenant_id), opening(session_id)).next()
        details = error_details(err.value)
        assert details.code == grpc.StatusCode.NOT_FOUND
        assert details.error_info.reason == "SESSION_NOT_FOUND"

    talk = Conversation(chat, auth(tenant), opening(session.session_id))
    await talk.next()
    talk.send(say("x" * (33 * 1024), "big"))
    frame = await talk.next()
    assert frame.error.client_message_id == "big"
    assert frame.error.status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    talk.send(say("   ", "blank"))
    frame = await talk.next()
    assert frame.error.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    talk.send(say("/tool list_models", "tool"))  # not allowed in this session
    frames = await talk.until("turn_completed")
    assert kinds(frames) == ["turn_started", "error", "turn_completed"]
    assert frames[1].error.status.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    talk.send(say("What do cats do?", "ok"))  # the stream survived all of it
    frames = await talk.until("turn_completed")
    assert frames[-1].turn_completed.status == pb.MESSAGE_STATUS_COMPLETED
    # a second open on an attached stream is out of order and ends it
    talk.send(opening(session.session_id))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        while True:
            await talk.next()
    assert error_details(err.value).error_info.reason == "FRAME_OUT_OF_ORDER"
    stored = await history(chat, auth, tenant, session.session_id)
    assert [m.client_message_id for m in stored if m.role == pb.MESSAGE_ROLE_USER] == [
        "tool",
        "ok",
    ]


async def test_tool_and_code_calls_run_as_tasks_and_stream_progress(chat, auth, tenant):
    session = await create(chat, auth, tenant, allowed_tools=["list_models"], code_enabled=True)
    talk = Conversation(chat, auth(tenant), opening(session.session_id))
    await talk.next()
    talk.send(say("/code\ntotal = sum(range(7))\nprint('the total is', total * 2)"))
    frames = await talk.until("turn_completed")
    assert frames[-1].turn_completed.status == pb.MESSAGE_STATUS_COMPLETED
    call = next(f.tool_call for f in frames if f.HasField("tool_call"))
    assert call.tool == "run_code" and call.task_id
    progress = [f.tool_progress.event.type for f in frames if f.HasField("tool_progress")]
    assert progress[0] == events_pb2.STEP_EVENT_TYPE_QUEUED
    assert events_pb2.STEP_EVENT_TYPE_STARTED in progress
    assert progress[-1] == events_pb2.STEP_EVENT_TYPE_COMPLETED
    passages = next(f.citations.passages for f in frames if f.HasField("citations"))
    assert "the total is 42" in passages[0].text

    talk.send(say('/tool list_models {"verbose": true}'))
    frames = await talk.until("turn_completed")
    assert frames[-1].turn_completed.status in (
        pb.MESSAGE_STATUS_COMPLETED,
        pb.MESSAGE_STATUS_FAILED,
    )
    talk.close()
    stored = await history(chat, auth, tenant, session.session_id)
    roles = [m.role for m in stored[:4]]
    assert roles == [
        pb.MESSAGE_ROLE_USER,
        pb.MESSAGE_ROLE_TOOL_CALL,
        pb.MESSAGE_ROLE_TOOL_RESULT,
        pb.MESSAGE_ROLE_ASSISTANT,
    ]
    assert stored[1].tool_call.task_id == call.task_id
    assert "the total is 42" in stored[2].tool_result.output.struct_value["stdout"]


async def test_settings_change_mid_stream_and_delete_ends_the_stream(chat, auth, tenant):
    session = await create(chat, auth, tenant, system_prompt="Be brief.")
    talk = Conversation(chat, auth(tenant), opening(session.session_id))
    await talk.next()
    talk.send(
        pb.ConverseRequest(
            settings=pb.ChangeSettings(
                settings=pb.SessionSettings(system_prompt="Be thorough.", retrieval_top_k=3),
                update_mask=field_mask_pb2.FieldMask(paths=["system_prompt"]),
            )
        )
    )
    changed = (await talk.until("settings_changed"))[-1].settings_changed.session
    assert changed.settings.system_prompt == "Be thorough."
    assert changed.settings.retrieval_top_k == 0  # not in the mask
    talk.send(pb.ConverseRequest(settings=pb.ChangeSettings(settings=pb.SessionSettings())))
    frame = await talk.next()
    assert frame.error.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]  # no mask

    await chat.DeleteSession(
        pb.DeleteSessionRequest(session_id=session.session_id), metadata=auth(tenant)
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        while True:
            await talk.next()
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_rag_down_is_an_error_frame_and_the_session_stays_usable(
    mesh, chat, auth, tenant, collection
):
    session = await create(chat, auth, tenant, collection=collection)
    talk = Conversation(chat, auth(tenant), opening(session.session_id))
    await talk.next()
    await asyncio.to_thread(mesh.stop_component, "rag")
    try:
        talk.send(say(QUESTION, "down"))
        frames = await talk.until("turn_completed")
    finally:
        await asyncio.to_thread(mesh.start_service, "rag")
    assert kinds(frames) == ["turn_started", "error", "turn_completed"]
    error = frames[1].error.status
    assert error.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert frames[-1].turn_completed.status == pb.MESSAGE_STATUS_FAILED
    talk.send(say(QUESTION, "up"))
    frames = await talk.until("turn_completed")
    assert frames[-1].turn_completed.status == pb.MESSAGE_STATUS_COMPLETED
    talk.close()
    stored = await history(chat, auth, tenant, session.session_id)
    assert stored[1].status == pb.MESSAGE_STATUS_FAILED and stored[1].error.code == 14


async def test_many_sessions_on_one_process(chat, auth, tenant):
    async def one(i: int) -> pb.TurnCompleted:
        session = await create(chat, auth, tenant)
        talk = Conversation(chat, auth(tenant), opening(session.session_id))
        await talk.next()
        talk.send(say(f"What do cats do? ({i})"))
        frames = await talk.until("turn_completed")
        talk.close()
        return frames[-1].turn_completed

    done = await asyncio.gather(*(one(i) for i in range(40)))
    assert {d.status for d in done} == {pb.MESSAGE_STATUS_COMPLETED}


@dataclasses.dataclass
class _Replica:
    """A Triton replica as the balancer sees it, idle."""

    name: str
    outstanding: int = 0

    def accepting(self) -> bool:
        return True


def home_replica(mesh, session_id: str) -> int:
    """The Triton replica a session's turns go to while every replica is up and idle:
    its rendezvous hash's pick, as the router's balancer makes it."""
    replicas = [_Replica(url) for url in mesh.triton_urls]
    return replicas.index(Balancer(replicas).order(session_id)[0])


@pytest.mark.timeout(240)  # a Triton replica restarted
async def test_the_model_server_dying_mid_answer_keeps_the_partial_answer_and_the_session(
    mesh, chat, auth, tenant, collection
):
    session = await create(chat, auth, tenant, collection=collection, retrieval_top_k=20, **LONG)
    talk = Conversation(chat, auth(tenant), opening(session.session_id))
    await talk.next()
    talk.send(say("Tell me everything about on-call, rotations, escalation and expenses", "m"))
    frames = await talk.until("token")
    # the replica generating the answer dies (the chat process, which routes it, lives)
    home = f"triton-{home_replica(mesh, session.session_id)}"
    (triton,) = [r for r in mesh.records() if r.name == home]
    os.kill(triton.pid, signal.SIGKILL)
    try:
        frames += await talk.until("turn_completed")
    finally:
        await asyncio.to_thread(mesh.start_service, home)
    assert "error" in kinds(frames)
    error = next(f.error for f in frames if f.HasField("error"))
    assert error.client_message_id == "m"
    assert error.status.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert frames[-1].turn_completed.status == pb.MESSAGE_STATUS_FAILED
    stored = (await history(chat, auth, tenant, session.session_id))[-1]
    assert stored.status == pb.MESSAGE_STATUS_FAILED and stored.error.code == 14
    assert stored.text == text_of(frames) and stored.text  # the partial answer is kept
    talk.send(say(QUESTION))
    after = await talk.until("turn_completed")
    assert after[-1].turn_completed.status == pb.MESSAGE_STATUS_COMPLETED
    talk.close()


def json_stream(text: str) -> list[dict]:
    """grpcurl's output: JSON objects one after another."""
    decoder, values, at = json.JSONDecoder(), [], 0
    while (at := len(text) - len(text[at:].lstrip())) < len(text):
        value, at = decoder.raw_decode(text, at)
        values.append(value)
    return values


def test_grpcurl_holds_a_conversation(envoy_target, auth, tenant):
    grpcurl = str(Path(sys.executable).parent / "grpcurl")
    (_, bearer), *_ = auth(tenant)
    created = subprocess.run(
        [grpcurl, "-plaintext", "-H", f"authorization: {bearer}", "-d", "{}",
         envoy_target, "switchboard.chat.v1.ChatService/CreateSession"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    session_id = json.loads(created.stdout)["session"]["session_id"]  # grpcurl: proto names
    frames = "\n".join(
        json.dumps(frame)
        for frame in (
            {"open": {"session_id": session_id}},
            {"message": {"client_message_id": "a", "text": "What do cats do?"}},
            {"message": {"client_message_id": "b", "text": "And dogs?"}},
        )
    )
    result = subprocess.run(
        [grpcurl, "-plaintext", "-H", f"authorization: {bearer}", "-d", "@",
         envoy_target, "switchboard.chat.v1.ChatService/Converse"],
        input=frames, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    replies = json_stream(result.stdout)
    frame_kinds = [next(k for k in r if k not in ("event_id", "message_id")) for r in replies]
    assert frame_kinds[0] == "opened"
    assert frame_kinds.count("turn_started") == 2 and frame_kinds.count("turn_completed") == 2
    assert frame_kinds[-1] == "turn_completed"  # half-close: both turns finish, then the end
    assert "token" in frame_kinds
    completed = [r["turn_completed"] for r in replies if "turn_completed" in r]
    assert {c["status"] for c in completed} == {"MESSAGE_STATUS_COMPLETED"}


def test_switchboard_chat_talks_from_the_terminal(envoy_target, auth, tenant):
    (_, bearer), *_ = auth(tenant)
    result = subprocess.run(
        [str(Path(sys.executable).parent / "switchboard"), "chat", "--target", envoy_target,
         "--tools", "list_models"],
        input="What do cats do?\n/tool list_models\n/quit\n",
        env={**os.environ, "SWITCHBOARD_API_KEY": bearer.removeprefix("Bearer ")},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("session ")
    assert out.count("assistant> ") == 2 and out.count("[completed: ") == 2
    assert "[tool list_models {} → task " in out
    assert "step call: completed" in out


def triton_generations(mesh) -> list[float]:
    """Generation requests each Triton replica has served, from its own metrics."""
    served = []
    for replica in range(mesh.config.triton_replicas):
        _, _, port = mesh.config.triton_ports(replica)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        served.append(
            sum(
                sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples
                if sample.name == "nv_inference_request_success_total"
                and sample.labels.get("model", "").startswith("generator")
            )
        )
    return served


OPEN_CIRCUIT = 2
"""`switchboard_inference_breaker_state` of an open circuit."""


def chat_breakers(mesh) -> dict[str, float]:
    """The circuit breaker of each backend of the router chat embeds (0 closed, 1
    half-open, 2 open), from chat's own metrics."""
    port = next(spec for spec in SERVICES if spec.name == "chat").metrics_port(mesh.config, 0)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {
        sample.labels["backend"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "switchboard_inference_breaker_state"
    }


async def test_a_sessions_turns_stay_on_the_triton_replica_it_started_on(chat, auth, tenant, mesh):
    assert mesh.config.triton_replicas == 2

    async def both_taken() -> bool:
        states = await asyncio.to_thread(chat_breakers, mesh)
        return len(states) == 2 and OPEN_CIRCUIT not in states.values()

    # a replica an earlier test killed must be back in chat's router: a session whose
    # home's circuit is still open would start elsewhere and go home once it half-opens
    # (a half-open home takes the first turn as its probe)
    await eventually(both_taken, timeout=30, interval=0.2, what="chat's router takes both")
    talks = []
    for _ in range(2):
        session = await create(chat, auth, tenant)
        talk = Conversation(chat, auth(tenant), opening(session.session_id))
        await talk.next()
        talks.append(talk)

    async def turn(talk: Conversation) -> None:
        talk.send(say(QUESTION))
        done = (await talk.until("turn_completed"))[-1].turn_completed
        assert done.status == pb.MESSAGE_STATUS_COMPLETED

    async def served_by(talk: Conversation, turns: int) -> list[float]:
        before = await asyncio.to_thread(triton_generations, mesh)
        for _ in range(turns):
            await turn(talk)
        served: list[float] = []

        async def counted() -> bool:  # Triton counts a request once it is released
            nonlocal served
            after = await asyncio.to_thread(triton_generations, mesh)
            served = [a - b for a, b in zip(after, before, strict=True)]
            return sum(served) >= turns

        await eventually(counted, interval=0.1, what=f"Triton counted the {turns} turns")
        return served

    await asyncio.gather(*(turn(t) for t in talks))
    # one at a time, both replicas are idle: only affinity keeps a session on its home
    # (the least loaded choice alone would send every turn to the first replica). A
    # session's home is its rendezvous hash's pick, the same on every inference replica;
    # that homes spread over the replicas is tested in tests/unit/test_inference_logic.py
    # and, across two inference replicas, in tests/control.
    homes = []
    for talk in talks:
        served = await served_by(talk, 3)
        assert sorted(served) == [0, 3], served
        homes.append(served.index(3))
        talk.close()
    # the least loaded choice alone would pick replica 0 every time: a session at home
    # on replica 1 shows the affinity (a new session's home is 1 with a chance of 1/2)
    for _ in range(12):
        if 1 in homes:
            break
        session = await create(chat, auth, tenant)
        talk = Conversation(chat, auth(tenant), opening(session.session_id))
        await talk.next()
        served = await served_by(talk, 3)
        assert sorted(served) == [0, 3], served
        homes.append(served.index(3))
        talk.close()
    assert 1 in homes, homes
