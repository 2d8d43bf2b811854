"""Tool steps: calls to registered HTTP and gRPC tools, with timeouts, retries and breakers.

Tools are registered in YAML (`load_tools`):

    allowed_hosts: [api.example.com, 127.0.0.1:8080]
    tools:
      weather:
        kind: http
        url: https://api.example.com/v1/weather
        method: GET
        timeout: 5s
      retrieve:
        kind: grpc
        method: switchboard.rag.v1.RagService/Retrieve

Only failures that mean "the tool could not answer" are retried and count against the
tool's circuit breaker: connection errors, timeouts, HTTP 429/502/503/504, and gRPC
UNAVAILABLE, DEADLINE_EXCEEDED or RESOURCE_EXHAUSTED with RetryInfo. Any other answer
(a 400, INVALID_ARGUMENT...) is final. Every attempt carries the caller's idempotency
key, so a tool that honours it applies a side effect once however often it is retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import json
import logging
import os
import pkgutil
import random
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import grpc
import pybreaker
import yaml
from google.protobuf import descriptor_pool, json_format, message_factory
from google.protobuf.message import Message

from services.runtime import (
    TENANT_HEADER,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    SwitchboardError,
    Unauthenticated,
    Unavailable,
    channel,
    error_details,
    parse_duration,
)

__all__ = [
    "GrpcToolSpec",
    "HttpToolSpec",
    "ToolExecutor",
    "ToolSpec",
    "ToolsConfig",
    "load_tools",
]

logger = logging.getLogger(__name__)

HTTP_METHODS = ("GET", "POST", "PUT", "DELETE")
RETRYABLE_HTTP_STATUSES = frozenset({429, 502, 503, 504})
IDEMPOTENCY_HEADER = "Idempotency-Key"
IDEMPOTENCY_METADATA = "idempotency-key"
MAX_RESPONSE_BYTES = 8 * 1024 * 1024
"""Largest HTTP response body a tool may return (the gRPC channels' message limit)."""

_GRPC_METHOD = re.compile(r"^(switchboard(?:\.\w+)*)\.(\w+)/(\w+)$")
_DURATION_KEYS = frozenset({"timeout", "backoff", "max_backoff", "breaker_reset"})
_HTTP_REJECTIONS: dict[int, type[SwitchboardError]] = {
    401: Unauthenticated,
    403: PermissionDenied,
    404: NotFound,
    409: FailedPrecondition,
    410: NotFound,
    412: FailedPrecondition,
}
_GRPC_REJECTIONS: dict[grpc.StatusCode, type[SwitchboardError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
}


@dataclass(frozen=True, kw_only=True)
class ToolSpec:
    """What every tool has: a name, and how its calls are timed, retried and guarded."""

    name: str
    timeout: timedelta = timedelta(seconds=10)
    """Limit of one attempt; the call's deadline may cut it shorter."""
    max_attempts: int = 3
    backoff: timedelta = timedelta(milliseconds=200)
    """Base of the backoff: the wait after attempt n is drawn from [0, backoff * 2**(n-1)]."""
    max_backoff: timedelta = timedelta(seconds=5)
    """Longest wait between attempts, a tool's own Retry-After included."""
    breaker_fail_max: int = 5
    """Retryable failures in a row that open the tool's circuit."""
    breaker_reset: timedelta = timedelta(seconds=30)
    """How long an open circuit fails fast before it lets one probe call through."""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a tool needs a name")
        if self.timeout <= timedelta(0) or self.breaker_reset <= timedelta(0):
            raise ValueError("timeout and breaker_reset must be positive")
        if not 1 <= self.max_attempts <= 10:
            raise ValueError(f"max_attempts must be within 1..10, not {self.max_attempts}")
        if not timedelta(0) <= self.backoff <= self.max_backoff:
            raise ValueError("backoff must be within 0..max_backoff")
        if self.breaker_fail_max < 1:
            raise ValueError("breaker_fail_max must be at least 1")


@dataclass(frozen=True, kw_only=True)
class HttpToolSpec(ToolSpec):
    """A tool behind an HTTP endpoint: arguments go as a JSON body (POST, PUT) or query."""

    url: str
    method: str = "POST"
    headers: tuple[tuple[str, str], ...] = ()
    """Static headers sent on every call, such as an API key."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in HTTP_METHODS:
            raise ValueError(f"method {self.method!r} is not one of {', '.join(HTTP_METHODS)}")
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url {self.url!r} is not an http(s) URL")

    @property
    def authority(self) -> str:
        """The URL's `host[:port]`, as `allowed_hosts` names it."""
        parts = urlsplit(self.url)
        return f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)


@dataclass(frozen=True, kw_only=True)
class GrpcToolSpec(ToolSpec):
    """A unary method of a Switchboard service, called through the mesh."""

    method: str
    """`package.Service/Method`, e.g. `switchboard.rag.v1.RagService/Retrieve`."""
    target: str | None = None
    """`host:port` to call; usually left out and given to the executor (Envoy's address)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _grpc_method(self.method)


@dataclass(frozen=True, kw_only=True)
class ToolsConfig:
    """The registered tools, and the hosts HTTP tools may reach."""

    tools: tuple[ToolSpec, ...] = ()
    allowed_hosts: frozenset[str] = frozenset()
    """`host[:port]` entries; an HTTP tool's URL must match one exactly."""

    def __post_init__(self) -> None:
        names = [tool.name for tool in self.tools]
        if duplicates := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"tools registered twice: {', '.join(duplicates)}")
        for tool in self.tools:
            if isinstance(tool, HttpToolSpec) and not self.allows(tool):
                raise ValueError(
                    f"tool {tool.name!r}: host {tool.authority!r} is not in allowed_hosts"
                )

    def allows(self, tool: HttpToolSpec) -> bool:
        """Whether the tool's URL names an allowed `host[:port]` (case-insensitive)."""
        return tool.authority.lower() in {host.lower() for host in self.allowed_hosts}


