"""Mesh tax: the latency Envoy and the router add over calling Triton directly.

One client, one call at a time (concurrency 1), persistent grpc.aio channels. Two blocks,
each with these arms: Triton directly, the floor (a bare Envoy and a bare Python hop
relaying to Triton, `bench._floor`: the least a mesh of this shape costs), the router on
its own port (no Envoy), and the mesh (Envoy -> router). Within a block every round
makes each arm's call once, in a freshly shuffled order, so the arms share the same
moments of a noisy machine and no arm always follows the same call:

- time to first token, `generator_small`, short prompt and two short passages:
  Triton ModelStreamInfer / InferenceService.Generate (model named explicitly). Generate
  is admitted by the admission service before it is routed, so this block has a fourth
  arm: the router's admission alone (its AdmissionGate, over an AdmitSession stream through
  Envoy's internal listener; then Release);
- unary embedding of one short text: Triton ModelInfer on `embedder` / InferenceService.Embed.

The calls act for tenant `bench`, which the benchmark first gives a policy with ample
limits: the tax is what is measured, not the default tenant's rate limit. Through the
public listener they carry the tenant's API key: `mesh` with a key as `switchboard keys
create` makes it (a signed token Envoy checks itself), and `mesh_ext_authz`, in the same
rounds, with a key of the older `sb_` form, which Envoy asks the auth service about on
every call (answered from its key cache), as every key was before; the router's own port
and the internal listener take `x-tenant-id` as sent. The blocks
run one after the other, so a generation never follows an embedding (whose forward pass
leaves the CPU busy for a while). The mesh runs one Triton replica, so every arm reaches
the same Triton process.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from switchboard.admission.v1 import admission_service_pb2_grpc
from switchboard.inference.v1 import inference_pb2, inference_service_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from bench._common import (
    api_key_metadata,
    give_tenant_room,
    ms,
    operator_metadata,
    percentile,
    print_table,
    running_mesh,
    unlimited_policy,
    write_result,
)
from bench._floor import floor_path
from bench.embed_batching import triton_embed_request
from services.inference.admission import AdmissionGate, Ask
from services.inference.triton import generate_request
from services.runtime import count_tokens

NAME = "mesh-tax"
WARMUP = 30
"""Rounds before measuring (each makes every call of its block once), at most WARMUP_S."""
WARMUP_S = 10.0
ITERATIONS = 400
BUDGET_S = {"ttft": 40.0, "embed": 45.0}
"""A block stops after this long even if fewer rounds are done (the notes say how many)."""
SEED = 2

PROMPT = "How does Triton combine concurrent requests?"
PASSAGES = (
    "Triton Inference Server batches requests dynamically. "
    "Dynamic batching combines concurrent requests into one model execution.",
    "Envoy routes each gRPC call to a cluster by the service name in its path.",
)
MAX_TOKENS = 8
EMBED_TEXT = "Envoy routes each gRPC call by service name."
TIMEOUT_S = 30.0

TENANT = "bench"
TRUSTED = (("x-tenant-id", TENANT),)
"""The tenant as the router's own port and Envoy's internal listener take it."""
Metadata = tuple[tuple[str, str], ...]
BENCH_POLICY = unlimited_policy(TENANT, in_flight=1024)

Timed = Callable[[], Awaitable[float]]
"""One call; returns the latency measured (seconds)."""


def triton_generate_request() -> service_pb2.ModelInferRequest:
    """The request the router sends for `generator_small` (same inputs, same parameters)."""
    return generate_request("generator_small", PROMPT, PASSAGES, MAX_TOKENS)


def _direct_ttft(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> Timed:
    return triton_ttft(stub, triton_generate_request())


def triton_ttft(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, request: service_pb2.ModelInferRequest
) -> Timed:
    """Times Triton's first token for `request` (a generation, streamed)."""

    async def call() -> float:
        started = time.perf_counter()
        first = None
        # read to the final response, as the router does, so Triton does the same work
        async for reply in stub.ModelStreamInfer(iter([request]), timeout=TIMEOUT_S):
            if reply.error_message:
                raise RuntimeError(f"Triton: {reply.error_message}")
            response = reply.infer_response
            if first is None and response.outputs:
                first = time.perf_counter() - started
            final = response.parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                break
        if first is None:
            raise RuntimeError("Triton streamed no token")
        return first

    return call


def _mesh_ttft(stub: inference_service_pb2_grpc.InferenceServiceStub, metadata: Metadata) -> Timed:
    request = inference_pb2.GenerateRequest(
        model="generator_small",
        prompt=PROMPT,
        context=[inference_pb2.Passage(source_id=f"p{i}", text=t) for i, t in enumerate(PASSAGES)],
        parameters=inference_pb2.GenerationParameters(max_tokens=MAX_TOKENS),
    )
    return generate_ttft(stub, request, metadata)


