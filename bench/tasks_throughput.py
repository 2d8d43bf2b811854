"""Durable task throughput: Switchboard execution vs a Celery chain on Redis, same run.

The work: tasks of 3 sequential cheap steps, each an HTTP call to a local echo server
(`bench._echo`, its own process). Switchboard: tasks submitted through Envoy to
ExecutionService (3 `tool` steps), state in PostgreSQL, steps over JetStream, run by the
launcher's worker processes; end to end from the first submission until every task is
COMPLETED. Two rounds: tasks submitted in batches (SubmitTasks, what a producer with
many tasks uses) and one per call (SubmitTask). Celery: `chain(echo, echo, echo)` per
task, Redis broker and result backend (append-only file, fsync every second), late acks
(redelivery on worker loss, as Switchboard), a prefork worker; from the first
`apply_async` until every chain's result is in. Both sides share the machine's 2 cores
with their own brokers and databases. Both Switchboard rounds also say where the CPU
went: milliseconds per task of each kind of process, and of the whole machine. The
floor: the same one-per-call submissions to a bare Envoy and a bare hop that answers at
once (`bench._floor`), the least CPU a unary call costs here; with the batched round's
CPU per task it bounds what one task per call can reach in this run.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import psycopg
from google.protobuf import struct_pb2
from switchboard.execution.v1 import execution_pb2 as pb
from switchboard.execution.v1 import execution_service_pb2_grpc

from bench import _echo
from bench._common import (
    api_key_metadata,
    cpu_seconds,
    machine_ticks,
    print_table,
    running_mesh,
    stop_process,
    write_result,
)
from bench._floor import call_floor
from services.launcher import free_port_base

NAME = "tasks-throughput"
TASKS = 3000
WARMUP_TASKS = 100
SUBMITTERS = 64
BATCH = 100
"""Tasks per SubmitTasks call in the batched round."""
BATCH_SUBMITTERS = 4
WORKER_PROCESSES = 2
STEPS_PER_WORKER = 128
CELERY_CONCURRENCY = 8
"""Prefork processes: the steps wait on HTTP, so more than the 2 cores."""
BUDGET_S = 300.0
API_KEY_CHARS = 289
"""A tenant's API key (an ES256 token) as `switchboard keys create` makes it, in characters."""


# ---- Switchboard ---------------------------------------------------------------------------


def _task() -> pb.SubmitTaskRequest:
    steps = []
    for i, name in enumerate(("one", "two", "three")):
        args = struct_pb2.Struct()
        args.update({"step": i})
        steps.append(
            pb.Step(
                name=name,
                depends_on=[steps[-1].name] if steps else [],
                tool=pb.ToolStep(tool="echo", arguments=args),
            )
        )
    return pb.SubmitTaskRequest(steps=steps)


def _completed(database_url: str, tenant: str) -> int:
    with psycopg.connect(database_url) as conn:
        (done,) = conn.execute(
            "SELECT count(*) FROM exec_tasks WHERE tenant_id = %s AND state = %s",
            (tenant, pb.TASK_STATE_COMPLETED),
        ).fetchone()
        (failed,) = conn.execute(
            "SELECT count(*) FROM exec_tasks WHERE tenant_id = %s AND state <> %s AND state <> %s",
            (tenant, pb.TASK_STATE_COMPLETED, pb.TASK_STATE_RUNNING),
        ).fetchone()
    if failed:
        raise RuntimeError(f"{failed} Switchboard tasks did not complete")
    return int(done)


