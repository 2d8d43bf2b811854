"""All Triton replicas down: UNAVAILABLE with RetryInfo, circuits open, recovery after.

It stops every Triton replica of the session's mesh; whatever happens, it leaves them
running again and every backend's circuit closed, so the tests after it (in any order)
find the mesh as it started.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from switchboard.inference.v1 import inference_pb2 as pb

from services.runtime import error_details
from tests.polling import eventually

REQUEST = pb.GenerateRequest(
    prompt="What does Envoy do?",
    context=[pb.Passage(source_id="e", text="Envoy routes gRPC calls. It is a proxy.")],
)
RESTORED_WITHIN_S = 90.0
"""Time for every restarted replica's circuit to close (each breaker probes after 5 s)."""


async def _generate(inference):
    return [r async for r in inference.Generate(REQUEST, timeout=10)]


async def _backend_states(inference) -> set[int]:
    models = await inference.ListModels(pb.ListModelsRequest(), timeout=5)
    return {b.state for m in models.models for b in m.backends}


async def _restore(mesh, inference) -> None:
    """Restarts the replicas not running (each waited for until ready), then calls until
    every backend's circuit has closed again."""
    running = {record.name for record, alive in mesh.status() if alive}
    for i in range(mesh.config.triton_replicas):
        if f"triton-{i}" not in running:
            await asyncio.to_thread(mesh.start_triton, i)

    async def all_closed() -> bool:
        # calls at once: while one backend is busy the balancer picks another, so a
        # half-open backend gets its probe
        calls = 2 * mesh.config.triton_replicas
        await asyncio.gather(
            *(inference.Embed(pb.EmbedRequest(texts=["probe"]), timeout=10) for _ in range(calls)),
            return_exceptions=True,
        )
        return await _backend_states(inference) == {pb.BACKEND_STATE_HEALTHY}

    await eventually(
        all_closed,
        timeout=RESTORED_WITHIN_S,
        interval=0.5,
        what="every Triton backend's circuit closed after the restart",
    )


@pytest.mark.timeout(300)  # two Triton restarts, then every circuit closing again
async def test_backends_down_then_back(mesh, inference):
    replicas = mesh.config.triton_replicas
    try:
        for i in range(replicas):
            assert await asyncio.to_thread(mesh.stop_component, f"triton-{i}")
        for _ in range(4):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _generate(inference)
            details = error_details(err.value)
            assert details.code == grpc.StatusCode.UNAVAILABLE
            assert details.error_info.reason == "BACKENDS_UNAVAILABLE"
            assert details.retry_info is not None
            assert details.retry_info.retry_delay.ToTimedelta().total_seconds() > 0
        assert await _backend_states(inference) == {pb.BACKEND_STATE_OPEN}, (
            "every circuit should be open"
        )
        # an open circuit fails fast, without waiting on a connection attempt
        started = time.perf_counter()
        with pytest.raises(grpc.aio.AioRpcError):
            await _generate(inference)
        assert time.perf_counter() - started < 1.0

        for i in range(replicas):
            await asyncio.to_thread(mesh.start_triton, i)
        replies: list[pb.GenerateResponse] = []

        async def recovered() -> bool:
            nonlocal replies
            try:
                replies = await _generate(inference)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE
                return False
            return True

        await eventually(
            recovered, timeout=60, interval=0.5, what="Generate recovered after Triton came back"
        )
        assert replies[-1].HasField("complete")
        assert pb.BACKEND_STATE_HEALTHY in await _backend_states(inference)
    finally:
        await _restore(mesh, inference)
