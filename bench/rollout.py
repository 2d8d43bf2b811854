"""Rollout and recovery under load: what callers see while the control plane replaces every
replica, and how fast a replica killed with SIGKILL is back in Envoy's endpoints.

One mesh: two replicas of every service (inference, admission, rag, execution, auth,
gateway, chat), two workers, one Triton. A `MixedLoad` (LOAD_WORKERS callers, each
looping Generate stream / Retrieve / SubmitTask / chat turn through the public port,
every call recorded) runs throughout; its tenant gets an admission policy above any rate it reaches,
so the figures are the mesh's, not the default policy's 10 requests/s. In order:

1. Steady load for STEADY_S: calls completed per second.
2. RolloutService for every service (one after the other, each replica replaced new
   first, the old one drained), under the same load: the calls that overlapped it and
   failed, how long it took, and the throughput meanwhile against the steady one.
3. kill -9 of one replica of each kind in turn. Recovery is the time from the kill to
   Envoy's ACK of the first config published after the replacement became SERVING: the
   control plane's own WatchEvents (`exited`, `started`, `serving`, then `config_pushed`
   with that version, then `config_acked`), read on a stream opened before the load
   starts, timed by the control plane's wall clock against this process's (the same
   machine). Each failed call is blamed on the last kill before it ended: a call that
   started once the killed process was dead (its sockets closed, a few ms after the
   signal) is a new call (which must succeed), one that started before was in flight.
   A call that started after the death but that Envoy had already written onto its
   connection to the dead process (it had not yet seen it close: "reset reason:
   connection termination") is counted apart, as written to the dead: in flight on the
   killed replica as far as Envoy knew, as the control plane's kill test counts it.
4. kill -9 of the only Triton: time until triton-0 is SERVING again, and the calls that
   failed meanwhile (Generate, Retrieve and chat turns need Triton: with one, they fail
   until it is back), counted apart from the others.
5. The control plane's `switchboard_xds_push_seconds` histogram (publish → every Envoy
   ACKed), scraped after the mesh is up and at the end: quantiles of the pushes of this
   run, read off its buckets; the same pushes timed from WatchEvents as a cross-check.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from prometheus_client.parser import text_string_to_metric_families
from switchboard.admission.v1 import admission_service_pb2_grpc
from switchboard.control.v1 import control_pb2 as pb
from switchboard.control.v1 import control_service_pb2_grpc

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
from bench._mixed_load import OPERATIONS as MIXED_OPERATIONS
from bench._mixed_load import CallRecord, MixedLoad

NAME = "rollout"
TENANT = "bench-rollout"
REPLICAS = {
    "inference_replicas": 2,
    "admission_replicas": 2,
    "rag_replicas": 2,
    "execution_replicas": 2,
    "auth_replicas": 2,
    "gateway_replicas": 2,
    "chat_replicas": 2,
}
OPERATIONS = MIXED_OPERATIONS
"""The load: Generate, Retrieve, SubmitTask and chat turns (whose streams resume on
another replica when theirs drains or dies)."""
WORKERS = 2
KINDS = ("inference", "admission", "rag", "execution", "worker", "auth", "gateway", "chat")
TRITON = "triton-0"
LOAD_WORKERS = 4
STEADY_S = 20.0
SETTLE_S = 2.0
"""Load after each recovery before the next kill, so its stragglers end first."""
RECOVERY_TIMEOUT_S = 60.0
DEATH_WAIT_S = 2.0
"""How long a SIGKILLed process may take to be gone (it is, in milliseconds)."""
TRITON_TIMEOUT_S = 240.0
ROLLOUT_TIMEOUT_S = 1200.0
"""Fifteen replacements, each a Python start-up: a minute each on a 2-core machine that
others load too."""
PUSH_METRIC = "switchboard_xds_push_seconds"
SERVING = pb.REPLICA_STATE_SERVING


# -- the control plane's events ------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    kind: str
    replica: str
    service: str
    version: int
    at: float
    """The control plane's wall clock (time.time()) when it happened."""


