"""In-process calls: a channel whose calls run a service's handlers in this process.

A process that embeds a service (the HTTP gateway embeds InferenceService, so that an
OpenAI request costs no second gRPC hop) calls it through the generated stub on a
`LocalChannel`. Each call goes through the same per-call bookkeeping a server applies
(`_interceptors.instrument`: the contract's checks, the request id / tenant / principal /
deadline context, metrics, access log, exception → status), without serializing the
messages or crossing a transport. A caller gets what a remote caller gets: the responses,
or a `grpc.aio.AioRpcError` with the status and its `google.rpc.Status` details.

Offered: unary-request methods (unary and server-streaming responses), deadlines
(`timeout`), `cancel()` of a stream. Request-streaming methods are not: calling one
raises NotImplementedError."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
from grpc.aio import Metadata

from services.runtime._interceptors import instrument

Metadatum = tuple[str, str | bytes]


class LocalRpcError(grpc.aio.AioRpcError):
    """An in-process call's failure, as a remote call's would be raised."""


def _error(
    code: grpc.StatusCode, details: str, trailing: Sequence[Metadatum] = ()
) -> LocalRpcError:
    return LocalRpcError(code, Metadata(), Metadata(*trailing), details)


def _deadline_exceeded() -> LocalRpcError:
    return _error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")


class _Context:
    """The part of `grpc.aio.ServicerContext` the runtime's handlers use."""

    __slots__ = ("_metadata", "_deadline", "_code")

    def __init__(self, metadata: Sequence[Metadatum] | None, timeout: float | None) -> None:
        self._metadata = tuple(metadata or ())
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._code: grpc.StatusCode | None = None

    def invocation_metadata(self) -> tuple[Metadatum, ...]:
        return self._metadata

    def time_remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - time.monotonic())

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def peer(self) -> str:
        return "local"

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Sequence[Metadatum] = ()
    ) -> None:
        self._code = code
        raise _error(code, details, trailing_metadata)

    async def abort_with_status(self, status: grpc.Status) -> None:
        await self.abort(status.code, status.details, status.trailing_metadata)


def _deadline(timeout: float | None) -> float | None:
    """The call's deadline on the event loop's clock (asyncio.timeout_at's)."""
    return None if timeout is None else asyncio.get_running_loop().time() + timeout


class _StreamCall:
    """A server-streaming call in progress: iterate it for the responses; `cancel()`
    closes the handler (its `finally` blocks run, as on a cancelled remote call)."""

    def __init__(self, responses: AsyncIterator[Any], deadline: float | None) -> None:
        self._responses = responses
        self._deadline = deadline
        self._closing: asyncio.Task[None] | None = None
        self._done = False

    def __aiter__(self) -> _StreamCall:
        return self

    async def __anext__(self) -> Any:
        if self._done:
            raise StopAsyncIteration
        try:
            async with asyncio.timeout_at(self._deadline):
                return await anext(self._responses)
        except TimeoutError:
            self._done = True
            raise _deadline_exceeded() from None
        except BaseException:
            self._done = True
            raise

    def cancel(self) -> bool:
        """Closes the handler if it has not ended; True if this call cancelled it."""
        if self._done or self._closing is not None:
            return False
        self._done = True
        close: Callable[[], Awaitable[None]] = self._responses.aclose  # type: ignore[attr-defined]
        self._closing = asyncio.ensure_future(close())
        return True

    def done(self) -> bool:
        return self._done


class _Registry:
    """Stands in for the server while a service registers: keeps its method handlers."""

    def __init__(self, methods: dict[str, grpc.RpcMethodHandler]) -> None:
        self._methods = methods

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        for name, handler in handlers.items():
            path = f"/{service}/{name}"
            self._methods[path] = instrument(path, handler)

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """The generated code adds each service twice; the registered handlers suffice."""


class LocalChannel:
    """A channel to the services `register` adds (as it would add them to a server):
    `InferenceServiceStub(LocalChannel(service.register))`."""

    def __init__(self, register: Callable[[Any], None]) -> None:
        self._methods: dict[str, grpc.RpcMethodHandler] = {}
        register(_Registry(self._methods))

    def _handler(self, method: str) -> grpc.RpcMethodHandler:
        handler = self._methods.get(method)
        if handler is None:
            raise LookupError(f"{method} is not served in this process")
        return handler

    def unary_unary(self, method: str, *_: Any, **__: Any) -> Callable[..., Awaitable[Any]]:
        handle = self._handler(method).unary_unary

        async def call(
            request: Any,
            *,
            timeout: float | None = None,
            metadata: Sequence[Metadatum] | None = None,
            **_: Any,
        ) -> Any:
            try:
                async with asyncio.timeout_at(_deadline(timeout)):
                    return await handle(request, _Context(metadata, timeout))
            except TimeoutError:
                raise _deadline_exceeded() from None

        return call

    def unary_stream(self, method: str, *_: Any, **__: Any) -> Callable[..., _StreamCall]:
        handle = self._handler(method).unary_stream

        def call(
            request: Any,
            *,
            timeout: float | None = None,
            metadata: Sequence[Metadatum] | None = None,
            **_: Any,
        ) -> _StreamCall:
            responses = handle(request, _Context(metadata, timeout))
            return _StreamCall(responses, _deadline(timeout))

        return call

    def stream_unary(self, method: str, *_: Any, **__: Any) -> Callable[..., Any]:
        return _request_streaming(method)

    def stream_stream(self, method: str, *_: Any, **__: Any) -> Callable[..., Any]:
        return _request_streaming(method)

    async def close(self) -> None:
        """Nothing to release: the embedded service is shut down by its owner."""


def _request_streaming(method: str) -> Callable[..., Any]:
    def call(*_: Any, **__: Any) -> Any:
        raise NotImplementedError(f"{method}: request-streaming methods are not called in-process")

    return call
