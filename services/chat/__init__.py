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

A turn's generation is an in-process call: the process embeds an InferenceService
(router, breakers, admission gate with its slices of the tenants' quotas) and calls its
Generate through the generated stub on a `LocalChannel`, as the gateway does. The call
gets what a call through the mesh gets (the contract's checks, the tenant's admission,
routing with the session as affinity key, its errors, metrics and span) without two more
passes through Envoy and a gRPC hop on the way to the first token. RAG and execution are
called through the mesh.

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
from switchboard.inference.v1 import inference_service_pb2_grpc

from services.chat.config import ChatConfig
from services.chat.live import Hub
from services.chat.servicer import ChatServicer
from services.chat.shared import Shared
from services.chat.store import SessionStore
from services.chat.turns import Turns
from services.inference import InferenceService, load_inference_config
from services.runtime import LocalChannel, load_config, stop_task

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

    def __init__(
        self, config: ChatConfig | None = None, inference: InferenceService | None = None
    ) -> None:
        self._config = config or load_config(ChatConfig, prefix="SWITCHBOARD_")
        self.store = SessionStore(self._config.database_url)
        self.inference = inference or InferenceService(load_inference_config())
        """The generating service this process embeds (Triton replicas from
        `SWITCHBOARD_TRITON_URLS`, admission at `SWITCHBOARD_ADMISSION_TARGET`)."""
        self._turns = Turns(
            self.store,
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
        await self.inference.start()
        # channels belong to the serving event loop
        self._turns.open(
            inference_service_pb2_grpc.InferenceServiceStub(  # type: ignore[no-untyped-call]
                LocalChannel(self.inference.register)
            )
        )
        await self.store.open()
        if self.shared is not None:
            await self.shared.connect(self.hub.relayed, self.hub.noticed)
        self._collector = asyncio.create_task(self._collect())

    def register(self, server: grpc.aio.Server) -> None:
        chat_service_pb2_grpc.add_ChatServiceServicer_to_server(
            ChatServicer(self.store, self.hub), server
        )

    async def ready(self) -> bool:
        stored, _ = await asyncio.gather(self.store.healthy(), self._check_models())
        return stored

    async def _check_models(self) -> None:
        """The embedded router re-checks its backends, on the schedule the inference
        replicas keep. Chat is ready without them: sessions and history are served while
        no model is, and a turn then fails UNAVAILABLE, as a call through the mesh would."""
        try:
            await self.inference.ready()
        except Exception:  # noqa: BLE001 - the breakers still judge the backends by calls
            logger.exception("the model backends' readiness check failed")

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
        await self.inference.shutdown()
        await self.store.close()

    async def _collect(self) -> None:
        while True:
            await asyncio.sleep(_COLLECT_EVERY_S)
            with contextlib.suppress(Exception):
                if forgotten := self.hub.collect_idle():
                    logger.info("forgot %d idle sessions", len(forgotten))
