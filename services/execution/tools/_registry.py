"""The tool registry: the tools a task may call, read from YAML and checked at load.

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

Durations are seconds or strings such as `250ms` or `5s`. A gRPC tool's method must be
a unary method of a Switchboard service (found in the generated code); an HTTP tool's
URL must name a host in `allowed_hosts`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from services.execution.tools._methods import grpc_method
from services.runtime import RetryPolicy, parse_duration

logger = logging.getLogger(__name__)

HTTP_METHODS = ("GET", "POST", "PUT", "DELETE")
_DURATION_KEYS = frozenset({"timeout", "backoff", "max_backoff", "breaker_reset"})


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

    @property
    def retry(self) -> RetryPolicy:
        """The tool's attempts and backoff."""
        return RetryPolicy(
            max_attempts=self.max_attempts, backoff=self.backoff, max_backoff=self.max_backoff
        )


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
        grpc_method(self.method)


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
