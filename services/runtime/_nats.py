"""The services' connection to NATS: one way to make it, for every service that uses it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import nats
from nats.aio.client import Client


async def connect_nats(
    url: str, *, name: str, changed: Callable[[], Awaitable[None]] | None = None
) -> Client:
    """A connection that reconnects for ever, every half second, after a lost server
    (its subscriptions survive); `changed` is awaited when it is lost and made again."""
    callbacks: dict[str, Any] = {}
    if changed is not None:
        callbacks = {"disconnected_cb": changed, "reconnected_cb": changed}
    return await nats.connect(
        url,
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=5,
        **callbacks,
    )
