"""Tracing's cost: a chat turn's time to first token and task throughput with tracing off,
every trace sampled, and 1% sampled, same run.

Three arms (`trace_sampling` 0, 1 and 0.01 in the launcher's config, so every process
and Envoy get it), each run twice, in the order off, full, 1pct, 1pct, full, off, each
run on a fresh mesh stopped after it, on failure too; an arm's two runs are pooled.
Each run measures:

- chat: `bench.chat_latency`'s RAG-off block. One open Converse stream through Envoy,
  a round being one chat turn and the same prompt straight to Triton, in shuffled order;
  its warm-up, then up to its ROUNDS rounds. TTFT is the whole turn's as the client sees
  it; added TTFT is chat minus direct.
- tasks: `bench.tasks_throughput`'s Switchboard round, tasks of 3 HTTP echo steps
  submitted one per SubmitTask call (what pays tracing per request), after a warm-up
  round; tasks per minute from the first submission until every task completed.

After a run's mesh is down (its processes flush their spans on exit), the lines of
`<run_dir>/traces/*.jsonl` are its spans written.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
from switchboard.admission.v1 import admission_service_pb2_grpc
from switchboard.chat.v1 import chat_service_pb2_grpc
from tritonclient.grpc import service_pb2_grpc

from bench import _echo, chat_latency, tasks_throughput
from bench._common import (
    api_key_metadata,
    give_tenant_room,
    ms,
    operator_metadata,
    percentile,
    print_table,
    write_result,
)
from bench.chat_latency import Block, Stream, chat_arm, create_session, direct_arm
from bench.tasks_throughput import switchboard_round

logger = logging.getLogger(__name__)

NAME = "tracing"
ARMS = {"off": 0.0, "full": 1.0, "1pct": 0.01}
"""Arm name -> trace_sampling."""
ORDER = ("off", "full", "1pct", "1pct", "full", "off")
"""The arms as they run: each twice, mirrored."""
TASKS = 4000
"""Tasks per arm's measured round (about 15 s of load at the one-per-call rate)."""
SEED = 3


@dataclass
class Arm:
    chat: Block
    tasks_seconds: float
    spans: int


@contextmanager
def _mesh(sampling: float) -> Iterator[tuple[Any, Path]]:
    """A mesh with `trace_sampling` = `sampling` in its own run directory, stopped on exit;
    yields the mesh and its run directory, which is removed after the caller's exit."""
    from services.launcher import Mesh, isolated_config

    run_dir = Path(tempfile.mkdtemp(prefix="switchboard-bench-tracing-"))
    config = isolated_config(
        run_dir, triton_replicas=1, workers=tasks_throughput.WORKER_PROCESSES, gpu="off"
    )
    mesh = Mesh(
        replace(config, trace_sampling=sampling),
        progress=lambda msg: print(f"  [mesh] {msg}", flush=True),
    )
    try:
        yield mesh, run_dir
    finally:
        mesh.down()


async def _chat(mesh: Any) -> Block:
    metadata = api_key_metadata(mesh, chat_latency.TENANT)
    async with (
        grpc.aio.insecure_channel(mesh.triton_urls[0]) as triton_channel,
        grpc.aio.insecure_channel(mesh.envoy_address) as envoy_channel,
    ):
        triton = service_pb2_grpc.GRPCInferenceServiceStub(triton_channel)
        chat = chat_service_pb2_grpc.ChatServiceStub(envoy_channel)
        await give_tenant_room(
            admission_service_pb2_grpc.AdmissionServiceStub(envoy_channel),
            operator_metadata(mesh),
            chat_latency.BENCH_POLICY,
        )
        stream = Stream(chat, metadata)
        await stream.open(await create_session(chat, metadata))
        block = await chat_latency._block(
            {"chat": chat_arm(stream), "direct": direct_arm(triton, [])},
            None,
            random.Random(SEED),
        )
        await stream.close()
        return block


def _arm(name: str, sampling: float, echo_port: int) -> Arm:
    print(f"  -- {name}: trace_sampling {sampling:g}", flush=True)
    with _mesh(sampling) as (mesh, run_dir):
        try:
            started = time.monotonic()
            mesh.up()
            print(f"  [mesh] up in {time.monotonic() - started:.1f}s", flush=True)
            chat = asyncio.run(_chat(mesh))
            print(f"  {name}: {chat.rounds} chat rounds in {chat.seconds:.0f}s", flush=True)
            env = _echo.tool_env(
                echo_port, run_dir, steps_per_worker=tasks_throughput.STEPS_PER_WORKER
            )
            workers = tasks_throughput.WORKER_PROCESSES
            for service in ("execution", *(f"worker-{i}" for i in range(workers))):
                mesh.start_service(service, env=env)
            asyncio.run(switchboard_round(mesh, tasks_throughput.WARMUP_TASKS, batch=1))
            tasks_s = asyncio.run(switchboard_round(mesh, TASKS, batch=1))
            print(f"  {name}: {TASKS} tasks in {tasks_s:.1f}s", flush=True)
            mesh.down()  # its processes flush their spans as they exit
            spans = _spans(run_dir / "traces")
            print(f"  {name}: {spans} spans written", flush=True)
            return Arm(chat, tasks_s, spans)
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)


