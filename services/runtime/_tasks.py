"""Background tasks a service owns: stopped the same way everywhere."""

from __future__ import annotations

import asyncio
import contextlib
import logging

logger = logging.getLogger(__name__)


async def stop_task(task: asyncio.Task[object] | None) -> None:
    """Cancels `task` (if any) and waits until it has finished; idempotent."""
    if task is None or task.done():
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
