"""HTTP API: what the OpenAI-compatible gateway adds over gRPC, and its throughput
beside LiteLLM's proxy.

Two parts, on one mesh (one CPU Triton replica) whose model policy is the default one
plus `generator_stub`, a small-tier generator served by an OpenAI-compatible stub
(`bench._openai_stub`, its own process, answering at once) through `upstream:`:

- time to first token, concurrency 1, `generator_small` on Triton: three arms, each
  round making each arm's call once in a freshly shuffled order (as mesh-tax does):
  `POST /v1/chat/completions` with `stream: true` through Envoy's public port (one
  keep-alive aiohttp session; first SSE chunk carrying content), the same generation as
  a gRPC `InferenceService.Generate` through Envoy (the request is the one the gateway
  makes of the HTTP body, `services.gateway.chat_call`, so both arms send the same
  Generate), and Triton's ModelStreamInfer directly;
- requests/s of non-streaming `/v1/chat/completions` at concurrency 64 on
  `generator_stub`: Switchboard (Envoy -> gateway, whose embedded router admits and
  calls the stub) and LiteLLM's proxy (one model, `openai/` provider, pointing at the same stub),
  each with a bearer key, in alternating short slices so both share the machine's
  noise. LiteLLM runs from a venv of its own (`make bench-http` installs it into
  `.tools/litellm`): its proxy extras pin packages (openai among them) the project's
  venv holds at other versions. Without it, `litellm_rps` and `vs_litellm_rps` are null
  and the notes say why.

The calls act for tenant `bench`, given a policy with ample limits first.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import yaml
from switchboard.admission.v1 import admission_service_pb2_grpc
from switchboard.inference.v1 import inference_service_pb2_grpc
from tritonclient.grpc import service_pb2_grpc

from bench import _openai_stub
from bench._common import (
    Window,
    api_key_metadata,
    closed_loop,
    free_port,
    give_tenant_room,
    ms,
    operator_metadata,
    percentile,
    print_table,
    rotated,
    running_mesh,
    stop_process,
    unlimited_policy,
    write_result,
)
from bench.mesh_tax import generate_ttft, triton_ttft
from services.gateway import chat_call
from services.inference.triton import generate_request

logger = logging.getLogger(__name__)

NAME = "http-api"
"""`make bench-http` writes bench/results/http-api.json."""
SEED = 3
REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = REPO / "services" / "inference" / "models.yaml"
LITELLM_VENV = REPO / ".tools" / "litellm"
"""Where `make bench-http` installs LiteLLM (the Makefile's `litellm` target)."""
LITELLM = LITELLM_VENV / "bin" / "litellm"

# -- time to first token
TTFT_MODEL = "generator_small"
PROMPT = "How does Triton combine concurrent requests?"
PASSAGES = (
    "Triton Inference Server batches requests dynamically. "
    "Dynamic batching combines concurrent requests into one model execution.",
    "Envoy routes each gRPC call to a cluster by the service name in its path.",
)
MAX_TOKENS = 8
WARMUP = 30
"""Rounds before measuring (every arm once each), at most WARMUP_S."""
WARMUP_S = 10.0
ITERATIONS = 400
TTFT_BUDGET_S = 40.0
TIMEOUT_S = 30.0

# -- requests/s
STUB_MODEL = "generator_stub"
"""The generator the stub serves, by this name at both gateways."""
CONCURRENCY = 64
SLICE_S = 6.0
RAMP_S = 2.0
"""The start of each slice, not counted: every worker's first call starts at once, and
answers take about a second at this concurrency on two cores."""
SLICES = 5
"""Measured slices per arm, after one warm-up slice each."""
DRAIN_S = 15.0
EXPECTED = _openai_stub.answer(MAX_TOKENS).strip()

TENANT = "bench"
BENCH_POLICY = unlimited_policy(TENANT, in_flight=1024)
LITELLM_KEY = "sk-bench-litellm"
LITELLM_START_S = 90.0

Timed = Callable[[], Awaitable[float]]
"""One call; returns the latency measured (seconds)."""


def chat_body(model: str, *, stream: bool) -> dict[str, Any]:
    """The chat completion both HTTP arms send: the passages as system messages, then
    the prompt."""
    messages = [{"role": "system", "content": passage} for passage in PASSAGES]
    messages.append({"role": "user", "content": PROMPT})
    return {"model": model, "messages": messages, "max_tokens": MAX_TOKENS, "stream": stream}


def model_policy(stub_port: int, directory: Path) -> Path:
    """The default models.yaml plus `generator_stub` (small tier, served by the stub,
    dearer than generator_small so that `auto` still prefers Triton's)."""
    policy = yaml.safe_load(DEFAULT_MODELS.read_text())
    policy["generators"].append(
        {
            "name": STUB_MODEL,
            "tier": "small",
            "context_tokens": 2048,
            "relative_cost": 1.5,
            "default_max_tokens": MAX_TOKENS,
            "upstream": {
                "kind": "openai",
                "base_url": f"http://127.0.0.1:{stub_port}/v1",
                "model": _openai_stub.MODEL,
            },
        }
    )
    path = directory / "models.yaml"
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return path


# -- LiteLLM's proxy -----------------------------------------------------------------------


@dataclass
class LiteLLM:
    """LiteLLM's proxy as started for the benchmark: its port, or why there is none."""

    port: int = 0
    reason: str = ""
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None


@contextmanager
def litellm_proxy(stub_port: int, directory: Path) -> Iterator[LiteLLM]:
    """Starts LiteLLM's proxy (one model, `STUB_MODEL`, on the stub; a master key) and
    stops it (by PID) on exit; `ready()` waits for it. Yields a LiteLLM without a port
    when it is not installed."""
    proxy = LiteLLM()
    if not LITELLM.exists():
        proxy.reason = f"LiteLLM is not installed ({LITELLM.relative_to(REPO)}: make bench-http)"
        yield proxy
        return
    config = {
        "model_list": [
            {
                "model_name": STUB_MODEL,
                "litellm_params": {
                    "model": f"openai/{_openai_stub.MODEL}",
                    "api_base": f"http://127.0.0.1:{stub_port}/v1",
                    "api_key": "-",
                },
            }
        ],
        "general_settings": {"master_key": LITELLM_KEY},
    }
    (directory / "litellm.yaml").write_text(yaml.safe_dump(config))
    proxy.port = free_port()
    proxy.log = directory / "litellm.log"
    # its own environment: no DATABASE_URL (it would try to migrate one), the model cost
    # map from the package (no fetch), no .env read from the working directory
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(directory),
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_MODE": "PRODUCTION",
    }
    with proxy.log.open("wb") as log:
        proxy.process = subprocess.Popen(
            [
                str(LITELLM),
                *("--config", str(directory / "litellm.yaml")),
                *("--host", "127.0.0.1", "--port", str(proxy.port)),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=directory,
            env=env,
        )
    try:
        yield proxy
    finally:
        stop_process(proxy.process)  # type: ignore[arg-type]


def litellm_version() -> str:
    """The installed LiteLLM's version, from its package metadata."""
    found = sorted(LITELLM_VENV.glob("lib/python*/site-packages/litellm-*.dist-info"))
    return found[-1].name.removeprefix("litellm-").removesuffix(".dist-info") if found else "?"


def wait_litellm(proxy: LiteLLM) -> None:
    """Waits until the proxy answers its liveness probe; on failure, leaves the reason."""
    if not proxy.port or proxy.process is None:
        return
    deadline = time.monotonic() + LITELLM_START_S
    url = f"http://127.0.0.1:{proxy.port}/health/liveliness"
    while time.monotonic() < deadline:
        if proxy.process.poll() is not None:
            break
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    tail = proxy.log.read_text(errors="replace")[-300:] if proxy.log else ""
    exited = proxy.process.poll()
    proxy.reason = (
        f"LiteLLM's proxy exited ({exited})"
        if exited is not None
        else f"LiteLLM's proxy did not answer within {LITELLM_START_S:.0f}s"
    ) + f": {' '.join(tail.split())}"
    proxy.port = 0


# -- time to first token --------------------------------------------------------------------


def _http_ttft(session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> Timed:
    body = json.dumps(chat_body(TTFT_MODEL, stream=True)).encode()

    async def call() -> float:
        started = time.perf_counter()
        first = None
        async with session.post(url, data=body, headers=headers) as reply:
            if reply.status != 200:
                raise RuntimeError(f"HTTP {reply.status}: {(await reply.text())[:200]}")
            # read to [DONE], as the gRPC arm reads to the end of the stream
            async for line in reply.content:
                if not line.startswith(b"data: "):
                    continue  # blank lines; queue positions are SSE comments
                data = line[6:].strip()
                if data == b"[DONE]":
                    break
                if first is None:
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise RuntimeError(f"stream failed: {chunk['error']}")
                    choices = chunk.get("choices") or ()
                    if choices and choices[0].get("delta", {}).get("content"):
                        first = time.perf_counter() - started
        if first is None:
            raise RuntimeError("the HTTP stream carried no content")
        return first

    return call


def _grpc_ttft(
    stub: inference_service_pb2_grpc.InferenceServiceStub, metadata: tuple[tuple[str, str], ...]
) -> Timed:
    return generate_ttft(stub, chat_call(chat_body(TTFT_MODEL, stream=True)).request, metadata)


def _triton_ttft(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> Timed:
    # the request the router sends for this Generate (same inputs, same parameters)
    return triton_ttft(stub, generate_request(TTFT_MODEL, PROMPT, PASSAGES, MAX_TOKENS))


@dataclass
class TtftBlock:
    samples: dict[str, list[float]]
    iterations: int = 0
    seconds: float = 0.0


async def ttft_block(arms: dict[str, Timed], rng: random.Random) -> TtftBlock:
    """Warm-up, then up to ITERATIONS rounds, each arm once per round in shuffled order."""
    names = list(arms)
    warming = time.perf_counter()
    for _ in range(WARMUP):
        for name in names:
            await arms[name]()
        if time.perf_counter() - warming > WARMUP_S:
            break
    block = TtftBlock({name: [] for name in names})
    started = time.perf_counter()
    while block.iterations < ITERATIONS and time.perf_counter() - started < TTFT_BUDGET_S:
        rng.shuffle(names)
        for name in names:
            block.samples[name].append(await arms[name]())
        block.iterations += 1
    block.seconds = time.perf_counter() - started
    return block


# -- requests/s -----------------------------------------------------------------------------


@dataclass
class LoadArm:
    """One gateway under load: its call, what it completed, and what went wrong."""

    url: str
    headers: dict[str, str]
    window: Window = field(default_factory=Window)
    errors: Counter[str] = field(default_factory=Counter)
    measuring: bool = False
    """Whether a failed call counts (not in warm-up)."""

    async def call(self, session: aiohttp.ClientSession, body: bytes) -> None:
        problem = await self.attempt(session, body)
        if problem and self.measuring:
            self.errors[problem] += 1

    async def attempt(self, session: aiohttp.ClientSession, body: bytes) -> str:
        """One call; what was wrong with its answer ("" = nothing)."""
        problem = ""
        try:
            async with session.post(self.url, data=body, headers=self.headers) as reply:
                raw = await reply.read()
            if reply.status != 200:
                problem = f"HTTP {reply.status}: {raw[:120]!r}"
            else:
                answer = json.loads(raw)
                if answer.get("model") != STUB_MODEL:
                    problem = f"served by {answer.get('model')!r}"  # a fallback tier
                elif answer["choices"][0]["message"]["content"].strip() != EXPECTED:
                    problem = "unexpected content"
        except (aiohttp.ClientError, TimeoutError, ValueError, LookupError, TypeError) as error:
            problem = f"{type(error).__name__}: {str(error)[:120]}"
        return problem


async def wait_answering(arm: LoadArm, session: aiohttp.ClientSession, what: str) -> None:
    """Until one call succeeds (the router marks an upstream ready on its next check)."""
    body = json.dumps(chat_body(STUB_MODEL, stream=False)).encode()
    deadline = time.monotonic() + 60
    while problem := await arm.attempt(session, body):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} does not answer: {problem}")
        await asyncio.sleep(0.5)


async def steady_slice(call: Callable[[], Awaitable[None]]) -> Window:
    """CONCURRENCY workers calling back to back for SLICE_S; counts the calls that end
    after RAMP_S and before the slice does (and their latencies); those in flight are then
    awaited (up to DRAIN_S), so the next slice starts on a quiet gateway."""
    return await closed_loop(
        lambda _: call(),
        concurrency=CONCURRENCY,
        seconds=SLICE_S,
        drain_s=DRAIN_S,
        ramp_s=RAMP_S,
    )


async def load(arms: dict[str, LoadArm]) -> None:
    """One warm-up slice per arm, then SLICES measured slices each, alternating (the arm
    that goes first alternates too)."""
    body = json.dumps(chat_body(STUB_MODEL, stream=False)).encode()
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=CONCURRENCY)
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for name, arm in arms.items():
            await wait_answering(arm, session, name)
        for n in range(SLICES + 1):
            rates = []
            for name in rotated(list(arms), n):
                arm = arms[name]
                arm.measuring = n > 0
                window = await steady_slice(lambda arm=arm: arm.call(session, body))
                arm.measuring = False
                if n > 0:
                    arm.window.add(window)
                rates.append(f"{name} {window.per_s:.0f}/s")
            print(f"  slice {n or 'warm-up'}: {', '.join(rates)}", flush=True)


# -- the run --------------------------------------------------------------------------------


@dataclass
class Measured:
    ttft: TtftBlock
    load: dict[str, LoadArm]


async def measure(mesh: Any, proxy: LiteLLM) -> Measured:
    key = api_key_metadata(mesh, TENANT)
    public = f"http://{mesh.envoy_address}/v1/chat/completions"
    http_headers = {"Authorization": key[0][1], "Content-Type": "application/json"}
    async with (
        grpc.aio.insecure_channel(mesh.triton_urls[0]) as triton_channel,
        grpc.aio.insecure_channel(mesh.envoy_address) as envoy_channel,
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1),
            timeout=aiohttp.ClientTimeout(total=TIMEOUT_S),
        ) as session,
    ):
        await give_tenant_room(
            admission_service_pb2_grpc.AdmissionServiceStub(envoy_channel),
            operator_metadata(mesh),
            BENCH_POLICY,
        )
        arms = {
            "http": _http_ttft(session, public, http_headers),
            "grpc": _grpc_ttft(inference_service_pb2_grpc.InferenceServiceStub(envoy_channel), key),
            "triton": _triton_ttft(service_pb2_grpc.GRPCInferenceServiceStub(triton_channel)),
        }
        ttft = await ttft_block(arms, random.Random(SEED))
        print(f"  ttft: {ttft.iterations} rounds in {ttft.seconds:.0f}s", flush=True)

    load_arms = {"switchboard": LoadArm(public, http_headers)}
    wait_litellm(proxy)
    if proxy.port:
        load_arms["litellm"] = LoadArm(
            f"http://127.0.0.1:{proxy.port}/v1/chat/completions",
            {"Authorization": f"Bearer {LITELLM_KEY}", "Content-Type": "application/json"},
        )
    else:
        print(f"  no LiteLLM: {proxy.reason}", flush=True)
    await load(load_arms)
    return Measured(ttft, load_arms)