async def _submit(stub: Any, metadata: Any, count: int, *, batch: int) -> None:
    """`count` tasks, one per SubmitTask call (`batch` 1, `SUBMITTERS` calls at a time)
    or `batch` per SubmitTasks call (`BATCH_SUBMITTERS` at a time)."""
    request = _task()
    gate = asyncio.Semaphore(SUBMITTERS if batch == 1 else BATCH_SUBMITTERS)

    async def one(size: int) -> None:
        async with gate:
            if batch == 1:
                await stub.SubmitTask(request, metadata=metadata, timeout=60)
                return
            reply = await stub.SubmitTasks(
                pb.SubmitTasksRequest(tasks=[request] * size), metadata=metadata, timeout=60
            )
            if refused := [r.error for r in reply.results if r.HasField("error")]:
                raise RuntimeError(f"{len(refused)} tasks refused: {refused[0].message}")

    await asyncio.gather(*(one(min(batch, count - i)) for i in range(0, count, batch)))


async def switchboard_round(mesh: Any, count: int, *, batch: int) -> float:
    """`count` tasks submitted as `_submit` does; seconds until every task completed."""
    tenant = f"bench-{uuid.uuid4().hex[:8]}"
    metadata = api_key_metadata(mesh, tenant)
    async with grpc.aio.insecure_channel(mesh.envoy_address) as channel:
        stub = execution_service_pb2_grpc.ExecutionServiceStub(channel)
        started = time.perf_counter()
        await _submit(stub, metadata, count, batch=batch)
        while _completed(mesh.database_url, tenant) < count:
            if time.perf_counter() - started > BUDGET_S:
                raise RuntimeError("Switchboard tasks did not finish within the budget")
            await asyncio.sleep(0.05)
        return time.perf_counter() - started


def _switchboard(
    echo_port: int, run_dir: Path
) -> tuple[float, float, dict[str, float], dict[str, float]]:
    """Seconds for `TASKS` tasks submitted in batches, then one per call, and where the
    CPU went in the one-per-call round and in the batched one (`_cpu_per_task`)."""
    env = _echo.tool_env(echo_port, run_dir, steps_per_worker=STEPS_PER_WORKER)
    with running_mesh(triton_replicas=1, workers=WORKER_PROCESSES) as mesh:
        for name in ("execution", *(f"worker-{i}" for i in range(WORKER_PROCESSES))):
            mesh.start_service(name, env=env)
        asyncio.run(switchboard_round(mesh, WARMUP_TASKS, batch=BATCH))
        used, ticks = cpu_seconds(mesh), machine_ticks()
        batched = asyncio.run(switchboard_round(mesh, TASKS, batch=BATCH))
        batched_cpu = _cpu_per_task(used, cpu_seconds(mesh), ticks, machine_ticks())
        asyncio.run(switchboard_round(mesh, WARMUP_TASKS, batch=1))
        used, ticks = cpu_seconds(mesh), machine_ticks()
        single = asyncio.run(switchboard_round(mesh, TASKS, batch=1))
        single_cpu = _cpu_per_task(used, cpu_seconds(mesh), ticks, machine_ticks())
        return single, batched, single_cpu, batched_cpu


async def _bare_calls(address: str, count: int) -> None:
    """`count` tasks submitted to `address` one per call, as the one-per-call round does,
    with a bearer token as long as a tenant's API key (nothing there checks it)."""
    metadata = (("authorization", f"Bearer {'k' * API_KEY_CHARS}"),)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = execution_service_pb2_grpc.ExecutionServiceStub(channel)
        await _submit(stub, metadata, count, batch=1)


def _ceiling(single: dict[str, float], batched: dict[str, float], floor: dict[str, float]) -> float:
    """Tasks per minute one per call could reach at most on this machine, from one run's
    figures: every core busy, each task costing a batched task's CPU (which includes its
    share of a SubmitTasks call, and gains from larger batches into PostgreSQL and
    JetStream), plus what submitting it alone added to the bench client, plus the bare
    call's CPU in Envoy and the server (nothing in the kernel): an upper bound."""
    client = max(single["bench client"] - batched["bench client"], 0.0)
    per_task_ms = batched["total"] + client + floor["envoy"] + floor["execution"]
    return 60_000 * (os.cpu_count() or 1) / per_task_ms


