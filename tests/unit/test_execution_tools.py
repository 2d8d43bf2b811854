"""The tool registry and what the executor refuses before calling anything: no process,
no socket. (Calls to real loopback tools are in tests/system/test_execution_tools.py.)"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import pytest

from services.execution.tools import (
    GrpcToolSpec,
    HttpToolSpec,
    ToolExecutor,
    ToolsConfig,
    load_tools,
)
from services.runtime import DeadlineExceeded, InvalidArgument, NotFound, PermissionDenied

KEY = "task-7/fetch"
RETRIEVE = "switchboard.rag.v1.RagService/Retrieve"
NOWHERE = "127.0.0.1:9"
"""An address nothing here calls: each test is refused before any attempt."""


def http_config(**options: Any) -> ToolsConfig:
    definition = {"kind": "http", "url": f"http://{NOWHERE}/echo", **options}
    return load_tools({"allowed_hosts": [NOWHERE], "tools": {"t": definition}})


def grpc_config(**options: Any) -> ToolsConfig:
    return load_tools({"tools": {"t": {"kind": "grpc", "method": RETRIEVE, **options}}})


async def call(tools: ToolExecutor, arguments: dict[str, Any] | None = None, **options: Any):
    return await tools.call("t", arguments or {}, tenant_id="acme", idempotency_key=KEY, **options)


# --- configuration -------------------------------------------------------------------


def test_load_tools_reads_yaml(tmp_path):
    path = tmp_path / "tools.yaml"
    path.write_text(
        "allowed_hosts: [api.example.com]\n"
        "tools:\n"
        "  weather:\n"
        "    kind: http\n"
        "    url: https://API.example.com/v1/weather\n"
        "    method: GET\n"
        "    timeout: 250ms\n"
        "    max_backoff: 2\n"
        "    headers: {X-Api-Key: secret}\n"
        "  retrieve:\n"
        f"    kind: grpc\n    method: {RETRIEVE}\n    breaker_fail_max: 2\n"
    )
    config = load_tools(path)
    weather, retrieve = config.tools
    assert weather == HttpToolSpec(
        name="weather",
        url="https://API.example.com/v1/weather",
        method="GET",
        timeout=timedelta(milliseconds=250),
        max_backoff=timedelta(seconds=2),
        headers=(("X-Api-Key", "secret"),),
    )
    assert retrieve == GrpcToolSpec(name="retrieve", method=RETRIEVE, breaker_fail_max=2)
    assert config.allows(weather)


@pytest.mark.parametrize(
    "tool,message",
    [
        ({"kind": "http", "url": "http://evil.example.com/x"}, "not in allowed_hosts"),
        ({"kind": "http", "url": "http://127.0.0.1:9090/x"}, "not in allowed_hosts"),
        ({"kind": "http", "url": "http://api.example.com@evil.com/"}, "not in allowed_hosts"),
        ({"kind": "http", "url": "ftp://api.example.com/x"}, "not an http"),
        ({"kind": "http", "url": "http://api.example.com/", "method": "PATCH"}, "PATCH"),
        ({"kind": "http", "url": "http://api.example.com/", "timeuot": 1}, "unknown keys"),
        ({"kind": "http", "url": "http://api.example.com/", "max_attempts": 0}, "max_attempts"),
        ({"kind": "http", "url": "http://api.example.com/", "timeout": "soon"}, "duration"),
        ({"kind": "smtp"}, "unknown kind 'smtp'"),
        ({"url": "http://api.example.com/"}, "unknown kind None"),
        ({"kind": "grpc", "method": "RagService.Retrieve"}, "is not switchboard"),
        ({"kind": "grpc", "method": "switchboard.rag.v1.Nope/Retrieve"}, "unknown service"),
        ({"kind": "grpc", "method": "switchboard.rag.v1.RagService/Nope"}, "has no method"),
        ({"kind": "grpc", "method": "switchboard.nope.v1.S/M"}, "no generated code"),
        ({"kind": "grpc", "method": "switchboard.rag.v1.rag_pb2.S/M"}, "unknown service"),
        (
            {"kind": "grpc", "method": "switchboard.rag.v1.RagService/IngestDocuments"},
            "must be unary",
        ),
    ],
)
def test_bad_tool_definitions_are_refused_at_load(tool, message):
    config = {"allowed_hosts": ["api.example.com", "127.0.0.1:8080"], "tools": {"bad": tool}}
    with pytest.raises(ValueError, match=message) as error:
        load_tools(config)
    assert "tool 'bad'" in str(error.value)


def test_bad_top_level_is_refused():
    with pytest.raises(ValueError, match="unknown keys"):
        load_tools({"tool": {}})
    with pytest.raises(ValueError, match="allowed_hosts must be a list"):
        load_tools({"allowed_hosts": "api.example.com"})


def test_grpc_tool_needs_a_target():
    with pytest.raises(ValueError, match="no gRPC target"):
        ToolExecutor(grpc_config())


def test_a_tool_retry_policy_is_its_attempts_and_backoff():
    spec = HttpToolSpec(
        name="t",
        url="http://api.example.com/",
        max_attempts=4,
        backoff=timedelta(milliseconds=100),
        max_backoff=timedelta(seconds=1),
    )
    assert (spec.retry.max_attempts, spec.retry.ceiling(1), spec.retry.ceiling(5)) == (4, 0.1, 1)


# --- refused before any attempt ------------------------------------------------------


async def test_unknown_tool_is_not_found():
    async with ToolExecutor(http_config()) as tools:
        assert tools.names == {"t"}
        assert tools.validate("t").name == "t"
        with pytest.raises(NotFound) as error:
            await tools.call("nope", {}, tenant_id="acme", idempotency_key=KEY)
    assert error.value.reason == "TOOL_NOT_FOUND"
    assert error.value.metadata == {"tool": "nope"}


async def test_passed_deadline_calls_nothing():
    async with ToolExecutor(http_config()) as tools:
        with pytest.raises(DeadlineExceeded) as error:
            await call(tools, deadline=time.monotonic() - 1)
    assert error.value.metadata == {"tool": "t", "attempts": "1"}


async def test_allowlist_is_checked_again_at_call_time():
    config = http_config()
    object.__setattr__(config, "allowed_hosts", frozenset({"api.example.com"}))
    async with ToolExecutor(config) as tools:
        with pytest.raises(PermissionDenied) as error:
            await call(tools)
    assert error.value.reason == "TOOL_HOST_NOT_ALLOWED"


async def test_grpc_arguments_that_do_not_fit_are_refused_before_calling():
    async with ToolExecutor(grpc_config(target=NOWHERE)) as tools:
        with pytest.raises(InvalidArgument) as error:
            await call(tools, {"top_k": "many"})
    assert error.value.reason == "TOOL_ARGUMENTS_INVALID"
