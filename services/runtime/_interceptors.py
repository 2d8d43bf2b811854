"""The server-side interceptor: request id, tenant, principal and deadline context, the
contract's checks (who may call, which requests are valid, whether the request's bytes
are a message at all), access log, metrics, exception → status mapping.

It is applied when servicers are registered (each method handler wrapped once), not
as a `grpc.aio.ServerInterceptor`: the effect is the same, without grpc's per-call
interceptor dispatch on every RPC."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc.aio import AbortError

from services.runtime import _context, _metrics, _tracing
from services.runtime._contract import MethodContract, method_contract
from services.runtime._errors import InvalidArgument, SwitchboardError

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("switchboard.access")

_HANDLER_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


_CONTRACTED = "/switchboard."
"""Methods of these services are checked against their contract: an RPC whose contract
names no caller is refused to everyone."""


class _Malformed:
    """A request message whose bytes did not parse (grpc itself would answer UNKNOWN,
    before any handler ran): the handler refuses it as INVALID_ARGUMENT."""

    __slots__ = ("type_name", "problem")

    def __init__(self, type_name: str, problem: str) -> None:
        self.type_name = type_name
        self.problem = problem

    def refusal(self) -> InvalidArgument:
        return InvalidArgument(
            f"the request is not a valid {self.type_name} message: {self.problem}",
            metadata={"message_type": self.type_name},
        )


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """`deserialize`, answering bytes that are no message with a `_Malformed`."""
    if deserialize is None:
        return None
    type_name = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
    type_name = getattr(type_name, "full_name", "request")

    def parse(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except Exception as exc:  # noqa: BLE001 - DecodeError, or whatever a parser raises
            return _Malformed(type_name, str(exc) or type(exc).__name__)

    return parse


async def _well_formed(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """A client stream's messages, up to the first that did not parse (which ends the
    call as INVALID_ARGUMENT)."""
    async for request in requests:
        if isinstance(request, _Malformed):
            raise request.refusal()
        yield request


class _Method:
    """Per-method constants, resolved once: names, the contract and the labelled metric
    children."""

    __slots__ = (
        "service",
        "method",
        "contract",
        "started",
        "in_flight",
        "latency",
        "span_name",
        "attributes",
        "_handled",
    )

    def __init__(self, full_method: str) -> None:
        _, _, rest = full_method.partition("/")
        self.service, _, self.method = rest.partition("/")
        self.span_name = rest
        self.attributes = {
            "rpc.system": "grpc",
            "rpc.service": self.service,
            "rpc.method": self.method,
        }
        self.contract: MethodContract | None = None
        if full_method.startswith(_CONTRACTED):
            self.contract = method_contract(full_method)
            if self.contract is None:
                raise LookupError(f"{full_method} is served but defined by no loaded contract")
        self.started = _metrics.RPC_STARTED.labels(self.service, self.method)
        self.in_flight = _metrics.RPC_IN_FLIGHT.labels(self.service)
        self.latency = _metrics.RPC_LATENCY.labels(self.service, self.method)
        self._handled: dict[grpc.StatusCode, Any] = {}

    def admit(self, request: Any) -> None:
        """The contract's checks, before the handler runs: the caller's principal, then
        (for a single request message) whether it parsed, and its constraints. A
        streamed request's messages are checked by the handler, which answers each on
        its own."""
        if isinstance(request, _Malformed):
            if self.contract is not None:
                self.contract.check_caller(_context.principal.get())
            raise request.refusal()
        if self.contract is not None:
            self.contract.admit(_context.principal.get(), request)

    def handled(self, code: grpc.StatusCode) -> Any:
        child = self._handled.get(code)
        if child is None:
            child = _metrics.RPC_HANDLED.labels(self.service, self.method, code.name)
            self._handled[code] = child
        return child


class _Call:
    """Bookkeeping of one RPC: sets the contextvars, then logs and counts its outcome."""

    __slots__ = (
        "service",
        "method",
        "started",
        "code",
        "error",
        "_tokens",
        "_m",
        "_span",
        "_active",
    )

    def __init__(self, m: _Method, context: grpc.aio.ServicerContext) -> None:
        self._m = m
        self.service, self.method = m.service, m.method
        self.started = time.perf_counter()
        self.code = grpc.StatusCode.OK
        self.error = ""
        metadata = dict(context.invocation_metadata() or ())
        # the caller's request id, bounded: it is echoed into logs and error details
        rid = metadata.get(_context.REQUEST_ID_HEADER, "")[: _context.MAX_REQUEST_ID]
        self._span = self._active = None
        if _tracing.enabled():
            # a child of the caller's span (its traceparent), or of the current one (a
            # call made in-process); a request without an id is known by its trace's
            self._span = _tracing.start_span(
                m.span_name,
                kind=_tracing.SpanKind.SERVER,
                parent=_tracing.extract(metadata),
                attributes=m.attributes,
            )
            rid = rid or _tracing.trace_id_of(self._span)
            self._span.set_attribute(_tracing.REQUEST_ID, rid)
            if tenant := metadata.get(_context.TENANT_HEADER):
                self._span.set_attribute("switchboard.tenant", tenant)
            self._active = _tracing.activate(self._span)
        rid = rid or uuid.uuid4().hex
        remaining = context.time_remaining()
        self._tokens = (
            _context.request_id.set(rid),
            _context.tenant_id.set(metadata.get(_context.TENANT_HEADER, "")),
            _context.principal.set(
                _context.Principal.from_header(metadata.get(_context.PRINCIPAL_HEADER))
            ),
            _context.deadline.set(None if remaining is None else time.monotonic() + remaining),
        )
        m.started.inc()
        m.in_flight.inc()

    async def fail(self, exc: BaseException, context: grpc.aio.ServicerContext) -> None:
        """Turns an exception into the call's status (re-raising what grpc owns)."""
        self.error = str(exc) or type(exc).__name__
        if isinstance(exc, SwitchboardError):
            self.code = exc.code
            await context.abort_with_status(exc.to_grpc_status())
        if isinstance(exc, AbortError):
            self.code = context.code() or grpc.StatusCode.UNKNOWN  # type: ignore[assignment]
            raise exc
        if isinstance(exc, asyncio.CancelledError | GeneratorExit):
            # the client cancelled (a stream handler is closed with GeneratorExit): the
            # call is over, there is nobody to send a status to
            self.code = grpc.StatusCode.CANCELLED
            raise exc
        self.code = grpc.StatusCode.INTERNAL
        logger.exception("unhandled error in %s/%s", self.service, self.method)
        internal = SwitchboardError("internal error", reason="INTERNAL")
        await context.abort_with_status(internal.to_grpc_status())

    def finish(self) -> None:
        elapsed = time.perf_counter() - self.started
        if self._span is not None:
            self._span.set_attribute("rpc.grpc.status_code", self.code.value[0])
            if self.code is not grpc.StatusCode.OK:
                _tracing.fail(self._span, f"{self.code.name}: {self.error}")
            _tracing.deactivate(self._active)
            self._span.end()
        self._m.in_flight.dec()
        self._m.handled(self.code).inc()
        self._m.latency.observe(elapsed)
        if access_logger.isEnabledFor(logging.INFO):
            access_logger.info(
                "rpc",
                extra={
                    "method": f"{self.service}/{self.method}",
                    "code": self.code.name,
                    "ms": round(elapsed * 1000, 3),
                },
            )
        variables = (_context.request_id, _context.tenant_id, _context.principal, _context.deadline)
        for var, token in zip(variables, self._tokens, strict=True):
            try:
                var.reset(token)
            except ValueError:  # finished from another context (a closed stream)
                pass