def run() -> dict:
    with (
        tempfile.TemporaryDirectory(prefix="switchboard-bench-http-") as scratch,
        _openai_stub.started() as stub_port,
        litellm_proxy(stub_port, Path(scratch)) as proxy,
    ):
        policy = model_policy(stub_port, Path(scratch))
        with running_mesh(triton_replicas=1, model_policy=policy) as mesh:
            measured = asyncio.run(measure(mesh, proxy))
    return report(measured, proxy)


def report(measured: Measured, proxy: LiteLLM) -> dict:
    ttft = measured.ttft
    p = {
        (arm, q): ms(percentile(values, q))
        for arm, values in ttft.samples.items()
        for q in (50, 99)
    }
    print_table(
        "time to first token (ms)",
        ("arm", "p50", "p99", "n"),
        [
            (arm, f"{p[arm, 50]:.3f}", f"{p[arm, 99]:.3f}", len(values))
            for arm, values in ttft.samples.items()
        ],
    )
    metrics: dict[str, float | None] = {
        "http_added_ttft_p50_ms": p["http", 50] - p["grpc", 50],
        "http_added_ttft_p99_ms": p["http", 99] - p["grpc", 99],
    }
    for arm in ("http", "grpc", "triton"):
        for q in (50, 99):
            metrics[f"{arm}_ttft_p{q}_ms"] = p[arm, q]

    rows = []
    for name in ("switchboard", "litellm"):
        arm = measured.load.get(name)
        if arm is None:
            for metric in ("rps", "errors", "p50_ms", "p99_ms"):
                metrics[f"{name}_{metric}"] = None
            continue
        window = arm.window
        errors = sum(arm.errors.values())
        metrics[f"{name}_rps"] = max(window.completed - errors, 0) / window.seconds
        metrics[f"{name}_errors"] = errors + window.abandoned
        metrics[f"{name}_p50_ms"] = ms(percentile(window.latencies, 50))
        metrics[f"{name}_p99_ms"] = ms(percentile(window.latencies, 99))
        rows.append((name, f"{window.per_s:.0f}", errors, window.abandoned))
    litellm_rps = metrics["litellm_rps"]
    metrics["vs_litellm_rps"] = (
        metrics["switchboard_rps"] / litellm_rps if litellm_rps else None  # type: ignore[operator]
    )
    print_table(
        f"non-streaming chat completions, concurrency {CONCURRENCY}",
        ("gateway", "req/s", "errors", "abandoned"),
        rows,
    )

    problems = "; ".join(
        f"{name}: {dict(arm.errors)}" for name, arm in measured.load.items() if arm.errors
    )
    litellm_note = (
        f"LiteLLM proxy {litellm_version()} (one process, its defaults: uvicorn access log on; "
        "master key checked in-process)"
        if "litellm" in measured.load
        else f"vs_litellm_rps null: {proxy.reason}"
    )
    notes = (
        "A 2-core machine, shared: absolute figures are noisy; the ratios come from one "
        "interleaved run. "
        f"TTFT: concurrency 1; after up to {WARMUP} warm-up rounds, {ttft.iterations} "
        f"rounds ({ttft.seconds:.0f}s), each round's arms in shuffled order; one CPU Triton "
        f"replica; {TTFT_MODEL}, {len(PROMPT)}-char prompt, {len(PASSAGES)} short passages "
        f"(system messages over HTTP, context passages over gRPC: the same Generate), "
        f"max_tokens {MAX_TOKENS}. http = POST /v1/chat/completions stream:true through "
        "Envoy's public port (keep-alive aiohttp session, first SSE chunk with content), "
        "grpc = InferenceService.Generate through Envoy, triton = ModelStreamInfer directly; "
        "http_added = http pXX - grpc pXX. "
        f"Requests/s: non-streaming /v1/chat/completions, concurrency {CONCURRENCY}, "
        f"{SLICES} slices of {SLICE_S:g}s per gateway (the first {RAMP_S:g}s of each not "
        "counted) after one warm-up slice each, the "
        "gateways alternating slice by slice, one aiohttp client; both in front of the same "
        f"OpenAI-compatible stub (bench._openai_stub, its own process) as {STUB_MODEL} "
        "(Switchboard: an upstream: generator in the small tier; Envoy -> gateway, whose "
        "embedded router admits the call (AdmitSession) and streams from the stub). "
        "rps counts answers with the expected model and content; errors = any other answer, "
        "failure or call abandoned. "
        f"{litellm_note}. "
        + (f"Errors: {problems}. " if problems else "")
        + f"Tenant {TENANT!r} with a policy above any rate the benchmark reaches"
    )
    targets = {"http_added_ttft_p50_ms": "<= 1"}
    return write_result(NAME, metrics, targets, notes)
