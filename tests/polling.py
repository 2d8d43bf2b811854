"""Waiting for a condition in a test: poll it until it holds or a timeout says what did not."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable

logger = logging.getLogger(__name__)

Check = Callable[[], Awaitable[object] | object]


async def eventually(
    check: Check,
    *,
    timeout: float = 5.0,
    interval: float = 0.05,
    what: str = "",
) -> float:
    """Calls `check` (plain or async) until it returns something true; returns the
    seconds that took.

    An exception from `check` fails at once: a check that tolerates an error on the way
    (a server still restarting) catches it and returns False.

    Raises:
        AssertionError: naming `what` (or the check) when it was still false after
            `timeout` seconds.
    """
    started = time.monotonic()
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        elapsed = time.monotonic() - started
        if result:
            return elapsed
        if elapsed >= timeout:
            name = what or getattr(check, "__qualname__", repr(check))
            raise AssertionError(f"not true within {timeout:g} s: {name}")
        await asyncio.sleep(interval)
