"""What every benchmark shares: the results file, the table, percentiles, the mesh, drivers."""

from __future__ import annotations

import asyncio
import itertools
import json
import operator
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"

_COMPARE = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}


# -- the machine and the results file --------------------------------------------------------


def machine() -> str:
    """`"2 cores"`, plus the GPUs nvidia-smi lists, if any."""
    cores = os.cpu_count() or 1
    text = f"{cores} core{'s' if cores != 1 else ''}"
    gpus = _gpus()
    if gpus:
        text += ", " + ", ".join(gpus)
    return text


def _gpus() -> list[str]:
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi is None:
        return []
    try:
        out = subprocess.run(
            [nvidia_smi, "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0:
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def merge_metrics(name: str, metrics: Mapping[str, float | None], *, source: str) -> None:
    """Puts `metrics` into `bench/results/<name>.json`, a file of figures that several
    benchmarks contribute to (`faults.json`), beside the others' figures; its notes say
    which benchmark gave which."""
    path = RESULTS_DIR / f"{name}.json"
    try:
        result = json.loads(path.read_text())
    except FileNotFoundError:
        result = {"name": name, "metrics": {}, "targets": {}, "sources": {}}
    result["when"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    result["machine"] = machine()
    result.setdefault("metrics", {}).update({k: _rounded(v) for k, v in metrics.items()})
    sources = result.setdefault("sources", {})
    sources.update(dict.fromkeys(metrics, f"bench/results/{source}.json (make bench-{source})"))
    result["notes"] = "figures from several benchmarks; `sources` names each one's"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def meets(value: float, target: str) -> bool:
    """Whether `value` meets a target such as `">= 4"` or `"<= 1"`."""
    op, _, bound = target.strip().partition(" ")
    return _COMPARE[op](value, float(bound))


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 3 if abs(value) < 100 else 1)
    return value


def write_result(
    name: str,
    metrics: Mapping[str, float | None],
    targets: Mapping[str, str],
    notes: str,
) -> dict[str, Any]:
    """Prints the metrics against their targets and writes `bench/results/<name>.json`
    (a metric that could not be measured is None: `null`, its reason in `notes`)."""
    result = {
        "name": name,
        "when": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(),
        "metrics": {k: _rounded(v) for k, v in metrics.items()},
        "targets": dict(targets),
        "notes": notes,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    rows = []
    for key, value in result["metrics"].items():
        target = targets.get(key, "")
        verdict = ("ok" if meets(value, target) else "MISSED") if target else ""
        shown = "null" if value is None else f"{value:g}"
        rows.append((key, shown, target, verdict)[: 4 if targets else 2])
    headers = ("metric", "value", "target", "")[: 4 if targets else 2]
    print_table(f"{name} ({result['machine']})", headers, rows)
    print(f"  {notes}")
    print(f"  wrote {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    return result


def missed_targets(result: Mapping[str, Any]) -> list[str]:
    return [
        f"{key} = {result['metrics'][key]:g} (target {target})"
        for key, target in result["targets"].items()
        if not meets(result["metrics"][key], target)
    ]


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    print(f"\n{title}")
    for n, row in enumerate(cells):
        print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            print("  " + "  ".join("-" * w for w in widths).rstrip())


# -- statistics ------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linearly interpolated (numpy's default)."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def ms(seconds: float) -> float:
    return seconds * 1000.0


# -- the mesh --------------------------------------------------------------------------------


@contextmanager
def running_mesh(
    *,
    triton_replicas: int = 1,
    workers: int = 1,
    model_policy: Path | None = None,
    settings: Mapping[str, object] | None = None,
    **replicas: int,
) -> Iterator[Any]:
    """The real mesh on free ports in its own run directory, stopped (by PID) on exit;
    `model_policy` replaces `services/inference/models.yaml`; `settings` replaces other
    LauncherConfig fields (`{"nats_sync_interval": "2m"}`); `replicas` sets other
    services' replica counts (`rag_replicas=2`), as `isolated_config` takes them."""
    from services.launcher import Mesh, isolated_config

    run_dir = Path(tempfile.mkdtemp(prefix="switchboard-bench-"))
    config = isolated_config(
        run_dir, triton_replicas=triton_replicas, workers=workers, gpu="off", **replicas
    )
    if model_policy is not None:
        config = replace(config, model_policy=model_policy)
    if settings:
        config = replace(config, **settings)
    mesh = Mesh(config, progress=lambda msg: print(f"  [mesh] {msg}", flush=True))
    try:
        started = time.monotonic()
        mesh.up()
        print(f"  [mesh] up in {time.monotonic() - started:.1f}s", flush=True)
        yield mesh
    finally:
        mesh.down()
        shutil.rmtree(run_dir, ignore_errors=True)


_API_KEYS: dict[tuple[str, str], str] = {}
_API_KEYS_LOCK = threading.Lock()


def api_key_metadata(mesh: Any, tenant: str) -> tuple[tuple[str, str], ...]:
    """Call metadata acting as `tenant` through the mesh's public Envoy listener: an API
    key for the tenant as a bearer token. The key is created on first use, as
    `switchboard keys create` does, and reused for the rest of the process.

    Callable with or without a running event loop (the key store runs in a thread).
    Calls straight to a service's own port take `x-tenant-id` instead: only Envoy
    checks keys.
    """
    slot = (mesh.database_url, tenant)
    with _API_KEYS_LOCK:
        if slot not in _API_KEYS:
            with ThreadPoolExecutor(1) as pool:
                _API_KEYS[slot] = pool.submit(asyncio.run, _create_api_key(mesh, tenant)).result(
                    timeout=60
                )
        token = _API_KEYS[slot]
    return (("authorization", f"Bearer {token}"),)


def operator_metadata(mesh: Any) -> tuple[tuple[str, str], ...]:
    """Call metadata of an operator through Envoy (policy writes are operators' only): an
    operator credential, created on first use as `switchboard keys create --operator`
    does."""
    return api_key_metadata(mesh, OPERATOR)


OPERATOR = ""
"""The `api_key_metadata` tenant that stands for an operator credential."""


async def _create_api_key(mesh: Any, tenant: str) -> str:
    store = mesh.key_store()
    await store.open()
    try:
        if tenant == OPERATOR:
            _, token = await store.create_operator("bench")
        else:
            _, token = await store.create(tenant, "bench")
        return token
    finally:
        await store.close()


# -- load drivers ----------------------------------------------------------------------------


@dataclass
class Window:
    """What a closed-loop run completed inside its measuring window."""

    completed: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    abandoned: int = 0
    """Calls still unfinished `drain_s` after the window closed (cancelled)."""

    @property
    def per_s(self) -> float:
        return self.completed / self.seconds if self.seconds else 0.0

    def add(self, other: Window) -> None:
        self.completed += other.completed
        self.seconds += other.seconds
        self.latencies.extend(other.latencies)
        self.abandoned += other.abandoned


async def closed_loop(
    call: Callable[[int], Awaitable[object]],
    *,
    concurrency: int,
    seconds: float,
    drain_s: float = 60.0,
    ramp_s: float = 0.0,
) -> Window:
    """`concurrency` workers, each calling `call(i)` back to back (i counts up across all
    workers) for `seconds`. Counts the calls that finished inside the window, after its
    first `ramp_s` (while every worker's first call starts at once). The ones still
    in flight when it closes are not counted but awaited, so the next run starts on a quiet
    server; after `drain_s` they are cancelled and counted as `abandoned` (a server that
    slow may still be working on them, so the caller should stop measuring)."""
    counter = itertools.count()
    window = Window(seconds=seconds - ramp_s)
    start = time.perf_counter()
    counted, end = start + ramp_s, start + seconds

    async def worker() -> None:
        while (began := time.perf_counter()) < end:
            await call(next(counter))
            if counted <= (done := time.perf_counter()) <= end:
                window.completed += 1
                window.latencies.append(done - began)

    workers = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
    try:
        _, pending = await asyncio.wait(workers, timeout=seconds + drain_s)
        window.abandoned = len(pending)
    finally:
        for task in workers:
            task.cancel()
        results = await asyncio.gather(*workers, return_exceptions=True)
    for result in results:
        if isinstance(result, Exception):
            raise result
    return window


def rotated(items: Sequence[Any], by: int) -> list[Any]:
    """`items` rotated left by `by`: alternates which arm of a comparison goes first."""
    by %= len(items)
    return [*items[by:], *items[:by]]


def unlimited_policy(tenant: str, *, in_flight: int) -> Any:
    """An admission policy whose rates a benchmark never reaches (the default tenant
    policy allows 10 requests/s), with `in_flight` requests at once."""
    from switchboard.admission.v1 import admission_pb2

    return admission_pb2.Policy(
        tenant_id=tenant,
        requests_per_second=100_000,
        request_burst=100_000,
        tokens_per_minute=10_000_000_000,
        token_burst=1_000_000_000,
        max_in_flight=in_flight,
        weight=1,
        max_queued=in_flight,
    )


async def give_tenant_room(stub: Any, metadata: Sequence[tuple[str, str]], policy: Any) -> None:
    """Stores `policy` (an admission Policy) for its tenant through `stub`, as the operator
    whose `metadata` (`operator_metadata`) is given, and waits until admission applies
    it."""
    from switchboard.admission.v1 import admission_pb2

    await stub.UpdatePolicy(
        admission_pb2.UpdatePolicyRequest(policy=policy), timeout=10, metadata=metadata
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        reply = await stub.GetPolicy(
            admission_pb2.GetPolicyRequest(tenant_id=policy.tenant_id),
            timeout=10,
            metadata=metadata,
        )
        if not reply.is_default and reply.policy.request_burst == policy.request_burst:
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"admission did not apply the {policy.tenant_id!r} policy within 10s")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process(process: subprocess.Popen[Any]) -> None:
    """Terminates a process this benchmark started (by its handle), killing it if need be."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def cpu_seconds(mesh: Any) -> dict[str, float]:
    """CPU time (user + system) used so far by each kind of mesh process (its replicas
    together, `worker-0` and `worker-1` as `worker`) with their children, and by this
    client process (`bench client`)."""
    import psutil

    used: dict[str, float] = {}
    for record, alive in mesh.status():
        if not alive:
            continue
        kind, _, slot = record.name.rpartition("-")
        kind = kind if kind and slot.isdigit() else record.name
        try:
            root = psutil.Process(record.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for proc in procs:
            try:
                times = proc.cpu_times()
            except psutil.Error:
                continue
            used[kind] = used.get(kind, 0.0) + times.user + times.system
    own = os.times()
    used["bench client"] = own.user + own.system
    return used


def machine_ticks() -> tuple[int, int]:
    """(all, idle) CPU ticks of the whole machine so far (/proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(values), values[3] + values[4]
