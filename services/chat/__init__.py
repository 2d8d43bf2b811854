"""The chat service: sessions with durable, gapless history in PostgreSQL, and the
bidirectional Converse stream.

A user message travels one way: `servicer` (Converse) → `live.Hub` (attaches the stream
to its session, dispatches its frames) → `live_session.LiveSession` (queues the message, one
turn at a time) → `turns.Turn` (runs it through the other services) → the session's
`events.EventLog`, which the stream reads.

With several replicas, a session is run by one of them, its owner, and any replica
serves its streams: `shared` is what they share over NATS (the session's events, its
owner, the relay of requests to the owner), `remote` a stream of a session another
replica owns (see `shared`).

`store` owns the tables; `sessions` applies field masks, loads sessions and builds the
Session message (the requests' values are checked by their contract's annotations, in
the runtime or, for Converse frames, in `live_session`); `commands` reads tool requests; this
module only wires the parts together and runs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

import grpc
from switchboard.chat.v1 import chat_service_pb2, chat_service_pb2_grpc

from services.chat.config import ChatConfig
from services.chat.live import Hub
from services.chat.servicer import ChatServicer
from services.chat.shared import Shared
from services.chat.store import SessionStore
from services.chat.turns import Turns
from services.runtime import load_config, stop_task

logger = logging.getLogger(__name__)

__all__ = ["ChatConfig", "ChatService"]

SERVICE_NAME = chat_service_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name
_COLLECT_EVERY_S = 30.0
DRAIN_TURNS_S = 20.0
"""How long a stopping replica lets its sessions' turns run before it lets them go
(the control plane allows 30 s after SIGTERM)."""


class ChatService:
    name = "chat"
    service_names: Sequence[str] = (SERVICE_NAME,)

    def __init__(self, config: ChatConfig | None = None) -> None:
        self._config = config or load_config(ChatConfig, prefix="SWITCHBOARD_")
        self.store = SessionStore(self._config.database_url)
        self._turns = Turns(
            self.store,
            inference=self._config.inference_target,
            rag=self._config.rag_target,
            execution=self._config.execution_target,
        )
        limits = self._config.limits
        self.shared = (
            Shared(
                self._config.nats_url,
                retain_events=limits.retain_events,
                event_retention_s=self._config.chat_event_retention_s,
                replicas=self._config.nats_stream_replicas,
            )
            if self._config.nats_url
            else None
        )
        self.hub = Hub(self.store, self._turns, limits, self.shared)
        self._collector: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._turns.open()  # channels belong to the serving event loop
        await self.store.open()
        if self.shared is not None:
            await self.shared.connect(self.hub.relayed, self.hub.noticed)
        self._collector = asyncio.create_task(self._collect())

    def register(self, server: grpc.aio.Server) -> None:
        chat_service_pb2_grpc.add_ChatServiceServicer_to_server(
            ChatServicer(self.store, self.hub), server
        )

    async def ready(self) -> bool:
        return await self.store.healthy()

    async def drain(self) -> None:
        """Stopping: streams resume on other replicas, turns finish here, then the
        sessions are let go (see `Hub.drain`)."""
        await self.hub.drain(within=DRAIN_TURNS_S)

    async def shutdown(self) -> None:
        if self._collector is not None:
            await stop_task(self._collector)
        self.hub.close()
        if self.shared is not None:
            await self.shared.close()
        await self._turns.close()
        await self.store.close()

    async def _collect(self) -> None:
        while True:
            await asyncio.sleep(_COLLECT_EVERY_S)
            with contextlib.suppress(Exception):
                if forgotten := self.hub.collect_idle():
                    logger.info("forgot %d idle sessions", len(forgotten))
