"""Outbound channels whose deadlines derive from the inbound call's remaining time."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import grpc

from services.runtime import _context
from services.runtime._errors import DeadlineExceeded

logger = logging.getLogger(__name__)


def outbound_timeout(requested: float | None, *, default: float | None = None) -> float | None:
    """The timeout for an outbound call: the least of what the caller asked for and what is
    left of the inbound deadline (`default` when neither is set).

    Raises:
        DeadlineExceeded: the inbound deadline has already passed.
    """
    remaining = _context.time_remaining()
    if remaining is not None and remaining <= 0:
        raise DeadlineExceeded(
            "deadline expired before the downstream call", reason="DEADLINE_EXCEEDED"
        )
    options = [t for t in (requested, remaining) if t is not None]
    return min(options) if options else default


def propagated_metadata(extra: Sequence[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    """Request id and tenant of the current inbound call, plus `extra`."""
    metadata = list(extra or ())
    keys = {k for k, _ in metadata}
    if (rid := _context.request_id.get()) and _context.REQUEST_ID_HEADER not in keys:
        metadata.append((_context.REQUEST_ID_HEADER, rid))
    if (tenant := _context.tenant_id.get()) and _context.TENANT_HEADER not in keys:
        metadata.append((_context.TENANT_HEADER, tenant))
    return metadata


class _Propagate:
    """Client interceptor base: narrows the timeout and forwards the request context."""

    def __init__(self, default_timeout: float | None) -> None:
        self._default = default_timeout

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        return grpc.aio.ClientCallDetails(
            method=details.method,
            timeout=outbound_timeout(details.timeout, default=self._default),
            metadata=grpc.aio.Metadata(*propagated_metadata(list(details.metadata or ()))),
            credentials=details.credentials,
            wait_for_ready=details.wait_for_ready,
        )


class _UnaryUnary(_Propagate, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _UnaryStream(_Propagate, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _StreamUnary(_Propagate, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


class _StreamStream(_Propagate, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


def channel(
    target: str,
    *,
    default_timeout: timedelta | None = timedelta(seconds=30),
    max_message_bytes: int = 8 * 1024 * 1024,
    propagate: bool = True,
) -> grpc.aio.Channel:
    """An insecure aio channel to another Switchboard service on the local mesh.

    With `propagate` (the default), every call forwards the inbound call's request id
    and tenant and is bounded by its remaining deadline (client interceptors). Without,
    calls carry only what the caller passes: for work that outlives its inbound call
    (a chat turn) and for hot paths, since grpc.aio's intercepted calls cost an extra
    task per call.
    """
    seconds = default_timeout.total_seconds() if default_timeout else None
    interceptors = (
        [cls(seconds) for cls in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]
        if propagate
        else None
    )
    return grpc.aio.insecure_channel(
        target,
        interceptors=interceptors,
        options=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 10_000),
        ],
    )
