"""Network faults between the services and their dependencies, for a long while: a fault
proxy (`tests.faultproxy`) in front of PostgreSQL (for rag), NATS (for execution),
Triton (for inference and for chat, which embeds the router) and Envoy's internal
listener (for chat's admission), its toxics rotated under mixed load through the
public port. Every call must end within its deadline with OK, UNAVAILABLE (with an
ErrorInfo), DEADLINE_EXCEEDED or RESOURCE_EXHAUSTED; afterwards no service process may
hold more file descriptors, memory or connections than it did after the warm-up.

`NETWORK_FAULTS_S` sets how long the toxics rotate (default 600 s). Chat forgets an idle
session after 20 s here (KEPT), not 2 min: the load opens sessions all along, and what
chat keeps of them by design is then full within the warm-up, so that any growth left is
growth nobody asked for.
`tests/integration/test_network_faults.py` runs the same for a bounded time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import grpc
import psutil
from switchboard.admission.v1 import admission_service_pb2_grpc
from switchboard.chat.v1 import chat_pb2, chat_service_pb2_grpc
from switchboard.events.v1 import events_pb2
from switchboard.execution.v1 import execution_pb2, execution_service_pb2_grpc
from switchboard.inference.v1 import inference_pb2, inference_service_pb2_grpc
from switchboard.rag.v1 import rag_pb2, rag_service_pb2_grpc

from bench._common import (
    api_key_metadata,
    give_tenant_room,
    merge_metrics,
    operator_metadata,
    print_table,
    running_mesh,
    unlimited_policy,
    write_result,
)
from bench._mixed_load import LoadWorkers
from services.runtime import error_details
from tests.faultproxy import Bandwidth, Blackhole, FaultProxy, Latency, Reset, SlowClose, Toxic

logger = logging.getLogger(__name__)

ROTATION: tuple[Toxic, ...] = (
    Latency(ms=200),
    Bandwidth(bytes_per_s=20_000),
    SlowClose(ms=2_000),
    Blackhole(),
    Reset(),
)
"""The toxics, in the order they take turns on every proxy at once."""
DEADLINE_S = 5.0
"""Each operation's deadline (one for all of its calls)."""
DEADLINE_MARGIN_S = 1.0
"""How late an operation may end after its deadline (the client's own scheduling)."""
ALLOWED = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
OPERATIONS = ("generate", "retrieve", "task", "chat")
COLLECTION = "faults"
SERVICE_KINDS = ("inference", "admission", "rag", "execution", "worker", "chat", "auth", "gateway")
"""The mesh's service processes (by name prefix), whose resources are sampled."""
FD_BOUND = 16
"""Most file descriptors a service process may hold more than after the warm-up."""
RSS_BOUND_MB = 40.0
"""Most resident memory a service process may hold more than after the warm-up."""
CONNECTION_BOUND = 8
KEPT = {"SWITCHBOARD_CHAT_IDLE_TTL_S": "20", "SWITCHBOARD_CHAT_EVENT_RETENTION_S": "20"}
"""What the services keep by design, shortened so that it is full within the warm-up."""
"""Most inet connections a service process may hold more than after the warm-up."""


# -- the proxies and who goes through them ---------------------------------------------------


def _via(url: str, proxy: FaultProxy) -> str:
    """`url` with its host:port replaced by the proxy's (user and path kept)."""
    parts = urlsplit(url)
    user = parts.netloc.rpartition("@")[0]
    netloc = f"{user}@{proxy.address}" if user else proxy.address
    return urlunsplit(parts._replace(netloc=netloc))


def _host_port(url: str) -> str:
    return urlsplit(url).netloc.rpartition("@")[2]


@contextlib.asynccontextmanager
async def dependency_proxies(mesh: Any) -> AsyncIterator[dict[str, FaultProxy]]:
    """A fault proxy in front of PostgreSQL, NATS, Triton and the internal listener;
    rag, execution, inference and chat restarted to reach them through it. The proxies
    stop on exit (the services are left pointing at them: stop the mesh next)."""
    async with contextlib.AsyncExitStack() as stack:
        upstreams = {
            "postgres": _host_port(mesh.database_url),
            "nats": _host_port(mesh.nats_url),
            "triton": mesh.triton_urls[0],
            "internal": mesh.internal_address,
        }
        proxies = {
            name: await stack.enter_async_context(FaultProxy(upstream))
            for name, upstream in upstreams.items()
        }
        for replica, env in proxied_env(mesh, proxies).items():
            await asyncio.to_thread(mesh.start_service, replica, env=env)
        yield proxies