def load_tools(source: str | os.PathLike[str] | Mapping[str, Any]) -> ToolsConfig:
    """Reads the tools' YAML from a path, or takes its already parsed mapping.

    Durations are seconds or strings such as `250ms` or `5s`.

    Raises:
        ValueError: what is wrong, naming the tool.
    """
    raw = source if isinstance(source, Mapping) else yaml.safe_load(Path(source).read_text())
    if not isinstance(raw, Mapping):
        raise ValueError("the tools config must be a mapping")
    if unknown := sorted(set(raw) - {"allowed_hosts", "tools"}):
        raise ValueError(f"unknown keys {unknown}: expected allowed_hosts and tools")
    hosts = raw.get("allowed_hosts") or []
    if not isinstance(hosts, list) or not all(isinstance(host, str) for host in hosts):
        raise ValueError("allowed_hosts must be a list of host[:port] strings")
    tools = raw.get("tools") or {}
    if not isinstance(tools, Mapping):
        raise ValueError("tools must map each tool's name to its definition")
    return ToolsConfig(
        tools=tuple(_tool_spec(str(name), entry) for name, entry in tools.items()),
        allowed_hosts=frozenset(hosts),
    )


def _tool_spec(name: str, entry: Any) -> ToolSpec:
    """One tool's definition, checked; ValueErrors name the tool."""
    kinds: dict[str, type[ToolSpec]] = {"http": HttpToolSpec, "grpc": GrpcToolSpec}
    try:
        if not isinstance(entry, Mapping):
            raise ValueError("the definition must be a mapping")
        options = dict(entry)
        kind = options.pop("kind", None)
        if kind not in kinds:
            raise ValueError(f"unknown kind {kind!r}: use http or grpc")
        cls = kinds[kind]
        if unknown := sorted(set(options) - {f.name for f in fields(cls)} - {"name"}):
            raise ValueError(f"unknown keys {unknown} for a {kind} tool")
        return cls(name=name, **{key: _option(key, value) for key, value in options.items()})
    except (TypeError, ValueError) as error:
        raise ValueError(f"tool {name!r}: {error}") from None


