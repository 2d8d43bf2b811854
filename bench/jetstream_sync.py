"""JetStream durability vs throughput: the tasks-throughput workload on a mesh whose NATS
syncs every message to disk before acknowledging it (`sync_interval: always`) vs NATS's
default (flushed every 2 minutes), same run.

Each setting gets its own mesh (NATS reads it at start); the settings alternate,
`ROUNDS` meshes each, and each mesh runs `TASKS` tasks submitted in batches and `TASKS`
one per call (after warm-up ones), as `bench.tasks_throughput` does. The figures are
each setting's mean over its meshes; `sync_always_vs_default` is their ratio.

Also merged into `bench/results/faults.json` (`sync_always_tasks_per_min`,
`sync_default_tasks_per_min`).
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import tempfile
from pathlib import Path

from bench import _echo
from bench._common import merge_metrics, running_mesh, write_result
from bench.tasks_throughput import (
    BATCH,
    STEPS_PER_WORKER,
    WARMUP_TASKS,
    WORKER_PROCESSES,
    switchboard_round,
)

NAME = "jetstream-sync"
TASKS = 1500
ROUNDS = 2
SETTINGS = {"default": "2m", "always": "always"}
"""Label -> SWITCHBOARD_NATS_SYNC_INTERVAL (`2m` is NATS's own default)."""


def _measure(echo_port: int, run_dir: Path, interval: str) -> tuple[float, float]:
    """Tasks/min submitted in batches, then one per call, on a fresh mesh."""
    env = _echo.tool_env(echo_port, run_dir, steps_per_worker=STEPS_PER_WORKER)
    with running_mesh(
        triton_replicas=1, workers=WORKER_PROCESSES, settings={"nats_sync_interval": interval}
    ) as mesh:
        for name in ("execution", *(f"worker-{i}" for i in range(WORKER_PROCESSES))):
            mesh.start_service(name, env=env)
        asyncio.run(switchboard_round(mesh, WARMUP_TASKS, batch=BATCH))
        batched = asyncio.run(switchboard_round(mesh, TASKS, batch=BATCH))
        asyncio.run(switchboard_round(mesh, WARMUP_TASKS, batch=1))
        single = asyncio.run(switchboard_round(mesh, TASKS, batch=1))
    return TASKS / batched * 60, TASKS / single * 60


def run() -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="switchboard-bench-sync-"))
    per_call: dict[str, list[float]] = {label: [] for label in SETTINGS}
    batched: dict[str, list[float]] = {label: [] for label in SETTINGS}
    try:
        with _echo.started() as echo_port:
            for _ in range(ROUNDS):
                for label, interval in SETTINGS.items():
                    in_batches, one_per_call = _measure(echo_port, run_dir, interval)
                    batched[label].append(in_batches)
                    per_call[label].append(one_per_call)
                    print(
                        f"  sync {label}: {in_batches:,.0f} tasks/min in batches, "
                        f"{one_per_call:,.0f} one per call",
                        flush=True,
                    )
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    mean = {label: statistics.fmean(values) for label, values in batched.items()}
    mean_single = {label: statistics.fmean(values) for label, values in per_call.items()}
    metrics = {
        "sync_always_tasks_per_min": mean["always"],
        "sync_default_tasks_per_min": mean["default"],
        "sync_always_vs_default": mean["always"] / mean["default"],
        "sync_always_tasks_per_min_one_per_call": mean_single["always"],
        "sync_default_tasks_per_min_one_per_call": mean_single["default"],
        "sync_always_vs_default_one_per_call": mean_single["always"] / mean_single["default"],
    }
    notes = (
        f"The tasks-throughput workload ({TASKS} tasks of 3 HTTP echo steps per round, "
        f"after {WARMUP_TASKS} warm-up ones; {BATCH} per SubmitTasks call, and one per "
        f"SubmitTask call; {WORKER_PROCESSES} workers) on a fresh mesh per setting, the "
        f"settings alternating, {ROUNDS} meshes each; means. always = JetStream syncs "
        "each message to disk before acknowledging it; default = NATS's sync_interval of "
        "2m (an acknowledged message may be in the page cache only until then). "
        "A 2-core machine, shared: the ratio is the figure; absolute rates are noisy"
    )
    result = write_result(NAME, metrics, {}, notes)
    merge_metrics(
        "faults",
        {k: metrics[k] for k in ("sync_always_tasks_per_min", "sync_default_tasks_per_min")},
        source=NAME,
    )
    return result


if __name__ == "__main__":
    run()
