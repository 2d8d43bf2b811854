"""What the chat service asks of what it depends on, without a network: the session
store's outages are DEPENDENCY_UNAVAILABLE (never INTERNAL), and a turn's tool call is
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
from services.chat.turns import StageFailed, Turn
from services.runtime import Unavailable

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
