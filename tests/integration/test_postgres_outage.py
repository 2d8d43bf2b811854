"""PostgreSQL stopped under the running mesh, then started again.

While it is down: calls that need it fail with UNAVAILABLE `DEPENDENCY_UNAVAILABLE` and
RetryInfo before their deadline (never DEADLINE_EXCEEDED, never INTERNAL); calls that do
not need it keep working for tenant keys (Envoy checks their signature alone) and for
keys the auth service verified before the outage; a key only the key store can check,
never verified, is refused (fail closed). Once it is back, every service reconnects by
itself.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from switchboard.chat.v1 import chat_pb2, chat_service_pb2_grpc
from switchboard.execution.v1 import execution_pb2, execution_service_pb2_grpc
from switchboard.inference.v1 import inference_pb2, inference_service_pb2_grpc
from switchboard.rag.v1 import rag_pb2, rag_service_pb2_grpc
from switchboard.rag.v1.rag_service_pb2 import DESCRIPTOR as RAG_DESCRIPTOR

from services.runtime import error_details
from tests.integration.conftest import AUTH_CACHE_TTL, as_tenant
from tests.polling import eventually

DEADLINE_S = 3.0


@pytest.fixture
async def stubs(envoy_target):
    async with grpc.aio.insecure_channel(envoy_target) as channel:
        yield (
            chat_service_pb2_grpc.ChatServiceStub(channel),
            rag_service_pb2_grpc.RagServiceStub(channel),
            execution_service_pb2_grpc.ExecutionServiceStub(channel),
            inference_service_pb2_grpc.InferenceServiceStub(channel),
        )


def database_calls(stubs, metadata):
    """One call per PostgreSQL-backed service reached through the edge."""
    chat, rag, execution, _ = stubs
    return {
        "chat": lambda: chat.ListSessions(
            chat_pb2.ListSessionsRequest(page_size=1), metadata=metadata, timeout=DEADLINE_S
        ),
        "rag": lambda: rag.ListCollections(
            rag_pb2.ListCollectionsRequest(page_size=1), metadata=metadata, timeout=DEADLINE_S
        ),
        "execution": lambda: execution.ListTasks(
            execution_pb2.ListTasksRequest(page_size=1), metadata=metadata, timeout=DEADLINE_S
        ),
    }


RAG_SERVICE = RAG_DESCRIPTOR.services_by_name["RagService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def rag_health(envoy_target: str, expected: int) -> bool:
    """Whether `grpc.health.v1` Check of RagService through Envoy answers `expected`
    (never NOT_FOUND: the check reaches a replica of the service it names)."""
    async with grpc.aio.insecure_channel(envoy_target) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=RAG_SERVICE), timeout=DEADLINE_S
        )
    return reply.status == expected


async def test_a_postgres_outage_fails_fast_keeps_known_keys_and_heals(
    mesh, stubs, credentials, envoy_target
):
    tenant = f"outage-{uuid.uuid4().hex[:8]}"
    known = as_tenant(tenant)
    # never used before the outage: a tenant's key (Envoy checks it alone) and a key of
    # the older form (only the auth service can check it, and its key store is down)
    stranger = credentials.metadata(f"stranger-{uuid.uuid4().hex[:8]}")
    async with mesh.key_store(signed=False) as store:
        _, older = await store.create(f"older-{uuid.uuid4().hex[:8]}", "outage test")
    unverifiable = (("authorization", f"Bearer {older}"),)
    inference = stubs[3]
    calls = database_calls(stubs, known)
    for call in calls.values():
        await call()  # the edge has verified the key; every service answers
    await asyncio.to_thread(mesh.stop_component, "postgres")
    try:
        for name, call in calls.items():
            for _ in range(2):  # the first call finds the database down, the next fails fast
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await call()
                assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, name
                details = error_details(failed.value)
                assert details.error_info.reason == "DEPENDENCY_UNAVAILABLE", name
                assert details.retry_info is not None, name
        # a health check of a service that needs the database says so, through Envoy
        await eventually(
            lambda: rag_health(envoy_target, NOT_SERVING),
            timeout=10,
            what="RagService NOT_SERVING through Envoy",
        )

        # the edge's cache of the known key has expired: it answers from the stale grace
        outage_started = time.monotonic()
        while time.monotonic() - outage_started < 2 * AUTH_CACHE_TTL.total_seconds():
            listed = await inference.ListModels(
                inference_pb2.ListModelsRequest(), metadata=known, timeout=DEADLINE_S
            )
            assert listed.models
        # a tenant key never seen: Envoy checks its signature, no database needed
        listed = await inference.ListModels(
            inference_pb2.ListModelsRequest(), metadata=stranger, timeout=DEADLINE_S
        )
        assert listed.models
        # a key only the key store could check: refused, the edge fails closed
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await inference.ListModels(
                inference_pb2.ListModelsRequest(), metadata=unverifiable, timeout=DEADLINE_S
            )
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await asyncio.to_thread(mesh.start_postgres)

    async def verify_stranger() -> None:
        # a key only the key store can check: the auth service's store is back too
        await inference.ListModels(
            inference_pb2.ListModelsRequest(), metadata=unverifiable, timeout=DEADLINE_S
        )

    async def healed() -> bool:
        for call in (*calls.values(), verify_stranger):
            try:
                await call()
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE
                return False
        return True

    took = await eventually(healed, timeout=30, interval=0.2, what="every service reconnects")
    await eventually(
        lambda: rag_health(envoy_target, SERVING), timeout=10, what="RagService SERVING again"
    )
    print(f"recovered {took:.1f} s after PostgreSQL accepted connections again")
    # a pool idle through the outage (this process's key store) hands out live
    # connections at once: the dead ones it held are checked and dropped
    assert credentials.key(f"after-{uuid.uuid4().hex[:8]}").startswith("eyJ")
