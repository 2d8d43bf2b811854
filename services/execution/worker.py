"""`python -m services.execution.worker`: a worker process pulling steps from JetStream.

It serves only gRPC health (SERVING while connected to NATS and PostgreSQL and its
pull loop runs), so the launcher can wait for it like any other process. Run as many
as you like: they share one durable pull consumer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import timedelta

import grpc

from services.execution.config import ExecutionConfig, load_execution_config
from services.execution.service import Parts
from services.execution.steps import StepRunner
from services.execution.worker_loop import Worker
from services.runtime import channel, main

logger = logging.getLogger(__name__)


class WorkerService:
    name = "worker"
    service_names: Sequence[str] = ()

    def __init__(self, config: ExecutionConfig | None = None) -> None:
        self.parts = Parts(config or load_execution_config())
        self._channel: grpc.aio.Channel | None = None
        self.worker: Worker | None = None

    async def start(self) -> None:
        parts = self.parts
        await parts.start()
        self._channel = channel(
            parts.config.inference_target or "127.0.0.1:1", default_timeout=timedelta(minutes=5)
        )
        runner = StepRunner(
            channel=self._channel,
            tools=parts.tools,
            sandbox=parts.sandbox,
            sandbox_limits=parts.limits,
        )
        self.worker = Worker(parts.engine, runner, concurrency=parts.config.execution_workers)
        await self.worker.start()

    def register(self, server: grpc.aio.Server) -> None:
        """Health only."""

    async def ready(self) -> bool:
        return self.worker is not None and self.worker.alive and await self.parts.ready()

    async def shutdown(self) -> None:
        if self.worker is not None:
            await self.worker.stop()
        if self._channel is not None:
            await self._channel.close()
        await self.parts.close()


if __name__ == "__main__":
    main(WorkerService())
