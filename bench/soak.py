"""`make soak`: a long mixed load with a service process killed every few minutes, watching
every process for leaks.

One mesh (one replica of each service, two of admission, one worker, one Triton). A
`MixedLoad` (Generate stream, Retrieve, SubmitTask, chat turn; LOAD_WORKERS callers)
runs for SWITCHBOARD_SOAK_S seconds (default 1,800). Every SWITCHBOARD_SOAK_KILL_EVERY_S
(default 180) one service process, drawn at random, is killed with SIGKILL: the control
plane restarts it. Every SAMPLE_EVERY_S each process of the mesh is sampled: resident
memory and open file descriptors (by PID, psutil), and for the Python services the
tasks alive on the event loop (`switchboard_asyncio_tasks`, scraped).

Figures:
- growth of each process's memory, descriptors and tasks from the end of its warm-up
  (WARMUP_S after it started, or after the load started) to its last sample, over the
  processes that lived at least MIN_OBSERVED_S past their warm-up: the largest of each
  (`soak_rss_growth_mb`, `soak_fd_growth`, `soak_task_growth`);
- calls by status code, and the calls that started more than KILL_GRACE_S after every
  kill and failed (`soak_new_call_errors`: a kill may fail the calls in flight on that
  process, and those that reach it before Envoy has the config without it);
- accepted tasks that did not complete (`soak_lost_tasks`, target 0);
- `bench/results/soak.png`: memory, descriptors and tasks per process over time.

NATS holds what JetStream is told to keep: an index entry per task whose events are
retained and an entry per message id in the duplicate window (see
`services.execution.bus`), and chat sessions' events for other replicas (10 min, see
`services.chat.shared`). With the defaults (7 days, 10 min) a 30-minute run never
reaches that steady state, and NATS's memory would climb with the tasks it keeps, which
is no leak. The soak shortens both (STORE_SETTINGS) so what NATS keeps levels off within
the warm-up, and any growth left is growth nobody asked for.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import psutil
from prometheus_client.parser import text_string_to_metric_families

from bench._common import (
    RESULTS_DIR,
    merge_metrics,
    running_mesh,
    write_result,
)
from bench._mixed_load import roomy_load

TENANT = "soak"
LOAD_WORKERS = 4
SAMPLE_EVERY_S = 10.0
WARMUP_S = 120.0
MIN_OBSERVED_S = 300.0
KILL_GRACE_S = 3.0
"""A call that starts this long after a kill must not fail because of it."""
FINISH_WAIT_S = 180.0
STORE_SETTINGS = {
    "SWITCHBOARD_EXECUTION_EVENT_RETENTION": "90s",
    "SWITCHBOARD_EXECUTION_DUPLICATE_WINDOW": "60s",
    "SWITCHBOARD_CHAT_EVENT_RETENTION_S": "60",
}
"""What JetStream keeps, shortened so that it is full within the warm-up."""


def _setting(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


@dataclass(frozen=True)
class Sample:
    at: float
    """Seconds since the load started."""
    process: str
    pid: int
    rss_mb: float
    fds: int
    tasks: int | None


def _service_names(mesh: Any) -> list[str]:
    from services.launcher._services import spec_of

    return [r.name for r in mesh.records() if spec_of(r.name) is not None]


def _loop_tasks(mesh: Any) -> dict[str, int]:
    """`switchboard_asyncio_tasks` of every Python service process that answers."""
    from services.launcher._prometheus import scrape_targets

    tasks = {}
    for target in scrape_targets(mesh.config):
        try:
            with urllib.request.urlopen(
                f"http://{target.address}{target.metrics_path}", timeout=2
            ) as reply:
                text = reply.read().decode()
        except OSError:
            continue  # restarting, or not a Python process
        for family in text_string_to_metric_families(text):
            if family.name == "switchboard_asyncio_tasks":
                tasks[target.process] = int(family.samples[0].value)
    return tasks


def _sample(mesh: Any, since: float) -> list[Sample]:
    tasks = _loop_tasks(mesh)
    samples = []
    for record in mesh.records():
        try:
            process = psutil.Process(record.pid)
            with process.oneshot():
                rss, fds = process.memory_info().rss / 2**20, process.num_fds()
        except psutil.Error:
            continue  # gone (killed, restarting)
        samples.append(
            Sample(
                time.monotonic() - since,
                record.name,
                record.pid,
                round(rss, 1),
                fds,
                tasks.get(record.name),
            )
        )
    return samples


def growth(samples: list[Sample], *, load_started: float = 0.0) -> dict[str, float]:
    """The largest growth of memory (MiB), descriptors and tasks over the processes
    (by PID) observed at least MIN_OBSERVED_S past their warm-up."""
    by_pid: dict[int, list[Sample]] = defaultdict(list)
    for s in samples:
        by_pid[s.pid].append(s)
    worst = {"rss_mb": 0.0, "fds": 0.0, "tasks": 0.0}
    for seen in by_pid.values():
        warm = max(seen[0].at, load_started) + WARMUP_S
        after = [s for s in seen if s.at >= warm]
        if not after or after[-1].at - after[0].at < MIN_OBSERVED_S:
            continue
        first, last = after[0], after[-1]
        worst["rss_mb"] = max(worst["rss_mb"], last.rss_mb - first.rss_mb)
        worst["fds"] = max(worst["fds"], last.fds - first.fds)
        if first.tasks is not None and last.tasks is not None:
            worst["tasks"] = max(worst["tasks"], last.tasks - first.tasks)
    return worst


def _plot(samples: list[Sample], kills: list[tuple[float, str]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(11, 10), sharex=True)
    by_process: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_process[s.process].append(s)
    for process, seen in sorted(by_process.items()):
        minutes = [s.at / 60 for s in seen]
        axes[0].plot(minutes, [s.rss_mb for s in seen], label=process, linewidth=1)
        axes[1].plot(minutes, [s.fds for s in seen], linewidth=1)
        with_tasks = [s for s in seen if s.tasks is not None]
        if with_tasks:
            axes[2].plot([s.at / 60 for s in with_tasks], [s.tasks for s in with_tasks])
    for ax, label in zip(axes, ("RSS (MiB)", "open fds", "asyncio tasks"), strict=True):
        ax.set_ylabel(label)
        for at, _ in kills:
            ax.axvline(at / 60, color="grey", linestyle=":", linewidth=0.8)
    axes[2].set_xlabel("minutes (dotted: a process killed)")
    axes[0].legend(fontsize=6, ncol=4)
    fig.suptitle("soak: every process over time")
    fig.tight_layout()
    fig.savefig(RESULTS_DIR / "soak.png", dpi=90)
    plt.close(fig)


async def _soak(mesh: Any, duration: float, kill_every: float) -> dict[str, Any]:
    load = await roomy_load(mesh, TENANT, workers=LOAD_WORKERS)
    rng = random.Random(int(os.environ.get("SWITCHBOARD_SOAK_SEED", "5")))
    samples: list[Sample] = []
    kills: list[tuple[float, str]] = []
    since = time.monotonic()
    async with load:
        next_kill = kill_every
        while (elapsed := time.monotonic() - since) < duration:
            samples += await asyncio.to_thread(_sample, mesh, since)
            if elapsed >= next_kill:
                victim = rng.choice(_service_names(mesh))
                (record,) = [r for r in mesh.records() if r.name == victim]
                os.kill(record.pid, signal.SIGKILL)
                kills.append((elapsed, victim))
                print(f"  {elapsed / 60:5.1f} min: killed {victim} (pid {record.pid})", flush=True)
                next_kill += kill_every
            await asyncio.sleep(SAMPLE_EVERY_S)  # the sampling period
    ended = time.monotonic()
    unfinished = await load.unfinished_tasks()
    print(f"  load stopped: {len(unfinished)} of {len(load.task_ids)} tasks unfinished", flush=True)
    finish_by = time.monotonic() + FINISH_WAIT_S
    while unfinished and time.monotonic() < finish_by:
        await asyncio.sleep(2)  # tasks accepted last may still be running: poll
        unfinished = await load.unfinished_tasks(list(unfinished))
    if unfinished:
        states = Counter(unfinished.values())
        print(f"  unfinished after {FINISH_WAIT_S:g} s: {dict(states)}", flush=True)
        print(f"  e.g. {sorted(unfinished)[:5]}", flush=True)
    kill_times = [since + at for at, _ in kills]
    new_call_errors = [
        r
        for r in load.failed(until=ended)
        if not any(k <= r.started < k + KILL_GRACE_S for k in kill_times)
    ]
    return {
        "samples": samples,
        "kills": kills,
        "codes": Counter(r.code.name for r in load.records),
        "calls": len(load.records),
        "new_call_errors": new_call_errors,
        "tasks": len(load.task_ids),
        "lost": len(unfinished),
        "unfinished": Counter(unfinished.values()),
    }


def run() -> dict[str, Any]:
    duration = _setting("SWITCHBOARD_SOAK_S", 1800)
    kill_every = _setting("SWITCHBOARD_SOAK_KILL_EVERY_S", 180)
    for name, value in STORE_SETTINGS.items():
        os.environ.setdefault(name, value)
    with running_mesh(triton_replicas=1, workers=1) as mesh:
        outcome = asyncio.run(_soak(mesh, duration, kill_every))
    worst = growth(outcome["samples"])
    by_process = {
        name: growth([s for s in outcome["samples"] if s.process == name])["rss_mb"]
        for name in sorted({s.process for s in outcome["samples"]})
    }
    _plot(outcome["samples"], outcome["kills"])
    metrics = {
        "soak_duration_s": duration,
        "soak_kills": len(outcome["kills"]),
        "soak_calls": outcome["calls"],
        "soak_new_call_errors": len(outcome["new_call_errors"]),
        "soak_tasks": outcome["tasks"],
        "soak_lost_tasks": outcome["lost"],
        "soak_rss_growth_mb": worst["rss_mb"],
        "soak_fd_growth": worst["fds"],
        "soak_task_growth": worst["tasks"],
    }
    shown = sorted(outcome["codes"].items())
    errors = [f"{r.operation} {r.code.name} {r.detail[:80]}" for r in outcome["new_call_errors"]]
    kept = ", ".join(f"{k.removeprefix('SWITCHBOARD_')}={os.environ[k]}" for k in STORE_SETTINGS)
    notes = (
        f"{duration / 60:g} min of mixed load ({LOAD_WORKERS} callers), a random service process"
        f" killed every {kill_every:g} s ({', '.join(v for _, v in outcome['kills']) or 'none'});"
        f" calls by code: {dict(shown)}; new calls failed: {errors[:10]};"
        f" unfinished tasks by state: {dict(outcome['unfinished'])};"
        f" growth measured per PID from {WARMUP_S:g} s after its start to its last sample,"
        f" over PIDs observed at least {MIN_OBSERVED_S:g} s after that; memory growth by"
        f" process (MiB): {by_process}; JetStream kept: {kept}; plot: soak.png"
    )
    result = write_result(
        "soak",
        metrics,
        {
            "soak_lost_tasks": "<= 0",
            "soak_new_call_errors": "<= 0",
            "soak_fd_growth": "<= 5",
            "soak_rss_growth_mb": "<= 20",
        },
        notes,
    )
    merge_metrics(
        "faults",
        {k: metrics[k] for k in ("soak_lost_tasks", "soak_rss_growth_mb", "soak_fd_growth")},
        source="soak",
    )
    return result


if __name__ == "__main__":
    run()