def _wrap_unary_response(
    behavior: Callable[..., Awaitable[Any]], full_method: str
) -> Callable[..., Awaitable[Any]]:
    m = _Method(full_method)

    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        call = _Call(m, context)
        try:
            m.admit(request)
            return await behavior(request, context)
        except BaseException as exc:  # noqa: BLE001 - mapped to a status, or re-raised
            await call.fail(exc, context)
        finally:
            call.finish()

    return handle


def _wrap_stream_response(
    behavior: Callable[..., Any], full_method: str
) -> Callable[..., AsyncIterator[Any]]:
    m = _Method(full_method)
    is_generator = inspect.isasyncgenfunction(behavior)

    async def handle(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        call = _Call(m, context)
        result = None
        try:
            m.admit(request)
            result = behavior(request, context)
            if is_generator or hasattr(result, "__aiter__"):
                # an async generator, or a method that returns one
                async for response in result:
                    yield response
            else:
                await result
        except BaseException as exc:  # noqa: BLE001 - mapped to a status, or re-raised
            await call.fail(exc, context)
        finally:
            try:
                if hasattr(result, "aclose"):
                    # a stream closed early (its call cancelled) closes the handler's
                    # generator now, not when it is collected: its `finally` runs
                    await result.aclose()
            finally:
                call.finish()

    return handle


def _checking_stream(handle: Callable[..., Any]) -> Callable[..., Any]:
    """`handle` of a client-streaming RPC, given only its stream's well-formed messages."""
    if inspect.isasyncgenfunction(handle):

        async def stream(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
            async for response in handle(_well_formed(requests), context):
                yield response

        return stream

    async def unary(requests: AsyncIterator[Any], context: Any) -> Any:
        return await handle(_well_formed(requests), context)

    return unary


_SKIPPED = ("/grpc.reflection.", "/grpc.health.")


def instrument(full_method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """`handler` with the per-call bookkeeping of `_Call` around its behaviour."""
    if handler is None or full_method.startswith(_SKIPPED):
        return handler
    streaming = (handler.request_streaming, handler.response_streaming)
    behavior = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary
    ) or handler.stream_stream
    wrapped = (
        _wrap_stream_response(behavior, full_method)
        if handler.response_streaming
        else _wrap_unary_response(behavior, full_method)
    )
    if handler.request_streaming:
        wrapped = _checking_stream(wrapped)
    return _HANDLER_FACTORIES[streaming](
        wrapped,
        request_deserializer=_tolerant(handler.request_deserializer),
        response_serializer=handler.response_serializer,
    )


class _InstrumentedGenericHandler(grpc.GenericRpcHandler):
    """A generic handler whose method handlers come back instrumented (once each)."""

    def __init__(self, inner: grpc.GenericRpcHandler) -> None:
        self._inner = inner
        self._cache: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        method = handler_call_details.method  # type: ignore[attr-defined]
        if method not in self._cache:
            self._cache[method] = instrument(method, self._inner.service(handler_call_details))
        return self._cache[method]


class InstrumentingRegistry:
    """Stands in for the server while servicers register: every handler they add is
    instrumented. Anything else is the server's own."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self._server.add_generic_rpc_handlers(
            tuple(_InstrumentedGenericHandler(h) for h in handlers)
        )

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self._server.add_registered_method_handlers(
            service, {m: instrument(f"/{service}/{m}", h) for m, h in handlers.items()}
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)