def _option(key: str, value: Any) -> Any:
    """A YAML value in the type its field wants."""
    if key in _DURATION_KEYS:
        return parse_duration(str(value))
    if key == "headers":
        if not isinstance(value, Mapping):
            raise ValueError("headers must be a mapping")
        return tuple((str(k), str(v)) for k, v in value.items())
    return value


@dataclass(frozen=True)
class _GrpcMethod:
    path: str
    request: type[Message]
    response: type[Message]


@functools.cache
def _grpc_method(name: str) -> _GrpcMethod:
    """The path and message classes of a unary Switchboard method, from the descriptors.

    Raises:
        ValueError: `name` is malformed, unknown or streaming.
    """
    match = _GRPC_METHOD.match(name)
    if not match:
        raise ValueError(f"method {name!r} is not switchboard.<package>.<Service>/<Method>")
    package, service, method = match.groups()
    _import_generated(package)
    try:
        found = descriptor_pool.Default().FindServiceByName(f"{package}.{service}")
    except KeyError:
        raise ValueError(f"unknown service {package}.{service}") from None
    descriptor = found.methods_by_name.get(method)
    if descriptor is None:
        raise ValueError(f"{package}.{service} has no method {method}")
    if descriptor.client_streaming or descriptor.server_streaming:
        raise ValueError(f"{name} streams; tools must be unary")
    return _GrpcMethod(
        path=f"/{name}",
        request=message_factory.GetMessageClass(descriptor.input_type),
        response=message_factory.GetMessageClass(descriptor.output_type),
    )


def _import_generated(package: str) -> None:
    """Imports a generated package's `*_pb2` modules, adding its services to the pool."""
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise ValueError(f"no generated code for package {package}") from None
    for info in pkgutil.iter_modules(getattr(module, "__path__", ())):
        if info.name.endswith("_pb2"):
            importlib.import_module(f"{package}.{info.name}")


class _Retryable(Exception):
    """The tool could not answer this attempt; another attempt may succeed."""

    def __init__(self, description: str, *, retry_after: float | None = None) -> None:
        super().__init__(description)
        self.retry_after = retry_after
        """Seconds the tool asked to wait (Retry-After, RetryInfo), if it said."""


class _DeadlineReached(Exception):
    """The call's deadline, not the tool's own timeout, ended an attempt."""


class _Failure(Exception):
    """Stands for a failed attempt when the outcome is reported to pybreaker."""


def _fail() -> None:
    raise _Failure


def _succeed() -> None:
    return None


