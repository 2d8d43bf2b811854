"""Coalescing concurrent calls into one: many steps per round trip to the store when busy."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


class Batcher(Generic[Item, Result]):
    """Hands `flush` every item submitted while its previous call ran: one round trip
    (and one commit) for many steps when busy, no wait added when idle.

    Args:
        flush: takes a batch, returns one result per item, in order; an exception it
            raises is every caller's in that batch.
        limit: most items per batch.
    """

    def __init__(
        self, flush: Callable[[list[Item]], Awaitable[list[Result]]], *, limit: int = 256
    ) -> None:
        self._flush = flush
        self._limit = limit
        self._waiting: list[tuple[Item, asyncio.Future[Result]]] = []
        self._flushing: asyncio.Task[None] | None = None

    async def __call__(self, item: Item) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._flushing is None:
            self._flushing = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        batch: list[tuple[Item, asyncio.Future[Result]]] = []
        try:
            while self._waiting:
                batch = self._waiting[: self._limit]
                del self._waiting[: self._limit]
                try:
                    results = await self._flush([item for item, _ in batch])
                except Exception as exc:  # noqa: BLE001 - each caller gets it
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        finally:
            self._flushing = None
            for _, future in [*batch, *self._waiting]:  # when cancelled: nobody hangs
                if not future.done():
                    future.cancel()
            self._waiting.clear()
