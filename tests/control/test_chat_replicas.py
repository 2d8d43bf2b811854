"""Chat as two replicas: a session's streams on either replica see the same events, a
killed owner's answer ends with an ErrorFrame and is stored FAILED, and a drained
owner's answer goes on to its end for a client that resumes anywhere.

The first two talk to each replica's own port (`x-tenant-id`, as Envoy sends it), to
choose which replica owns the session and which serves the other stream; the rollout
resumes through Envoy, as a client does."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from switchboard.chat.v1 import chat_pb2 as pb
from switchboard.chat.v1 import chat_service_pb2_grpc
from switchboard.control.v1 import control_pb2, control_service_pb2_grpc
from switchboard.inference.v1 import inference_pb2

from bench._common import api_key_metadata
from services.launcher import Mesh
from services.runtime import error_details
from tests.polling import eventually

pytestmark = pytest.mark.timeout(300)

SERVING = control_pb2.REPLICA_STATE_SERVING
QUESTION = "Tell me everything about on-call, rotations, escalation and expenses"
SLOW_CODE_S = 12
"""How long the drained owner's turn runs (its code sleeps): longer than a rollout of
two chat replicas takes to drain both, shorter than the time a draining replica gives
its turns (`services.chat.DRAIN_TURNS_S`)."""
SETTINGS = pb.SessionSettings(
    model="generator_large", parameters=inference_pb2.GenerationParameters(max_tokens=400)
)


@pytest.fixture
async def control(mesh: Mesh):
    async with grpc.aio.insecure_channel(mesh.internal_address) as channel:
        yield control_service_pb2_grpc.ControlServiceStub(channel)


async def chat_replicas(control) -> list[control_pb2.Replica]:
    """The two chat replicas, once both serve."""

    found: list[control_pb2.Replica] = []

    async def both() -> bool:
        reply = await control.ListReplicas(control_pb2.ListReplicasRequest(service="chat"))
        found[:] = [r for r in reply.replicas if r.state == SERVING]
        return len(found) == 2

    await eventually(both, timeout=90, what="two chat replicas serving")
    return found


class Stream:
    """A Converse stream driven frame by frame."""

    def __init__(self, channel: grpc.aio.Channel, metadata, first: pb.ConverseRequest) -> None:
        self._outbox: asyncio.Queue[pb.ConverseRequest | None] = asyncio.Queue()
        self._outbox.put_nowait(first)
        stub = chat_service_pb2_grpc.ChatServiceStub(channel)
        self.call = stub.Converse(self._frames(), metadata=metadata, timeout=120)

    async def _frames(self):
        while (frame := await self._outbox.get()) is not None:
            yield frame

    def send(self, frame: pb.ConverseRequest) -> None:
        self._outbox.put_nowait(frame)

    def close(self) -> None:
        self._outbox.put_nowait(None)

    async def next(self) -> pb.ConverseResponse:
        frame = await asyncio.wait_for(self.call.read(), 60)
        assert frame is not grpc.aio.EOF, "the stream ended"
        return frame

    async def until(self, kind: str) -> list[pb.ConverseResponse]:
        seen = []
        while (frame := await self.next()).WhichOneof("frame") != kind:
            seen.append(frame)
        return [*seen, frame]


def say(text: str) -> pb.ConverseRequest:
    return pb.ConverseRequest(message=pb.UserMessage(client_message_id=uuid.uuid4().hex, text=text))


def opening(session_id: str) -> pb.ConverseRequest:
    return pb.ConverseRequest(open=pb.OpenSession(session_id=session_id))


def resuming(session_id: str, after: str) -> pb.ConverseRequest:
    return pb.ConverseRequest(resume=pb.ResumeSession(session_id=session_id, last_event_id=after))


def ids(frames) -> list[str]:
    return [f.event_id for f in frames]


def tokens(frames) -> list[pb.ConverseResponse]:
    return [f for f in frames if f.HasField("token")]


async def new_session(channel, metadata, *, code_enabled: bool = False) -> str:
    stub = chat_service_pb2_grpc.ChatServiceStub(channel)
    settings = pb.SessionSettings(code_enabled=code_enabled)
    settings.MergeFrom(SETTINGS)
    reply = await stub.CreateSession(
        pb.CreateSessionRequest(settings=settings), metadata=metadata, timeout=10
    )
    return reply.session.session_id


async def answer_started(stream: Stream) -> list[pb.ConverseResponse]:
    """Sends the question; the frames up to the answer's third token."""
    stream.send(say(QUESTION))
    seen = await stream.until("token")
    return seen + [await stream.next() for _ in range(2)]