class EventLog:
    """Every WatchEvents event from `start()` on, in the order the control plane emitted
    them (one stream; reopened if it breaks, which `gaps` counts)."""

    def __init__(self, control: control_service_pb2_grpc.ControlServiceStub) -> None:
        self._control = control
        self.events: list[Event] = []
        self.gaps = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Opens the stream (its first events come with the first change, which the
        steady phase leaves seconds away)."""
        self._task = asyncio.ensure_future(self._read())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _read(self) -> None:
        while True:
            call = self._control.WatchEvents(pb.WatchEventsRequest())
            try:
                async for item in call:
                    e = item.event
                    at = e.time.seconds + e.time.nanos / 1e9
                    self.events.append(Event(e.kind, e.replica, e.service, e.config_version, at))
                    if e.kind.startswith("rollout_"):
                        print(f"  [control] {e.message}", flush=True)
            except grpc.aio.AioRpcError:
                pass
            finally:
                call.cancel()
            self.gaps += 1
            await asyncio.sleep(0.1)

    def first(self, after: int, match: Callable[[Event], bool]) -> int | None:
        """The index of the first event after index `after` that matches."""
        for index in range(after + 1, len(self.events)):
            if match(self.events[index]):
                return index
        return None

    async def wait(
        self, after: int, match: Callable[[Event], bool], *, timeout: float, what: str
    ) -> int:
        deadline = time.monotonic() + timeout
        while (found := self.first(after, match)) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not within {timeout:g}s")
            await asyncio.sleep(0.02)
        return found

    def start_ups(self, since: int, until: int) -> list[float]:
        """Seconds from `started` to `serving` of each replica started within the events
        [since, until)."""
        found = []
        for index in range(since, until):
            event = self.events[index]
            if event.kind == "started":
                serving = self.first(
                    index, lambda e, name=event.replica: e.kind == "serving" and e.replica == name
                )
                if serving is not None:
                    found.append(self.events[serving].at - event.at)
        return found

    def durations(self, since: int, until: int, begin: str, end: str) -> dict[str, float]:
        """Service → seconds from its `begin` event to its `end` event, within [since, until)."""
        began: dict[str, float] = {}
        found = {}
        for event in self.events[since:until]:
            if event.kind == begin:
                began[event.service] = event.at
            elif event.kind == end and event.service in began:
                found[event.service] = event.at - began[event.service]
        return found

    def push_seconds(self) -> list[float]:
        """For each config version pushed and acknowledged: `config_pushed` → `config_acked`."""
        pushed = {e.version: e.at for e in self.events if e.kind == "config_pushed"}
        return [
            e.at - pushed[e.version]
            for e in self.events
            if e.kind == "config_acked" and e.version in pushed
        ]


# -- one kill ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recovery:
    kind: str
    replica: str
    killed_at: float
    """Wall clock."""
    killed_mono: float
    exited_s: float
    started_s: float
    serving_s: float
    acked_s: float
    """Kill → Envoy ACKed the config with the replacement in EDS: the recovery."""


async def recovered(
    control: control_service_pb2_grpc.ControlServiceStub,
    log: EventLog,
    victim: pb.Replica,
    *,
    mark: int,
    killed_at: float,
    killed_mono: float,
) -> Recovery:
    """How `victim`, killed at `killed_at` (wall clock) after event index `mark`, came back.

    Raises:
        TimeoutError: it was not back in EDS in time.
    """

    def of_victim(kind: str) -> Callable[[Event], bool]:
        return lambda e: e.kind == kind and e.replica == victim.name

    what = f"{victim.name} after kill -9"
    exited = await log.wait(mark, of_victim("exited"), timeout=10, what=f"{what}: exited")
    started = await log.wait(exited, of_victim("started"), timeout=10, what=f"{what}: started")
    serving = await log.wait(
        started, of_victim("serving"), timeout=RECOVERY_TIMEOUT_S, what=f"{what}: serving"
    )
    pushed = await log.wait(
        serving, lambda e: e.kind == "config_pushed", timeout=10, what=f"{what}: pushed"
    )
    version = log.events[pushed].version
    acked = await log.wait(
        pushed,
        lambda e: e.kind == "config_acked" and e.version >= version,
        timeout=10,
        what=f"{what}: config {version} acked",
    )
    now = {r.name: r for r in await _replicas(control, victim.service)}.get(victim.name)
    if now is None or now.state != SERVING or now.pid in (0, victim.pid):
        raise TimeoutError(f"{victim.name} is not back as a new process: {now}")
    at = [log.events[i].at - killed_at for i in (exited, started, serving, acked)]
    return Recovery(victim.service, victim.name, killed_at, killed_mono, *at)


def _kill(pid: int) -> float:
    """SIGKILLs `pid`; returns when (monotonic) it was dead: its descriptors closed, so
    Envoy sees its connections end. Until then a call may still be written to them."""
    os.kill(pid, signal.SIGKILL)
    stat = Path(f"/proc/{pid}/stat")
    give_up = time.monotonic() + DEATH_WAIT_S
    while time.monotonic() < give_up:
        try:
            state = stat.read_text().rpartition(")")[2].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            break  # reaped
        if state in ("Z", "X"):
            break  # a zombie: everything but its exit status is gone
        time.sleep(0.0005)  # exiting: polled, it takes a few ms
    return time.monotonic()


async def _replicas(
    control: control_service_pb2_grpc.ControlServiceStub, service: str = ""
) -> list[pb.Replica]:
    reply = await control.ListReplicas(pb.ListReplicasRequest(service=service), timeout=5)
    return list(reply.replicas)


# -- the run -------------------------------------------------------------------------------


@dataclass
class Figures:
    steady_per_s: float = 0.0
    steady_errors: int = 0
    rollout_s: float = 0.0
    rollout_per_s: float = 0.0
    rollout_errors: list[CallRecord] | None = None
    rolled: int = 0
    rollout_failure: str = ""
    rollout_services: dict[str, float] | None = None
    rollout_start_ups: list[float] | None = None
    recoveries: list[Recovery] | None = None
    unrecovered: list[str] | None = None
    kill_new: list[CallRecord] | None = None
    kill_in_flight: list[CallRecord] | None = None
    kill_written_to_the_dead: list[CallRecord] | None = None
    triton_recovery_s: float | None = None
    triton_generate_back_s: float | None = None
    triton_failure: str = ""
    triton_errors: list[CallRecord] | None = None
    push_events_s: list[float] | None = None
    event_gaps: int = 0
    calls: int = 0
    chat_turns: int = 0
    chat_resumes: int = 0
    chat_gaps: int = 0


def _per_s(records: Sequence[CallRecord], start: float, end: float) -> float:
    done = sum(1 for r in records if r.ok and start <= r.ended < end)
    return done / (end - start)


async def measure(mesh: Any) -> Figures:
    figures = Figures()
    key = api_key_metadata(mesh, TENANT)
    async with (
        grpc.aio.insecure_channel(mesh.envoy_address) as public,
        grpc.aio.insecure_channel(mesh.internal_address) as internal,
    ):
        await give_tenant_room(
            admission_service_pb2_grpc.AdmissionServiceStub(public),
            operator_metadata(mesh),
            unlimited_policy(TENANT, in_flight=256),
        )
        control = control_service_pb2_grpc.ControlServiceStub(internal)
        log = EventLog(control)
        log.start()
        load = MixedLoad(mesh.envoy_address, key, workers=LOAD_WORKERS, operations=OPERATIONS)
        await load.prepare()
        try:
            async with load:
                await load.wait_calls(3 * LOAD_WORKERS, since=time.monotonic())
                await _steady(load, figures)
                await _rollout(control, log, load, figures)
                await _kills(control, log, load, figures)
                await _triton(control, log, load, figures)
        finally:
            await log.stop()
        figures.push_events_s = log.push_seconds()
        figures.event_gaps = log.gaps
        figures.calls = len(load.records)
        figures.chat_turns = sum(1 for r in load.records if r.operation == "chat" and r.ok)
        figures.chat_resumes = load.chat_resumes
        figures.chat_gaps = load.chat_gaps
    return figures


async def _steady(load: MixedLoad, figures: Figures) -> None:
    print(f"  steady load for {STEADY_S:g}s", flush=True)
    start = time.monotonic()
    await asyncio.sleep(STEADY_S)
    end = time.monotonic()
    figures.steady_per_s = _per_s(load.records, start, end)
    figures.steady_errors = len(load.failed(since=start, until=end))


async def _rollout(
    control: control_service_pb2_grpc.ControlServiceStub,
    log: EventLog,
    load: MixedLoad,
    figures: Figures,
) -> None:
    print("  rolling out every service", flush=True)
    mark = len(log.events)
    start = time.monotonic()
    try:
        reply = await control.RolloutService(pb.RolloutServiceRequest(), timeout=ROLLOUT_TIMEOUT_S)
        figures.rolled = len(reply.replicas)
    except grpc.aio.AioRpcError as error:
        figures.rollout_failure = f"{error.code().name}: {error.details()}"
        print(f"  the rollout FAILED: {figures.rollout_failure}", flush=True)
    end = time.monotonic()
    await asyncio.sleep(0.5)  # the last events, on their stream
    figures.rollout_services = log.durations(
        mark, len(log.events), "rollout_started", "rollout_done"
    )
    figures.rollout_start_ups = log.start_ups(mark, len(log.events))
    figures.rollout_s = end - start
    figures.rollout_per_s = _per_s(load.records, start, end)
    await load.wait_calls(2 * LOAD_WORKERS, since=time.monotonic())
    figures.rollout_errors = [
        r for r in load.records if not r.ok and r.ended >= start and r.started < end
    ]


async def _kills(
    control: control_service_pb2_grpc.ControlServiceStub,
    log: EventLog,
    load: MixedLoad,
    figures: Figures,
) -> None:
    recoveries, unrecovered, kills = [], [], []
    phase_start = time.monotonic()
    for kind in KINDS:
        victim = next(r for r in await _replicas(control, kind) if r.state == SERVING)
        mark = len(log.events) - 1
        killed_at, killed_mono = time.time(), time.monotonic()
        kills.append(_kill(victim.pid))
        try:
            recovery = await recovered(
                control, log, victim, mark=mark, killed_at=killed_at, killed_mono=killed_mono
            )
        except TimeoutError as error:
            unrecovered.append(str(error))
            print(f"  kill -9 {victim.name}: NOT back: {error}", flush=True)
            continue
        recoveries.append(recovery)
        print(f"  kill -9 {victim.name}: back in EDS after {recovery.acked_s:.2f}s", flush=True)
        await asyncio.sleep(SETTLE_S)
        await load.wait_calls(LOAD_WORKERS, since=time.monotonic())
    phase_end = time.monotonic()
    figures.unrecovered = unrecovered
    new, in_flight, written = [], [], []
    for record in load.failed(since=phase_start - 60, until=phase_end):
        blamed = max((k for k in kills if k <= record.ended), default=None)
        if blamed is None:
            continue  # ended before the first kill: the rollout's or steady load's
        if record.started < blamed:
            in_flight.append(record)
        else:
            (written if _written_to_the_dead(record) else new).append(record)
    figures.recoveries, figures.kill_new, figures.kill_in_flight = recoveries, new, in_flight
    figures.kill_written_to_the_dead = written


async def _triton(
    control: control_service_pb2_grpc.ControlServiceStub,
    log: EventLog,
    load: MixedLoad,
    figures: Figures,
) -> None:
    (victim,) = [r for r in await _replicas(control, "triton") if r.name == TRITON]
    mark = len(log.events) - 1
    killed_at, killed_mono = time.time(), time.monotonic()
    _kill(victim.pid)
    print(f"  kill -9 {TRITON}", flush=True)
    try:
        serving = await log.wait(
            mark,
            lambda e: e.kind == "serving" and e.replica == TRITON,
            timeout=TRITON_TIMEOUT_S,
            what=f"{TRITON} serving after kill -9",
        )
        figures.triton_recovery_s = log.events[serving].at - killed_at
        deadline = time.monotonic() + RECOVERY_TIMEOUT_S
        while not (
            back := [r for r in load.completed(since=killed_mono) if r.operation == "generate"]
        ):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no Generate succeeded {RECOVERY_TIMEOUT_S:g}s after")
            await asyncio.sleep(0.05)
        figures.triton_generate_back_s = min(r.ended for r in back) - killed_mono
    except TimeoutError as error:
        figures.triton_failure = str(error)
        print(f"  {TRITON} NOT back: {error}", flush=True)
    await asyncio.sleep(SETTLE_S)
    await load.wait_calls(2 * LOAD_WORKERS, since=time.monotonic())
    figures.triton_errors = [r for r in load.records if not r.ok and r.ended >= killed_mono]


# -- the xDS push histogram ----------------------------------------------------------------


def push_buckets(url: str) -> dict[float, float]:
    """The control plane's `switchboard_xds_push_seconds` buckets: upper bound → count."""
    with urllib.request.urlopen(url, timeout=5) as reply:  # noqa: S310 - loopback
        text = reply.read().decode()
    return {
        float(sample.labels["le"]): sample.value
        for family in text_string_to_metric_families(text)
        if family.name == PUSH_METRIC
        for sample in family.samples
        if sample.name == f"{PUSH_METRIC}_bucket"
    }


