"""Session fixtures: the real mesh, started through the launcher users run, and API keys
for the tenants the tests act as (the public Envoy listener refuses calls without one)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Coroutine, Iterator
from datetime import timedelta
from typing import Any, TypeVar

import grpc
import pytest
from switchboard.inference.v1 import inference_service_pb2_grpc

from services.auth import keys
from services.launcher import Mesh, isolated_config

T = TypeVar("T")

DEFAULT_TENANT = "tests"
"""The tenant of calls that name none of their own (the `inference` fixture's)."""
OPERATOR = ""
"""The slot of the session's operator credential among the tenants' keys."""
AUTH_CACHE_TTL = timedelta(seconds=2)
"""The auth service's key cache in the test mesh: a revoked key stops working this soon."""
WEB_ORIGIN = "http://allowed.example"
"""A browser origin the test mesh lets call the public port with gRPC-Web (CORS)."""


@pytest.fixture(scope="session")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    config = isolated_config(tmp_path_factory.mktemp("run"))
    config = dataclasses.replace(config, auth_cache_ttl=AUTH_CACHE_TTL, web_origins=WEB_ORIGIN)
    mesh = Mesh(config, progress=print)
    try:
        mesh.up()
        yield mesh
    finally:
        mesh.down()


@pytest.fixture(scope="session")
def envoy_target(mesh: Mesh) -> str:
    return mesh.envoy_address


class Credentials:
    """One API key per tenant, created on first use through the `KeyStore` that
    `switchboard keys create` uses, and kept for the session.

    The methods are plain functions, callable inside async tests: the store runs on its
    own event loop in a background thread.
    """

    def __init__(self, mesh: Mesh) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="api-keys", daemon=True)
        self._thread.start()
        self._store = mesh.key_store()
        self._tokens: dict[str, str] = {}
        self._lock = threading.Lock()
        try:
            self._run(self._store.open())
        except BaseException:
            self._stop_loop()
            raise

    def key(self, tenant: str) -> str:
        """The tenant's key (a token the mesh's signing key signed)."""
        with self._lock:
            if tenant not in self._tokens:
                _, self._tokens[tenant] = self._run(self._store.create(tenant, "tests"))
            return self._tokens[tenant]

    def metadata(self, tenant: str) -> tuple[tuple[str, str], ...]:
        """Call metadata acting as `tenant` through Envoy: its key as a bearer token."""
        return (("authorization", f"Bearer {self.key(tenant)}"),)

    def operator(self) -> tuple[tuple[str, str], ...]:
        """Call metadata of an operator through Envoy: an operator credential, created
        on first use as `switchboard keys create --operator` does."""
        with self._lock:
            if OPERATOR not in self._tokens:
                _, self._tokens[OPERATOR] = self._run(self._store.create_operator("tests"))
            return (("authorization", f"Bearer {self._tokens[OPERATOR]}"),)

    def interceptors(self, tenant: str) -> list[grpc.aio.ClientInterceptor]:
        """For `grpc.aio.insecure_channel(..., interceptors=...)`: every call on the
        channel carries the tenant's key unless it sends a key of its own."""
        return _api_key_interceptors(self.key(tenant))

    def revoke(self, tenant: str) -> None:
        """Revokes the tenant's key (the next `key` call makes a new one)."""
        with self._lock:
            key_id, _ = keys.parse(self._tokens.pop(tenant)) or ("", "")
        assert self._run(self._store.revoke(key_id))

    def close(self) -> None:
        try:
            self._run(self._store.close())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)


_active: Credentials | None = None


@pytest.fixture(scope="session", autouse=True)
def credentials(mesh: Mesh) -> Iterator[Credentials]:
    global _active
    keys = _active = Credentials(mesh)
    try:
        yield keys
    finally:
        _active = None
        keys.close()


def as_tenant(tenant: str) -> tuple[tuple[str, str], ...]:
    """Metadata of a call through Envoy as `tenant`: its API key (`credentials`)."""
    assert _active is not None, "needs the session's `credentials` fixture"
    return _active.metadata(tenant)


def as_operator(tenant: str = "") -> tuple[tuple[str, str], ...]:
    """Metadata of a call through Envoy as an operator (`credentials`), acting on
    `tenant` when given (its `x-tenant-id`, which routes calls on a tenant's live state)."""
    assert _active is not None, "needs the session's `credentials` fixture"
    return _active.operator() + ((("x-tenant-id", tenant),) if tenant else ())


@pytest.fixture
async def inference(envoy_target: str, credentials: Credentials):
    """The generated Python client, through Envoy, as DEFAULT_TENANT (a call may send
    another tenant's key in its metadata)."""
    interceptors = credentials.interceptors(DEFAULT_TENANT)
    async with grpc.aio.insecure_channel(envoy_target, interceptors=interceptors) as channel:
        yield inference_service_pb2_grpc.InferenceServiceStub(channel)


def _api_key_interceptors(key: str) -> list[grpc.aio.ClientInterceptor]:
    header = ("authorization", f"Bearer {key}")

    def details(call: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = list(call.metadata or ())
        if not any(k == "authorization" for k, _ in metadata):
            metadata.append(header)
        return grpc.aio.ClientCallDetails(
            method=call.method,
            timeout=call.timeout,
            metadata=grpc.aio.Metadata(*metadata),
            credentials=call.credentials,
            wait_for_ready=call.wait_for_ready,
        )

    class UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation, call, request):
            return await continuation(details(call), request)

    class UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
        async def intercept_unary_stream(self, continuation, call, request):
            return await continuation(details(call), request)

    class StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
        async def intercept_stream_unary(self, continuation, call, requests):
            return await continuation(details(call), requests)

    class StreamStream(grpc.aio.StreamStreamClientInterceptor):
        async def intercept_stream_stream(self, continuation, call, requests):
            return await continuation(details(call), requests)

    return [UnaryUnary(), UnaryStream(), StreamUnary(), StreamStream()]
