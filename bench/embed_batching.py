"""Dynamic batching: `Embed` throughput with Triton's dynamic batching on vs off.

64 clients keep one single-text request each in flight against Triton's gRPC API, on the
`embedder` model (dynamic batching) and on `embedder_unbatched` (the same model, batching
off), in alternating rounds of the same run. A third arm sends the same load through the
mesh (Envoy -> InferenceService.Embed -> the router -> `embedder`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import grpc
from switchboard.inference.v1 import inference_pb2, inference_service_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from bench._common import (
    Window,
    api_key_metadata,
    closed_loop,
    ms,
    percentile,
    print_table,
    rotated,
    running_mesh,
    write_result,
)
from services.inference.triton import encode_bytes

NAME = "embed-batching"
TENANT = "bench"
"""The mesh arm's tenant (its API key goes with every call through Envoy)."""
CONCURRENCY = 64
WARMUP_S = 2.0
ROUND_S = 3.0
ROUNDS = 4
"""Rounds per arm; the arms take turns, the first arm changing each round."""
BUDGET_S = 90.0
"""No round starts after this long (calls still in flight when a window closes are
awaited, which takes long when the server is slow)."""

_SUBJECTS = ("Triton", "Envoy", "The router", "The embedder", "A client", "The mesh", "NATS")
_VERBS = ("batches", "routes", "answers", "streams", "balances", "retries", "embeds")
_OBJECTS = ("concurrent requests", "gRPC calls", "short texts", "every token", "the replicas")

TEXTS = [
    f"{s} {v} {o} within a few milliseconds, request {i}."
    for i, (s, v, o) in enumerate((s, v, o) for s in _SUBJECTS for v in _VERBS for o in _OBJECTS)
]
"""Single short sentences (about 15 tokens each), all different."""


def triton_embed_request(model: str, text: str) -> service_pb2.ModelInferRequest:
    """One text as a [1, 1] BYTES tensor, asking for EMBEDDING only (as the router does)."""
    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[1, 1])
    request.raw_input_contents.append(encode_bytes([text.encode()]))
    request.outputs.add(name="EMBEDDING")
    return request


Call = Callable[[int], Awaitable[object]]


def _direct(stub: service_pb2_grpc.GRPCInferenceServiceStub, model: str) -> Call:
    requests = [triton_embed_request(model, text) for text in TEXTS]

    def call(i: int) -> Awaitable[object]:
        return stub.ModelInfer(requests[i % len(requests)], timeout=60)

    return call


def _mesh(
    stub: inference_service_pb2_grpc.InferenceServiceStub, metadata: tuple[tuple[str, str], ...]
) -> Call:
    requests = [inference_pb2.EmbedRequest(texts=[text]) for text in TEXTS]

    def call(i: int) -> Awaitable[object]:
        return stub.Embed(requests[i % len(requests)], metadata=metadata, timeout=60)

    return call


def _check_drained(arm: str, window: Window) -> None:
    if window.abandoned:
        raise RuntimeError(
            f"{arm}: {window.abandoned} calls still unfinished a minute after the window "
            "closed; the server is too slow to measure"
        )


async def _measure(
    triton: str, envoy: str, metadata: tuple[tuple[str, str], ...]
) -> dict[str, Window]:
    async with (
        grpc.aio.insecure_channel(triton) as triton_channel,
        grpc.aio.insecure_channel(envoy) as envoy_channel,
    ):
        triton_stub = service_pb2_grpc.GRPCInferenceServiceStub(triton_channel)
        arms = {
            "batched": _direct(triton_stub, "embedder"),
            "unbatched": _direct(triton_stub, "embedder_unbatched"),
            "mesh_batched": _mesh(
                inference_service_pb2_grpc.InferenceServiceStub(envoy_channel), metadata
            ),
        }
        for name, call in arms.items():
            warm = await closed_loop(call, concurrency=CONCURRENCY, seconds=WARMUP_S)
            print(f"  warm-up {name}: {warm.per_s:.0f}/s", flush=True)
            _check_drained(name, warm)
        totals = {name: Window() for name in arms}
        rows = []
        started = time.monotonic()
        for round_ in range(ROUNDS):
            if time.monotonic() - started > BUDGET_S:
                print(f"  time budget reached after {round_} rounds", flush=True)
                break
            for name in rotated(list(arms), round_):
                window = await closed_loop(arms[name], concurrency=CONCURRENCY, seconds=ROUND_S)
                totals[name].add(window)
                rows.append((round_ + 1, name, window.completed, f"{window.per_s:.1f}"))
                print(f"  round {round_ + 1} {name}: {window.per_s:.1f}/s", flush=True)
                _check_drained(name, window)
        print_table("rounds", ("round", "arm", "requests", "per_s"), rows)
        return totals


def run() -> dict:
    with running_mesh(triton_replicas=1) as mesh:
        metadata = api_key_metadata(mesh, TENANT)
        totals = asyncio.run(_measure(mesh.triton_urls[0], mesh.envoy_address, metadata))
    batched, unbatched, through_mesh = (
        totals["batched"],
        totals["unbatched"],
        totals["mesh_batched"],
    )
    if not (batched.completed and unbatched.completed and through_mesh.completed):
        raise RuntimeError("an arm finished no call inside its windows; nothing to compare")
    metrics = {
        "speedup": batched.per_s / unbatched.per_s,
        "batched_per_s": batched.per_s,
        "unbatched_per_s": unbatched.per_s,
        "mesh_batched_per_s": through_mesh.per_s,
        "batched_p50_ms": ms(percentile(batched.latencies, 50)),
        "unbatched_p50_ms": ms(percentile(unbatched.latencies, 50)),
        "mesh_batched_p50_ms": ms(percentile(through_mesh.latencies, 50)),
    }
    requests = batched.completed + unbatched.completed + through_mesh.completed
    rounds = round(batched.seconds / ROUND_S)
    notes = (
        f"concurrency {CONCURRENCY} single-text requests, {requests:,} requests; "
        f"{rounds} alternating {ROUND_S:g}s rounds per arm after a {WARMUP_S:g}s warm-up; "
        "batched/unbatched: raw gRPC ModelInfer straight to one CPU Triton "
        "(embedder vs embedder_unbatched); mesh_batched: Envoy -> router Embed -> embedder; "
        "client, Envoy, router and Triton share the machine's cores"
    )
    return write_result(NAME, metrics, {"speedup": ">= 4"}, notes)