def proxied_env(mesh: Any, proxies: Mapping[str, FaultProxy]) -> dict[str, dict[str, str]]:
    """The environment that points each service at its dependencies' proxies."""
    return {
        "rag": {"SWITCHBOARD_DATABASE_URL": _via(mesh.database_url, proxies["postgres"])},
        "execution": {"SWITCHBOARD_NATS_URL": _via(mesh.nats_url, proxies["nats"])},
        "inference": {"SWITCHBOARD_TRITON_URLS": proxies["triton"].address},
        # chat generates through the router it embeds: to Triton, admission via Envoy
        "chat": {
            "SWITCHBOARD_TRITON_URLS": proxies["triton"].address,
            "SWITCHBOARD_ADMISSION_TARGET": proxies["internal"].address,
        },
    }


def set_all(proxies: Mapping[str, FaultProxy], toxic: Toxic | None) -> None:
    for proxy in proxies.values():
        if toxic is None:
            proxy.clear()
        else:
            proxy.set(toxic)


# -- the load --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """How one operation (one or more calls under one deadline) ended."""

    operation: str
    started: float
    elapsed: float
    code: grpc.StatusCode | None
    """None: it did not end by its deadline plus the margin, and was cancelled."""
    reason: str = ""
    """The ErrorInfo reason of a failure, "" when it carried none."""

    def label(self) -> str:
        """`operation CODE REASON`, for counting what was seen."""
        code = "HUNG" if self.code is None else self.code.name
        return f"{self.operation} {code} {self.reason}".rstrip()

    def problem(self) -> str | None:
        """What is wrong with it, if anything."""
        if self.code is None:
            return f"{self.operation} hung past its deadline"
        if self.code not in ALLOWED:
            return f"{self.operation} ended {self.code.name} {self.reason}".rstrip()
        if self.elapsed > DEADLINE_S + DEADLINE_MARGIN_S:
            return f"{self.operation} took {self.elapsed:.2f} s (deadline {DEADLINE_S:g} s)"
        if self.code == grpc.StatusCode.UNAVAILABLE and not self.reason:
            return f"{self.operation} UNAVAILABLE without an ErrorInfo"
        return None


class _Failed(Exception):
    def __init__(self, code: grpc.StatusCode, reason: str) -> None:
        super().__init__(code, reason)
        self.code, self.reason = code, reason


