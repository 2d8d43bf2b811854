"""Two chat replicas sharing the session mesh's NATS and PostgreSQL: a session's events
survive the replica a client was on.

The test starts its own chat processes (A and B) with the environment the launcher
gives a chat process, and talks to each directly (as the tenant, on the internal
trust of `x-tenant-id`), so that "the client is on B after A died" is certain, not
left to Envoy's round robin. Each test kills or stops only replicas it started, by
PID, and every one is stopped at the end, whatever happened.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from switchboard.chat.v1 import chat_pb2 as pb
from switchboard.chat.v1 import chat_service_pb2_grpc
from switchboard.rag.v1 import rag_service_pb2_grpc

from services.demo import handbook
from services.launcher import Mesh, ProcessRecord, spawn, stop
from services.runtime import TENANT_HEADER, error_details
from tests.integration.test_converse import COLLECTION, LONG, QUESTION, Conversation, kinds
from tests.polling import eventually

pytestmark = pytest.mark.timeout(600)  # replicas started and stopped, and the mesh if first

REPO = Path(__file__).resolve().parents[2]
LEASE_S = 1.5
"""The replicas' turn lease: how soon a dead replica's turn is recovered."""
ASKING = "Tell me everything about on-call, rotations and escalation"
SLOW_CODE = "/code\nimport time\ntime.sleep(3)\nprint('slept well')"
"""A turn that lasts a few seconds (a sandboxed step), then generates."""


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@dataclass
class Replica:
    name: str
    record: ProcessRecord
    target: str
    channel: grpc.aio.Channel

    @property
    def chat(self) -> chat_service_pb2_grpc.ChatServiceStub:
        return chat_service_pb2_grpc.ChatServiceStub(self.channel)

    def alive(self) -> bool:
        return self.record.process() is not None


class Replicas:
    """Chat processes this test started, against the session mesh."""

    def __init__(self, mesh: Mesh, run_dir: Path) -> None:
        self._mesh = mesh
        self._run_dir = run_dir
        self.started: list[Replica] = []

    async def start(self, name: str, **settings: str) -> Replica:
        host = self._mesh.config.host
        port = _free_port(host)
        mesh = self._mesh.internal_address
        env = {
            "SWITCHBOARD_CHAT_REPLICA_ID": name,
            "SWITCHBOARD_CHAT_HOST": host,
            "SWITCHBOARD_CHAT_PORT": str(port),
            "SWITCHBOARD_CHAT_TURN_LEASE_S": str(LEASE_S),
            "SWITCHBOARD_INFERENCE_TARGET": mesh,
            "SWITCHBOARD_RAG_TARGET": mesh,
            "SWITCHBOARD_EXECUTION_TARGET": mesh,
            "SWITCHBOARD_ADMISSION_TARGET": mesh,
            "SWITCHBOARD_DATABASE_URL": self._mesh.database_url,
            "SWITCHBOARD_NATS_URL": self._mesh.nats_url,
            "PYTHONUNBUFFERED": "1",
            **{f"SWITCHBOARD_CHAT_{k.upper()}": v for k, v in settings.items()},
        }
        record = spawn(
            name,
            [sys.executable, "-m", "services.chat"],
            log=self._run_dir / f"{name}.log",
            env=env,
            cwd=REPO,
        )
        target = f"{host}:{port}"
        replica = Replica(name, record, target, grpc.aio.insecure_channel(target))
        self.started.append(replica)
        health = health_pb2_grpc.HealthStub(replica.channel)

        async def serving() -> bool:
            assert replica.alive(), f"{name} exited: see {self._run_dir / f'{name}.log'}"
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.aio.AioRpcError:
                return False
            return reply.status == health_pb2.HealthCheckResponse.SERVING

        await eventually(serving, timeout=60, interval=0.1, what=f"{name} SERVING")
        return replica

    @staticmethod
    def kill(replica: Replica) -> None:
        os.kill(replica.record.pid, signal.SIGKILL)

    @staticmethod
    def terminate(replica: Replica) -> None:
        os.kill(replica.record.pid, signal.SIGTERM)

    async def close(self) -> None:
        for replica in self.started:
            await replica.channel.close()
            await asyncio.to_thread(stop, replica.record)


@pytest.fixture
async def replicas(mesh: Mesh, tmp_path: Path):
    started = Replicas(mesh, tmp_path)
    try:
        yield started
    finally:
        await started.close()


@pytest.fixture(scope="module")
def tenant() -> str:
    return f"replicas-{uuid.uuid4().hex[:8]}"


def as_tenant(tenant: str) -> tuple[tuple[str, str], ...]:
    return ((TENANT_HEADER, tenant),)


@pytest.fixture(scope="module")
async def collection(envoy_target: str, tenant: str, credentials) -> str:
    async with grpc.aio.insecure_channel(envoy_target) as channel:
        rag = rag_service_pb2_grpc.RagServiceStub(channel)
        requests = handbook(COLLECTION, 6)
        reply = await rag.IngestDocuments(
            iter(requests), metadata=credentials.metadata(tenant), timeout=120
        )
        assert reply.documents_failed == 0
    return COLLECTION


async def create(replica: Replica, tenant: str, **settings: object) -> str:
    reply = await replica.chat.CreateSession(
        pb.CreateSessionRequest(settings=pb.SessionSettings(**settings)),
        metadata=as_tenant(tenant),
        timeout=10,
    )
    return reply.session.session_id


def say(text: str, client_id: str = "") -> pb.ConverseRequest:
    return pb.ConverseRequest(
        message=pb.UserMessage(client_message_id=client_id or uuid.uuid4().hex, text=text)
    )


def resuming(session_id: str, after: str) -> pb.ConverseRequest:
    return pb.ConverseRequest(resume=pb.ResumeSession(session_id=session_id, last_event_id=after))


async def history(replica: Replica, tenant: str, session_id: str) -> list[pb.Message]:
    reply = await replica.chat.ListMessages(
        pb.ListMessagesRequest(session_id=session_id), metadata=as_tenant(tenant), timeout=10
    )
    return list(reply.messages)


def tokens(frames: list[pb.ConverseResponse]) -> list[pb.Token]:
    return [f.token for f in frames if f.HasField("token")]


def sequences(frames: list[pb.ConverseResponse]) -> list[int]:
    return [int(f.event_id.rpartition(".")[2]) for f in frames]


def assert_one_answer_without_gaps(frames: list[pb.ConverseResponse]) -> str:
    """The frames of one turn, read across replicas: every token once, in order, and
    each event once; returns the answer's text."""
    assert sequences(frames) == sorted(set(sequences(frames))), "events repeated or reordered"
    indexes = [t.index for t in tokens(frames)]
    assert indexes == list(range(len(indexes))), "tokens missing or repeated"
    assert len({f.message_id for f in frames if f.message_id}) == 1
    return "".join(t.text for t in tokens(frames))


