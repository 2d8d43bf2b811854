"""What the chat service asks of what it depends on, without a network: the session
store's outages are DEPENDENCY_UNAVAILABLE (never INTERNAL), an answer the store refused
as its turn ended is stored late (FAILED, after its question), and a turn's tool call is
submitted with the session's priority (interactive when unset)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import grpc
import psycopg
import pytest
from switchboard.chat.v1 import chat_pb2 as pb
from switchboard.common.v1 import common_pb2

from services.chat.commands import ToolRequest
from services.chat.store import SessionStore
from services.chat.turns import LATE_STORE, StageFailed, Turn
from services.runtime import Unavailable, error_details

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