class FaultLoad(LoadWorkers):
    """`workers` callers through `target` as the tenant of `metadata`, each looping over
    Generate, Retrieve, a task (SubmitTask, then WatchTask to its end) and a chat turn
    (CreateSession, then Converse), each operation under one deadline."""

    COLLECTION = COLLECTION
    DOCUMENT = (
        "faults-1",
        "A circuit breaker opens after failures in a row and lets a probe through once its"
        " reset time has passed.",
    )

    def __init__(
        self, target: str, metadata: Sequence[tuple[str, str]], *, workers: int = 4
    ) -> None:
        super().__init__(target, metadata, workers=workers)
        self.outcomes: list[Outcome] = []

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def since(self, moment: float) -> list[Outcome]:
        return [o for o in self.outcomes if o.started >= moment]

    async def once(self, operation: str) -> Outcome:
        """Runs one operation, on a channel of its own."""
        async with grpc.aio.insecure_channel(self._target) as channel:
            return await self._run(operation, channel)

    async def _worker(self, index: int) -> None:
        assert self._channel is not None
        turn = index
        while not self._stop.is_set():
            operation = OPERATIONS[turn % len(OPERATIONS)]
            turn += 1
            self.outcomes.append(await self._run(operation, self._channel))

    async def _run(self, operation: str, channel: grpc.aio.Channel) -> Outcome:
        started = time.monotonic()
        deadline = started + DEADLINE_S
        code: grpc.StatusCode | None = grpc.StatusCode.OK
        reason = ""
        try:
            async with asyncio.timeout(DEADLINE_S + DEADLINE_MARGIN_S + 5.0):
                await getattr(self, f"_{operation}")(channel, deadline)
        except grpc.aio.AioRpcError as exc:
            details = error_details(exc)
            code = exc.code()
            reason = details.error_info.reason if details.error_info else ""
        except _Failed as exc:
            code, reason = exc.code, exc.reason
        except TimeoutError:
            code = None
        return Outcome(operation, started, time.monotonic() - started, code, reason)

    @staticmethod
    def _left(deadline: float) -> float:
        return max(0.001, deadline - time.monotonic())

    async def _generate(self, channel: grpc.aio.Channel, deadline: float) -> None:
        stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
        request = inference_pb2.GenerateRequest(
            prompt="What does a circuit breaker do?",
            parameters=inference_pb2.GenerationParameters(max_tokens=8),
        )
        call = stub.Generate(request, metadata=self._metadata, timeout=self._left(deadline))
        async for _ in call:
            pass

    async def _retrieve(self, channel: grpc.aio.Channel, deadline: float) -> None:
        stub = rag_service_pb2_grpc.RagServiceStub(channel)
        await stub.Retrieve(
            rag_pb2.RetrieveRequest(collection=COLLECTION, query="when does it probe", top_k=2),
            metadata=self._metadata,
            timeout=self._left(deadline),
        )

    async def _task(self, channel: grpc.aio.Channel, deadline: float) -> None:
        stub = execution_service_pb2_grpc.ExecutionServiceStub(channel)
        step = execution_pb2.Step(name="one", tool=execution_pb2.ToolStep(tool="list_models"))
        reply = await stub.SubmitTask(
            execution_pb2.SubmitTaskRequest(steps=[step]),
            metadata=self._metadata,
            timeout=self._left(deadline),
        )
        watch = stub.WatchTask(
            execution_pb2.WatchTaskRequest(task_id=reply.task.task_id),
            metadata=self._metadata,
            timeout=self._left(deadline),
        )
        async for event in watch:
            if event.HasField("task_event") and event.task_event.type in _FINAL:
                watch.cancel()
                return

    async def _chat(self, channel: grpc.aio.Channel, deadline: float) -> None:
        stub = chat_service_pb2_grpc.ChatServiceStub(channel)
        created = await stub.CreateSession(
            chat_pb2.CreateSessionRequest(), metadata=self._metadata, timeout=self._left(deadline)
        )
        call = stub.Converse(metadata=self._metadata, timeout=self._left(deadline))
        session = chat_pb2.OpenSession(session_id=created.session.session_id)
        await call.write(chat_pb2.ConverseRequest(open=session))
        message = chat_pb2.UserMessage(client_message_id="faults-1", text="What opens?")
        await call.write(chat_pb2.ConverseRequest(message=message))
        async for frame in call:
            if frame.HasField("error"):
                details = error_details(frame.error.status)
                call.cancel()
                raise _Failed(details.code, details.error_info.reason if details.error_info else "")
            if frame.HasField("turn_completed"):
                await call.done_writing()
                call.cancel()
                return
        raise _Failed(grpc.StatusCode.UNKNOWN, "stream ended before the turn completed")


_FINAL = (
    events_pb2.TASK_EVENT_TYPE_COMPLETED,
    events_pb2.TASK_EVENT_TYPE_FAILED,
    events_pb2.TASK_EVENT_TYPE_CANCELLED,
)


