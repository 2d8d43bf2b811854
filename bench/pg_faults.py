"""PostgreSQL restarted, then stalled, under mixed load: how callers fare and how fast
every service recovers by itself.

One mesh (one replica of each service, one worker, one Triton). Throughout, a
`MixedLoad` (Generate stream, Retrieve, SubmitTask, chat turn over Converse) and
`Probes`: one caller per kind of call, each with a DEADLINE_S deadline, recording its
status code, ErrorInfo reason and RetryInfo. Probes that need the database: SubmitTask
(acknowledged tasks kept), IngestDocument (acknowledged documents kept), CreateSession +
SendMessage (acknowledged user messages kept), Retrieve, admission GetPolicy; that do
not: Generate and ListModels.

1. Restart: `stop_component("postgres")`, DOWN_S down, `start_postgres()` (returns once
   PostgreSQL accepts connections again). Recovery of each DB-backed kind: from then to
   the end of its first successful call.
2. Stall: SIGSTOP of the postmaster and every child (`postgres_stalled`) for STALL_S,
   then SIGCONT. Recovery of each kind: from SIGCONT to the end of its first successful
   call.
3. Losses: every acknowledged task reaches a final state and exists once for its
   idempotency key; the collection holds every acknowledged document; every session
   holds its acknowledged user message exactly once.

`tests/integration/test_postgres_stall.py` runs the same probes through the same stall.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import psutil
from switchboard.admission.v1 import admission_pb2, admission_service_pb2_grpc
from switchboard.chat.v1 import chat_pb2, chat_service_pb2_grpc
from switchboard.execution.v1 import execution_pb2, execution_service_pb2_grpc
from switchboard.inference.v1 import inference_pb2, inference_service_pb2_grpc
from switchboard.rag.v1 import rag_pb2, rag_service_pb2_grpc

from bench._common import (
    api_key_metadata,
    merge_metrics,
    print_table,
    running_mesh,
    write_result,
)
from bench._mixed_load import MixedLoad, roomy_load
from services.runtime import error_details

logger = logging.getLogger(__name__)

NAME = "pg-faults"
TENANT = "bench-pg-faults"
DEADLINE_S = 3.0
"""Each probe call's deadline."""
PROBE_PAUSE_S = 0.25
"""A probe's pause between calls (light load: the 2-core machine runs the mesh too)."""
LOAD_WORKERS = 2
LOAD_TIMEOUT_S = 5.0
DOWN_S = 10.0
STALL_S = 10.0
WARM_S = 5.0
RECOVERY_TIMEOUT_S = 60.0
FINAL_TIMEOUT_S = 90.0
COLLECTION = "pg-faults"
DATABASE_KINDS = ("submit", "ingest", "chat", "retrieve", "policy")
"""Probe kinds whose calls need PostgreSQL."""
FREE_KINDS = ("generate", "list_models")
"""Probe kinds whose calls do not."""
FINAL_STATES = (
    execution_pb2.TASK_STATE_COMPLETED,
    execution_pb2.TASK_STATE_FAILED,
    execution_pb2.TASK_STATE_CANCELLED,
)


# -- the stall -------------------------------------------------------------------------------


def postgres_postmaster(mesh: Any) -> psutil.Process:
    """The running postmaster the mesh recorded."""
    (record,) = [r for r in mesh.records() if r.name == "postgres"]
    process = record.process()
    if process is None:
        raise RuntimeError("PostgreSQL is not running")
    return process


@contextlib.contextmanager
def postgres_stalled(mesh: Any) -> Iterator[list[psutil.Process]]:
    """SIGSTOP to the postmaster, then to each of its children (it forks none while
    stopped), yielding the stopped processes; SIGCONT to each on exit, whatever happens."""
    postmaster = postgres_postmaster(mesh)
    stopped: list[psutil.Process] = []
    try:
        postmaster.send_signal(signal.SIGSTOP)
        stopped.append(postmaster)
        for child in postmaster.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                child.send_signal(signal.SIGSTOP)
                stopped.append(child)
        yield stopped
    finally:
        for process in reversed(stopped):
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGCONT)


