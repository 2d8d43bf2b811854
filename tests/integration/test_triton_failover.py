"""All Triton replicas down: UNAVAILABLE with RetryInfo, circuits open, recovery after.

Runs last in the session (file order): it stops and restarts the Triton replicas.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from switchboard.inference.v1 import inference_pb2 as pb

from services.runtime import error_details

REQUEST = pb.GenerateRequest(
    prompt="What does Envoy do?",
    context=[pb.Passage(source_id="e", text="Envoy routes gRPC calls. It is a proxy.")],
)


async def _generate(inference):
    return [r async for r in inference.Generate(REQUEST, timeout=10)]


async def test_backends_down_then_back(mesh, inference):
    replicas = mesh.config.triton_replicas
    for i in range(replicas):
        assert mesh.stop_component(f"triton-{i}")
    try:
        for _ in range(4):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _generate(inference)
            details = error_details(err.value)
            assert details.code == grpc.StatusCode.UNAVAILABLE
            assert details.error_info.reason == "BACKENDS_UNAVAILABLE"
            assert details.retry_info is not None
            assert details.retry_info.retry_delay.ToTimedelta().total_seconds() > 0
        models = await inference.ListModels(pb.ListModelsRequest(), timeout=5)
        states = {b.state for m in models.models for b in m.backends}
        assert states == {pb.BACKEND_STATE_OPEN}, "every circuit should be open"
        # an open circuit fails fast, without waiting on a connection attempt
        started = time.perf_counter()
        with pytest.raises(grpc.aio.AioRpcError):
            await _generate(inference)
        assert time.perf_counter() - started < 1.0
    finally:
        for i in range(replicas):
            mesh.start_triton(i)
    deadline = time.monotonic() + 60
    while True:
        try:
            replies = await _generate(inference)
            break
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() < deadline, "did not recover after Triton came back"
            await asyncio.sleep(0.5)
    assert replies[-1].HasField("complete")
    models = await inference.ListModels(pb.ListModelsRequest(), timeout=5)
    assert any(b.state == pb.BACKEND_STATE_HEALTHY for m in models.models for b in m.backends)
