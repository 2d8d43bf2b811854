"""Step overhead: from one step's completion to the next step's start, sequential steps.

Chains of cheap steps (HTTP tool calls to a local echo, `bench._echo`) are submitted
through Envoy and run by the launcher's worker processes. Each gap is measured where
the steps run, at the echo (one process, one clock): from the moment step i's reply
leaves it to the moment step i+1's call arrives. In between, the worker reads the
reply, commits the completion (which claims the next step, in the same transaction),
publishes the COMPLETED, QUEUED and STARTED events to JetStream, and sends the next
call. A gap is thus everything the platform adds between two steps' real work.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import struct_pb2
from switchboard.execution.v1 import execution_pb2 as pb
from switchboard.execution.v1 import execution_service_pb2_grpc

from bench import _echo
from bench._common import api_key_metadata, ms, percentile, print_table, running_mesh, write_result

NAME = "step-overhead"
STEPS = 20
"""Steps per chain: 19 gaps each."""
CHAINS = 60
WARMUP_CHAINS = 4
CONCURRENCY = (1, 8)
"""Chains in flight: one (an idle system), and several at once."""
WORKER_PROCESSES = 2
STEPS_PER_WORKER = 64
TERMINAL = {pb.TASK_STATE_COMPLETED, pb.TASK_STATE_FAILED, pb.TASK_STATE_CANCELLED}


def _chain() -> pb.SubmitTaskRequest:
    steps: list[pb.Step] = []
    for i in range(STEPS):
        args = struct_pb2.Struct()
        args.update({"step": i})
        steps.append(
            pb.Step(
                name=f"s{i:02d}",
                depends_on=[steps[-1].name] if steps else [],
                tool=pb.ToolStep(tool="echo", arguments=args),
            )
        )
    return pb.SubmitTaskRequest(steps=steps)


def _gaps(task_id: str, timings: dict[str, tuple[int, int]]) -> list[float]:
    """Seconds from each step's reply leaving the echo to its successor's call arriving."""
    calls = [timings[f"{task_id}:s{i:02d}"] for i in range(STEPS)]
    return [(later[0] - earlier[1]) / 1e9 for earlier, later in zip(calls, calls[1:], strict=False)]


async def _round(mesh: Any, echo_port: int, chains: int, concurrency: int) -> list[float]:
    """Runs `chains` chains, `concurrency` at a time; returns every gap."""
    tenant = f"bench-{uuid.uuid4().hex[:8]}"
    metadata = api_key_metadata(mesh, tenant)
    request = _chain()
    gate = asyncio.Semaphore(concurrency)
    async with grpc.aio.insecure_channel(mesh.envoy_address) as channel:
        stub = execution_service_pb2_grpc.ExecutionServiceStub(channel)

        async def one() -> None:
            async with gate:
                reply = await stub.SubmitTask(request, metadata=metadata, timeout=30)
                get = pb.GetTaskRequest(task_id=reply.task.task_id)
                while True:
                    await asyncio.sleep(0.05)
                    task = (await stub.GetTask(get, metadata=metadata, timeout=30)).task
                    if task.state in TERMINAL:
                        break
                if task.state != pb.TASK_STATE_COMPLETED:
                    raise RuntimeError(f"task {task.task_id} ended {task.state}")
                if any(s.attempt != 1 for s in task.step_statuses):
                    raise RuntimeError(f"task {task.task_id} ran a step twice")
                done.append(task.task_id)

        done: list[str] = []
        await asyncio.gather(*(one() for _ in range(chains)))
    timings = await asyncio.to_thread(_echo.timings, echo_port)
    return [gap for task_id in done for gap in _gaps(task_id, timings)]


def run() -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="switchboard-bench-steps-"))
    results: dict[int, list[float]] = {}
    try:
        with _echo.started() as echo_port:
            env = _echo.tool_env(echo_port, run_dir, steps_per_worker=STEPS_PER_WORKER)
            with running_mesh(triton_replicas=1, workers=WORKER_PROCESSES) as mesh:
                for name in ("execution", *(f"worker-{i}" for i in range(WORKER_PROCESSES))):
                    mesh.start_service(name, env=env)
                asyncio.run(_round(mesh, echo_port, WARMUP_CHAINS, 1))
                for concurrency in CONCURRENCY:
                    results[concurrency] = asyncio.run(_round(mesh, echo_port, CHAINS, concurrency))
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    rows = []
    for concurrency, gaps in results.items():
        rows.append(
            (concurrency, len(gaps), *(f"{ms(percentile(gaps, q)):.2f}" for q in (50, 90, 99)))
        )
    print_table(
        "completion -> next start (ms)", ("chains at once", "gaps", "p50", "p90", "p99"), rows
    )
    idle, busy = results[CONCURRENCY[0]], results[CONCURRENCY[-1]]
    metrics = {
        "p50_ms": ms(percentile(idle, 50)),
        "p99_ms": ms(percentile(idle, 99)),
        f"p50_ms_{CONCURRENCY[-1]}_chains": ms(percentile(busy, 50)),
        f"p99_ms_{CONCURRENCY[-1]}_chains": ms(percentile(busy, 99)),
    }
    notes = (
        f"{CHAINS} chains of {STEPS} sequential HTTP echo tool steps per run, submitted "
        f"through Envoy, {WORKER_PROCESSES} worker processes; p50_ms/p99_ms with one chain "
        f"at a time, the _{CONCURRENCY[-1]}_chains figures with {CONCURRENCY[-1]} at once. "
        "A gap is measured at the echo: step i's reply leaving it to step i+1's call "
        "arriving (the worker reads the reply, commits the completion, which claims the "
        "next step, publishes COMPLETED, QUEUED and STARTED to JetStream, sends the call)"
    )
    return write_result(NAME, metrics, {"p50_ms": "<= 5"}, notes)


if __name__ == "__main__":
    run()