async def backend_states(target: str, metadata: Sequence[tuple[str, str]]) -> set[int]:
    """Every Triton backend's circuit state, as ListModels reports it."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
        reply = await stub.ListModels(
            inference_pb2.ListModelsRequest(), metadata=metadata, timeout=DEADLINE_S
        )
    return {b.state for m in reply.models for b in m.backends}


async def failing_operations(load: FaultLoad) -> list[str]:
    """The operations that do not succeed (each tried once, on a fresh channel), with
    how they ended; empty when the mesh serves normally."""
    outcomes = await asyncio.gather(*(load.once(op) for op in OPERATIONS))
    return [
        f"{o.operation}: {o.code.name if o.code else 'hung'} {o.reason} after {o.elapsed:.1f}s"
        for o in outcomes
        if o.code != grpc.StatusCode.OK
    ]


async def serves_normally(load: FaultLoad) -> bool:
    """Whether every operation succeeds (once each, on a fresh channel)."""
    return not await failing_operations(load)


async def give_room(mesh: Any, tenant: str, metadata: Sequence[tuple[str, str]]) -> None:
    """A policy the load never reaches, so what the faults cause is what is seen."""
    async with grpc.aio.insecure_channel(mesh.envoy_address) as channel:
        stub = admission_service_pb2_grpc.AdmissionServiceStub(channel)
        await give_tenant_room(
            stub, operator_metadata(mesh), unlimited_policy(tenant, in_flight=64)
        )


# -- the service processes' resources --------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    pid: int
    fds: int
    rss_mb: float
    connections: int


def service_usage(mesh: Any) -> dict[str, Usage]:
    """Each running service process's open descriptors, resident memory and inet
    connections, by replica name."""
    usage = {}
    for record in mesh.records():
        if record.name.split("-")[0] not in SERVICE_KINDS:
            continue
        process = record.process()
        if process is None:
            continue
        with contextlib.suppress(psutil.Error):
            usage[record.name] = Usage(
                pid=process.pid,
                fds=process.num_fds(),
                rss_mb=process.memory_info().rss / 2**20,
                connections=len(process.net_connections(kind="inet")),
            )
    return usage


@dataclass
class Growth:
    """Each process's growth from a baseline to a later sample."""

    fds: dict[str, int] = field(default_factory=dict)
    rss_mb: dict[str, float] = field(default_factory=dict)
    connections: dict[str, int] = field(default_factory=dict)
    restarted: list[str] = field(default_factory=list)
    """Processes whose PID changed (a crash the control plane restarted) or vanished."""
    failing: list[str] = field(default_factory=list)
    """The operations that did not succeed when last tried (`settled`), with how they
    ended: the mesh did not serve normally again."""

    @classmethod
    def between(cls, before: Mapping[str, Usage], after: Mapping[str, Usage]) -> Growth:
        growth = cls()
        for name, was in before.items():
            now = after.get(name)
            if now is None or now.pid != was.pid:
                growth.restarted.append(name)
                continue
            growth.fds[name] = now.fds - was.fds
            growth.rss_mb[name] = now.rss_mb - was.rss_mb
            growth.connections[name] = now.connections - was.connections
        return growth

    def within_bounds(self) -> bool:
        return (
            not self.restarted
            and max(self.fds.values(), default=0) <= FD_BOUND
            and max(self.rss_mb.values(), default=0.0) <= RSS_BOUND_MB
            and max(self.connections.values(), default=0) <= CONNECTION_BOUND
        )

    def describe(self) -> str:
        return ", ".join(
            f"{name} {self.fds[name]:+d} fds {self.rss_mb[name]:+.1f} MB"
            f" {self.connections[name]:+d} conns"
            for name in sorted(self.fds)
        ) + (f"; restarted: {self.restarted}" if self.restarted else "")


# -- the rotation ----------------------------------------------------------------------------


async def rotate(
    proxies: Mapping[str, FaultProxy],
    *,
    seconds: float,
    step_s: float,
    on_step: Any = None,
) -> int:
    """Every toxic of ROTATION in turn on every proxy, `step_s` each with a clean
    `step_s` between two, for `seconds`; returns the steps taken. `on_step(elapsed)` is
    awaited after each step (sampling)."""
    started = time.monotonic()
    steps = 0
    while time.monotonic() - started < seconds:
        set_all(proxies, ROTATION[steps % len(ROTATION)])
        await asyncio.sleep(step_s)
        set_all(proxies, None)
        await asyncio.sleep(step_s)
        steps += 1
        if on_step is not None:
            await on_step(time.monotonic() - started)
    set_all(proxies, None)
    return steps


async def settled(
    mesh: Any, load: FaultLoad, baseline: Mapping[str, Usage], *, timeout: float
) -> Growth:
    """Waits (polling) until every operation succeeds and every process is back within
    the bounds of `baseline`; returns the last growth seen, in bounds or not."""
    end = time.monotonic() + timeout
    growth = Growth()
    while time.monotonic() < end:
        if failing := await failing_operations(load):
            growth = Growth(failing=failing)
        else:
            growth = Growth.between(baseline, service_usage(mesh))
            if growth.within_bounds():
                break
        await asyncio.sleep(1.0)
    return growth


# -- the benchmark ---------------------------------------------------------------------------


async def _measure(mesh: Any, seconds: float) -> dict[str, Any]:
    tenant = f"network-faults-{uuid.uuid4().hex[:6]}"
    metadata = api_key_metadata(mesh, tenant)
    await give_room(mesh, tenant, metadata)
    async with dependency_proxies(mesh) as proxies:
        load = FaultLoad(mesh.envoy_address, metadata, workers=4)
        await load.prepare()
        timeline: list[dict[str, Any]] = []
        async with load:
            # warm-up: one turn of every toxic, then healed
            await rotate(proxies, seconds=len(ROTATION) * 10.0, step_s=5.0)
            await settled(mesh, load, service_usage(mesh), timeout=60)
            baseline = service_usage(mesh)
            began = time.monotonic()

            async def sample(elapsed: float) -> None:
                usage = service_usage(mesh)
                timeline.append(
                    {
                        "s": round(elapsed, 1),
                        "fds": sum(u.fds for u in usage.values()),
                        "rss_mb": round(sum(u.rss_mb for u in usage.values()), 1),
                        "connections": sum(u.connections for u in usage.values()),
                    }
                )

            steps = await rotate(proxies, seconds=seconds, step_s=5.0, on_step=sample)
            rotated_s = time.monotonic() - began
        growth = await settled(mesh, load, baseline, timeout=90)
        outcomes = load.since(began)
        injected = sum(p.faults_injected for p in proxies.values())
        by_toxic: dict[str, int] = {}
        for proxy in proxies.values():
            for name, count in proxy.injected.items():
                by_toxic[name] = by_toxic.get(name, 0) + count
    problems = [p for o in outcomes if (p := o.problem())]
    codes: dict[str, int] = {}
    for o in outcomes:
        codes[o.label()] = codes.get(o.label(), 0) + 1
    return {
        "seconds": rotated_s,
        "steps": steps,
        "outcomes": outcomes,
        "problems": problems,
        "codes": codes,
        "injected": injected,
        "by_toxic": by_toxic,
        "growth": growth,
        "baseline": baseline,
        "timeline": timeline,
    }


