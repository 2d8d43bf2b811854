"""The tool executor: a call's attempts, each within its time limit, retried with
backoff, behind the tool's circuit breaker, all with the caller's idempotency key.

Only failures that mean "the tool could not answer" are retried and count against the
tool's circuit: connection errors, timeouts, HTTP 429/502/503/504, and gRPC
UNAVAILABLE, or RESOURCE_EXHAUSTED with RetryInfo. Any other answer (a 400,
INVALID_ARGUMENT...) is final. Every attempt carries the caller's idempotency key, so
a tool that honours it applies a side effect once however often it is retried.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta
from typing import Any

from services.execution.tools._attempts import Attempt, Retryable
from services.execution.tools._grpc import GrpcTools
from services.execution.tools._http import HttpTools
from services.execution.tools._registry import GrpcToolSpec, HttpToolSpec, ToolsConfig, ToolSpec
from services.runtime import (
    CircuitBreaker,
    CircuitOpenError,
    DeadlineExceeded,
    NotFound,
    RetriesExhausted,
    SwitchboardError,
    Unavailable,
)

logger = logging.getLogger(__name__)


class _DeadlineReached(Exception):
    """The call's deadline, not the tool's own timeout, ended an attempt."""


class ToolExecutor:
    """Calls registered tools with per-attempt timeouts, retries and a breaker per tool.

    Use as `async with ToolExecutor(config) as tools:`, or call `shutdown()` at the end:
    it closes the HTTP session and the gRPC channels.

    Args:
        config: the registered tools.
        grpc_target: where gRPC tools are called (the mesh's Envoy); overrides the tools'
            own `target`.
        clock: the clock of `call`'s deadlines and of the tools' circuits (seconds;
            monotonic, as the runtime's).
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
        self._specs = {spec.name: spec for spec in config.tools}
        self._breakers = {
            spec.name: CircuitBreaker(
                spec.name,
                fail_max=spec.breaker_fail_max,
                reset=spec.breaker_reset,
                probe_timeout=spec.timeout,
                clock=clock,
            )
            for spec in config.tools
        }
        self._http = HttpTools(config)
        self._grpc = GrpcTools(config, target=grpc_target)
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()

    async def __aenter__(self) -> ToolExecutor:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()

    async def shutdown(self) -> None:
        """Closes the HTTP session and the gRPC channels; calling it again does nothing."""
        await self._http.close()
        await self._grpc.close()

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
            PermissionDenied: `TOOL_HOST_NOT_ALLOWED`, the URL left the allowlist.
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
        send = self._prepare(spec, arguments, tenant_id, idempotency_key)
        breaker = self._breakers[tool]

        async def attempt(number: int) -> dict[str, Any]:
            try:
                timeout, by_deadline = self._attempt_timeout(spec, deadline)
                with breaker.guard(failures=Retryable, answers=SwitchboardError):
                    return await _timed(send, timeout, by_deadline=by_deadline)
            except CircuitOpenError as open_circuit:
                raise _circuit_open(spec, open_circuit.retry_after) from None
            except _DeadlineReached:
                raise DeadlineExceeded(
                    f"the deadline passed before tool {tool!r} answered",
                    reason="DEADLINE_EXCEEDED",
                    metadata={"tool": tool, "attempts": str(number)},
                ) from None
            except Retryable as failure:
                logger.warning(
                    "tool attempt failed",
                    extra={"tool": tool, "attempt": number, "error": str(failure)},
                )
                raise

        try:
            return await spec.retry.call(
                attempt,
                retry_on=Retryable,
                rng=self._rng,
                sleep=self._sleep,
                clock=self._clock,
                deadline=deadline,
                retry_after=lambda failure: failure.retry_after,
                give_up=lambda _: not breaker.is_closed,
            )
        except RetriesExhausted as exhausted:
            raise _exhausted(spec, exhausted, breaker) from None

    def _prepare(
        self, spec: ToolSpec, arguments: Mapping[str, Any], tenant_id: str, key: str
    ) -> Attempt:
        """The call's attempts; checks what it can before any."""
        if isinstance(spec, HttpToolSpec):
            return self._http.prepare(spec, arguments, key=key)
        assert isinstance(spec, GrpcToolSpec)
        return self._grpc.prepare(spec, arguments, tenant_id=tenant_id, key=key)

    def _attempt_timeout(self, spec: ToolSpec, deadline: float | None) -> tuple[float, bool]:
        """The next attempt's time limit, and whether the deadline (not the tool) sets it."""
        limit = spec.timeout.total_seconds()
        if deadline is None:
            return limit, False
        remaining = deadline - self._clock()
        if remaining <= 0:
            raise _DeadlineReached
        return (remaining, True) if remaining < limit else (limit, False)


async def _timed(send: Attempt, timeout: float, *, by_deadline: bool) -> dict[str, Any]:
    """Runs one attempt; its timeout is retryable, unless the call's deadline set it."""
    try:
        return await send(timeout)
    except TimeoutError:
        if by_deadline:
            raise _DeadlineReached from None
        raise Retryable(f"no answer within {timeout:g}s") from None


def _circuit_open(spec: ToolSpec, retry_after: timedelta) -> Unavailable:
    return Unavailable(
        f"tool {spec.name!r} is failing; its circuit is open",
        reason="TOOL_CIRCUIT_OPEN",
        metadata={"tool": spec.name},
        retry_after=retry_after,
    )


def _exhausted(spec: ToolSpec, exhausted: RetriesExhausted, breaker: CircuitBreaker) -> Unavailable:
    """The error of a call whose attempts all failed (or that the breaker stopped)."""
    failure = exhausted.last
    assert isinstance(failure, Retryable)
    if not breaker.is_closed:
        retry_after: timedelta | None = breaker.retry_after()
    elif failure.retry_after is not None:
        retry_after = timedelta(seconds=failure.retry_after)
    else:
        retry_after = None
    return Unavailable(
        f"tool {spec.name!r} failed after {exhausted.attempts} attempt(s): {failure}",
        reason="TOOL_UNAVAILABLE",
        metadata={
            "tool": spec.name,
            "attempts": str(exhausted.attempts),
            "last_error": str(failure),
        },
        retry_after=retry_after,
    )