def generate_ttft(
    stub: inference_service_pb2_grpc.InferenceServiceStub,
    request: inference_pb2.GenerateRequest,
    metadata: Metadata,
) -> Timed:
    """Times the first token of a Generate call."""

    async def call() -> float:
        started = time.perf_counter()
        first = None
        async for reply in stub.Generate(request, timeout=TIMEOUT_S, metadata=metadata):
            if first is None and reply.HasField("token"):
                first = time.perf_counter() - started
        if first is None:
            raise RuntimeError("Generate streamed no token")
        return first

    return call


def _admit(gate: AdmissionGate) -> Timed:
    """An admission as the router makes it for this Generate (timed: its AdmitSession
    message and reply), then the release (in the background, as the router does)."""
    ask = Ask(
        tenant_id=TENANT,
        tier="small",
        prompt_tokens=count_tokens(PROMPT) + sum(map(count_tokens, PASSAGES)),
        max_tokens=MAX_TOKENS,
    )

    async def call() -> float:
        started = time.perf_counter()
        lease_id = await gate.admit(ask)
        took = time.perf_counter() - started
        gate.release(lease_id, tenant_id=TENANT, prompt=ask.prompt_tokens, completion=0)
        return took

    return call


def _direct_embed(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> Timed:
    request = triton_embed_request("embedder", EMBED_TEXT)

    async def call() -> float:
        started = time.perf_counter()
        await stub.ModelInfer(request, timeout=TIMEOUT_S)
        return time.perf_counter() - started

    return call


def _mesh_embed(stub: inference_service_pb2_grpc.InferenceServiceStub, metadata: Metadata) -> Timed:
    request = inference_pb2.EmbedRequest(texts=[EMBED_TEXT])

    async def call() -> float:
        started = time.perf_counter()
        await stub.Embed(request, timeout=TIMEOUT_S, metadata=metadata)
        return time.perf_counter() - started

    return call


@dataclass
class Block:
    """The calls of one block, per arm, and how long measuring took."""

    samples: dict[str, list[float]]
    iterations: int
    seconds: float


async def _block(arms: dict[str, Timed], budget_s: float, rng: random.Random) -> Block:
    """Warm-up, then up to ITERATIONS rounds, each arm once per round in shuffled order."""
    names = list(arms)
    warming = time.perf_counter()
    for _ in range(WARMUP):
        for name in names:
            await arms[name]()
        if time.perf_counter() - warming > WARMUP_S:
            break
    block = Block({name: [] for name in names}, 0, 0.0)
    started = time.perf_counter()
    while block.iterations < ITERATIONS and time.perf_counter() - started < budget_s:
        rng.shuffle(names)
        for name in names:
            block.samples[name].append(await arms[name]())
        block.iterations += 1
    block.seconds = time.perf_counter() - started
    return block


async def _measure(
    triton: str,
    floor: str,
    router: str,
    envoy: str,
    internal: str,
    key: Metadata,
    older_key: Metadata,
    operator: Metadata,
) -> dict[str, Block]:
    rng = random.Random(SEED)
    async with (
        grpc.aio.insecure_channel(triton) as triton_channel,
        grpc.aio.insecure_channel(router) as router_channel,
        grpc.aio.insecure_channel(envoy) as envoy_channel,
        grpc.aio.insecure_channel(floor) as floor_channel,
    ):
        direct = service_pb2_grpc.GRPCInferenceServiceStub(triton_channel)
        bare = service_pb2_grpc.GRPCInferenceServiceStub(floor_channel)
        via_router = inference_service_pb2_grpc.InferenceServiceStub(router_channel)
        via_envoy = inference_service_pb2_grpc.InferenceServiceStub(envoy_channel)
        await give_tenant_room(
            admission_service_pb2_grpc.AdmissionServiceStub(envoy_channel),
            operator,
            BENCH_POLICY,
        )
        admission = AdmissionGate(internal)  # the router's client, every call a round trip
        sliced = AdmissionGate(internal, slice_size=4)  # as the router runs it: from a slice
        arms = {
            "ttft": {
                "direct": _direct_ttft(direct),
                "floor": _direct_ttft(bare),
                "router": _mesh_ttft(via_router, TRUSTED),
                "mesh": _mesh_ttft(via_envoy, key),
                "mesh_ext_authz": _mesh_ttft(via_envoy, older_key),
                "admit": _admit(admission),
                "admit_slice": _admit(sliced),
            },
            "embed": {
                "direct": _direct_embed(direct),
                "floor": _direct_embed(bare),
                "router": _mesh_embed(via_router, TRUSTED),
                "mesh": _mesh_embed(via_envoy, key),
                "mesh_ext_authz": _mesh_embed(via_envoy, older_key),
            },
        }
        blocks = {}
        try:
            for kind, block_arms in arms.items():
                blocks[kind] = block = await _block(block_arms, BUDGET_S[kind], rng)
                print(f"  {kind}: {block.iterations} rounds in {block.seconds:.0f}s", flush=True)
        finally:
            await admission.close()
            await sliced.close()
        return blocks


async def _older_key(mesh: Any) -> Metadata:
    """The tenant's key in the older `sb_` form (a store without the signing key): Envoy
    cannot check it itself."""
    async with mesh.key_store(signed=False) as store:
        _, token = await store.create(TENANT, "bench, older form")
    return (("authorization", f"Bearer {token}"),)


def run() -> dict:
    with (
        running_mesh(triton_replicas=1) as mesh,
        tempfile.TemporaryDirectory(prefix="switchboard-floor-") as tmp,
        floor_path(mesh.triton_urls[0], Path(tmp)) as floor,
    ):
        router = f"{mesh.config.host}:{mesh.config.inference_port}"
        key = api_key_metadata(mesh, TENANT)
        blocks = asyncio.run(
            _measure(
                mesh.triton_urls[0],
                floor,
                router,
                mesh.envoy_address,
                mesh.internal_address,
                key,
                asyncio.run(_older_key(mesh)),
                operator_metadata(mesh),
            )
        )

    p = {
        (kind, arm, q): ms(percentile(values, q))
        for kind, block in blocks.items()
        for arm, values in block.samples.items()
        for q in (50, 99)
    }
    labels = {
        "admit": "admission round trip (AdmitSession) via Envoy (internal)",
        "admit_slice": "admission from a slice (AdmitSession ahead of need)",
    }
    print_table(
        "latency (ms)",
        ("call", "p50", "p99", "n"),
        [
            (labels.get(arm, f"{kind} {arm}"), f"{p[kind, arm, 50]:.3f}", f"{p[kind, arm, 99]:.3f}")
            + (len(values),)
            for kind, block in blocks.items()
            for arm, values in block.samples.items()
        ],
    )
    metrics: dict[str, float] = {}
    for prefix, arm in (
        ("added", "mesh"),
        ("added_ext_authz", "mesh_ext_authz"),
        ("router_only_added", "router"),
    ):
        for kind in ("ttft", "embed"):
            for q in (50, 99):
                metrics[f"{prefix}_{kind}_p{q}_ms"] = p[kind, arm, q] - p[kind, "direct", q]
    for kind in ("ttft", "embed"):
        for arm in ("direct", "router", "mesh", "mesh_ext_authz"):
            for q in (50, 99):
                metrics[f"{arm}_{kind}_p{q}_ms"] = p[kind, arm, q]
    for kind in ("ttft", "embed"):
        for q in (50, 99):
            metrics[f"floor_{kind}_p{q}_ms"] = p[kind, "floor", q]
            metrics[f"floor_added_{kind}_p{q}_ms"] = p[kind, "floor", q] - p[kind, "direct", q]
            metrics[f"over_floor_{kind}_p{q}_ms"] = p[kind, "mesh", q] - p[kind, "floor", q]
    for q in (50, 99):
        metrics[f"admit_p{q}_ms"] = p["ttft", "admit", q]
        metrics[f"admit_slice_p{q}_ms"] = p["ttft", "admit_slice", q]
    ttft, embed = blocks["ttft"], blocks["embed"]
    notes = (
        f"concurrency 1; after up to {WARMUP} warm-up rounds, {ttft.iterations} ttft calls "
        f"per arm ({ttft.seconds:.0f}s), then {embed.iterations} embed calls per arm "
        f"({embed.seconds:.0f}s), each round's arms in shuffled order; one CPU Triton "
        f"replica. ttft: generator_small, {len(PROMPT)}-char prompt, {len(PASSAGES)} short "
        f"passages, max_tokens {MAX_TOKENS}, first token as the client sees it; embed: one "
        "short text on embedder. direct = raw grpc.aio Triton stub (ModelStreamInfer / "
        "ModelInfer), floor = the same Triton stub (both blocks) through a bare Envoy (one "
        "route) and a bare grpc.aio hop relaying the bytes (bench._floor): the least this "
        "shape of mesh costs; over_floor = mesh pXX - floor pXX; mesh = Envoy (API key "
        "token checked by Envoy itself) -> router (-> Envoy's internal listener -> "
        "admission for Generate, unless a lease of the router's slice serves it) -> "
        "Triton, router_only = the router's own port; mesh_ext_authz = the same with an "
        "older-form key, checked by the auth service (ext_authz) on every call; added = "
        "mesh pXX - direct pXX; admit = the router's admission alone "
        "(services.inference.admission.AdmissionGate: a message on its AdmitSession stream "
        "and the reply), through Envoy's internal listener; admit_slice = the same gate "
        "with a slice of 4, as the router runs it (most admissions take no round trip). "
        f"Tenant {TENANT!r} with a policy above any rate the benchmark reaches"
    )
    targets = {
        "added_ttft_p50_ms": "<= 1.5",
        "added_ttft_p99_ms": "<= 3",
        "over_floor_ttft_p50_ms": "<= 0.3",
        "added_embed_p50_ms": "<= 1",
        "added_embed_p99_ms": "<= 3",
    }
    return write_result(NAME, metrics, targets, notes)