async def history(channel, metadata, session_id: str) -> list[pb.Message]:
    stub = chat_service_pb2_grpc.ChatServiceStub(channel)
    reply = await stub.ListMessages(
        pb.ListMessagesRequest(session_id=session_id), metadata=metadata, timeout=10
    )
    return list(reply.messages)


@dataclass
class Answering:
    """A session replica A owns (its stream opened there), whose answer has started."""

    a: control_pb2.Replica
    on_a: grpc.aio.Channel
    on_b: grpc.aio.Channel
    metadata: tuple[tuple[str, str], ...]
    session_id: str
    owner: Stream
    seen: list[pb.ConverseResponse]


@contextlib.asynccontextmanager
async def answering_on_a(control) -> AsyncIterator[Answering]:
    """The two chat replicas, A and B, each reached on its own port, and a session A owns
    with an answer under way."""
    a, b = await chat_replicas(control)
    metadata = (("x-tenant-id", f"chat-replicas-{uuid.uuid4().hex[:8]}"),)
    async with (
        grpc.aio.insecure_channel(a.address) as on_a,
        grpc.aio.insecure_channel(b.address) as on_b,
    ):
        session_id = await new_session(on_b, metadata)
        owner = Stream(on_a, metadata, opening(session_id))  # A claims the session
        await owner.next()
        seen = await answer_started(owner)
        yield Answering(a, on_a, on_b, metadata, session_id, owner, seen)


async def test_a_stream_on_another_replica_reads_the_same_events_and_drives_the_session(
    control,
) -> None:
    async with answering_on_a(control) as started:
        on_b, metadata, session_id = started.on_b, started.metadata, started.session_id
        owner, seen = started.owner, started.seen
        other = Stream(on_b, metadata, resuming(session_id, seen[-1].event_id))
        opened = await other.next()
        assert opened.opened.resumed and opened.event_id == seen[-1].event_id
        rest_on_b = await other.until("turn_completed")
        rest_on_a = await owner.until("turn_completed")
        assert ids(rest_on_b) == ids(rest_on_a)  # the same events, numbered by the owner
        assert rest_on_b[-1].turn_completed.status == pb.MESSAGE_STATUS_COMPLETED
        indexes = [t.token.index for t in tokens(seen + rest_on_b)]
        assert indexes == list(range(len(indexes)))

        # B's message is relayed to the owner, whose turn both streams see
        other.send(say("Who approves expense reports?"))
        second_on_b = await other.until("turn_completed")
        second_on_a = await owner.until("turn_completed")
        assert ids(second_on_b) == ids(second_on_a)
        assert second_on_b[0].HasField("turn_started")
        assert second_on_b[-1].turn_completed.status == pb.MESSAGE_STATUS_COMPLETED
        # B half-closes: its stream ends (after the owner's turns)
        other.close()
        assert await asyncio.wait_for(other.call.read(), 30) is grpc.aio.EOF
        owner.close()
        stored = await history(on_b, metadata, session_id)
        assert [m.status for m in stored] == [pb.MESSAGE_STATUS_COMPLETED] * 4


