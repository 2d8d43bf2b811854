"""The chat service: sessions with durable, gapless history in PostgreSQL.

`store` owns the tables; `sessions` validates requests and applies field masks. The
bidirectional Converse stream is not built yet (it answers UNIMPLEMENTED).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from switchboard.chat.v1 import chat_service_pb2, chat_service_pb2_grpc

from services.chat.servicer import ChatServicer
from services.chat.store import SessionStore
from services.runtime import load_config

logger = logging.getLogger(__name__)

__all__ = ["ChatConfig", "ChatService"]

SERVICE_NAME = chat_service_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name


@dataclass(frozen=True)
class ChatConfig:
    database_url: str
    """PostgreSQL holding sessions and history (`SWITCHBOARD_DATABASE_URL`)."""

    def __post_init__(self) -> None:
        if not self.database_url:
            raise ValueError("SWITCHBOARD_DATABASE_URL must name the chat database")


class ChatService:
    name = "chat"
    service_names: Sequence[str] = (SERVICE_NAME,)

    def __init__(self, config: ChatConfig | None = None) -> None:
        self._config = config or load_config(ChatConfig, prefix="SWITCHBOARD_")
        self.store = SessionStore(self._config.database_url)

    async def start(self) -> None:
        await self.store.open()

    def register(self, server: grpc.aio.Server) -> None:
        chat_service_pb2_grpc.add_ChatServiceServicer_to_server(ChatServicer(self.store), server)

    async def ready(self) -> bool:
        return await self.store.healthy()

    async def shutdown(self) -> None:
        await self.store.close()