def all_stopped(processes: Sequence[psutil.Process]) -> bool:
    """Whether every one of `processes` is stopped (the SIGSTOP landed)."""
    try:
        return all(p.status() == psutil.STATUS_STOPPED for p in processes)
    except psutil.NoSuchProcess:
        return False


def stop_postgres_fast(mesh: Any) -> None:
    """PostgreSQL's fast shutdown (SIGINT, as `pg_ctl stop -m fast`: sessions ended, a
    clean stop), then the mesh forgets the process. (`stop_component` alone sends SIGTERM,
    PostgreSQL's smart shutdown, which waits for every client to disconnect: the
    services' pools never do, so it ends in SIGKILL 15 s later.)"""
    postmaster = postgres_postmaster(mesh)
    postmaster.send_signal(signal.SIGINT)
    postmaster.wait(timeout=60)
    mesh.stop_component("postgres")


_START_APART = """
import pickle, sys, time
from services.launcher import Mesh
with open(sys.argv[1], "rb") as f:
    Mesh(pickle.load(f)).start_postgres()
print(time.time())
"""


async def start_postgres_apart(mesh: Any) -> float:
    """`mesh.start_postgres()` in a process of its own; returns when (this process's
    monotonic clock) PostgreSQL accepted connections again and was bootstrapped.

    Not in this process: PostgreSQL starts as another user, so subprocess forks (no
    vfork), and a fork while this process's gRPC threads are busy can abort the child in
    gRPC's fork handler (`ev_epoll1_linux.cc: Check failed: next_worker->state == KICKED`)
    before it execs PostgreSQL."""
    with tempfile.NamedTemporaryFile(suffix=".pickle") as config:
        pickle.dump(mesh.config, config)
        config.flush()
        helper = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _START_APART, config.name, stdout=asyncio.subprocess.PIPE
        )
        out, _ = await helper.communicate()
    if helper.returncode != 0:
        raise RuntimeError(f"PostgreSQL did not start again (exit {helper.returncode})")
    return time.monotonic() - (time.time() - float(out.split()[-1]))


# -- the probes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """One probe call."""

    kind: str
    started: float
    ended: float
    code: grpc.StatusCode
    reason: str = ""
    """A failure's ErrorInfo reason; empty without ErrorInfo."""
    retry: bool = False
    """Whether the failure carried RetryInfo."""
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.code == grpc.StatusCode.OK

    @property
    def took(self) -> float:
        return self.ended - self.started


@dataclass
class Acknowledged:
    """What the database-backed probes were told was stored."""

    tasks: dict[str, str] = field(default_factory=dict)
    """task id -> idempotency key."""
    documents: list[str] = field(default_factory=list)
    messages: dict[str, str] = field(default_factory=dict)
    """session id -> client message id."""


