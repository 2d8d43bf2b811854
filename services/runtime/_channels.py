"""Outbound channels whose deadlines derive from the inbound call's remaining time."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import grpc

from services.runtime import _context, _tracing
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
    """Request id, tenant and trace context of the current inbound call, plus `extra`."""
    metadata = list(extra or ())
    keys = {k for k, _ in metadata}
    if _tracing.enabled() and _tracing.TRACEPARENT not in keys:
        if (parent := _tracing.traceparent()) is not None:
            metadata.append((_tracing.TRACEPARENT, parent))
    if (rid := _context.request_id.get()) and _context.REQUEST_ID_HEADER not in keys:
        metadata.append((_context.REQUEST_ID_HEADER, rid))
    if (tenant := _context.tenant_id.get()) and _context.TENANT_HEADER not in keys:
        metadata.append((_context.TENANT_HEADER, tenant))
    return metadata


def client_span(method: str) -> _tracing.AnySpan:
    """A started client span of an outbound call to `method` (`/pkg.Service/Method`);
    current until `ended_with` ends it. INVALID_SPAN while tracing is off."""
    if not _tracing.enabled():
        return _tracing.INVALID_SPAN
    service, _, name = method.lstrip("/").partition("/")
    return _tracing.start_span(
        method.lstrip("/"),
        kind=_tracing.SpanKind.CLIENT,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
    )


def ended_with(span: _tracing.AnySpan, call: Any) -> Any:
    """`call`, whose end ends `span`."""
    if not span.is_recording():
        return call

    def done(finished: Any) -> None:
        # grpc.aio tells a call's status only to a coroutine: the callee's span holds it
        if finished.cancelled():
            span.set_attribute("switchboard.cancelled", True)
        span.end()

    call.add_done_callback(done)
    return call


class _Propagate:
    """Client interceptor base: narrows the timeout, forwards the request context, and
    traces the call (a client span, whose context the callee continues)."""

    def __init__(self, default_timeout: float | None) -> None:
        self._default = default_timeout

    async def _call(
        self, continuation: Any, details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        span = client_span(
            details.method if isinstance(details.method, str) else details.method.decode()
        )
        token = _tracing.activate(span)
        try:
            details = grpc.aio.ClientCallDetails(
                method=details.method,
                timeout=outbound_timeout(details.timeout, default=self._default),
                metadata=grpc.aio.Metadata(*propagated_metadata(list(details.metadata or ()))),
                credentials=details.credentials,
                wait_for_ready=details.wait_for_ready,
            )
        except BaseException as exc:
            _tracing.fail(span, exc)
            span.end()
            raise
        finally:
            _tracing.deactivate(token)
        return ended_with(span, await continuation(details, request))


class _UnaryUnary(_Propagate, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await self._call(continuation, details, request)


class _UnaryStream(_Propagate, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await self._call(continuation, details, request)


class _StreamUnary(_Propagate, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await self._call(continuation, details, requests)


class _StreamStream(_Propagate, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await self._call(continuation, details, requests)


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
            # a connection that stops answering (a partition: nothing is refused or
            # closed) is given up within 25 s, and its calls fail UNAVAILABLE, even the
            # calls no deadline bounds (a chat turn's admission and generation)
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.keepalive_timeout_ms", 5_000),
        ],
    )