class _Breaker:
    """A tool's pybreaker circuit, driven around asyncio calls.

    pybreaker guards synchronous callables, so each attempt's outcome is reported to it
    afterwards. While open, calls fail fast; once `breaker_reset` has passed, one probe
    goes through and its outcome closes or re-opens the circuit.
    """

    def __init__(self, spec: ToolSpec) -> None:
        self._circuit = pybreaker.CircuitBreaker(
            fail_max=spec.breaker_fail_max,
            reset_timeout=spec.breaker_reset.total_seconds(),
            name=spec.name,
            throw_new_error_on_trip=False,
        )
        self._probe_timeout = spec.timeout.total_seconds()
        self._probing = False

    @property
    def is_open(self) -> bool:
        return self._circuit.current_state == pybreaker.STATE_OPEN

    def retry_after(self) -> timedelta:
        """How long until a call may go through: the rest of the reset, or a probe's run."""
        wait = self._until_reset()
        return timedelta(seconds=wait if wait > 0 else self._probe_timeout)

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Wraps one attempt: fails fast while open, then reports how the attempt ended.

        `_Retryable` counts as a failure; a result or any SwitchboardError (the tool
        answered, if only to refuse) as a success; anything else, such as a deadline or
        a cancellation, says nothing about the tool and is not reported.

        Raises:
            Unavailable: `TOOL_CIRCUIT_OPEN`, without calling the tool.
        """
        probe = self._admit()
        try:
            yield
        except _Retryable:
            self._report(_fail)
            raise
        except SwitchboardError:
            self._report(_succeed)
            raise
        else:
            self._report(_succeed)
        finally:
            if probe:
                self._probing = False

    def _admit(self) -> bool:
        """Whether this call is the one probe of an open circuit; raises if it may not go."""
        if not self.is_open:
            return False
        if self._probing or self._until_reset() > 0:
            raise Unavailable(
                f"tool {self._circuit.name!r} is failing; its circuit is open",
                reason="TOOL_CIRCUIT_OPEN",
                metadata={"tool": str(self._circuit.name)},
                retry_after=self.retry_after(),
            )
        self._probing = True
        return True

    def _until_reset(self) -> float:
        """Seconds until the open circuit lets a probe through (0 or less: it may now)."""
        opened = self._circuit._state_storage.opened_at  # noqa: SLF001 - pybreaker's clock
        if opened is None:
            return 0.0
        return self._circuit.reset_timeout - (datetime.now(UTC) - opened).total_seconds()

    def _report(self, outcome: Callable[[], None]) -> None:
        was_open = self.is_open
        try:
            self._circuit.call(outcome)
        except (_Failure, pybreaker.CircuitBreakerError):
            pass
        if self.is_open and not was_open:
            logger.warning("tool circuit open", extra={"tool": self._circuit.name})


class ToolExecutor:
    """Calls registered tools with per-attempt timeouts, retries and a breaker per tool.

    Use as `async with ToolExecutor(config) as tools:`, or call `shutdown()` at the end:
    it closes the HTTP session and the gRPC channels.

    Args:
        config: the registered tools.
        grpc_target: where gRPC tools are called (the mesh's Envoy); overrides the tools'
            own `target`.
        clock: the clock of `call`'s deadlines (seconds; monotonic, as the runtime's).
        sleep: waits between attempts.
        rng: draws the backoff jitter.

    Raises:
        ValueError: a gRPC tool has no target.
    """

    def __init__(
        self,
        config: ToolsConfig,
        *,
        grpc_target: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self._config = config
        self._specs = {spec.name: spec for spec in config.tools}
        self._breakers = {spec.name: _Breaker(spec) for spec in config.tools}
        self._targets = {
            spec.name: _grpc_target(spec, grpc_target)
            for spec in config.tools
            if isinstance(spec, GrpcToolSpec)
        }
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._session: aiohttp.ClientSession | None = None
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def __aenter__(self) -> ToolExecutor:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()

    async def shutdown(self) -> None:
        """Closes the HTTP session and the gRPC channels; calling it again does nothing."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()
        channels, self._channels = self._channels, {}
        for open_channel in channels.values():
            await open_channel.close()

    @property
    def names(self) -> frozenset[str]:
        """The registered tools' names."""
        return frozenset(self._specs)

    def validate(self, name: str) -> ToolSpec:
        """The tool called `name`, for checking a task's steps when it is submitted.

        Raises:
            NotFound: `TOOL_NOT_FOUND`.
        """
        spec = self._specs.get(name)
        if spec is None:
            raise NotFound(
                f"no tool named {name!r} is registered",
                reason="TOOL_NOT_FOUND",
                metadata={"tool": name},
            )
        return spec

    async def call(
        self,
        tool: str,
        arguments: Mapping[str, Any],
        *,
        tenant_id: str,
        idempotency_key: str,
        deadline: float | None = None,
    ) -> dict[str, Any]:
        """Calls a tool, retrying the failures another attempt may cure.

        Args:
            tool: the registered tool's name.
            arguments: the JSON object of the step's arguments.
            tenant_id: the task's tenant, sent to gRPC tools as `x-tenant-id`.
            idempotency_key: the same on every attempt (task id and step name), sent as
                the `Idempotency-Key` header or `idempotency-key` metadata.
            deadline: when the call must have ended, on the executor's clock; None for
                only the tool's own limits.

        Returns:
            For an HTTP tool `{"status": int, "body": parsed JSON or text}`; for a gRPC
            tool the response as proto JSON with the proto's field names.

        Raises:
            NotFound: `TOOL_NOT_FOUND`.
            InvalidArgument: `TOOL_ARGUMENTS_INVALID`, the arguments do not fit the gRPC
                request.
            SwitchboardError: `TOOL_REJECTED` (the tool refused the call: an HTTP 4xx or
                INVALID_ARGUMENT-like code) or `TOOL_FAILED` (it failed otherwise), of
                the kind matching the tool's status; metadata `tool`, `status`.
            Unavailable: `TOOL_CIRCUIT_OPEN`, or `TOOL_UNAVAILABLE` once no attempt is
                left (metadata `attempts`, `last_error`).
            DeadlineExceeded: the deadline passed before the tool answered.
        """
        spec = self.validate(tool)
        send = self._sender(spec, arguments, tenant_id, idempotency_key)
        breaker = self._breakers[tool]
        for attempt in range(1, spec.max_attempts + 1):
            try:
                timeout, by_deadline = self._attempt_timeout(spec, deadline)
                with breaker.guard():
                    return await _timed(send, timeout, by_deadline=by_deadline)
            except _Retryable as error:
                failure = error
            except _DeadlineReached:
                raise DeadlineExceeded(
                    f"the deadline passed before tool {tool!r} answered",
                    reason="DEADLINE_EXCEEDED",
                    metadata={"tool": tool, "attempts": str(attempt)},
                ) from None
            logger.warning(
                "tool attempt failed",
                extra={"tool": tool, "attempt": attempt, "error": str(failure)},
            )
            delay = None if breaker.is_open else self._retry_delay(spec, attempt, failure, deadline)
            if delay is None:
                break
            await self._sleep(delay)
        raise _exhausted(spec, attempt, failure, breaker)

    def _attempt_timeout(self, spec: ToolSpec, deadline: float | None) -> tuple[float, bool]:
        """The next attempt's time limit, and whether the deadline (not the tool) sets it."""
        limit = spec.timeout.total_seconds()
        if deadline is None:
            return limit, False
        remaining = deadline - self._clock()
        if remaining <= 0:
            raise _DeadlineReached
        return (remaining, True) if remaining < limit else (limit, False)

    def _retry_delay(
        self, spec: ToolSpec, attempt: int, failure: _Retryable, deadline: float | None
    ) -> float | None:
        """The wait before the next attempt; None when no attempt or no time is left.

        The tool's own Retry-After or RetryInfo when it gave one, else a full-jitter
        exponential backoff; either capped at `max_backoff`.
        """
        if attempt >= spec.max_attempts:
            return None
        cap = spec.max_backoff.total_seconds()
        if failure.retry_after is not None:
            delay = min(failure.retry_after, cap)
        else:
            ceiling = min(cap, spec.backoff.total_seconds() * 2 ** (attempt - 1))
            delay = self._rng.uniform(0, ceiling)
        if deadline is not None and self._clock() + delay >= deadline:
            return None
        return delay

    def _sender(
        self, spec: ToolSpec, arguments: Mapping[str, Any], tenant_id: str, key: str
    ) -> Callable[[float], Awaitable[dict[str, Any]]]:
        """One attempt of the call, given its timeout; checks what it can before any.

        Raises:
            PermissionDenied: `TOOL_HOST_NOT_ALLOWED`, the URL left the allowlist.
            InvalidArgument: `TOOL_ARGUMENTS_INVALID`.
        """
        if isinstance(spec, HttpToolSpec):
            if not self._config.allows(spec):
                raise PermissionDenied(
                    f"tool {spec.name!r}: host {spec.authority!r} is not in allowed_hosts",
                    reason="TOOL_HOST_NOT_ALLOWED",
                    metadata={"tool": spec.name},
                )
            return functools.partial(self._http, spec, arguments, key)
        assert isinstance(spec, GrpcToolSpec)
        request = _grpc_request(spec, arguments)
        return functools.partial(self._grpc, spec, request, tenant_id, key)

    async def _http(
        self, spec: HttpToolSpec, arguments: Mapping[str, Any], key: str, timeout: float
    ) -> dict[str, Any]:
        """One HTTP attempt; redirects are not followed (they could leave the allowlist)."""
        payload: dict[str, Any] = (
            {"json": arguments} if spec.method in ("POST", "PUT") else {"params": _query(arguments)}
        )
        try:
            async with self._http_session().request(
                spec.method,
                spec.url,
                headers={**dict(spec.headers), IDEMPOTENCY_HEADER: key},
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=timeout),
                **payload,
            ) as response:
                content = await _read_capped(spec, response)
        except TimeoutError:  # before ClientConnectionError: ServerTimeoutError is both
            raise
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as error:
            raise _Retryable(f"{type(error).__name__}: {error}") from None
        return _http_result(spec, response, content)

    def _http_session(self) -> aiohttp.ClientSession:
        """The shared session, opened on first use; no cookies are kept between tools."""
        if self._session is None:
            self._session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    async def _grpc(
        self, spec: GrpcToolSpec, request: Message, tenant_id: str, key: str, timeout: float
    ) -> dict[str, Any]:
        """One gRPC attempt through the mesh."""
        method = _grpc_method(spec.method)
        call = self._channel(spec).unary_unary(
            method.path,
            request_serializer=method.request.SerializeToString,
            response_deserializer=method.response.FromString,
        )
        metadata = ((TENANT_HEADER, tenant_id), (IDEMPOTENCY_METADATA, key))
        try:
            response = await call(request, timeout=timeout, metadata=metadata)
        except grpc.aio.AioRpcError as error:
            raise _grpc_failure(spec, error) from None
        return json_format.MessageToDict(response, preserving_proto_field_name=True)

    def _channel(self, spec: GrpcToolSpec) -> grpc.aio.Channel:
        target = self._targets[spec.name]
        if target not in self._channels:
            self._channels[target] = channel(target)
        return self._channels[target]