class Probes:
    """One caller per kind (`DATABASE_KINDS` and `FREE_KINDS`) through `target` as the
    tenant of `metadata`, each call with a `deadline` and every result recorded."""

    def __init__(
        self,
        target: str,
        metadata: Sequence[tuple[str, str]],
        *,
        deadline: float = DEADLINE_S,
        pause: float = PROBE_PAUSE_S,
        kinds: Sequence[str] = (*DATABASE_KINDS, *FREE_KINDS),
    ) -> None:
        self._target = target
        self._metadata = tuple(metadata)
        self.deadline = deadline
        self._pause = pause
        self._kinds = tuple(kinds)
        self.run_id = uuid.uuid4().hex[:12]
        self.records: list[Probe] = []
        self.acknowledged = Acknowledged()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._channel: grpc.aio.Channel | None = None
        self._count = 0

    async def __aenter__(self) -> Probes:
        self._stop = asyncio.Event()
        self._channel = grpc.aio.insecure_channel(self._target)
        calls = self._calls(self._channel)
        await calls["ingest"]()  # the collection Retrieve reads
        self._tasks = [asyncio.ensure_future(self._loop(k, calls[k])) for k in self._kinds]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._channel is not None:
            await self._channel.close()

    def of(self, kind: str, *, since: float = 0.0, until: float = float("inf")) -> list[Probe]:
        """`kind`'s calls that ended within [since, until)."""
        return [r for r in self.records if r.kind == kind and since <= r.ended < until]

    def first_ok(self, kind: str, *, since: float) -> Probe | None:
        ok = [r for r in self.of(kind, since=since) if r.ok]
        return min(ok, key=lambda r: r.ended) if ok else None

    def overlapping(self, start: float, end: float) -> list[Probe]:
        """The calls in flight at some moment of [start, end]."""
        return [r for r in self.records if r.started <= end and r.ended >= start]

    async def wait_ok(self, kinds: Sequence[str], *, since: float, timeout: float) -> None:
        """Waits until each of `kinds` has a call that succeeded after `since`."""
        deadline = time.monotonic() + timeout
        while missing := [k for k in kinds if self.first_ok(k, since=since) is None]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no successful {', '.join(missing)} within {timeout:g}s")
            await asyncio.sleep(0.05)

    async def _loop(self, kind: str, call: Callable[[], Awaitable[None]]) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            code, reason, retry, message = grpc.StatusCode.OK, "", False, ""
            try:
                await call()
            except grpc.aio.AioRpcError as error:
                details = error_details(error)
                code, message = error.code(), error.details() or ""
                reason = details.error_info.reason if details.error_info is not None else ""
                retry = details.retry_info is not None
            self.records.append(
                Probe(kind, started, time.monotonic(), code, reason, retry, message)
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self._pause)

    def _next(self) -> str:
        self._count += 1
        return f"{self.run_id}-{self._count}"

    def _calls(self, channel: grpc.aio.Channel) -> dict[str, Callable[[], Awaitable[None]]]:
        meta, deadline = self._metadata, self.deadline
        execution = execution_service_pb2_grpc.ExecutionServiceStub(channel)
        rag = rag_service_pb2_grpc.RagServiceStub(channel)
        chat = chat_service_pb2_grpc.ChatServiceStub(channel)
        admission = admission_service_pb2_grpc.AdmissionServiceStub(channel)
        inference = inference_service_pb2_grpc.InferenceServiceStub(channel)
        acknowledged = self.acknowledged

        async def submit() -> None:
            key = self._next()
            step = execution_pb2.Step(name="one", tool=execution_pb2.ToolStep(tool="list_models"))
            request = execution_pb2.SubmitTaskRequest(
                idempotency_key=key, steps=[step], labels={"pg-faults": self.run_id}
            )
            reply = await execution.SubmitTask(request, metadata=meta, timeout=deadline)
            acknowledged.tasks[reply.task.task_id] = key

        async def ingest() -> None:
            document_id = self._next()
            document = rag_pb2.Document(
                document_id=document_id,
                collection=f"{COLLECTION}-{self.run_id}",
                text=f"Probe document {document_id}: PostgreSQL keeps what was acknowledged.",
            )
            request = rag_pb2.IngestDocumentRequest(document=document)
            await rag.IngestDocument(request, metadata=meta, timeout=deadline)
            acknowledged.documents.append(document_id)

        async def converse() -> None:
            until = time.monotonic() + deadline
            created = await chat.CreateSession(
                chat_pb2.CreateSessionRequest(), metadata=meta, timeout=deadline
            )
            session_id = created.session.session_id
            message = chat_pb2.UserMessage(client_message_id=self._next(), text="What stalls?")
            await chat.SendMessage(
                chat_pb2.SendMessageRequest(session_id=session_id, message=message),
                metadata=meta,
                timeout=max(until - time.monotonic(), 0.001),
            )
            acknowledged.messages[session_id] = message.client_message_id

        async def retrieve() -> None:
            request = rag_pb2.RetrieveRequest(
                collection=f"{COLLECTION}-{self.run_id}", query="what was acknowledged", top_k=2
            )
            await rag.Retrieve(request, metadata=meta, timeout=deadline)

        async def policy() -> None:
            await admission.GetPolicy(
                admission_pb2.GetPolicyRequest(), metadata=meta, timeout=deadline
            )

        async def generate() -> None:
            request = inference_pb2.GenerateRequest(
                prompt="Say something short.",
                parameters=inference_pb2.GenerationParameters(max_tokens=4),
            )
            async for _ in inference.Generate(request, metadata=meta, timeout=deadline):
                pass

        async def list_models() -> None:
            await inference.ListModels(
                inference_pb2.ListModelsRequest(), metadata=meta, timeout=deadline
            )

        return {
            "submit": submit,
            "ingest": ingest,
            "chat": converse,
            "retrieve": retrieve,
            "policy": policy,
            "generate": generate,
            "list_models": list_models,
        }