async def open_and_ask(replica: Replica, tenant: str, sid: str, text: str) -> Conversation:
    talk = Conversation(
        replica.chat, as_tenant(tenant), pb.ConverseRequest(open={"session_id": sid})
    )
    await talk.next()
    talk.send(say(text, "q"))
    return talk


async def test_a_client_resumes_on_another_replica_after_its_own_is_killed(
    replicas: Replicas, tenant: str, collection: str
):
    a = await replicas.start("chat-a")
    b = await replicas.start("chat-b")
    sid = await create(a, tenant, collection=collection, retrieval_top_k=20, **LONG)
    talk = await open_and_ask(a, tenant, sid, ASKING)
    seen = await talk.until("token")
    seen += [await talk.next() for _ in range(3)]
    replicas.kill(a)  # mid-answer
    await eventually(lambda: not a.alive(), what="chat-a is gone")
    talk.call.cancel()

    resumed = Conversation(b.chat, as_tenant(tenant), resuming(sid, seen[-1].event_id))
    opened = await resumed.next()
    assert opened.opened.resumed and opened.event_id == seen[-1].event_id
    rest = await resumed.until("turn_completed", timeout=LEASE_S * 10)
    frames = seen + rest
    text = assert_one_answer_without_gaps(frames)
    assert text, "chat-a streamed part of the answer before it died"
    # the turn was cut short: a clear error frame, then its end, FAILED
    assert kinds(rest)[-2:] == ["error", "turn_completed"]
    error = rest[-2].error
    assert error.client_message_id == "q"
    assert error.status.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert rest[-1].turn_completed.status == pb.MESSAGE_STATUS_FAILED
    # and the history holds the partial answer, marked
    stored = await history(b, tenant, sid)
    assert [m.role for m in stored] == [pb.MESSAGE_ROLE_USER, pb.MESSAGE_ROLE_ASSISTANT]
    answer = stored[-1]
    assert answer.message_id == frames[0].turn_started.assistant_message_id
    assert answer.status == pb.MESSAGE_STATUS_FAILED and answer.text == text
    assert answer.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
    # the session goes on, on B
    resumed.send(say(QUESTION))
    after = await resumed.until("turn_completed")
    assert after[-1].turn_completed.status == pb.MESSAGE_STATUS_COMPLETED
    resumed.close()


