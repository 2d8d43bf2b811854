"""ChatService servicer: proto in, sessions store / live sessions, proto out."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
from switchboard.chat.v1 import chat_pb2 as pb
from switchboard.chat.v1 import chat_service_pb2_grpc

from services.chat.live import Hub
from services.chat.sessions import message_cursor, session_cursor, session_message, update_session
from services.chat.store import SessionStore
from services.runtime import (
    page_size,
    page_token,
    read_page_token,
    require_tenant,
)

logger = logging.getLogger(__name__)


class ChatServicer(chat_service_pb2_grpc.ChatServiceServicer):
    def __init__(self, store: SessionStore, hub: Hub) -> None:
        self._store = store
        self._hub = hub

    async def Converse(  # noqa: N802 - gRPC method name
        self,
        request_iterator: AsyncIterator[pb.ConverseRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ConverseResponse]:
        tenant = require_tenant()
        frames = aiter(request_iterator)
        first = await anext(frames, None)
        if first is None:
            return
        live, reader, opened = await self._hub.attach(tenant, first)
        serving = asyncio.create_task(self._hub.serve(live, reader, frames))
        clean = False
        try:
            yield opened
            while (event := await reader.next()) is not None:
                yield event
            clean = True
        finally:
            serving.cancel()
            await self._hub.detach(live, reader, clean=clean)

    async def SendMessage(  # noqa: N802 - gRPC method name
        self, request: pb.SendMessageRequest, context: grpc.aio.ServicerContext
    ) -> pb.SendMessageResponse:
        return await self._hub.send(require_tenant(), request)

    async def CancelTurn(  # noqa: N802 - gRPC method name
        self, request: pb.CancelTurnRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelTurnResponse:
        return pb.CancelTurnResponse(cancelled=await self._hub.cancel(require_tenant(), request))

    async def StreamEvents(  # noqa: N802 - gRPC method name
        self, request: pb.StreamEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamEventsResponse]:
        tenant = require_tenant()
        live, reader, opened = await self._hub.watch(
            tenant, request.session_id, request.after_event_id
        )
        try:
            yield pb.StreamEventsResponse(event=opened)
            while (event := await reader.next()) is not None:
                yield pb.StreamEventsResponse(event=event)
        finally:
            await self._hub.detach(live, reader, clean=True)  # a watcher leaving cancels nothing

    async def CreateSession(  # noqa: N802 - gRPC method name
        self, request: pb.CreateSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateSessionResponse:
        tenant = require_tenant()
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
        what = "ListSessionsRequest"
        size = page_size(request.page_size, what=what)
        after = read_page_token(request.page_token, session_cursor, what=what)
        rows = await self._store.list(tenant, after=after, limit=size + 1)
        response = pb.ListSessionsResponse(sessions=[session_message(r) for r in rows[:size]])
        if len(rows) > size:
            last = rows[size - 1]
            response.next_page_token = page_token(last.update_time.isoformat(), last.session_id)
        return response

    async def UpdateSession(  # noqa: N802 - gRPC method name
        self, request: pb.UpdateSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateSessionResponse:
        session = await update_session(self._store, require_tenant(), request)
        self._hub.updated(session)
        return pb.UpdateSessionResponse(session=session)

    async def DeleteSession(  # noqa: N802 - gRPC method name
        self, request: pb.DeleteSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteSessionResponse:
        session_id = await self._store.delete(require_tenant(), request.session_id)
        self._hub.delete(session_id)
        return pb.DeleteSessionResponse()

    async def ListMessages(  # noqa: N802 - gRPC method name
        self, request: pb.ListMessagesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListMessagesResponse:
        tenant = require_tenant()
        what = "ListMessagesRequest"
        size = page_size(request.page_size, what=what)
        after = read_page_token(request.page_token, message_cursor, what=what) or 0
        messages = await self._store.messages(
            tenant, request.session_id, after=after, limit=size + 1
        )
        response = pb.ListMessagesResponse(messages=messages[:size])
        if len(messages) > size:
            response.next_page_token = page_token(str(messages[size - 1].sequence))
        return response