# -- losses ----------------------------------------------------------------------------------


@dataclass
class Losses:
    tasks_lost: list[str] = field(default_factory=list)
    """Acknowledged tasks not found, or not in a final state in time."""
    tasks_duplicated: list[str] = field(default_factory=list)
    """Idempotency keys with more than one task."""
    documents_lost: int = 0
    messages_lost: list[str] = field(default_factory=list)
    messages_duplicated: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return (
            len(self.tasks_lost)
            + len(self.tasks_duplicated)
            + self.documents_lost
            + len(self.messages_lost)
            + len(self.messages_duplicated)
        )


async def check_losses(
    target: str,
    metadata: Sequence[tuple[str, str]],
    probes: Probes,
    *,
    extra_tasks: Sequence[str] = (),
    timeout: float = FINAL_TIMEOUT_S,
) -> Losses:
    """What of `probes`' acknowledged work (and the `extra_tasks` ids) is missing or
    doubled, once every task had `timeout` seconds to reach a final state."""
    losses = Losses()
    acknowledged = probes.acknowledged
    async with grpc.aio.insecure_channel(target) as channel:
        execution = execution_service_pb2_grpc.ExecutionServiceStub(channel)
        pending = set(acknowledged.tasks) | set(extra_tasks)
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for task_id in sorted(pending):
                try:
                    reply = await execution.GetTask(
                        execution_pb2.GetTaskRequest(task_id=task_id), metadata=metadata, timeout=10
                    )
                except grpc.aio.AioRpcError as error:
                    if error.code() == grpc.StatusCode.NOT_FOUND:
                        losses.tasks_lost.append(task_id)
                        pending.discard(task_id)
                    continue
                if reply.task.state in FINAL_STATES:
                    pending.discard(task_id)
            if pending:
                await asyncio.sleep(0.5)
        losses.tasks_lost.extend(sorted(pending))
        keys: Counter[str] = Counter()
        token = ""
        while True:
            page = await execution.ListTasks(
                execution_pb2.ListTasksRequest(
                    labels={"pg-faults": probes.run_id}, page_size=100, page_token=token
                ),
                metadata=metadata,
                timeout=10,
            )
            keys.update(t.idempotency_key for t in page.tasks)
            token = page.next_page_token
            if not token:
                break
        losses.tasks_duplicated = sorted(k for k, n in keys.items() if n > 1)

        rag = rag_service_pb2_grpc.RagServiceStub(channel)
        collection = f"{COLLECTION}-{probes.run_id}"
        stored = 0
        token = ""
        while True:
            listed = await rag.ListCollections(
                rag_pb2.ListCollectionsRequest(page_size=100, page_token=token),
                metadata=metadata,
                timeout=10,
            )
            stored += sum(c.document_count for c in listed.collections if c.name == collection)
            token = listed.next_page_token
            if not token:
                break
        losses.documents_lost = max(0, len(acknowledged.documents) - stored)

        chat = chat_service_pb2_grpc.ChatServiceStub(channel)
        for session_id, client_id in acknowledged.messages.items():
            listed = await chat.ListMessages(
                chat_pb2.ListMessagesRequest(session_id=session_id, page_size=100),
                metadata=metadata,
                timeout=10,
            )
            found = sum(1 for m in listed.messages if m.client_message_id == client_id)
            if found == 0:
                losses.messages_lost.append(session_id)
            elif found > 1:
                losses.messages_duplicated.append(session_id)
    return losses


# -- the benchmark ---------------------------------------------------------------------------