async def test_a_killed_owner_s_answer_ends_with_an_error_frame_and_is_stored_failed(
    control,
) -> None:
    async with answering_on_a(control) as started:
        on_b, metadata, session_id = started.on_b, started.metadata, started.session_id
        seen = started.seen
        # a page on B watches the turn (StreamEvents): it reads the shared events, so
        # once it has a token, the shared log has it
        stub = chat_service_pb2_grpc.ChatServiceStub(on_b)
        watch = stub.StreamEvents(
            pb.StreamEventsRequest(session_id=session_id), metadata=metadata, timeout=60
        )
        watched = [reply.event async for reply in _until_token(watch)]
        os.kill(started.a.pid, signal.SIGKILL)
        # B, watching, finds the owner gone, takes the session over and ends its turn
        async for reply in watch:
            watched.append(reply.event)
            if reply.event.HasField("turn_completed"):
                break
        errors = [f.error for f in watched if f.HasField("error")]
        assert len(errors) == 1
        assert error_details(errors[0].status).error_info.reason == "ANSWER_INTERRUPTED"
        assert errors[0].status.code == grpc.StatusCode.UNAVAILABLE.value[0]
        assert watched[-1].turn_completed.status == pb.MESSAGE_STATUS_FAILED
        stored = (await history(on_b, metadata, session_id))[-1]
        assert stored.role == pb.MESSAGE_ROLE_ASSISTANT
        assert stored.status == pb.MESSAGE_STATUS_FAILED
        assert stored.message_id == watched[-1].turn_completed.assistant_message_id
        # what was stored is what the owner had shared: every token the watcher got
        assert stored.text and stored.text == "".join(t.token.text for t in tokens(watched))
        # the client whose stream broke with A resumes on B: the rest, then the end
        resumed = Stream(on_b, metadata, resuming(session_id, seen[-1].event_id))
        assert (await resumed.next()).opened.resumed
        rest = await resumed.until("turn_completed")
        assert [f.WhichOneof("frame") for f in rest][-2:] == ["error", "turn_completed"]
        every = ids(seen + rest)
        assert len(set(every)) == len(every)  # no event twice, whatever A had not shared
        # the session goes on, on its new owner
        resumed.send(say("Who approves expense reports?"))
        after = await resumed.until("turn_completed")
        assert after[-1].turn_completed.status == pb.MESSAGE_STATUS_COMPLETED
        resumed.close()
        watch.cancel()
    await chat_replicas(control)  # the killed one is back


async def _until_token(call) -> AsyncIterator[pb.StreamEventsResponse]:
    """A StreamEvents call's replies up to its first token."""
    async for reply in call:
        yield reply
        if reply.event.HasField("token"):
            return


async def test_a_drained_owner_s_answer_goes_on_to_its_end_for_a_client_resuming_anywhere(
    mesh: Mesh, control
) -> None:
    await chat_replicas(control)
    metadata = api_key_metadata(mesh, f"chat-replicas-{uuid.uuid4().hex[:8]}")
    async with grpc.aio.insecure_channel(mesh.envoy_address) as channel:
        session_id = await new_session(channel, metadata, code_enabled=True)
        stream = Stream(channel, metadata, opening(session_id))
        await stream.next()
        # a turn that runs for a while whatever the model's speed: its code sleeps
        stream.send(say(f"/code\nimport time\ntime.sleep({SLOW_CODE_S})\nprint('slept')"))
        seen = await stream.until("tool_call")
        rollout = asyncio.ensure_future(
            control.RolloutService(control_pb2.RolloutServiceRequest(service="chat"), timeout=300)
        )
        frames = list(seen)
        resumes = 0
        while not frames[-1].HasField("turn_completed"):
            try:
                frames.append(await stream.next())
            except grpc.aio.AioRpcError as error:  # its replica drains: resume elsewhere
                assert error.code() == grpc.StatusCode.UNAVAILABLE, error
                assert error_details(error).error_info.reason == "SHUTTING_DOWN"
                resumes += 1
                assert resumes <= 4
                stream = Stream(channel, metadata, resuming(session_id, frames[-1].event_id))
                assert (await stream.next()).opened.resumed
        stream.close()
        await rollout
        assert resumes >= 1, "the answer ended before its replica was drained"
        assert frames[-1].turn_completed.status == pb.MESSAGE_STATUS_COMPLETED
        assert not [f for f in frames if f.HasField("error")]
        assert any(f.HasField("tool_progress") for f in frames)
        indexes = [t.token.index for t in tokens(frames)]
        assert indexes == list(range(len(indexes)))  # no gap, no repeat
        stored = (await history(channel, metadata, session_id))[-1]
        assert stored.text == "".join(t.token.text for t in tokens(frames))