def bucket_quantile(buckets: dict[float, float], q: float) -> float | None:
    """The q-quantile (0..1) of cumulative `buckets`, linear within the bucket it falls in
    (Prometheus's histogram_quantile); None without observations."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


# -- the result ----------------------------------------------------------------------------


def run() -> dict:
    with running_mesh(triton_replicas=1, workers=WORKERS, **REPLICAS) as mesh:
        url = f"http://{mesh.config.host}:{mesh.config.metrics_base_port + 50}/metrics"
        before = push_buckets(url)
        try:
            figures = asyncio.run(measure(mesh))
        except Exception:
            _keep_logs(mesh)
            raise
        if figures.rollout_failure or figures.unrecovered or figures.triton_failure:
            _keep_logs(mesh)
        after = push_buckets(url)
    pushes = {bound: after[bound] - before.get(bound, 0.0) for bound in after}
    return _report(figures, pushes)


def _keep_logs(mesh: Any) -> None:
    """Copies the run's logs out of its run directory (removed with the mesh)."""
    kept = Path(tempfile.mkdtemp(prefix="switchboard-bench-rollout-logs-"))
    shutil.copytree(mesh.config.run_dir / "logs", kept, dirs_exist_ok=True)
    print(f"  the mesh's logs are kept in {kept}", flush=True)


