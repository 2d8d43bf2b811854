"""Per-request context (request id, tenant, deadline) carried in contextvars."""

from __future__ import annotations

import contextvars
import logging
import time

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
TENANT_HEADER = "x-tenant-id"

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
tenant_id: contextvars.ContextVar[str] = contextvars.ContextVar("tenant_id", default="")
# Absolute deadline on the time.monotonic() clock, or None when the caller set none.
deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("deadline", default=None)


def time_remaining() -> float | None:
    """Seconds left before the inbound request's deadline, or None without one."""
    at = deadline.get()
    if at is None:
        return None
    return at - time.monotonic()


def current_tenant() -> str:
    """The tenant of the call being handled (`x-tenant-id`), or "" without one."""
    return tenant_id.get()


def clear_deadline() -> None:
    """Forgets the inbound deadline in this context: for work that outlives its call
    (a chat turn goes on when the stream that started it drops)."""
    deadline.set(None)
