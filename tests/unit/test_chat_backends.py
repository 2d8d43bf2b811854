"""What the chat service asks of what it depends on, without a network: the session
store's outages are DEPENDENCY_UNAVAILABLE (never INTERNAL), an answer the store refused
as its turn ended is stored late (FAILED, after its question), and a turn's tool call is
submitted with the session's priority (interactive when unset), and a turn going straight
to generation stores its question once the answer has begun, not on the way to it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import grpc
import psycopg
import pytest
from switchboard.chat.v1 import chat_pb2 as pb
from switchboard.common.v1 import common_pb2
from switchboard.inference.v1 import inference_pb2

from services.chat.commands import ToolRequest
from services.chat.store import SessionStore
from services.chat.turns import LATE_STORE, USER_STORE_AFTER_S, StageFailed, Turn
from services.runtime import Unavailable, error_details
from tests.polling import eventually

SID = "00000000-0000-0000-0000-000000000001"


class DownDatabase:
    """A pool whose every connection fails, as when PostgreSQL is down."""

    @contextlib.asynccontextmanager
    async def connection(self, timeout: float | None = None) -> AsyncIterator[Any]:
        raise psycopg.OperationalError("connection refused")
        yield


async def found(tenant_id: str, session_id: str) -> Any:
    return SimpleNamespace(session_id=session_id)


@pytest.mark.parametrize(
    ("method", "arguments"),
    [
        ("list", {"after": None, "limit": 10}),
        ("messages", {"session_id": SID, "after": 0, "limit": 10}),
        ("client_message_ids", {"session_id": SID, "limit": 10}),
        ("get", {"session_id": SID}),
    ],
)
async def test_a_store_outage_is_dependency_unavailable(method, arguments):
    store = SessionStore.__new__(SessionStore)  # no pool: nothing to open or close
    store._db = DownDatabase()  # type: ignore[assignment]
    if method != "get":
        store.get = found  # type: ignore[method-assign]  # the session exists
    with pytest.raises(Unavailable) as exc:
        await getattr(store, method)("acme", **arguments)
    assert exc.value.reason == "DEPENDENCY_UNAVAILABLE"
    assert exc.value.metadata["dependency"] == "postgresql"


class Refused(grpc.aio.AioRpcError):
    def __init__(self) -> None:
        super().__init__(
            grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details="down"
        )


@pytest.mark.parametrize(
    ("priority", "submitted"),
    [
        (common_pb2.PRIORITY_UNSPECIFIED, common_pb2.PRIORITY_INTERACTIVE),
        (common_pb2.PRIORITY_INTERACTIVE, common_pb2.PRIORITY_INTERACTIVE),
        (common_pb2.PRIORITY_BATCH, common_pb2.PRIORITY_BATCH),
    ],
)
async def test_a_tool_call_task_has_the_session_s_priority(priority, submitted):
    requests: list[Any] = []

    async def submit_task(request: Any, **_: Any) -> Any:
        requests.append(request)
        raise Refused()

    turn = Turn(
        tenant_id="acme",
        session_id=SID,
        settings=pb.SessionSettings(priority=priority, allowed_tools=["echo"]),
        message=pb.UserMessage(text="/tool echo"),
        store=None,  # type: ignore[arg-type]
        backends=SimpleNamespace(execution=SimpleNamespace(SubmitTask=submit_task)),  # type: ignore[arg-type]
        emit=None,  # type: ignore[arg-type]
        last_event_id=str,
    )
    with pytest.raises(StageFailed):
        await turn._call_tool(ToolRequest("echo"))
    (request,) = requests
    assert request.priority == submitted


class FlakyStore:
    """A session store that refuses the answer `down` times (the database is down),
    then stores it."""

    def __init__(self, down: int) -> None:
        self.down = down
        self.stored: list[pb.Message] = []

    async def append(self, tenant_id, session_id, message, *, last_event_id=""):
        if message.role == pb.MESSAGE_ROLE_ASSISTANT and self.down:
            self.down -= 1
            raise Unavailable("the session store is unavailable", reason="DEPENDENCY_UNAVAILABLE")
        stored = pb.Message()
        stored.CopyFrom(message)
        self.stored.append(stored)
        return stored


def turn_on(store: FlakyStore, frames: list[pb.ConverseResponse], sleeps: list[float]) -> Turn:
    async def emit(frame: pb.ConverseResponse) -> None:
        frames.append(frame)

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    return Turn(
        tenant_id="acme",
        session_id=SID,
        settings=pb.SessionSettings(),
        message=pb.UserMessage(text="hello", client_message_id="c-1"),
        store=store,  # type: ignore[arg-type]
        backends=None,  # type: ignore[arg-type]
        emit=emit,
        last_event_id=str,
        sleep=sleep,
    )


async def test_an_answer_the_store_refused_is_stored_late_as_failed_after_its_question():
    store, frames, sleeps = FlakyStore(down=3), [], []
    turn = turn_on(store, frames, sleeps)
    turn.answer.text.extend(["Hi", " there"])
    await turn._finish(pb.MESSAGE_STATUS_COMPLETED)
    # the client heard at once: an error, then the turn FAILED
    kinds = [f.WhichOneof("frame") for f in frames]
    assert kinds == ["turn_started", "error", "turn_completed"]
    assert frames[-1].turn_completed.status == pb.MESSAGE_STATUS_FAILED
    # and the history has the question, then what became of it
    user, answer = store.stored
    assert user.role == pb.MESSAGE_ROLE_USER and user.text == "hello"
    assert (answer.role, answer.status, answer.text) == (
        pb.MESSAGE_ROLE_ASSISTANT,
        pb.MESSAGE_STATUS_FAILED,
        "Hi there",
    )
    assert error_details(answer.error).error_info.reason == "DEPENDENCY_UNAVAILABLE"
    assert len(sleeps) == 2  # the refusal as the turn ended, then two more, then stored


async def test_an_answer_is_given_up_once_the_store_stays_down_and_never_stored_twice():
    store, frames, sleeps = FlakyStore(down=10_000), [], []
    turn = turn_on(store, frames, sleeps)
    await turn._finish(pb.MESSAGE_STATUS_COMPLETED)
    assert [m.role for m in store.stored] == [pb.MESSAGE_ROLE_USER]
    assert len(sleeps) == LATE_STORE.max_attempts - 1
    await turn._finish(pb.MESSAGE_STATUS_CANCELLED)  # a cancel after the end changes nothing
    assert [f.WhichOneof("frame") for f in frames].count("turn_completed") == 1


class Generation:
    """Stands in for a Generate call: yields the replies the test puts in."""

    def __init__(self) -> None:
        self.replies: asyncio.Queue[inference_pb2.GenerateResponse | None] = asyncio.Queue()

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> inference_pb2.GenerateResponse:
        reply = await self.replies.get()
        if reply is None:
            raise StopAsyncIteration
        return reply

    def cancel(self) -> None:
        pass


def generating_turn(
    store: FlakyStore, frames: list[pb.ConverseResponse]
) -> tuple[Turn, Generation]:
    turn = turn_on(store, frames, [])
    generation = Generation()
    turn._backends = SimpleNamespace(  # type: ignore[assignment]
        inference=SimpleNamespace(Generate=lambda request, metadata: generation)
    )
    return turn, generation


def token_reply(text: str) -> inference_pb2.GenerateResponse:
    return inference_pb2.GenerateResponse(token=inference_pb2.TokenDelta(text=text))


async def test_the_question_is_stored_once_the_answer_has_begun():
    store, frames = FlakyStore(down=0), []
    turn, generation = generating_turn(store, frames)
    running = asyncio.create_task(turn._generate(pb.SessionSettings()))
    for _ in range(10):
        await asyncio.sleep(0)  # what is ready runs (well within USER_STORE_AFTER_S)
    assert [f.WhichOneof("frame") for f in frames] == ["turn_started"]
    assert store.stored == []  # not on the way to the first token
    generation.replies.put_nowait(token_reply("Hi"))
    await eventually(lambda: store.stored, timeout=USER_STORE_AFTER_S / 2, what="the question")
    (user,) = store.stored
    assert user.message_id == frames[0].turn_started.user_message_id
    assert frames[-1].token.text == "Hi"
    generation.replies.put_nowait(None)
    await running


async def test_the_question_is_stored_soon_even_if_the_answer_does_not_begin():
    store, frames = FlakyStore(down=0), []
    turn, generation = generating_turn(store, frames)
    running = asyncio.create_task(turn._generate(pb.SessionSettings()))
    await eventually(lambda: store.stored, timeout=1, what="the question, with no reply")
    assert [f.WhichOneof("frame") for f in frames] == ["turn_started"]
    generation.replies.put_nowait(None)
    await running
