"""The tool executor against real loopback tools: an aiohttp server and a gRPC RagService.
(The registry, and what is refused before any call, are in tests/unit/.)

Waits between attempts are recorded, not slept; the tools' circuits run on a fake clock."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import grpc
import pytest
from aiohttp import web
from switchboard.rag.v1 import rag_pb2, rag_service_pb2_grpc

from services.execution.tools import (
    MAX_RESPONSE_BYTES,
    ToolExecutor,
    ToolsConfig,
    load_tools,
)
from services.runtime import (
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    SwitchboardError,
    Unavailable,
)
from tests.fakes import Clock, Sleeps

KEY = "task-7/fetch"
RETRIEVE = "switchboard.rag.v1.RagService/Retrieve"


@dataclass
class Reply:
    """One scripted answer of the HTTP tool; the default echoes the request."""

    status: int = 200
    json: Any = None
    text: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


class HttpTool:
    """A loopback HTTP tool that answers from a script and, on `/ledger`, applies a side
    effect once per idempotency key (before answering, so a failed answer still applied it).
    """

    def __init__(self) -> None:
        self.port = 0
        self.script: list[Reply] = []
        self.requests: list[web.Request] = []
        self.bodies: list[Any] = []
        self.effects: dict[str, int] = {}
        self.released = asyncio.Event()

    def url(self, path: str = "/echo") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def keys(self) -> list[str | None]:
        return [r.headers.get("Idempotency-Key") for r in self.requests]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json() if request.can_read_body else None
        self.requests.append(request)
        self.bodies.append(body)
        key = request.headers.get("Idempotency-Key", "")
        if request.path == "/ledger":
            self.effects.setdefault(key, len(self.effects))
        reply = self.script.pop(0) if self.script else Reply()
        if reply.delay:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.released.wait(), reply.delay)
        if reply.text is not None:
            return web.Response(status=reply.status, text=reply.text, headers=reply.headers)
        echo = {"json": body, "query": dict(request.query), "effect": self.effects.get(key)}
        payload = reply.json if reply.json is not None else echo
        return web.json_response(payload, status=reply.status, headers=reply.headers)


class FakeRag(rag_service_pb2_grpc.RagServiceServicer):
    """RagService.Retrieve from a script: an error to abort with, seconds to stall, or None."""

    def __init__(self) -> None:
        self.port = 0
        self.script: list[SwitchboardError | float | None] = []
        self.calls: list[tuple[rag_pb2.RetrieveRequest, dict[str, str]]] = []

    async def Retrieve(self, request: Any, context: Any) -> rag_pb2.RetrieveResponse:  # noqa: N802
        self.calls.append((request, dict(context.invocation_metadata())))
        step = self.script.pop(0) if self.script else None
        if isinstance(step, SwitchboardError):
            await context.abort_with_status(step.to_grpc_status())
        if isinstance(step, float):
            await asyncio.sleep(step)
        chunk = rag_pb2.RetrievedChunk(chunk_id="c1", text=request.query, score=0.5)
        return rag_pb2.RetrieveResponse(chunks=[chunk])


@pytest.fixture
async def http_tool():
    tool = HttpTool()
    app = web.Application()
    app.router.add_route("*", "/{path:.*}", tool.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    tool.port = runner.addresses[0][1]
    yield tool
    tool.released.set()
    await runner.cleanup()


@pytest.fixture
async def rag():
    fake = FakeRag()
    server = grpc.aio.server()
    rag_service_pb2_grpc.add_RagServiceServicer_to_server(fake, server)
    fake.port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield fake
    await server.stop(None)


def http_config(tool: HttpTool, path: str = "/echo", **options: Any) -> ToolsConfig:
    definition = {"kind": "http", "url": tool.url(path), "backoff": 0.1, **options}
    return load_tools({"allowed_hosts": [f"127.0.0.1:{tool.port}"], "tools": {"t": definition}})


def grpc_config(**options: Any) -> ToolsConfig:
    return load_tools({"tools": {"t": {"kind": "grpc", "method": RETRIEVE, **options}}})


def executor(config: ToolsConfig, sleep: Sleeps | None = None, **options: Any) -> ToolExecutor:
    return ToolExecutor(config, sleep=sleep or Sleeps(), rng=random.Random(7), **options)


async def call(tools: ToolExecutor, arguments: dict[str, Any] | None = None, **options: Any):
    return await tools.call("t", arguments or {}, tenant_id="acme", idempotency_key=KEY, **options)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- HTTP tools ----------------------------------------------------------------------


async def test_http_post_sends_json_key_and_headers(http_tool):
    config = http_config(http_tool, headers={"X-Api-Key": "secret"})
    async with executor(config) as tools:
        result = await call(tools, {"city": "Oslo", "days": 3})
    assert result == {
        "status": 200,
        "body": {"json": {"city": "Oslo", "days": 3}, "query": {}, "effect": None},
    }
    (request,) = http_tool.requests
    assert request.method == "POST"
    assert request.headers["Idempotency-Key"] == KEY
    assert request.headers["X-Api-Key"] == "secret"


async def test_http_get_sends_arguments_as_query(http_tool):
    arguments = {"q": "rain", "days": 3.0, "exact": True, "tags": ["a", "b"]}
    async with executor(http_config(http_tool, method="GET")) as tools:
        result = await call(tools, arguments)
    assert result["body"]["query"] == {
        "q": "rain",
        "days": "3",
        "exact": "true",
        "tags": '["a", "b"]',
    }
    assert http_tool.requests[0].method == "GET"


async def test_http_text_body_is_returned_as_text(http_tool):
    http_tool.script = [Reply(status=201, text="created")]
    async with executor(http_config(http_tool, method="PUT")) as tools:
        assert await call(tools) == {"status": 201, "body": "created"}


async def test_http_503_is_retried_with_jittered_backoff(http_tool):
    http_tool.script = [Reply(status=503), Reply(status=503)]
    sleeps = Sleeps()
    async with executor(http_config(http_tool, max_backoff=1), sleeps) as tools:
        result = await call(tools, {"x": 1})
    assert result["status"] == 200
    assert len(http_tool.requests) == 3
    assert http_tool.keys == [KEY] * 3
    expected = random.Random(7)
    assert sleeps.delays == [expected.uniform(0, 0.1), expected.uniform(0, 0.2)]


async def test_exhausted_attempts_raise_tool_unavailable_within_jitter_bounds(http_tool):
    http_tool.script = [Reply(status=502)] * 6
    sleeps = Sleeps()
    config = http_config(http_tool, max_attempts=6, max_backoff=0.3, breaker_fail_max=10)
    async with executor(config, sleeps) as tools:
        with pytest.raises(Unavailable) as error:
            await call(tools)
    assert error.value.reason == "TOOL_UNAVAILABLE"
    assert error.value.metadata == {"tool": "t", "attempts": "6", "last_error": "HTTP 502"}
    assert len(http_tool.requests) == 6
    caps = [0.1, 0.2, 0.3, 0.3, 0.3]
    assert all(0 <= d <= cap for d, cap in zip(sleeps.delays, caps, strict=True))
    expected = random.Random(7)
    assert sleeps.delays == [expected.uniform(0, cap) for cap in caps]


@pytest.mark.parametrize(
    "status,kind,reason",
    [
        (400, InvalidArgument, "TOOL_REJECTED"),
        (404, NotFound, "TOOL_REJECTED"),
        (403, PermissionDenied, "TOOL_REJECTED"),
        (500, Internal, "TOOL_FAILED"),
    ],
)
async def test_final_http_statuses_are_not_retried(http_tool, status, kind, reason):
    http_tool.script = [Reply(status=status, text="no such city")]
    sleeps = Sleeps()
    async with executor(http_config(http_tool), sleeps) as tools:
        with pytest.raises(kind) as error:
            await call(tools)
    assert error.value.reason == reason
    assert error.value.metadata == {"tool": "t", "status": str(status)}
    assert "no such city" in error.value.message
    assert len(http_tool.requests) == 1
    assert sleeps.delays == []


async def test_redirects_are_not_followed(http_tool):
    http_tool.script = [Reply(status=302, headers={"Location": "http://example.com/"})]
    async with executor(http_config(http_tool)) as tools:
        with pytest.raises(Internal) as error:
            await call(tools)
    assert error.value.reason == "TOOL_FAILED"
    assert len(http_tool.requests) == 1


async def test_oversized_response_is_refused(http_tool):
    http_tool.script = [Reply(text="x" * (MAX_RESPONSE_BYTES + 1))]
    async with executor(http_config(http_tool)) as tools:
        with pytest.raises(Internal, match="more than"):
            await call(tools)
    assert len(http_tool.requests) == 1


@pytest.mark.parametrize("retry_after,waited", [("2", 2.0), ("120", 5.0)])
async def test_retry_after_is_honoured_up_to_max_backoff(http_tool, retry_after, waited):
    http_tool.script = [Reply(status=429, headers={"Retry-After": retry_after})]
    sleeps = Sleeps()
    async with executor(http_config(http_tool, max_backoff=5), sleeps) as tools:
        assert (await call(tools))["status"] == 200
    assert sleeps.delays == [waited]


async def test_slow_attempt_times_out_and_is_retried(http_tool):
    http_tool.script = [Reply(delay=5)]
    async with executor(http_config(http_tool, timeout=0.2)) as tools:
        started = time.monotonic()
        assert (await call(tools))["status"] == 200
    assert time.monotonic() - started < 2
    assert len(http_tool.requests) == 2


async def test_deadline_shorter_than_the_timeout_ends_the_call(http_tool):
    http_tool.script = [Reply(delay=5)]
    async with executor(http_config(http_tool, timeout=5, breaker_fail_max=1)) as tools:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded) as error:
            await call(tools, deadline=started + 0.3)
        assert 0.25 < time.monotonic() - started < 2
        assert error.value.metadata == {"tool": "t", "attempts": "1"}
        # The caller's deadline says nothing about the tool: its circuit stays closed.
        assert (await call(tools))["status"] == 200
    assert len(http_tool.requests) == 2


async def test_no_retry_when_the_wait_would_pass_the_deadline(http_tool):
    http_tool.script = [Reply(status=503, headers={"Retry-After": "3"})]
    sleeps = Sleeps()
    async with executor(http_config(http_tool, max_backoff=5), sleeps) as tools:
        with pytest.raises(Unavailable) as error:
            await call(tools, deadline=time.monotonic() + 1)
    assert error.value.metadata["attempts"] == "1"
    assert error.value.retry_after == timedelta(seconds=3)
    assert sleeps.delays == []


async def test_idempotency_key_makes_a_retried_side_effect_apply_once(http_tool):
    # The ledger applies the effect, then the answer is lost twice.
    http_tool.script = [Reply(status=503), Reply(status=502)]
    async with executor(http_config(http_tool, "/ledger")) as tools:
        first = await call(tools, {"amount": 10})
        other = await tools.call("t", {}, tenant_id="acme", idempotency_key="task-7/other")
    assert http_tool.keys == [KEY, KEY, KEY, "task-7/other"]
    assert first["body"]["effect"] == 0
    assert other["body"]["effect"] == 1
    assert http_tool.effects == {KEY: 0, "task-7/other": 1}


async def test_connection_refused_is_retried_then_unavailable():
    port = free_port()
    config = load_tools(
        {
            "allowed_hosts": [f"127.0.0.1:{port}"],
            "tools": {"t": {"kind": "http", "url": f"http://127.0.0.1:{port}/"}},
        }
    )
    sleeps = Sleeps()
    async with executor(config, sleeps) as tools:
        with pytest.raises(Unavailable) as error:
            await call(tools)
    assert error.value.metadata["attempts"] == "3"
    assert "Connect" in error.value.metadata["last_error"]
    assert len(sleeps.delays) == 2


# --- circuit breaker -----------------------------------------------------------------


async def test_breaker_opens_fails_fast_and_half_opens_after_reset(http_tool):
    http_tool.script = [Reply(status=503), Reply(status=503), Reply(status=503)]
    config = http_config(http_tool, max_attempts=1, breaker_fail_max=2, breaker_reset=0.3)
    clock = Clock()
    async with executor(config, clock=clock) as tools:
        for _ in range(2):
            with pytest.raises(Unavailable, match="after 1 attempt"):
                await call(tools)
        with pytest.raises(Unavailable) as error:
            await call(tools)
        assert error.value.reason == "TOOL_CIRCUIT_OPEN"
        assert timedelta(0) < error.value.retry_after <= timedelta(seconds=0.3)
        assert len(http_tool.requests) == 2

        clock.advance(0.35)  # half-open: one probe, which fails and re-opens
        with pytest.raises(Unavailable, match="after 1 attempt"):
            await call(tools)
        with pytest.raises(Unavailable, match="circuit is open"):
            await call(tools)
        assert len(http_tool.requests) == 3

        clock.advance(0.35)  # the next probe succeeds and closes the circuit
        assert (await call(tools))["status"] == 200
        assert (await call(tools))["status"] == 200
    assert len(http_tool.requests) == 5


async def test_half_open_circuit_lets_one_probe_through(http_tool):
    http_tool.script = [Reply(status=503), Reply(delay=0.3)]
    config = http_config(http_tool, max_attempts=1, breaker_fail_max=1, breaker_reset=0.2)
    clock = Clock()
    async with executor(config, clock=clock) as tools:
        with pytest.raises(Unavailable):
            await call(tools)
        clock.advance(0.25)
        probe, other = await asyncio.gather(call(tools), call(tools), return_exceptions=True)
    assert probe["status"] == 200
    assert isinstance(other, Unavailable) and other.reason == "TOOL_CIRCUIT_OPEN"
    assert other.retry_after == timedelta(seconds=10)  # the probe's longest run
    assert len(http_tool.requests) == 2


async def test_breaker_ends_the_retries_of_a_call_once_open(http_tool):
    http_tool.script = [Reply(status=503)] * 5
    sleeps = Sleeps()
    config = http_config(http_tool, max_attempts=5, breaker_fail_max=2, breaker_reset=30)
    async with executor(config, sleeps) as tools:
        with pytest.raises(Unavailable) as error:
            await call(tools)
    assert error.value.reason == "TOOL_UNAVAILABLE"
    assert error.value.metadata["attempts"] == "2"
    assert timedelta(seconds=29) < error.value.retry_after <= timedelta(seconds=30)
    assert len(sleeps.delays) == 1


async def test_refusals_do_not_count_against_the_breaker(http_tool):
    http_tool.script = [Reply(status=400), Reply(status=422)]
    async with executor(http_config(http_tool, breaker_fail_max=1)) as tools:
        for _ in range(2):
            with pytest.raises(InvalidArgument):
                await call(tools)
        assert (await call(tools))["status"] == 200


# --- gRPC tools ----------------------------------------------------------------------


async def test_grpc_call_builds_the_request_and_returns_proto_json(rag):
    # The executor's target (the mesh's address) overrides the tool's own.
    config = grpc_config(target="127.0.0.1:1")
    async with executor(config, grpc_target=f"127.0.0.1:{rag.port}") as tools:
        result = await call(tools, {"collection": "docs", "query": "hello", "top_k": 3.0})
    assert result == {"chunks": [{"chunk_id": "c1", "text": "hello", "score": 0.5}]}
    ((request, metadata),) = rag.calls
    assert (request.collection, request.query, request.top_k) == ("docs", "hello", 3)
    assert metadata["x-tenant-id"] == "acme"
    assert metadata["idempotency-key"] == KEY


async def test_grpc_unavailable_is_retried_with_the_same_key(rag):
    rag.script = [
        Unavailable("warming up", reason="DEPENDENCY_UNAVAILABLE"),
        Unavailable("warming up", reason="DEPENDENCY_UNAVAILABLE"),
    ]
    sleeps = Sleeps()
    async with executor(grpc_config(target=f"127.0.0.1:{rag.port}"), sleeps) as tools:
        result = await call(tools, {"query": "q"})
    assert result["chunks"][0]["text"] == "q"
    assert [metadata["idempotency-key"] for _, metadata in rag.calls] == [KEY] * 3
    assert len(sleeps.delays) == 2


async def test_grpc_invalid_argument_is_relayed_at_once(rag):
    rag.script = [InvalidArgument("top_k must be positive")]
    async with executor(grpc_config(target=f"127.0.0.1:{rag.port}")) as tools:
        with pytest.raises(InvalidArgument) as error:
            await call(tools)
    assert error.value.reason == "TOOL_REJECTED"
    assert error.value.metadata == {
        "tool": "t",
        "status": "INVALID_ARGUMENT",
        "tool_reason": "INVALID_REQUEST",
    }
    assert "top_k must be positive" in error.value.message
    assert len(rag.calls) == 1


async def test_grpc_resource_exhausted_is_retried_only_with_retry_info(rag):
    rag.script = [
        ResourceExhausted(
            "busy", reason="QUOTA_EXCEEDED", retry_after=timedelta(milliseconds=1500)
        ),
        ResourceExhausted("quota spent", reason="QUOTA_EXCEEDED"),
    ]
    sleeps = Sleeps()
    async with executor(grpc_config(target=f"127.0.0.1:{rag.port}"), sleeps) as tools:
        with pytest.raises(ResourceExhausted) as error:
            await call(tools)
    assert error.value.reason == "TOOL_REJECTED"
    assert sleeps.delays == [1.5]
    assert len(rag.calls) == 2


async def test_grpc_attempt_timeout_is_retried(rag):
    rag.script = [2.0]
    async with executor(grpc_config(target=f"127.0.0.1:{rag.port}", timeout=0.2)) as tools:
        started = time.monotonic()
        assert "chunks" in await call(tools)
    assert time.monotonic() - started < 1.5
    assert len(rag.calls) == 2
