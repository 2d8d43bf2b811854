"""The execution service's processes: the API process, and what it shares with the workers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import grpc
from switchboard.execution.v1 import execution_service_pb2, execution_service_pb2_grpc

from services.execution import metrics
from services.execution.bus import Bus, WorkSettings
from services.execution.config import ExecutionConfig, load_execution_config
from services.execution.engine import Engine
from services.execution.sandbox import SandboxLimits, SandboxPool
from services.execution.servicer import ExecutionServicer
from services.execution.store import TaskStore
from services.execution.tail import EventTail
from services.execution.tools import ToolExecutor, load_tools
from services.runtime import stop_task

logger = logging.getLogger(__name__)

SERVICE_NAME = execution_service_pb2.DESCRIPTOR.services_by_name["ExecutionService"].full_name


class Parts:
    """What the API process and the worker processes both run on."""

    def __init__(self, config: ExecutionConfig) -> None:
        self.config = config
        self.store = TaskStore(config.database_url)
        self.bus = Bus(
            config.nats_url,
            WorkSettings(
                ack_wait=config.execution_ack_wait,
                max_deliver=config.execution_max_deliver,
                event_retention=config.execution_event_retention,
                duplicate_window=config.execution_duplicate_window,
                replicas=config.nats_stream_replicas,
            ),
        )
        self.engine = Engine(self.store, self.bus)
        self.tools = ToolExecutor(
            load_tools(config.execution_tools), grpc_target=config.inference_target or None
        )
        self.limits = SandboxLimits()
        self.sandbox: SandboxPool | None = None

    async def start(self) -> None:
        await self.store.open()
        await self.bus.connect()
        if self.config.execution_sandbox_pool:
            self.sandbox = SandboxPool(limits=self.limits, size=self.config.execution_sandbox_pool)
            await self.sandbox.start()

    async def ready(self) -> bool:
        return self.bus.connected and await self.store.healthy()

    async def close(self) -> None:
        await self.engine.close()
        if self.sandbox is not None:
            await self.sandbox.close()
        await self.tools.shutdown()
        await self.bus.close()
        await self.store.close()


class ExecutionService:
    """The API process: SubmitTask, GetTask, ListTasks, WatchTask, CancelTask, RunCode;
    it also re-sends work whose message a crash may have lost. WatchTask reads the event
    stream through one live consumer of this process (`tail`)."""

    name = "execution"
    service_names: Sequence[str] = (SERVICE_NAME,)

    def __init__(self, config: ExecutionConfig | None = None) -> None:
        self.parts = Parts(config or load_execution_config())
        self.tail = EventTail(self.parts.bus)
        self._sweeper: asyncio.Task[None] | None = None
        self._backlog: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.parts.start()
        await self.tail.start()
        self._sweeper = asyncio.create_task(self._sweep(), name="execution-sweeper")
        self._backlog = asyncio.create_task(
            metrics.watch_consumer(self.parts.bus), name="execution-backlog"
        )

    def register(self, server: grpc.aio.Server) -> None:
        parts = self.parts
        execution_service_pb2_grpc.add_ExecutionServiceServicer_to_server(
            ExecutionServicer(
                parts.engine,
                parts.tools,
                sandbox=parts.sandbox,
                sandbox_limits=parts.limits,
                task_events=self.tail.feed.events,
                event_retention=parts.config.execution_event_retention,
            ),
            server,
        )

    async def ready(self) -> bool:
        return await self.parts.ready()

    async def shutdown(self) -> None:
        await stop_task(self._sweeper)
        await stop_task(self._backlog)
        await self.tail.shutdown()
        await self.parts.close()

    async def _sweep(self) -> None:
        every = self.parts.config.execution_republish_after
        while True:
            await asyncio.sleep(every.total_seconds() / 2)
            try:
                if sent := await self.parts.engine.republish_stale(every):
                    logger.info("re-sent queued steps", extra={"steps": sent})
            except Exception as exc:  # noqa: BLE001 - keep sweeping through outages
                logger.warning("cannot re-send queued steps: %s", exc)