async def _timed(
    send: Callable[[float], Awaitable[dict[str, Any]]], timeout: float, *, by_deadline: bool
) -> dict[str, Any]:
    """Runs one attempt; its timeout is retryable, unless the call's deadline set it."""
    try:
        return await send(timeout)
    except TimeoutError:
        if by_deadline:
            raise _DeadlineReached from None
        raise _Retryable(f"no answer within {timeout:g}s") from None


def _grpc_target(spec: GrpcToolSpec, override: str | None) -> str:
    target = override or spec.target
    if not target:
        raise ValueError(f"tool {spec.name!r} has no gRPC target: set target or grpc_target")
    return target


def _exhausted(
    spec: ToolSpec, attempts: int, failure: _Retryable, breaker: _Breaker
) -> Unavailable:
    """The error of a call whose attempts all failed (or that the breaker stopped)."""
    if breaker.is_open:
        retry_after: timedelta | None = breaker.retry_after()
    elif failure.retry_after is not None:
        retry_after = timedelta(seconds=failure.retry_after)
    else:
        retry_after = None
    return Unavailable(
        f"tool {spec.name!r} failed after {attempts} attempt(s): {failure}",
        reason="TOOL_UNAVAILABLE",
        metadata={"tool": spec.name, "attempts": str(attempts), "last_error": str(failure)},
        retry_after=retry_after,
    )


