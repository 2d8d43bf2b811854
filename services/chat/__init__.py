"""The chat service: sessions with durable, gapless history in PostgreSQL, and the
bidirectional Converse stream.

`store` owns the tables; `sessions` applies field masks and builds the Session message
(the requests' values are checked by their contract's annotations, in the runtime or,
for Converse frames, in `live`); `live` holds the sessions with open streams (event
logs, turn queues, cancellation, resume); `turns` runs one turn through the other
services; `commands` reads tool requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

import grpc
from switchboard.chat.v1 import chat_pb2 as pb
from switchboard.chat.v1 import chat_service_pb2, chat_service_pb2_grpc

from services.chat.config import ChatConfig
from services.chat.live import Hub, LiveSession
from services.chat.servicer import ChatServicer
from services.chat.sessions import session_message, update_session
from services.chat.store import SessionStore
from services.chat.turns import Backends, Turn
from services.runtime import clear_deadline, load_config, stop_task

logger = logging.getLogger(__name__)

__all__ = ["ChatConfig", "ChatService"]

SERVICE_NAME = chat_service_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name
_COLLECT_EVERY_S = 30.0


class ChatService:
    name = "chat"
    service_names: Sequence[str] = (SERVICE_NAME,)

    def __init__(self, config: ChatConfig | None = None) -> None:
        self._config = config or load_config(ChatConfig, prefix="SWITCHBOARD_")
        self.store = SessionStore(self._config.database_url)
        self._backends: Backends | None = None
        self.hub = Hub(
            load=self._load,
            run_turn=self._run_turn,
            change_settings=self._change_settings,
            limits=self._config.limits,
        )
        self._collector: asyncio.Task[None] | None = None

    @property
    def backends(self) -> Backends:
        assert self._backends is not None, "start() first"
        return self._backends

    async def start(self) -> None:
        self._backends = Backends(  # channels belong to the serving event loop
            inference=self._config.inference_target,
            rag=self._config.rag_target,
            execution=self._config.execution_target,
        )
        await self.store.open()
        self._collector = asyncio.create_task(self._collect())

    def register(self, server: grpc.aio.Server) -> None:
        chat_service_pb2_grpc.add_ChatServiceServicer_to_server(
            ChatServicer(self.store, self.hub), server
        )

    async def ready(self) -> bool:
        return await self.store.healthy()

    async def shutdown(self) -> None:
        if self._collector is not None:
            await stop_task(self._collector)
        self.hub.close()
        if self._backends is not None:
            await self._backends.close()
        await self.store.close()

    async def _collect(self) -> None:
        while True:
            await asyncio.sleep(_COLLECT_EVERY_S)
            with contextlib.suppress(Exception):
                if forgotten := self.hub.collect_idle():
                    logger.info("forgot %d idle sessions", forgotten)

    # ---- what the live sessions need --------------------------------------------------

    async def _load(self, tenant_id: str, session_id: str) -> tuple[pb.Session, set[str]]:
        row = await self.store.get(tenant_id, session_id)
        seen = await self.store.client_message_ids(tenant_id, row.session_id, limit=1000)
        return session_message(row), seen

    async def _run_turn(self, live: LiveSession, message: pb.UserMessage) -> None:
        clear_deadline()  # a turn outlives the stream that started it
        turn = Turn(
            tenant_id=live.tenant_id,
            session_id=live.session_id,
            settings=live.settings,
            message=message,
            store=self.store,
            backends=self.backends,
            emit=live.emit,
            last_event_id=lambda: live.log.last_event_id,
        )
        live.turn_message_id = turn.assistant_id
        await turn.run()

    async def _change_settings(self, live: LiveSession, change: pb.ChangeSettings) -> pb.Session:
        request = pb.UpdateSessionRequest(
            session=pb.Session(session_id=live.session_id, settings=change.settings),
        )
        request.update_mask.paths.extend(
            p if p.startswith("settings") else f"settings.{p}" for p in change.update_mask.paths
        )
        return await update_session(self.store, live.tenant_id, request)
