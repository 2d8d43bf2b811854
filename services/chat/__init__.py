"""The chat service: sessions with durable, gapless history in PostgreSQL, and the
bidirectional Converse stream, served by any number of replicas.

A user message travels one way: `servicer` (Converse) → `live.Hub` (attaches the stream
to its session, dispatches its frames) → `live.LiveSession` (queues the message, one
turn at a time, under the session's turn lease: `leases`) → `turns.Turn` (runs it
through the other services) → the session's log (`events`), which the streams read.

Nothing a client depends on lives only in one replica's memory: the history is in
PostgreSQL (`store`), a session's events in JetStream (`stream`), its running turn's
owner and the ids of the messages it accepted in JetStream KV buckets (`leases`,
`claims`); other replicas hear of cancellations and changes (`notices`). A client
whose replica dies or drains resumes on any other from its last event id; a turn whose
replica died is closed by another (`recovery`). One thing stays in a replica's memory:
the messages it accepted that wait behind a running turn of their session (lost if it
dies or stops before their turn). Without NATS the service runs as one
process, its events and leases in memory (`local`).

`store` owns the tables; `sessions` applies field masks, loads sessions and builds the
Session message (the requests' values are checked by their contract's annotations, in
the runtime or, for Converse frames, in `live`); `commands` reads tool requests; this
module only wires the parts together and runs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Sequence

import grpc
import nats
from nats.aio.client import Client
from switchboard.chat.v1 import chat_service_pb2, chat_service_pb2_grpc

from services.chat.claims import Claims, KvClaims, LocalClaims
from services.chat.config import ChatConfig
from services.chat.events import SessionLog
from services.chat.leases import KvLeases, TurnLeases
from services.chat.live import Hub
from services.chat.local import LocalLeases, LocalLog
from services.chat.notices import NatsNotices, Notices, QuietNotices
from services.chat.recovery import Recovery, interrupted
from services.chat.servicer import ChatServicer
from services.chat.store import SessionStore
from services.chat.stream import StreamLog
from services.chat.turns import Turns
from services.runtime import dependency_unavailable, load_config, stop_task

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
        self._turns = Turns(
            self.store,
            inference=self._config.inference_target,
            rag=self._config.rag_target,
            execution=self._config.execution_target,
        )
        self.replica = f"{self._config.chat_replica_id or socket.gethostname()}:{os.getpid()}"
        self._nats: Client | None = None
        self._log: SessionLog | None = None
        self._leases: TurnLeases | None = None
        self._notices: Notices = QuietNotices()
        self._claims: Claims = LocalClaims()
        self._hub: Hub | None = None
        self._collector: asyncio.Task[None] | None = None

    @property
    def hub(self) -> Hub:
        assert self._hub is not None, "start() first"
        return self._hub

    async def start(self) -> None:
        self._turns.open()  # channels belong to the serving event loop
        await self.store.open()
        self._log, self._leases = await self._shared_state()
        self._hub = Hub(
            self.store,
            self._turns,
            self._config.limits,
            log=self._log,
            leases=self._leases,
            notices=self._notices,
            claims=self._claims,
            replica=self.replica,
        )
        await self._hub.start()
        self._collector = asyncio.create_task(self._collect())

    async def _shared_state(self) -> tuple[SessionLog, TurnLeases]:
        """The session log and turn leases: in JetStream, shared by every replica, or in
        this process's memory without NATS."""
        config = self._config
        if not config.nats_url:
            logger.warning("no NATS: sessions' events live in this process only")
            return LocalLog(window=config.chat_flow_window), LocalLeases()
        try:
            self._nats = await nats.connect(
                config.nats_url,
                name=f"switchboard-chat-{self.replica}",
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                connect_timeout=5,
            )
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            raise dependency_unavailable("nats", "session log", exc) from exc
        js = self._nats.jetstream(timeout=5)
        log = StreamLog(js, config.log_limits)
        await log.open()
        leases = KvLeases(
            js,
            owner=self.replica,
            ttl=config.chat_turn_lease_s,
            recover=Recovery(log, self.store).recover,
        )
        await leases.open()
        self._notices = NatsNotices(self._nats, replica=self.replica)
        claims = KvClaims(js)
        await claims.open()
        self._claims = claims
        return log, leases

    def register(self, server: grpc.aio.Server) -> None:
        chat_service_pb2_grpc.add_ChatServiceServicer_to_server(
            ChatServicer(self.store, self.hub), server
        )

    async def ready(self) -> bool:
        nats_up = self._nats is None or self._nats.is_connected
        return nats_up and await self.store.healthy()

    async def drain(self) -> None:
        """The replica is stopping (no new calls come): turns are no longer abandoned
        when their streams drop, so they finish for clients resuming elsewhere."""
        if self._hub is not None:
            self._hub.drain()

    async def shutdown(self) -> None:
        if self._collector is not None:
            await stop_task(self._collector)
        if self._hub is not None:
            await self._hub.finish(self._config.chat_shutdown_grace_s, interrupted())
            self._hub.close()
        if self._log is not None:
            await self._log.flush()
        await self._notices.close()
        if self._leases is not None:
            await self._leases.close()
        await self._turns.close()
        if self._nats is not None and not self._nats.is_closed:
            with contextlib.suppress(nats.errors.Error, OSError, TimeoutError):
                await self._nats.close()
        await self.store.close()

    async def _collect(self) -> None:
        while True:
            await asyncio.sleep(_COLLECT_EVERY_S)
            with contextlib.suppress(Exception):
                if forgotten := self.hub.collect_idle():
                    logger.info("forgot %d idle sessions", forgotten)