@dataclass
class Outage:
    """One fault: its window and what callers saw."""

    name: str
    start: float = 0.0
    back: float = 0.0
    """When PostgreSQL accepted connections again (restart) or got SIGCONT (stall)."""
    recovery: dict[str, float] = field(default_factory=dict)
    """Kind -> seconds from `back` to the end of its first successful call."""
    failure: str = ""
    probe_codes: Counter[str] = field(default_factory=Counter)
    load_codes: Counter[str] = field(default_factory=Counter)


async def _outage(
    name: str,
    fault: Callable[[], Awaitable[float]],
    probes: Probes,
    load: MixedLoad,
) -> Outage:
    outage = Outage(name)
    outage.start = time.monotonic()
    print(f"  {name}", flush=True)
    outage.back = await fault()
    try:
        await probes.wait_ok(DATABASE_KINDS, since=outage.back, timeout=RECOVERY_TIMEOUT_S)
    except TimeoutError as error:
        outage.failure = str(error)
        print(f"  {name}: NOT recovered: {error}", flush=True)
    for kind in DATABASE_KINDS:
        first = probes.first_ok(kind, since=outage.back)
        if first is not None:
            outage.recovery[kind] = first.ended - outage.back
    end = time.monotonic()
    outage.probe_codes = Counter(
        f"{r.kind} {r.code.name}" for r in probes.overlapping(outage.start, outage.back)
    )
    outage.load_codes = Counter(
        f"{r.operation} {r.code.name}"
        for r in load.records
        if r.started <= outage.back and r.ended >= outage.start
    )
    print(
        f"  {name}: back after {max(outage.recovery.values(), default=float('nan')):.2f}s"
        f" ({end - outage.start:.1f}s in all)",
        flush=True,
    )
    await asyncio.sleep(WARM_S)
    return outage


async def measure(mesh: Any) -> tuple[list[Outage], Probes, MixedLoad, Losses]:
    load = await roomy_load(mesh, TENANT, workers=LOAD_WORKERS, timeout=LOAD_TIMEOUT_S)
    key = api_key_metadata(mesh, TENANT)
    probes = Probes(mesh.envoy_address, key)

    async def restart() -> float:
        await asyncio.to_thread(stop_postgres_fast, mesh)
        await asyncio.sleep(DOWN_S)
        return await start_postgres_apart(mesh)

    async def stall() -> float:
        with postgres_stalled(mesh) as stopped:
            await asyncio.sleep(STALL_S)
            if not all_stopped(stopped):
                raise RuntimeError("PostgreSQL was not stopped throughout the stall")
        return time.monotonic()

    async with load, probes:
        warm = time.monotonic()
        await probes.wait_ok((*DATABASE_KINDS, *FREE_KINDS), since=warm, timeout=60)
        await asyncio.sleep(WARM_S)
        outages = [
            await _outage("restart", restart, probes, load),
            await _outage("stall", stall, probes, load),
        ]
    losses = await check_losses(mesh.envoy_address, key, probes, extra_tasks=load.task_ids)
    return outages, probes, load, losses


def run() -> dict:
    with running_mesh(triton_replicas=1, workers=1) as mesh:
        outages, probes, load, losses = asyncio.run(measure(mesh))
    return _report(outages, probes, load, losses)


def _overrun(probes: Probes, load: MixedLoad) -> float:
    """The longest any call ran past its deadline (negative: none did)."""
    late = [r.took - probes.deadline for r in probes.records]
    late += [r.ended - r.started - LOAD_TIMEOUT_S for r in load.records]
    return max(late)