def run() -> dict[str, Any]:
    seconds = float(os.environ.get("NETWORK_FAULTS_S", "600"))
    for name, value in KEPT.items():
        os.environ.setdefault(name, value)
    with running_mesh(triton_replicas=1, admission_replicas=1) as mesh:
        found = asyncio.run(_measure(mesh, seconds))
    growth: Growth = found["growth"]
    outcomes = found["outcomes"]
    print_table(
        "calls while the toxics rotated",
        ("operation, code, ErrorInfo reason", "calls"),
        sorted(found["codes"].items()),
    )
    print_table(
        "growth after the faults stopped (from after the warm-up)",
        ("process", "fds", "rss MB", "connections"),
        [
            (n, growth.fds[n], f"{growth.rss_mb[n]:.1f}", growth.connections[n])
            for n in sorted(growth.fds)
        ],
    )
    for problem in found["problems"][:20]:
        print(f"  problem: {problem}")
    metrics = {
        "rotated_s": found["seconds"],
        "calls": len(outcomes),
        "calls_ok": sum(1 for o in outcomes if o.code == grpc.StatusCode.OK),
        "call_problems": len(found["problems"]),
        "proxy_faults_injected": found["injected"],
        "leak_fd_growth": max(growth.fds.values(), default=0),
        "leak_fd_growth_sum": sum(growth.fds.values()),
        "leak_rss_growth_mb": max(growth.rss_mb.values(), default=0.0),
        "leak_connection_growth": max(growth.connections.values(), default=0),
        "restarted_processes": len(growth.restarted),
    }
    notes = (
        f"toxics {', '.join(type(t).__name__ for t in ROTATION)} rotated on four proxies"
        f" (PostgreSQL for rag, NATS for execution, Triton for inference and chat, the"
        f" internal listener for chat's admission) for {found['seconds']:.0f} s"
        f" (NETWORK_FAULTS_S={seconds:g}; the default run is 600 s),"
        f" 5 s on then 5 s clear, {found['steps']} steps, under 4 workers of mixed load"
        f" (Generate, Retrieve, SubmitTask+WatchTask, a chat turn; {DEADLINE_S:g} s deadline"
        f" each); faults injected by toxic {found['by_toxic']}; status codes {found['codes']};"
        f" growth is each service process's at the end (after the faults stopped and every"
        f" operation succeeded again) minus after a warm-up rotation; leak_fd_growth and"
        f" leak_rss_growth_mb are the max over processes, leak_fd_growth_sum the sum;"
        f" restarted: {growth.restarted or 'none'};"
        f" chat idle sessions kept {os.environ['SWITCHBOARD_CHAT_IDLE_TTL_S']} s, their"
        f" events in JetStream {os.environ['SWITCHBOARD_CHAT_EVENT_RETENTION_S']} s;"
        f" sampled totals over time: {found['timeline']}"
    )
    targets = {
        "call_problems": "<= 0",
        "leak_fd_growth": f"<= {FD_BOUND}",
        "leak_rss_growth_mb": f"<= {RSS_BOUND_MB:g}",
        "leak_connection_growth": f"<= {CONNECTION_BOUND}",
        "restarted_processes": "<= 0",
    }
    result = write_result("network-faults", metrics, targets, notes)
    merge_metrics(
        "faults",
        {
            "proxy_faults_injected": metrics["proxy_faults_injected"],
            "leak_fd_growth": metrics["leak_fd_growth"],
            "leak_rss_growth_mb": metrics["leak_rss_growth_mb"],
        },
        source="network-faults",
    )
    return result