def _report(f: Figures, pushes: dict[float, float]) -> dict:
    recoveries = f.recoveries or []
    rollout_start_ups = f.rollout_start_ups or []
    print_table(
        "rollout, one service after the other (s)",
        ("service", "took"),
        [(service, f"{took:.1f}") for service, took in (f.rollout_services or {}).items()],
    )
    print_table(
        "kill -9 → back in EDS (s after the kill)",
        ("replica", "exited", "started", "serving", "acked", "new errs", "in-flight errs"),
        [
            (
                r.replica,
                f"{r.exited_s:.2f}",
                f"{r.started_s:.2f}",
                f"{r.serving_s:.2f}",
                f"{r.acked_s:.2f}",
                sum(1 for c in f.kill_new or [] if _blamed(c, recoveries) is r),
                sum(1 for c in f.kill_in_flight or [] if _blamed(c, recoveries) is r),
            )
            for r in recoveries
        ],
    )
    acked = [r.acked_s for r in recoveries]
    start_up = [r.serving_s - r.started_s for r in recoveries]
    to_eds = [r.acked_s - r.serving_s for r in recoveries]
    unrecovered = f.unrecovered or []
    push_p50, push_p99 = (bucket_quantile(pushes, q) for q in (0.5, 0.99))
    events = f.push_events_s or []
    metrics: dict[str, float | None] = {
        "steady_per_s": f.steady_per_s,
        "rollout_per_s": f.rollout_per_s,
        "throughput_dip_pct": 100.0 * (1 - f.rollout_per_s / f.steady_per_s),
        "rollout_errors": len(f.rollout_errors or []),
        "rollout_completed": 0 if f.rollout_failure else 1,
        "rollout_s": f.rollout_s,
        "rollout_start_up_p50_s": (
            percentile(rollout_start_ups, 50) if rollout_start_ups else None
        ),
        "recovery_p50_s": percentile(acked, 50) if acked else None,
        "recovery_max_s": max(acked) if acked else None,
        "recovery_start_up_p50_s": percentile(start_up, 50) if acked else None,
        "recovery_serving_to_acked_p50_ms": ms(percentile(to_eds, 50)) if acked else None,
        "kills_not_recovered": len(unrecovered),
        "kill_errors_new_calls": len(f.kill_new or []),
        "kill_errors_in_flight": len(f.kill_in_flight or []),
        "kill_errors_written_to_the_dead": len(f.kill_written_to_the_dead or []),
        "triton_recovery_s": f.triton_recovery_s,
        "triton_generate_back_s": f.triton_generate_back_s,
        "triton_kill_errors": len(f.triton_errors or []),
        "xds_push_p50_ms": None if push_p50 is None else ms(push_p50),
        "xds_push_p99_ms": None if push_p99 is None else ms(push_p99),
        "xds_pushes": pushes.get(float("inf"), 0.0),
        "xds_push_events_p50_ms": ms(percentile(events, 50)) if events else None,
        "xds_push_events_p99_ms": ms(percentile(events, 99)) if events else None,
        "steady_errors": f.steady_errors,
        "chat_turns": f.chat_turns,
        "chat_resumes": f.chat_resumes,
        "chat_gaps": f.chat_gaps,
        **{f"recovery_{r.kind}_s": r.acked_s for r in recoveries},
    }
    targets = {
        "rollout_errors": "<= 0",
        "rollout_completed": ">= 1",
        "recovery_max_s": "<= 2",
        "kills_not_recovered": "<= 0",
        "kill_errors_new_calls": "<= 0",
        "xds_push_p99_ms": "<= 100",
        "chat_gaps": "<= 0",
    }
    targets = {k: v for k, v in targets.items() if metrics[k] is not None}
    notes = (
        "one mesh: 2 replicas of inference/admission/rag/execution/auth/gateway/chat,"
        f" 2 workers, 1 Triton (CPU); {LOAD_WORKERS} MixedLoad callers (Generate stream,"
        f" Retrieve, SubmitTask, chat turn through Envoy), {f.calls} calls in all."
        f" Steady {STEADY_S:g}s;"
        f" rollout of every service ({f.rolled} replicas afterwards); throughput = calls"
        " completed OK per second, dip = rollout vs steady. Recovery: kill -9 (this"
        " process's clock) → Envoy's ACK of the first config pushed after the replacement's"
        " `serving` event (control plane's WatchEvents clock; same machine);"
        " recovery_start_up = started → serving (the new process's start-up and first"
        " successful health probe), serving_to_acked = EDS push and ACK;"
        " rollout_start_up = the same for each new replica the rollout started. Kill"
        " errors: each failed call blamed on the last kill before it ended; new = started"
        f" after it. Rollout per service (s): {_seconds(f.rollout_services)}."
        f" Failed calls: rollout {_codes(f.rollout_errors)}, kills new"
        f" {_codes(f.kill_new)} {_after_kill(f.kill_new or [], f.recoveries or [])},"
        f" in flight {_codes(f.kill_in_flight)}, written to the dead process's connection"
        f" {_codes(f.kill_written_to_the_dead)}"
        f" {_after_kill(f.kill_written_to_the_dead or [], f.recoveries or [])}, Triton kill"
        f" {_codes(f.triton_errors)} (Generate, Retrieve, chat need the only Triton)."
        " triton_recovery = kill → triton-0 `serving`; triton_generate_back = kill → first"
        " Generate OK. xds_push quantiles read off the control plane's"
        f" {PUSH_METRIC} buckets (this run's pushes: after the mesh was up → end);"
        " xds_push_events = the same pushes timed from config_pushed → config_acked events."
        " Chat: turns completed, streams resumed on another replica (theirs drained or"
        " died), turns whose tokens came with a gap or a duplicate across resumes."
        + (f" The rollout FAILED: {f.rollout_failure}." if f.rollout_failure else "")
        + "".join(f" Not back after kill -9: {line}." for line in unrecovered)
        + (f" Triton not back: {f.triton_failure}." if f.triton_failure else "")
        + (f" WatchEvents reopened {f.event_gaps} time(s)." if f.event_gaps else "")
    )
    return write_result(NAME, metrics, targets, notes)