def _pooled(done: list[Arm]) -> Arm:
    """One arm's runs as one: their chat samples together, their task seconds and spans
    summed."""
    samples: dict[str, list[Any]] = {}
    for arm in done:
        for side, seen in arm.chat.samples.items():
            samples.setdefault(side, []).extend(seen)
    chat = Block(
        samples,
        rounds=sum(a.chat.rounds for a in done),
        seconds=sum(a.chat.seconds for a in done),
    )
    return Arm(chat, sum(a.tasks_seconds for a in done), sum(a.spans for a in done))


def _spans(traces_dir: Path) -> int:
    count = 0
    for path in traces_dir.glob("*.jsonl"):
        with path.open("rb") as lines:
            count += sum(1 for _ in lines)
    return count


def run() -> dict:
    load = os.getloadavg()
    print(f"  load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    runs: dict[str, list[Arm]] = {name: [] for name in ARMS}
    with _echo.started() as echo_port:
        # each arm twice, the second pass in the reverse order (off, full, 1pct, 1pct,
        # full, off): a drift of the machine over the run weighs on every arm alike
        for name in ORDER:
            runs[name].append(_arm(name, ARMS[name], echo_port))
    arms = {name: _pooled(done) for name, done in runs.items()}

    def ttft(arm: str, q: float, side: str = "chat") -> float:
        return ms(percentile([s.ttft for s in arms[arm].chat.samples[side]], q))

    def per_min(arm: str) -> float:
        return TASKS * len(runs[arm]) / arms[arm].tasks_seconds * 60

    def slower_pct(base: float, other: float) -> float:
        return (other - base) / base * 100

    print_table(
        "per arm",
        ("arm", "ttft p50", "ttft p99", "added p50", "rounds", "tasks/min", "spans"),
        [
            (
                name,
                f"{ttft(name, 50):.2f}",
                f"{ttft(name, 99):.2f}",
                f"{ttft(name, 50) - ttft(name, 50, 'direct'):.2f}",
                arm.chat.rounds,
                f"{per_min(name):,.0f}",
                arm.spans,
            )
            for name, arm in arms.items()
        ],
    )
    metrics: dict[str, float] = {
        "ttft_overhead_pct_full": slower_pct(ttft("off", 50), ttft("full", 50)),
        "ttft_overhead_pct_1pct": slower_pct(ttft("off", 50), ttft("1pct", 50)),
        "tasks_overhead_pct_full": -slower_pct(per_min("off"), per_min("full")),
        "tasks_overhead_pct_1pct": -slower_pct(per_min("off"), per_min("1pct")),
    }
    for name, arm in arms.items():
        metrics[f"chat_ttft_p50_ms_{name}"] = ttft(name, 50)
        metrics[f"chat_ttft_p99_ms_{name}"] = ttft(name, 99)
        metrics[f"direct_ttft_p50_ms_{name}"] = ttft(name, 50, "direct")
        metrics[f"added_ttft_p50_ms_{name}"] = ttft(name, 50) - ttft(name, 50, "direct")
        metrics[f"tasks_per_min_{name}"] = per_min(name)
        metrics[f"spans_{name}"] = arm.spans
        metrics[f"chat_rounds_{name}"] = arm.chat.rounds
    metrics["load_avg_1m_at_start"] = load[0]
    metrics["load_avg_5m_at_start"] = load[1]
    notes = (
        "three arms, off (trace_sampling 0: tracing off, Envoy without a tracer), full (1.0) "
        "and 1pct (0.01), each run twice on a fresh mesh, in the order "
        f"{', '.join(ORDER)}; an arm's two runs pooled (chat samples together, tasks/min over "
        "both rounds). Each run: chat as bench/chat_latency.py's "
        f"RAG-off block (one Converse stream through Envoy, API key, {chat_latency.MODEL}, "
        f"max_tokens {chat_latency.MAX_TOKENS}; up to {chat_latency.WARMUP} warm-up rounds, "
        f"then up to {chat_latency.ROUNDS} rounds of chat turn + direct Triton call in "
        "shuffled order, concurrency 1), then tasks as bench/tasks_throughput.py's "
        f"Switchboard round: {TASKS} tasks of 3 HTTP echo steps one per SubmitTask call, "
        f"{tasks_throughput.SUBMITTERS} at a time, after {tasks_throughput.WARMUP_TASKS} "
        f"warm-up ones, {tasks_throughput.WORKER_PROCESSES} worker processes. "
        "ttft_overhead_pct_X = (chat TTFT p50 of X - of off) / off * 100 (the whole TTFT "
        "the client sees); tasks_overhead_pct_X = (tasks/min off - X) / off * 100; "
        "spans_X = lines in <run_dir>/traces/*.jsonl once X's meshes are down (chat, tasks, "
        "warm-ups and set-up together, both runs). load_avg = os.getloadavg() before the first arm"
    )
    targets = {
        "ttft_overhead_pct_full": "<= 10",
        "tasks_overhead_pct_full": "<= 10",
        "ttft_overhead_pct_1pct": "<= 2",
    }
    return write_result(NAME, metrics, targets, notes)


if __name__ == "__main__":
    run()