def _query(arguments: Mapping[str, Any]) -> dict[str, str]:
    """Arguments as query parameters: strings as they are, anything else as JSON.

    Integral floats become integers: a Struct holds every number as a double.
    """
    params = {}
    for name, value in arguments.items():
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        params[name] = value if isinstance(value, str) else json.dumps(value)
    return params


async def _read_capped(spec: HttpToolSpec, response: aiohttp.ClientResponse) -> bytes:
    """The response body, refused past MAX_RESPONSE_BYTES."""
    chunks, size = [], 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise Internal(
                f"tool {spec.name!r} answered more than {MAX_RESPONSE_BYTES} bytes",
                reason="TOOL_FAILED",
                metadata={"tool": spec.name, "status": str(response.status)},
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _http_result(
    spec: HttpToolSpec, response: aiohttp.ClientResponse, content: bytes
) -> dict[str, Any]:
    """The call's result for a 2xx answer; a retryable or final failure for the rest."""
    body = _decode(response, content)
    status = response.status
    if 200 <= status < 300:
        return {"status": status, "body": body}
    if status in RETRYABLE_HTTP_STATUSES:
        raise _Retryable(
            f"HTTP {status}", retry_after=_retry_after(response.headers.get("Retry-After"))
        )
    rejected = 400 <= status < 500
    kind = _HTTP_REJECTIONS.get(status, InvalidArgument) if rejected else Internal
    raise kind(
        f"tool {spec.name!r} answered HTTP {status}: {str(body)[:200]}",
        reason="TOOL_REJECTED" if rejected else "TOOL_FAILED",
        metadata={"tool": spec.name, "status": str(status)},
    )


def _decode(response: aiohttp.ClientResponse, content: bytes) -> Any:
    """A JSON body parsed, any other body as text."""
    try:
        text = content.decode(response.charset or "utf-8", errors="replace")
    except LookupError:
        text = content.decode("utf-8", errors="replace")
    if response.content_type == "application/json" or response.content_type.endswith("+json"):
        with contextlib.suppress(ValueError):
            return json.loads(text)
    return text


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header; None for an HTTP date (backoff applies then)."""
    if value is None or not value.strip().isdigit():
        return None
    return float(value)


def _grpc_request(spec: GrpcToolSpec, arguments: Mapping[str, Any]) -> Message:
    """The request message built from the arguments (proto JSON).

    Raises:
        InvalidArgument: `TOOL_ARGUMENTS_INVALID`.
    """
    request_class = _grpc_method(spec.method).request
    try:
        return json_format.ParseDict(arguments, request_class())
    except json_format.ParseError as error:
        raise InvalidArgument(
            f"arguments of tool {spec.name!r} do not fit "
            f"{request_class.DESCRIPTOR.full_name}: {error}",
            reason="TOOL_ARGUMENTS_INVALID",
            metadata={"tool": spec.name},
        ) from None


def _grpc_failure(spec: GrpcToolSpec, error: grpc.aio.AioRpcError) -> Exception:
    """A failed gRPC attempt as a timeout, a retryable failure or a final error."""
    code = error.code()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return TimeoutError()
    details = error_details(error)
    retry_after = (
        details.retry_info.retry_delay.ToTimedelta().total_seconds() if details.retry_info else None
    )
    if code == grpc.StatusCode.UNAVAILABLE or (
        code == grpc.StatusCode.RESOURCE_EXHAUSTED and retry_after is not None
    ):
        return _Retryable(f"gRPC {code.name}: {details.message}", retry_after=retry_after)
    metadata = {"tool": spec.name, "status": code.name}
    if details.error_info is not None:
        metadata["tool_reason"] = details.error_info.reason
    kind = _GRPC_REJECTIONS.get(code, Internal)
    return kind(
        f"tool {spec.name!r} answered {code.name}: {details.message}",
        reason="TOOL_REJECTED" if code in _GRPC_REJECTIONS else "TOOL_FAILED",
        metadata=metadata,
    )