def _after_kill(calls: Sequence[CallRecord], recoveries: Sequence[Recovery]) -> list[str]:
    """Each new call that failed: how long after its kill it started, and its error."""
    described = []
    for call in calls:
        recovery = _blamed(call, recoveries)
        since = (
            "" if recovery is None else f"+{(call.started - recovery.killed_mono) * 1000:.0f} ms "
        )
        described.append(f"{since}{call.detail[:160]}")
    return described


def _written_to_the_dead(record: CallRecord) -> bool:
    """Envoy had written the call onto its connection to the killed process before it saw
    that connection close (a few ms to tens of ms after the death, on a loaded machine):
    the connection was terminated under it, and Envoy does not retry a call that may have
    reached its process (unless read-only). As the control plane's kill test does, such a
    call counts as in flight on the killed replica, apart from the new calls."""
    return (
        record.code == grpc.StatusCode.UNAVAILABLE
        and "reset reason: connection termination" in record.detail
    )


def _blamed(call: CallRecord, recoveries: Sequence[Recovery]) -> Recovery | None:
    before = [r for r in recoveries if r.killed_mono <= call.ended]
    return max(before, key=lambda r: r.killed_mono) if before else None


def _seconds(durations: dict[str, float] | None) -> str:
    return "{" + ", ".join(f"{k}: {v:.1f}" for k, v in (durations or {}).items()) + "}"


def _codes(records: Sequence[CallRecord] | None) -> str:
    counts = Counter(f"{r.operation} {r.code.name}" for r in records or [])
    return "{" + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) + "}"
