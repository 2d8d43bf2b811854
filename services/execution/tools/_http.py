"""HTTP tools: one attempt of a call over aiohttp, and what its answer means.

Connection errors and HTTP 429/502/503/504 are retryable (a Retry-After in seconds is
honoured); any other non-2xx answer is final: a 4xx is the tool refusing the call
(`TOOL_REJECTED`, of the kind matching the status), a 5xx its failure (`TOOL_FAILED`).
Redirects are not followed (they could leave the allowlist).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import Mapping
from typing import Any

import aiohttp

from services.execution.tools._attempts import Attempt, Retryable
from services.execution.tools._registry import HttpToolSpec, ToolsConfig
from services.runtime import (
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    SwitchboardError,
    Unauthenticated,
)

logger = logging.getLogger(__name__)

IDEMPOTENCY_HEADER = "Idempotency-Key"
RETRYABLE_HTTP_STATUSES = frozenset({429, 502, 503, 504})
MAX_RESPONSE_BYTES = 8 * 1024 * 1024
"""Largest HTTP response body a tool may return (the gRPC channels' message limit)."""

_HTTP_REJECTIONS: dict[int, type[SwitchboardError]] = {
    401: Unauthenticated,
    403: PermissionDenied,
    404: NotFound,
    409: FailedPrecondition,
    410: NotFound,
    412: FailedPrecondition,
}


class HttpTools:
    """Calls HTTP tools through one session, opened on first use (no cookies kept)."""

    def __init__(self, config: ToolsConfig) -> None:
        self._config = config
        self._session: aiohttp.ClientSession | None = None

    def prepare(self, spec: HttpToolSpec, arguments: Mapping[str, Any], *, key: str) -> Attempt:
        """The call's attempts, each sending the idempotency `key`.

        Raises:
            PermissionDenied: `TOOL_HOST_NOT_ALLOWED`, the URL left the allowlist.
        """
        if not self._config.allows(spec):
            raise PermissionDenied(
                f"tool {spec.name!r}: host {spec.authority!r} is not in allowed_hosts",
                reason="TOOL_HOST_NOT_ALLOWED",
                metadata={"tool": spec.name},
            )
        return functools.partial(self._attempt, spec, arguments, key)

    async def close(self) -> None:
        """Closes the session; calling it again does nothing."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def _attempt(
        self, spec: HttpToolSpec, arguments: Mapping[str, Any], key: str, timeout: float
    ) -> dict[str, Any]:
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
            raise Retryable(f"{type(error).__name__}: {error}") from None
        return _http_result(spec, response, content)

    def _http_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        return self._session


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
        raise Retryable(
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