async def test_a_stopped_replica_closes_its_unfinished_turn_for_clients_elsewhere(
    replicas: Replicas, tenant: str
):
    a = await replicas.start("chat-a", shutdown_grace_s="0")
    b = await replicas.start("chat-b")
    sid = await create(a, tenant, code_enabled=True)
    talk = await open_and_ask(a, tenant, sid, SLOW_CODE)
    seen = await talk.until("tool_call")
    talk.call.cancel()
    replicas.terminate(a)  # drained, then stopped: its turn cannot finish in 0 s

    resumed = Conversation(b.chat, as_tenant(tenant), resuming(sid, seen[-1].event_id))
    assert (await resumed.next()).opened.resumed
    rest = await resumed.until("turn_completed")
    assert_one_answer_without_gaps(seen + rest)
    assert "error" in kinds(rest)
    error = next(f.error for f in rest if f.HasField("error"))
    assert error_details(error.status).error_info.reason == "SHUTTING_DOWN"
    assert rest[-1].turn_completed.status == pb.MESSAGE_STATUS_FAILED
    await eventually(lambda: not a.alive(), timeout=30, what="chat-a stopped")
    stored = (await history(b, tenant, sid))[-1]
    assert stored.role == pb.MESSAGE_ROLE_ASSISTANT and stored.status == pb.MESSAGE_STATUS_FAILED
    resumed.close()


async def test_a_draining_replica_finishes_its_turn_for_a_client_resumed_elsewhere(
    replicas: Replicas, tenant: str
):
    a = await replicas.start("chat-a", shutdown_grace_s="60")
    b = await replicas.start("chat-b")
    sid = await create(a, tenant, code_enabled=True)
    talk = await open_and_ask(a, tenant, sid, SLOW_CODE)
    seen = await talk.until("tool_call")
    replicas.terminate(a)  # the rollout drains A
    talk.call.cancel()  # and its client reconnects through Envoy, to B

    resumed = Conversation(b.chat, as_tenant(tenant), resuming(sid, seen[-1].event_id))
    assert (await resumed.next()).opened.resumed
    rest = await resumed.until("turn_completed")
    text = assert_one_answer_without_gaps(seen + rest)
    assert "error" not in kinds(rest)
    # generated to its end on A after the SIGTERM: B only relayed it (a turn B had
    # taken over would have ended FAILED)
    assert rest[-1].turn_completed.status == pb.MESSAGE_STATUS_COMPLETED
    await eventually(lambda: not a.alive(), timeout=30, what="chat-a stopped after its turn")
    stored = (await history(b, tenant, sid))[-1]
    assert stored.status == pb.MESSAGE_STATUS_COMPLETED and stored.text == text
    resumed.close()


