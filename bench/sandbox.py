"""RunCode latency and rate: `print(1)` through Envoy, and the sandbox alone, same run.

Through Envoy: the ExecutionService RunCode RPC on the launcher's execution process,
which keeps `SANDBOX_POOL` sandboxes started ahead of time (its default). Sequential calls
give the latency; `CONCURRENCY` callers back to back give the rate. In process: the same
sandbox module called directly (a `SandboxPool` of the same size, and a cold `run()`
that starts its sandbox itself), so the share of gRPC and Envoy is visible. Rounds of
each alternate, so both see the same machine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from switchboard.execution.v1 import execution_pb2 as pb
from switchboard.execution.v1 import execution_service_pb2_grpc

from bench._common import (
    api_key_metadata,
    closed_loop,
    ms,
    percentile,
    print_table,
    rotated,
    running_mesh,
    write_result,
)
from services.execution.sandbox import RunRequest, SandboxLimits, SandboxPool
from services.execution.sandbox import run as cold_run

NAME = "sandbox"
CODE = "print(1)"
ROUNDS = 4
CALLS_PER_ROUND = 50
PACE_S = 0.15
"""Latency calls start this far apart: a rate the pool keeps up with (each run uses up
a sandbox, and starting one takes about 70 ms of a core)."""
CONCURRENCY = 4
RATE_SECONDS = 10.0
SANDBOX_POOL = 2
"""The execution service's default `SWITCHBOARD_EXECUTION_SANDBOX_POOL`."""
TENANT = "bench-sandbox"


async def _timed(call: Callable[[], Awaitable[None]], count: int) -> list[float]:
    """Latencies of `count` calls, one at a time, starting `PACE_S` apart."""
    latencies = []
    for _ in range(count):
        began = time.perf_counter()
        await call()
        latencies.append(time.perf_counter() - began)
        await asyncio.sleep(max(0.0, began + PACE_S - time.perf_counter()))
    return latencies


async def _measure(mesh: Any) -> tuple[dict[str, list[float]], float, float]:
    """Latencies of each way, runs per second through Envoy and in process."""
    metadata = api_key_metadata(mesh, TENANT)
    request = pb.RunCodeRequest(code=CODE)
    async with (
        grpc.aio.insecure_channel(mesh.envoy_address) as channel,
        SandboxPool(limits=SandboxLimits(), size=SANDBOX_POOL) as pool,
    ):
        stub = execution_service_pb2_grpc.ExecutionServiceStub(channel)

        async def envoy(_: int = 0) -> None:
            reply = await stub.RunCode(request, metadata=metadata, timeout=30)
            if reply.stdout != b"1\n" and reply.stdout != "1\n":
                raise RuntimeError(f"unexpected RunCode reply: {reply}")

        async def pooled(_: int = 0) -> None:
            result = await pool.run(RunRequest(code=CODE))
            if result.stdout not in (b"1\n", "1\n"):
                raise RuntimeError(f"unexpected sandbox result: {result}")

        async def cold() -> None:
            await cold_run(RunRequest(code=CODE))

        ways: dict[str, Callable[[], Awaitable[None]]] = {
            "envoy": envoy,
            "in_process_pool": pooled,
            "in_process_cold": cold,
        }
        await _timed(envoy, 5)
        latencies: dict[str, list[float]] = {way: [] for way in ways}
        for n in range(ROUNDS):
            for way in rotated(list(ways), n):
                latencies[way] += await _timed(ways[way], CALLS_PER_ROUND)
        await asyncio.sleep(0.5)
        through_envoy = await closed_loop(envoy, concurrency=CONCURRENCY, seconds=RATE_SECONDS)
        await asyncio.sleep(0.5)
        in_process = await closed_loop(pooled, concurrency=CONCURRENCY, seconds=RATE_SECONDS)
    return latencies, through_envoy.per_s, in_process.per_s


def run() -> dict:
    with running_mesh(triton_replicas=1) as mesh:
        latencies, envoy_rate, local_rate = asyncio.run(_measure(mesh))
    rows = [
        (way, len(values), *(f"{ms(percentile(values, q)):.1f}" for q in (50, 90, 99)))
        for way, values in latencies.items()
    ]
    print_table(f"{CODE} latency (ms), one at a time", ("way", "runs", "p50", "p90", "p99"), rows)
    print_table(
        f"runs per second, {CONCURRENCY} at once",
        ("way", "runs/s"),
        [("envoy", f"{envoy_rate:.1f}"), ("in_process_pool", f"{local_rate:.1f}")],
    )
    envoy, pooled, cold = (latencies[w] for w in ("envoy", "in_process_pool", "in_process_cold"))
    metrics = {
        "p50_ms": ms(percentile(envoy, 50)),
        "p99_ms": ms(percentile(envoy, 99)),
        "runs_per_s": envoy_rate,
        "sandbox_only_p50_ms": ms(percentile(pooled, 50)),
        "sandbox_only_p99_ms": ms(percentile(pooled, 99)),
        "sandbox_only_runs_per_s": local_rate,
        "cold_sandbox_p50_ms": ms(percentile(cold, 50)),
    }
    notes = (
        f"RunCode({CODE!r}) through Envoy to the execution service (a pool of "
        f"{SANDBOX_POOL} warm sandboxes, its default), {ROUNDS} x {CALLS_PER_ROUND} "
        f"calls one at a time, started {PACE_S * 1000:.0f} ms apart; runs_per_s: "
        f"{CONCURRENCY} callers back to back for {RATE_SECONDS:.0f}s. sandbox_only_*: the "
        "sandbox module called in the bench's "
        f"process, a SandboxPool of {SANDBOX_POOL}, same pattern, rounds alternating with "
        "Envoy's; cold_sandbox_p50_ms: run() starting its own sandbox. Every run is a "
        "fresh sandbox (namespaces, seccomp, rlimits), destroyed after it"
    )
    return write_result(NAME, metrics, {"p50_ms": "<= 50"}, notes)


if __name__ == "__main__":
    run()
