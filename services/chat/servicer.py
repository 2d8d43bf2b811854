"""ChatService servicer: sessions and their history. (Converse is not built yet.)"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
from switchboard.chat.v1 import chat_pb2 as pb
from switchboard.chat.v1 import chat_service_pb2_grpc

from services.chat.sessions import (
    apply_mask,
    check_new,
    page_token,
    read_page_token,
    session_cursor,
    session_message,
)
from services.chat.store import SessionStore
from services.runtime import FieldViolation, SwitchboardError, invalid, require_tenant

logger = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


class NotBuilt(SwitchboardError):
    code = grpc.StatusCode.UNIMPLEMENTED
    reason = "NOT_IMPLEMENTED"


def _page_size(size: int, what: str) -> int:
    if not 0 <= size <= MAX_PAGE_SIZE:
        raise invalid([FieldViolation("page_size", f"must be 0..{MAX_PAGE_SIZE}")], what=what)
    return size or DEFAULT_PAGE_SIZE


class ChatServicer(chat_service_pb2_grpc.ChatServiceServicer):
    def __init__(self, store: SessionStore) -> None:
        self._store = store

    async def Converse(  # noqa: N802 - gRPC method name
        self,
        request_iterator: AsyncIterator[pb.ConverseRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ConverseResponse]:
        raise NotBuilt("Converse is not available yet; sessions and history are")
        yield  # pragma: no cover - makes this a stream handler

    async def CreateSession(  # noqa: N802 - gRPC method name
        self, request: pb.CreateSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateSessionResponse:
        tenant = require_tenant()
        check_new(request)
        row = await self._store.create(tenant, request.title, request.settings)
        return pb.CreateSessionResponse(session=session_message(row))

    async def GetSession(  # noqa: N802 - gRPC method name
        self, request: pb.GetSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetSessionResponse:
        row = await self._store.get(require_tenant(), request.session_id)
        return pb.GetSessionResponse(session=session_message(row))

    async def ListSessions(  # noqa: N802 - gRPC method name
        self, request: pb.ListSessionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListSessionsResponse:
        tenant = require_tenant()
        size = _page_size(request.page_size, "ListSessionsRequest")
        rows = await self._store.list(
            tenant, after=session_cursor(request.page_token), limit=size + 1
        )
        response = pb.ListSessionsResponse(sessions=[session_message(r) for r in rows[:size]])
        if len(rows) > size:
            last = rows[size - 1]
            response.next_page_token = page_token(last.update_time.isoformat(), last.session_id)
        return response

    async def UpdateSession(  # noqa: N802 - gRPC method name
        self, request: pb.UpdateSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateSessionResponse:
        tenant = require_tenant()
        current = await self._store.get(tenant, request.session.session_id)
        title, settings = apply_mask(current, request)
        row = await self._store.update(tenant, current.session_id, title=title, settings=settings)
        return pb.UpdateSessionResponse(session=session_message(row))

    async def DeleteSession(  # noqa: N802 - gRPC method name
        self, request: pb.DeleteSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteSessionResponse:
        await self._store.delete(require_tenant(), request.session_id)
        return pb.DeleteSessionResponse()

    async def ListMessages(  # noqa: N802 - gRPC method name
        self, request: pb.ListMessagesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListMessagesResponse:
        tenant = require_tenant()
        size = _page_size(request.page_size, "ListMessagesRequest")
        after = 0
        if request.page_token:
            (value,) = read_page_token(request.page_token, what="ListMessagesRequest")[:1]
            if not value.isdigit():
                raise invalid(
                    [FieldViolation("page_token", "not a token from a previous response")],
                    what="ListMessagesRequest",
                )
            after = int(value)
        messages = await self._store.messages(
            tenant, request.session_id, after=after, limit=size + 1
        )
        response = pb.ListMessagesResponse(messages=messages[:size])
        if len(messages) > size:
            response.next_page_token = page_token(str(messages[size - 1].sequence))
        return response
