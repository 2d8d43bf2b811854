"""Per-request context (request id, tenant, principal, deadline) carried in contextvars."""

from __future__ import annotations

import contextvars
import enum
import logging
import time

from switchboard.common.v1 import authority_pb2

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
MAX_REQUEST_ID = 128
"""A longer `x-request-id` is cut to this many characters."""
TENANT_HEADER = "x-tenant-id"
PRINCIPAL_HEADER = "x-switchboard-principal"
"""Set by the edge from the credential (`tenant` or `operator`), whatever the client
sent; a call without it (a service calling another on the internal listener) is a
tenant's."""


class Principal(enum.Enum):
    """A kind of caller (`switchboard.common.v1.Principal`)."""

    TENANT = authority_pb2.PRINCIPAL_TENANT
    OPERATOR = authority_pb2.PRINCIPAL_OPERATOR

    @property
    def header_value(self) -> str:
        return self.name.lower()

    @classmethod
    def from_header(cls, value: str | None) -> Principal:
        """The principal a call's header names; anything but `operator` is a tenant
        (the least authority)."""
        return cls.OPERATOR if value == cls.OPERATOR.header_value else cls.TENANT


request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
tenant_id: contextvars.ContextVar[str] = contextvars.ContextVar("tenant_id", default="")
principal: contextvars.ContextVar[Principal] = contextvars.ContextVar(
    "principal", default=Principal.TENANT
)
# Absolute deadline on the time.monotonic() clock, or None when the caller set none.
deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("deadline", default=None)


def time_remaining() -> float | None:
    """Seconds left before the inbound request's deadline, or None without one."""
    at = deadline.get()
    if at is None:
        return None
    return at - time.monotonic()


def current_request_id() -> str:
    """The request id of the call being handled, or "" outside one."""
    return request_id.get()


def current_tenant() -> str:
    """The tenant of the call being handled (`x-tenant-id`), or "" without one."""
    return tenant_id.get()


def current_principal() -> Principal:
    """The principal of the call being handled (a tenant unless the edge said operator)."""
    return principal.get()


def clear_deadline() -> None:
    """Forgets the inbound deadline in this context: for work that outlives its call
    (a chat turn goes on when the stream that started it drops)."""
    deadline.set(None)