def _call_floor(run_dir: Path) -> dict[str, float]:
    """CPU milliseconds per call (`_cpu_per_task`'s kinds) of `TASKS` SubmitTask calls
    through a bare Envoy into a hop that answers at once (`bench._floor.call_floor`; the
    hop counts as `execution`): the least a task submitted one per call adds to the
    work of a batched one."""
    import psutil

    with call_floor(run_dir) as (address, (hop, envoy)):
        procs = {"execution": psutil.Process(hop), "envoy": psutil.Process(envoy)}

        def used() -> dict[str, float]:
            own = os.times()
            cpu = {kind: sum(proc.cpu_times()[:2]) for kind, proc in procs.items()}
            return {**cpu, "bench client": own.user + own.system}

        asyncio.run(_bare_calls(address, WARMUP_TASKS))
        before, ticks = used(), machine_ticks()
        asyncio.run(_bare_calls(address, TASKS))
        return _cpu_per_task(before, used(), ticks, machine_ticks())


CPU_SHOWN = ("worker", "nats", "execution", "postgres", "envoy", "bench client")
"""The processes whose CPU per task the result names; the rest of the machine's busy
time (the echo, the kernel, the other services) is `other`."""


def _cpu_per_task(
    before: dict[str, float],
    after: dict[str, float],
    ticks_before: tuple[int, int],
    ticks_after: tuple[int, int],
) -> dict[str, float]:
    """CPU milliseconds per task of each process of `CPU_SHOWN`, `other`, the machine's
    whole (`total`), and how many of its cores were busy (`busy_cores`)."""
    hz = os.sysconf("SC_CLK_TCK")
    ticks, idle = ticks_after[0] - ticks_before[0], ticks_after[1] - ticks_before[1]
    window_s = ticks / hz / (os.cpu_count() or 1)
    busy_s = (ticks - idle) / hz
    per_task = {
        kind: (after.get(kind, 0.0) - before.get(kind, 0.0)) * 1000 / TASKS for kind in CPU_SHOWN
    }
    total = busy_s * 1000 / TASKS
    per_task["other"] = max(total - sum(per_task.values()), 0.0)
    per_task["total"] = total
    per_task["busy_cores"] = busy_s / window_s if window_s else 0.0
    return per_task


# ---- Celery --------------------------------------------------------------------------------