def _report(outages: list[Outage], probes: Probes, load: MixedLoad, losses: Losses) -> dict:
    restart, stall = outages
    print_table(
        "first successful call after PostgreSQL was back (s)",
        ("kind", "restart", "stall"),
        [
            (
                k,
                f"{restart.recovery.get(k, float('nan')):.2f}",
                f"{stall.recovery.get(k, float('nan')):.2f}",
            )
            for k in DATABASE_KINDS
        ],
    )
    for outage in outages:
        print_table(
            f"calls in flight during the {outage.name} (probes, then mixed load)",
            ("kind status", "calls"),
            sorted(
                {
                    **outage.probe_codes,
                    **{f"load {k}": v for k, v in outage.load_codes.items()},
                }.items()
            ),
        )
    bad = [
        r
        for r in probes.records
        if not r.ok
        and r.code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    ]
    unavailable = [r for r in probes.records if r.code == grpc.StatusCode.UNAVAILABLE]
    metrics: dict[str, float | None] = {
        "pg_restart_recovery_s": max(restart.recovery.values()) if not restart.failure else None,
        "pg_stall_recovery_s": max(stall.recovery.values()) if not stall.failure else None,
        "pg_outage_lost": losses.total,
        "pg_outage_overrun_max_s": _overrun(probes, load),
        "pg_outage_other_codes": len(bad),
        "pg_unavailable_without_error_info": sum(1 for r in unavailable if not r.reason),
        "pg_unavailable_without_retry_info": sum(1 for r in unavailable if not r.retry),
        **{f"pg_restart_recovery_{k}_s": v for k, v in restart.recovery.items()},
        **{f"pg_stall_recovery_{k}_s": v for k, v in stall.recovery.items()},
        "tasks_acknowledged": len(probes.acknowledged.tasks) + len(load.task_ids),
        "documents_acknowledged": len(probes.acknowledged.documents),
        "messages_acknowledged": len(probes.acknowledged.messages),
        "probe_calls": len(probes.records),
        "load_calls": len(load.records),
    }
    targets = {
        "pg_outage_lost": "<= 0",
        "pg_outage_overrun_max_s": "<= 0.5",
        "pg_outage_other_codes": "<= 0",
    }
    notes = (
        "one mesh: one replica of each service, 1 worker, 1 Triton (CPU);"
        f" probes (one caller per kind, {DEADLINE_S:g}s deadline, {PROBE_PAUSE_S:g}s apart):"
        " DB-backed SubmitTask, IngestDocument, CreateSession+SendMessage (chat), Retrieve,"
        " GetPolicy; DB-free Generate, ListModels; plus a MixedLoad of"
        f" {LOAD_WORKERS} callers ({LOAD_TIMEOUT_S:g}s deadline). Restart: stop, {DOWN_S:g}s"
        " down, start; stop = PostgreSQL's fast shutdown (SIGINT); recovery from"
        " start_postgres() returning (accepting connections, bootstrap checked) to the end"
        " of each kind's first OK call; pg_restart_recovery_s"
        f" = the max over kinds. Stall: SIGSTOP postmaster + children {STALL_S:g}s;"
        " recovery from SIGCONT. pg_outage_lost: acknowledged tasks not final or missing,"
        " idempotency keys with two tasks, acknowledged documents missing from the"
        " collection's document_count, acknowledged user messages missing or doubled."
        " overrun = the longest any call ran past its own deadline (negative: none did)."
        f" Restart codes: {_codes(restart)}. Stall codes: {_codes(stall)}."
        f" Failures other than UNAVAILABLE/DEADLINE_EXCEEDED: {_examples(bad)}."
        + (f" Restart NOT recovered: {restart.failure}." if restart.failure else "")
        + (f" Stall NOT recovered: {stall.failure}." if stall.failure else "")
        + (f" Losses: {losses}." if losses.total else "")
    )
    result = write_result(NAME, metrics, targets, notes)
    merge_metrics(
        "faults",
        {
            k: result["metrics"][k]
            for k in ("pg_restart_recovery_s", "pg_stall_recovery_s", "pg_outage_lost")
        },
        source=NAME,
    )
    return result


def _codes(outage: Outage) -> str:
    counts = outage.probe_codes + Counter({f"load {k}": v for k, v in outage.load_codes.items()})
    return "{" + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) + "}"


def _examples(records: Sequence[Probe]) -> str:
    seen = Counter(f"{r.kind} {r.code.name} {r.reason}: {r.message[:80]}" for r in records)
    return "{" + "; ".join(f"{k} ×{v}" for k, v in seen.most_common(5)) + "}"