async def test_sent_on_one_replica_streamed_from_another_one_turn_at_a_time(
    replicas: Replicas, tenant: str, collection: str
):
    a = await replicas.start("chat-a")
    b = await replicas.start("chat-b")
    sid = await create(a, tenant, collection=collection)
    me = as_tenant(tenant)
    watch = b.chat.StreamEvents(pb.StreamEventsRequest(session_id=sid), metadata=me, timeout=120)
    opened = (await watch.read()).event
    assert opened.opened.session.session_id == sid and opened.event_id
    message = pb.UserMessage(client_message_id="on-a", text=QUESTION)
    sent = await a.chat.SendMessage(
        pb.SendMessageRequest(session_id=sid, message=message), metadata=me, timeout=10
    )
    resent = await b.chat.SendMessage(
        pb.SendMessageRequest(session_id=sid, message=message), metadata=me, timeout=10
    )
    assert sent.accepted and not resent.accepted  # answered once, whichever replica
    other = pb.UserMessage(client_message_id="on-b", text="Who approves expense reports?")
    assert (
        await b.chat.SendMessage(
            pb.SendMessageRequest(session_id=sid, message=other), metadata=me, timeout=10
        )
    ).accepted
    frames: list[pb.ConverseResponse] = []
    while sum(f.HasField("turn_completed") for f in frames) < 2:
        frames.append((await asyncio.wait_for(watch.read(), 60)).event)
    watch.cancel()
    started = [f.turn_started.client_message_id for f in frames if f.HasField("turn_started")]
    assert sorted(started) == ["on-a", "on-b"]
    owners = [f.message_id for f in frames if f.message_id]
    assert len([m for i, m in enumerate(owners) if i == 0 or owners[i - 1] != m]) == 2, (
        "the two turns interleaved"
    )
    assert {f.turn_completed.status for f in frames if f.HasField("turn_completed")} == {
        pb.MESSAGE_STATUS_COMPLETED
    }
    # the id SendMessage gave on A resumes on B exactly at A's turn (or before B's)
    replay = b.chat.StreamEvents(
        pb.StreamEventsRequest(session_id=sid, after_event_id=sent.last_event_id),
        metadata=me,
        timeout=60,
    )
    assert (await replay.read()).event.event_id == sent.last_event_id
    again = [(await replay.read()).event for _ in frames]
    replay.cancel()
    assert [f.event_id for f in again] == [f.event_id for f in frames]
    stored = await history(a, tenant, sid)
    assert [m.role for m in stored] == [pb.MESSAGE_ROLE_USER, pb.MESSAGE_ROLE_ASSISTANT] * 2


async def test_a_cancel_through_another_replica_stops_the_answer(
    replicas: Replicas, tenant: str, collection: str
):
    a = await replicas.start("chat-a")
    b = await replicas.start("chat-b")
    sid = await create(a, tenant, collection=collection, retrieval_top_k=20, **LONG)
    me = as_tenant(tenant)
    watch = b.chat.StreamEvents(pb.StreamEventsRequest(session_id=sid), metadata=me, timeout=120)
    await watch.read()
    message = pb.UserMessage(client_message_id="long", text=ASKING)
    await a.chat.SendMessage(pb.SendMessageRequest(session_id=sid, message=message), metadata=me)
    frames = [(await watch.read()).event]
    while not frames[-1].HasField("token"):
        frames.append((await watch.read()).event)
    answer_id = frames[0].turn_started.assistant_message_id
    cancel = pb.CancelTurnRequest(session_id=sid, assistant_message_id=answer_id)
    assert (await b.chat.CancelTurn(cancel, metadata=me, timeout=10)).cancelled  # runs on A
    while not frames[-1].HasField("turn_completed"):
        frames.append((await asyncio.wait_for(watch.read(), 60)).event)
    watch.cancel()
    assert frames[-1].turn_completed.status == pb.MESSAGE_STATUS_CANCELLED
    stored = (await history(b, tenant, sid))[-1]
    assert stored.message_id == answer_id and stored.status == pb.MESSAGE_STATUS_CANCELLED
    assert stored.text == assert_one_answer_without_gaps(frames)
    assert not (await b.chat.CancelTurn(cancel, metadata=me, timeout=10)).cancelled