def _celery(echo_port: int, run_dir: Path) -> float:
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        raise RuntimeError("redis-server is not installed (`make bench` installs it)")
    port = free_port_base(host="127.0.0.1", span=1)
    redis = subprocess.Popen(
        [redis_server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(run_dir),
         "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""],
        stdout=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    env = {
        **os.environ,
        "BENCH_REDIS_URL": f"redis://127.0.0.1:{port}/0",
        "BENCH_ECHO_URL": f"http://127.0.0.1:{echo_port}/echo",
    }
    worker = None
    try:
        os.environ.update(env)
        from celery import chain

        from bench._celery_app import app, echo

        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "bench._celery_app", "worker",
             "--pool=prefork", f"--concurrency={CELERY_CONCURRENCY}", "--loglevel=WARNING",
             "--without-gossip", "--without-mingle", "--without-heartbeat"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while not app.control.inspect(timeout=1).ping():
            if time.monotonic() > deadline:
                raise RuntimeError("the Celery worker did not start")

        def round_(count: int) -> float:
            started = time.perf_counter()
            results = [
                chain(echo.s(i, 0), echo.s(1), echo.s(2)).apply_async() for i in range(count)
            ]
            for result in results:
                result.get(timeout=BUDGET_S)
            return time.perf_counter() - started

        round_(WARMUP_TASKS)
        return round_(TASKS)
    finally:
        if worker is not None:
            stop_process(worker)
        stop_process(redis)


def run() -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="switchboard-bench-tasks-"))
    try:
        with _echo.started() as echo_port:
            celery_s = _celery(echo_port, run_dir)
            print(f"  celery: {TASKS} chains in {celery_s:.1f}s", flush=True)
            single_s, batched_s, cpu, batched_cpu = _switchboard(echo_port, run_dir)
            print(f"  switchboard: {TASKS} tasks in {single_s:.1f}s one per call, "
                  f"{batched_s:.1f}s in batches of {BATCH}", flush=True)  # fmt: skip
        floor = _call_floor(run_dir)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    rows = [
        (f"switchboard, SubmitTasks x {BATCH}", batched_s),
        ("switchboard, SubmitTask", single_s),
        ("celery chain", celery_s),
    ]
    print_table(
        "end to end",
        ("system", "tasks", "seconds", "tasks_per_min", "steps_per_s"),
        [
            (name, TASKS, f"{s:.1f}", f"{TASKS / s * 60:,.0f}", f"{TASKS * 3 / s:,.0f}")
            for name, s in rows
        ],
    )
    ours, single, theirs = (TASKS / s * 60 for _, s in rows)
    metrics = {
        "tasks_per_min": ours,
        "tasks_per_min_one_per_call": single,
        "celery_tasks_per_min": theirs,
        "vs_celery": ours / theirs,
        "one_per_call_vs_celery": single / theirs,
        "tasks": TASKS,
        **{
            f"cpu_ms_per_task_one_per_call_{kind.replace(' ', '_')}": value
            for kind, value in cpu.items()
            if kind != "busy_cores"
        },
        "busy_cores_one_per_call": cpu["busy_cores"],
        **{
            f"cpu_ms_per_task_batched_{kind.replace(' ', '_')}": value
            for kind, value in batched_cpu.items()
            if kind != "busy_cores"
        },
        **{
            f"floor_call_cpu_ms_{kind.replace(' ', '_')}": floor[kind]
            for kind in ("execution", "envoy", "bench client", "total")
        },
        "one_per_call_ceiling_tasks_per_min": _ceiling(cpu, batched_cpu, floor),
    }
    notes = (
        f"{TASKS} tasks of 3 sequential HTTP echo steps, each round after {WARMUP_TASKS} "
        f"warm-up ones; Switchboard: submitted through Envoy (API key checked at the edge) "
        f"{BATCH} per SubmitTasks call, {BATCH_SUBMITTERS} calls at a time (tasks_per_min), "
        f"and one per SubmitTask call, {SUBMITTERS} at a time (tasks_per_min_one_per_call); "
        f"{WORKER_PROCESSES} worker processes x {STEPS_PER_WORKER} steps, PostgreSQL state, "
        "JetStream file storage; Celery 5 chain (one apply_async per task), Redis AOF "
        f"everysec, late acks, prefork x {CELERY_CONCURRENCY}; same machine, same echo process. "
        "cpu_ms_per_task_one_per_call_*: CPU (user + system) per task in the one-per-call "
        "round, of each kind of mesh process with its children (worker: both workers; "
        "bench client: the submitting and polling process), other: the rest of the "
        "machine's busy time (the echo, the kernel, the other services), total: the "
        "machine's busy time; busy_cores_one_per_call: cores busy on average in that round; "
        "cpu_ms_per_task_batched_*: the same for the batched round; floor_call_cpu_ms_*: "
        f"CPU per call of {TASKS} SubmitTask calls, {SUBMITTERS} at a time, through a bare "
        "Envoy (one route) into a bare grpc.aio hop on uvloop that answers at once "
        "(bench._floor; execution: the hop, total: the machine's busy time), the least a "
        "unary call costs here; one_per_call_ceiling_tasks_per_min: what one per call could "
        "reach in this run at most (_ceiling)"
    )
    return write_result(
        NAME,
        metrics,
        {"tasks_per_min": ">= 50000", "vs_celery": ">= 1", "one_per_call_vs_celery": ">= 1"},
        notes,
    )


if __name__ == "__main__":
    run()
