"""Control events (replica life, config pushes and acks, operations), fanned out to
every WatchEvents stream as they happen. A watcher that falls behind by more than its
queue loses the oldest events, never slows the control plane."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ControlEvent:
    time: float
    kind: str
    message: str
    replica: str = ""
    service: str = ""
    config_version: int = 0


class EventBus:
    def __init__(self, *, queue_size: int = 1024) -> None:
        self._queues: set[asyncio.Queue[ControlEvent]] = set()
        self._queue_size = queue_size

    def emit(
        self,
        kind: str,
        message: str,
        *,
        replica: str = "",
        service: str = "",
        config_version: int = 0,
    ) -> None:
        event = ControlEvent(time.time(), kind, message, replica, service, config_version)
        for queue in self._queues:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(event)

    async def watch(self) -> AsyncIterator[ControlEvent]:
        """The events emitted from now on, until the caller stops iterating."""
        queue: asyncio.Queue[ControlEvent] = asyncio.Queue(self._queue_size)
        self._queues.add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._queues.discard(queue)
