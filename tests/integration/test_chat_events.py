"""The browser's chat contract end to end through Envoy (over gRPC here; the browser test
drives the same calls over gRPC-Web): SendMessage, CancelTurn and StreamEvents."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
from switchboard.chat.v1 import chat_pb2 as pb
from switchboard.chat.v1 import chat_service_pb2_grpc
from switchboard.rag.v1 import rag_service_pb2_grpc

from services.demo import handbook
from services.runtime import error_details
from tests.integration.test_converse import (
    COLLECTION,
    LONG,
    QUESTION,
    create,
    history,
    new_tenant,
)
from tests.polling import eventually

TIMEOUT = 60


@pytest.fixture(scope="module")
def tenant() -> str:
    return new_tenant()


@pytest.fixture(scope="module")
def auth(credentials):
    return credentials.metadata


@pytest.fixture
async def chat(envoy_target: str):
    async with grpc.aio.insecure_channel(envoy_target) as channel:
        yield chat_service_pb2_grpc.ChatServiceStub(channel)


@pytest.fixture(scope="module")
async def collection(envoy_target, tenant, auth) -> str:
    async with grpc.aio.insecure_channel(envoy_target) as channel:
        rag = rag_service_pb2_grpc.RagServiceStub(channel)
        requests = handbook(COLLECTION, 6)
        reply = await rag.IngestDocuments(iter(requests), metadata=auth(tenant), timeout=120)
        assert reply.documents_failed == 0
    return COLLECTION


def send(session_id: str, text: str, client_id: str = "") -> pb.SendMessageRequest:
    return pb.SendMessageRequest(
        session_id=session_id,
        message=pb.UserMessage(client_message_id=client_id or uuid.uuid4().hex, text=text),
    )


class Watcher:
    """A StreamEvents call read event by event."""

    def __init__(self, chat, metadata, session_id: str, after: str = "") -> None:
        request = pb.StreamEventsRequest(session_id=session_id, after_event_id=after)
        self.call = chat.StreamEvents(request, metadata=metadata, timeout=TIMEOUT * 2)

    async def next(self) -> pb.ConverseResponse:
        reply = await asyncio.wait_for(self.call.read(), TIMEOUT)
        assert reply is not grpc.aio.EOF, "the stream ended"
        return reply.event

    async def until(self, kind: str) -> list[pb.ConverseResponse]:
        seen = []
        while (frame := await self.next()).WhichOneof("frame") != kind:
            seen.append(frame)
        return [*seen, frame]


def tokens(frames) -> list:
    return [f.token for f in frames if f.HasField("token")]


async def refused(call, code: grpc.StatusCode, reason: str):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    details = error_details(err.value)
    assert (details.code, details.error_info.reason) == (code, reason), details
    return details


async def test_a_sent_message_streams_its_turn_and_a_resend_is_answered_once(
    chat, auth, tenant, collection
):
    session = await create(chat, auth, tenant, collection=collection)
    watcher = Watcher(chat, auth(tenant), session.session_id)
    opened = await watcher.next()
    assert opened.opened.session.session_id == session.session_id and opened.event_id
    sent = await chat.SendMessage(send(session.session_id, QUESTION, "q1"), metadata=auth(tenant))
    again = await chat.SendMessage(send(session.session_id, QUESTION, "q1"), metadata=auth(tenant))
    assert sent.accepted and not again.accepted
    frames = await watcher.until("turn_completed")
    assert frames[0].turn_started.client_message_id == "q1"
    assert [f.WhichOneof("frame") for f in frames[-2:]] == ["citations", "turn_completed"]
    assert frames[-1].turn_completed.status == pb.MESSAGE_STATUS_COMPLETED
    assert len(tokens(frames)) > 5
    # the id SendMessage answered with resumes exactly at the turn
    replay = Watcher(chat, auth(tenant), session.session_id, after=sent.last_event_id)
    assert (await replay.next()).opened.resumed
    assert [f.event_id for f in await replay.until("turn_completed")] == [
        f.event_id for f in frames
    ]
    watcher.call.cancel()
    replay.call.cancel()
    stored = await history(chat, auth, tenant, session.session_id)
    assert [m.role for m in stored] == [pb.MESSAGE_ROLE_USER, pb.MESSAGE_ROLE_ASSISTANT]
    assert stored[1].text == "".join(t.text for t in tokens(frames))


async def test_a_sent_turn_runs_to_its_end_with_nobody_watching(chat, auth, tenant, collection):
    session = await create(chat, auth, tenant, collection=collection)
    watcher = Watcher(chat, auth(tenant), session.session_id)
    await watcher.next()
    await chat.SendMessage(send(session.session_id, QUESTION), metadata=auth(tenant))
    await watcher.until("token")
    watcher.call.cancel()  # the page is closed mid-answer

    async def answered() -> bool:
        stored = await history(chat, auth, tenant, session.session_id)
        return len(stored) == 2 and stored[1].status == pb.MESSAGE_STATUS_COMPLETED

    await eventually(answered, timeout=TIMEOUT, interval=0.2, what="the answer is stored")


async def test_a_reload_gets_the_answer_in_progress_and_a_reconnect_the_rest_without_gaps(
    chat, auth, tenant, collection
):
    session = await create(chat, auth, tenant, collection=collection, retrieval_top_k=20, **LONG)
    sid = session.session_id
    await chat.SendMessage(
        send(sid, "Tell me everything about on-call, rotations and escalation"),
        metadata=auth(tenant),
    )
    first = Watcher(chat, auth(tenant), sid)  # from the turn in progress
    await first.next()
    seen = await first.until("token")
    seen += [await first.next() for _ in range(3)]
    first.call.cancel()  # the connection drops
    second = Watcher(chat, auth(tenant), sid, after=seen[-1].event_id)
    assert (await second.next()).event_id == seen[-1].event_id
    middle = [await second.next() for _ in range(3)]
    second.call.cancel()
    reload = Watcher(chat, auth(tenant), sid)  # a page reloaded mid-answer
    await reload.next()
    whole = await reload.until("turn_completed")
    assert whole[0].HasField("turn_started")
    assert [f.event_id for f in whole[: len(seen) + 3]] == [f.event_id for f in seen + middle]
    indexes = [t.index for t in tokens(whole)]
    assert indexes == list(range(len(indexes)))  # no gap, no repeat
    assert len({f.event_id for f in whole}) == len(whole)
    assert whole[-1].turn_completed.status == pb.MESSAGE_STATUS_COMPLETED
    reload.call.cancel()
    answer = (await history(chat, auth, tenant, sid))[-1]
    assert answer.text == "".join(t.text for t in tokens(whole))


async def test_cancel_turn_stops_the_answer_and_keeps_it_partial(chat, auth, tenant, collection):
    session = await create(chat, auth, tenant, collection=collection, retrieval_top_k=20, **LONG)
    sid = session.session_id
    watcher = Watcher(chat, auth(tenant), sid)
    await watcher.next()
    await chat.SendMessage(
        send(sid, "Tell me everything about on-call, rotations, escalation and expenses"),
        metadata=auth(tenant),
    )
    frames = await watcher.until("token")
    answer_id = frames[0].turn_started.assistant_message_id
    elsewhere = pb.CancelTurnRequest(session_id=sid, assistant_message_id="not-this-one")
    assert not (await chat.CancelTurn(elsewhere, metadata=auth(tenant))).cancelled
    request = pb.CancelTurnRequest(session_id=sid, assistant_message_id=answer_id)
    assert (await chat.CancelTurn(request, metadata=auth(tenant))).cancelled
    frames += await watcher.until("turn_completed")
    assert frames[-1].turn_completed.status == pb.MESSAGE_STATUS_CANCELLED
    watcher.call.cancel()
    assert not (await chat.CancelTurn(request, metadata=auth(tenant))).cancelled
    stored = (await history(chat, auth, tenant, sid))[-1]
    assert stored.message_id == answer_id and stored.status == pb.MESSAGE_STATUS_CANCELLED
    assert stored.text == "".join(t.text for t in tokens(frames))


async def test_another_tenants_session_is_not_found(chat, auth, tenant):
    session = await create(chat, auth, tenant)
    other = auth(new_tenant())
    sid = session.session_id
    not_found = (grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")
    await refused(chat.SendMessage(send(sid, "hi"), metadata=other), *not_found)
    await refused(chat.CancelTurn(pb.CancelTurnRequest(session_id=sid), metadata=other), *not_found)
    await refused(Watcher(chat, other, sid).next(), *not_found)
    assert await history(chat, auth, tenant, sid) == []


async def test_bad_requests_and_unknown_or_future_event_ids(chat, auth, tenant):
    session = await create(chat, auth, tenant)
    sid, me = session.session_id, auth(tenant)
    invalid = (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
    blank = await refused(chat.SendMessage(send(sid, "  \n"), metadata=me), *invalid)
    assert [v.field for v in blank.field_violations] == ["message.text"]
    bare = await refused(
        chat.SendMessage(pb.SendMessageRequest(session_id=sid), metadata=me), *invalid
    )
    assert [v.field for v in bare.field_violations] == ["message"]
    long_id = pb.StreamEventsRequest(session_id=sid, after_event_id="x" * 65)
    bad = await refused(chat.StreamEvents(long_id, metadata=me).read(), *invalid)
    assert [v.field for v in bad.field_violations] == ["after_event_id"]
    huge = send(sid, "x" * (32 * 1024 + 1))
    await refused(
        chat.SendMessage(huge, metadata=me), grpc.StatusCode.RESOURCE_EXHAUSTED, "MESSAGE_TOO_LARGE"
    )

    watcher = Watcher(chat, me, sid)
    start = (await watcher.next()).event_id
    watcher.call.cancel()
    incarnation, _, number = start.partition(".")
    expired = (grpc.StatusCode.FAILED_PRECONDITION, "EVENT_HISTORY_EXPIRED")
    for after in ("never-given-out", f"{incarnation}.{int(number) + 5}", "0000.1"):
        await refused(Watcher(chat, me, sid, after=after).next(), *expired)


async def test_sessions_open_and_stream_after_nats_restarts(chat, auth, tenant, mesh):
    """JetStream keeps the sessions' shared events in memory: a NATS that restarted has
    lost that stream, and the chat service makes it again instead of refusing every
    session it loads from then on."""
    session = await create(chat, auth, tenant)
    await asyncio.to_thread(mesh.stop_component, "nats")
    await asyncio.to_thread(mesh.start_nats)
    watchers: list[Watcher] = []

    async def opened() -> bool:
        watcher = Watcher(chat, auth(tenant), session.session_id)
        try:
            frame = await watcher.next()
        except grpc.aio.AioRpcError as error:  # until chat is connected to NATS again
            assert error_details(error).error_info.reason == "DEPENDENCY_UNAVAILABLE", error
            return False
        watchers.append(watcher)
        return frame.HasField("opened")

    await eventually(opened, timeout=30, what="a stream of a session loaded after the restart")
    sent = await chat.SendMessage(send(session.session_id, QUESTION), metadata=auth(tenant))
    assert sent.accepted
    frames = await watchers[0].until("turn_completed")
    assert frames[-1].turn_completed.status == pb.MESSAGE_STATUS_COMPLETED
    assert tokens(frames)
    for watcher in watchers:
        watcher.call.cancel()
