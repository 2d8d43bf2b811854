"""Full disks under a running mesh: NATS's JetStream store and PostgreSQL's data directory
each on a small tmpfs of its own, a ballast file that fills one to the last byte, and the
two scenarios that `tests/integration/test_full_disk.py` asserts on and
`bench/full_disk.py` (`make bench-full-disk`) records.

1. NATS store full (`nats_store_full`): tasks are submitted (SubmitTask through Envoy)
   while the ballast fills the store, then the ballast is deleted. Recovery: from then
   to the first new task that completes. Every task whose SubmitTask answered OK must
   complete, once for its idempotency key.
2. PostgreSQL data full (`postgres_data_full`): documents are ingested, tasks submitted
   and chat sessions created while the ballast fills the data directory, then it is
   deleted (PostgreSQL restarted if its postmaster died). Recovery: from then to the
   moment every kind of call has succeeded again. Every acknowledged document, task and
   session must be readable afterwards.

Each call has a deadline (`DEADLINE_S`); every answer is recorded (status code,
ErrorInfo reason, RetryInfo, time taken), so that a caller's view of the full disk can be
checked: UNAVAILABLE or RESOURCE_EXHAUSTED with ErrorInfo, never INTERNAL or UNKNOWN,
never an answer past the deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from switchboard.chat.v1 import chat_pb2, chat_service_pb2_grpc
from switchboard.execution.v1 import execution_pb2, execution_service_pb2_grpc
from switchboard.rag.v1 import rag_pb2, rag_service_pb2_grpc

from bench._common import api_key_metadata
from services.launcher import Mesh, isolated_config
from services.runtime import error_details

logger = logging.getLogger(__name__)

NATS_MIB = 64
"""The JetStream store's filesystem."""
POSTGRES_MIB = 96
"""The data directory's filesystem: an initialised cluster with the switchboard database
and every service's schema takes 47 MiB (17 MiB of it one WAL segment), so this leaves
room for the mesh's start and a few more WAL segments, not much more."""
DEADLINE_S = 5.0
MARGIN_S = 1.0
"""How far past its deadline an answer may come (scheduling on a loaded machine)."""
FULL_S = 12.0
"""How long the load runs against a full filesystem."""
INTERVAL_S = 0.3
"""Between one caller's calls."""
RECOVERY_TIMEOUT_S = 120.0
SETTLE_TIMEOUT_S = 180.0
"""How long acknowledged tasks get to complete once the space is back."""
CLEAR = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
"""The codes a caller may see while a disk is full (with an ErrorInfo)."""
CODE = "1 + 1"
"""A task's one step: quick, in the sandbox."""


class DiskUnavailable(RuntimeError):
    """Small filesystems cannot be mounted here (not root, or mount refused)."""


# -- filesystems ---------------------------------------------------------------------------


def mount_tmpfs(path: Path, mib: int) -> None:
    """Mounts a `mib` MiB tmpfs at `path` (created if missing).

    Raises:
        DiskUnavailable: not root, or the mount failed.
    """
    if os.geteuid() != 0:
        raise DiskUnavailable("mounting a tmpfs needs root")
    if shutil.which("mount") is None:
        raise DiskUnavailable("no mount(8) here")
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={mib}m,mode=0755", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise DiskUnavailable(f"mount -t tmpfs at {path} failed: {done.stderr.strip()}")


def unmount(path: Path) -> None:
    """Unmounts `path`; lazily when something still holds it open."""
    done = subprocess.run(["umount", str(path)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        logger.warning("umount %s: %s; detaching it lazily", path, done.stderr.strip())
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def free_mib(path: Path) -> float:
    """Free space of the filesystem holding `path`, in MiB."""
    return shutil.disk_usage(path).free / 2**20


class Ballast:
    """A file that takes every free byte of its filesystem until it is freed."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "ballast.fill"
        self.written = 0

    def fill(self) -> int:
        """Writes until the filesystem refuses another byte; returns the bytes written."""
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for size in (2**20, 2**16, 2**12, 2**9, 1):
                chunk = b"\0" * size
                while True:
                    try:
                        self.written += os.write(fd, chunk)
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
        finally:
            os.close(fd)
        return self.written

    def free(self) -> None:
        self.path.unlink(missing_ok=True)


@contextlib.contextmanager
def full_disk_mesh(run_dir: Path | None = None, **settings: Any) -> Iterator[Mesh]:
    """A mesh of its own (one replica of each service, one worker, one Triton) whose
    `nats` and `postgres` directories are small tmpfs filesystems, mounted before it
    starts; stopped by PID and unmounted on exit, even when it failed.

    Raises:
        DiskUnavailable: the filesystems cannot be mounted here.
    """
    own = run_dir is None
    run_dir = Path(tempfile.mkdtemp(prefix="switchboard-full-disk-")) if own else run_dir
    mounted: list[Path] = []
    mesh: Mesh | None = None
    try:
        for name, mib in (("nats", NATS_MIB), ("postgres", POSTGRES_MIB)):
            mount_tmpfs(run_dir / name, mib)
            mounted.append(run_dir / name)
        # the launcher owns `postgres` to its PostgreSQL user (mode 0700) before initdb;
        # NATS runs as this user and creates its store below `nats`
        config = isolated_config(
            run_dir, triton_replicas=1, admission_replicas=1, workers=1, gpu="off"
        )
        if settings:
            config = dataclasses.replace(config, **settings)
        mesh = Mesh(config, progress=lambda msg: print(f"  [mesh] {msg}", flush=True))
        mesh.up()
        print(
            f"  [mesh] up; free: nats {free_mib(run_dir / 'nats'):.1f} MiB,"
            f" postgres {free_mib(run_dir / 'postgres'):.1f} MiB",
            flush=True,
        )
        yield mesh
    finally:
        try:
            if mesh is not None:
                mesh.down()
        finally:
            for path in reversed(mounted):
                unmount(path)
            if own:
                shutil.rmtree(run_dir, ignore_errors=True)


def postmaster_running(mesh: Mesh) -> bool:
    return any(r.name == "postgres" and running for r, running in mesh.status())


# -- calls ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One answer a caller got."""

    kind: str
    started: float
    took: float
    code: grpc.StatusCode
    reason: str = ""
    retry: bool = False
    message: str = ""

    @property
    def late(self) -> bool:
        """Answered past its deadline (or said it was)."""
        return self.took > DEADLINE_S + MARGIN_S or self.code == grpc.StatusCode.DEADLINE_EXCEEDED

    @property
    def unclear(self) -> bool:
        """Not OK and not a clear error: another code than UNAVAILABLE or
        RESOURCE_EXHAUSTED, or one without an ErrorInfo reason."""
        return self.code != grpc.StatusCode.OK and (self.code not in CLEAR or not self.reason)


@dataclass
class Calls:
    """Every answer of a scenario, in order."""

    calls: list[Call] = field(default_factory=list)

    async def make(self, kind: str, call: Callable[[], Awaitable[Any]]) -> Any | None:
        """Makes `call`, records its answer; returns its reply, None if it failed."""
        started = time.monotonic()
        try:
            reply = await call()
        except grpc.aio.AioRpcError as error:
            self.record(kind, started, error)
            return None
        self.calls.append(Call(kind, started, time.monotonic() - started, grpc.StatusCode.OK))
        return reply

    def record(self, kind: str, started: float, error: grpc.aio.AioRpcError | Any) -> None:
        """Records a failed call (`error` a failed call or a google.rpc.Status)."""
        details = error_details(error)
        info = details.error_info
        self.calls.append(
            Call(
                kind,
                started,
                time.monotonic() - started,
                details.code,
                info.reason if info is not None else "",
                details.retry_info is not None,
                str(getattr(details, "message", "") or "")[:200],
            )
        )

    def between(self, start: float, end: float) -> list[Call]:
        return [c for c in self.calls if start <= c.started < end]

    def summary(self, calls: list[Call] | None = None) -> dict[str, int]:
        """`kind code reason` -> how many."""
        counted = Counter(
            f"{c.kind} {c.code.name} {c.reason}".strip() for c in (calls or self.calls)
        )
        return dict(sorted(counted.items()))

    def unclear(self) -> list[Call]:
        return [c for c in self.calls if c.unclear]

    def late(self) -> list[Call]:
        return [c for c in self.calls if c.late]


@dataclass
class Outcome:
    """What a scenario showed."""

    name: str
    calls: Calls
    filled_bytes: int
    full_at: float
    freed_at: float
    recovery_s: float | None = None
    """From freeing the space to the service being back (None: it was not, in time)."""
    acknowledged: int = 0
    lost: list[str] = field(default_factory=list)
    """Acknowledged items not found (or, for tasks, not completed) afterwards."""
    duplicated: list[str] = field(default_factory=list)
    """Idempotency keys with more than one task."""
    reruns: int = 0
    """Completed steps that took more than one attempt."""
    postgres_restarted: bool = False
    nats_restarted: bool = False
    """The control plane restarted NATS (a stream's write error lasts until then)."""
    notes: list[str] = field(default_factory=list)

    def report(self) -> str:
        during = self.calls.between(self.full_at, self.freed_at)
        recovery = "none" if self.recovery_s is None else f"{self.recovery_s:.2f}"
        unclear = [(c.kind, c.code.name, c.reason, c.message) for c in self.calls.unclear()]
        lines = [
            f"{self.name}: ballast {self.filled_bytes / 2**20:.1f} MiB;"
            f" recovery {recovery} s;"
            f" acknowledged {self.acknowledged}, lost {len(self.lost)},"
            f" duplicated {len(self.duplicated)}, reruns {self.reruns};"
            f" postgres restarted: {self.postgres_restarted},"
            f" nats restarted: {self.nats_restarted}",
            f"  while full: {self.calls.summary(during)}",
            f"  all calls: {self.calls.summary()}",
            f"  unclear: {unclear[:10]}",
            f"  late: {[(c.kind, c.code.name, round(c.took, 2)) for c in self.calls.late()][:10]}",
            *(f"  note: {n}" for n in self.notes),
        ]
        return "\n".join(lines)


# -- the mesh's calls ----------------------------------------------------------------------


class Callers:
    """Stubs through Envoy, acting as one tenant (its API key)."""

    def __init__(self, channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...]) -> None:
        self.execution = execution_service_pb2_grpc.ExecutionServiceStub(channel)
        self.rag = rag_service_pb2_grpc.RagServiceStub(channel)
        self.chat = chat_service_pb2_grpc.ChatServiceStub(channel)
        self.metadata = metadata

    def submit(self, key: str, run: str) -> Awaitable[execution_pb2.SubmitTaskResponse]:
        request = execution_pb2.SubmitTaskRequest(
            idempotency_key=key,
            steps=[execution_pb2.Step(name="sum", code=execution_pb2.CodeStep(code=CODE))],
            labels={"run": run},
        )
        return self.execution.SubmitTask(request, metadata=self.metadata, timeout=DEADLINE_S)

    def get_task(self, task_id: str) -> Awaitable[execution_pb2.GetTaskResponse]:
        return self.execution.GetTask(
            execution_pb2.GetTaskRequest(task_id=task_id),
            metadata=self.metadata,
            timeout=DEADLINE_S,
        )

    async def tasks_of(self, run: str) -> list[execution_pb2.Task]:
        tasks, token = [], ""
        while True:
            page = await self.execution.ListTasks(
                execution_pb2.ListTasksRequest(
                    labels={"run": run}, page_size=1000, page_token=token
                ),
                metadata=self.metadata,
                timeout=30,
            )
            tasks.extend(page.tasks)
            token = page.next_page_token
            if not token:
                return tasks

    def ingest(
        self, collection: str, document_id: str
    ) -> Awaitable[rag_pb2.IngestDocumentsResponse]:
        text = (
            f"Document {document_id} of the full-disk run: the R7 robot's battery pack is"
            " swapped after 500 charge cycles; a lost badge is reported within one hour. "
        ) * 8

        async def stream():
            yield rag_pb2.IngestDocumentsRequest(
                document=rag_pb2.Document(document_id=document_id, collection=collection, text=text)
            )

        return self.rag.IngestDocuments(stream(), metadata=self.metadata, timeout=DEADLINE_S)

    async def document_count(self, collection: str) -> int:
        reply = await self.rag.ListCollections(
            rag_pb2.ListCollectionsRequest(page_size=100),
            metadata=self.metadata,
            timeout=DEADLINE_S,
        )
        return next((c.document_count for c in reply.collections if c.name == collection), 0)

    def create_session(self, title: str) -> Awaitable[chat_pb2.CreateSessionResponse]:
        return self.chat.CreateSession(
            chat_pb2.CreateSessionRequest(title=title), metadata=self.metadata, timeout=DEADLINE_S
        )

    def get_session(self, session_id: str) -> Awaitable[chat_pb2.GetSessionResponse]:
        return self.chat.GetSession(
            chat_pb2.GetSessionRequest(session_id=session_id),
            metadata=self.metadata,
            timeout=DEADLINE_S,
        )


DONE = execution_pb2.TASK_STATE_COMPLETED
FINAL = (
    execution_pb2.TASK_STATE_COMPLETED,
    execution_pb2.TASK_STATE_FAILED,
    execution_pb2.TASK_STATE_CANCELLED,
)


async def poll(
    check: Callable[[], Awaitable[bool]], timeout: float, interval: float = 0.25
) -> float | None:
    """Seconds until `check` held, None if it did not within `timeout` (a check that
    tolerates errors on the way catches them itself)."""
    started = time.monotonic()
    while True:
        if await check():
            return time.monotonic() - started
        if time.monotonic() - started >= timeout:
            return None
        await asyncio.sleep(interval)


class TaskLoad:
    """Submits a task every INTERVAL_S (a fresh idempotency key each) until stopped;
    keeps the keys and ids SubmitTask acknowledged."""

    def __init__(self, callers: Callers, calls: Calls, run: str) -> None:
        self.callers, self.calls, self.run = callers, calls, run
        self.acknowledged: dict[str, str] = {}  # idempotency key -> task id
        self._stop = asyncio.Event()
        self._n = 0

    async def one(self, kind: str = "submit") -> str | None:
        self._n += 1
        key = f"{self.run}-{self._n}"
        reply = await self.calls.make(kind, lambda: self.callers.submit(key, self.run))
        if reply is None:
            return None
        self.acknowledged[key] = reply.task.task_id
        return reply.task.task_id

    async def run_until_stopped(self) -> None:
        while not self._stop.is_set():
            await self.one()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), INTERVAL_S)

    def stop(self) -> None:
        self._stop.set()

    async def completed(self, task_id: str) -> bool:
        try:
            reply = await self.callers.get_task(task_id)
        except grpc.aio.AioRpcError:
            return False
        return reply.task.state == DONE

    async def settle(self, outcome: Outcome) -> None:
        """Waits for every acknowledged task to end; records the lost (not completed),
        the duplicated (keys with more than one task) and the reruns."""
        pending = dict(self.acknowledged)

        async def ended() -> bool:
            for key, task_id in list(pending.items()):
                try:
                    reply = await self.callers.get_task(task_id)
                except grpc.aio.AioRpcError:
                    return False
                if reply.task.state in FINAL:
                    del pending[key]
                    if reply.task.state != DONE:
                        outcome.lost.append(
                            f"{key}: {execution_pb2.TaskState.Name(reply.task.state)}"
                        )
            return not pending

        if await poll(ended, SETTLE_TIMEOUT_S, interval=1.0) is None:
            outcome.lost.extend(f"{key}: not ended" for key in pending)
        outcome.acknowledged += len(self.acknowledged)
        tasks = await self.callers.tasks_of(self.run)
        per_key = Counter(t.idempotency_key for t in tasks)
        outcome.duplicated.extend(k for k, n in per_key.items() if n > 1)
        outcome.reruns += sum(1 for t in tasks for s in t.step_statuses if s.attempt > 1)


async def _warm(load: TaskLoad) -> None:
    """The mesh runs tasks end to end (first calls may meet replicas still starting)."""

    async def one_completes() -> bool:
        task_id = await load.one("warm-up")
        return task_id is not None and await poll(lambda: load.completed(task_id), 30) is not None

    if await poll(one_completes, 90, interval=1.0) is None:
        raise AssertionError("the mesh did not run a task within 90 s of starting")
    load.acknowledged.clear()


# -- scenario 1: NATS's store full ---------------------------------------------------------


async def nats_store_full(
    mesh: Mesh, tenant: str = "", *, recovery_timeout: float = RECOVERY_TIMEOUT_S
) -> Outcome:
    """Tasks submitted while the JetStream store is full, then after it is freed (what
    was lost is counted once tasks run again: without a recovery it is not known)."""
    tenant = tenant or f"disk-nats-{uuid.uuid4().hex[:8]}"
    metadata = api_key_metadata(mesh, tenant)
    store = mesh.config.run_dir / "nats"
    nats_before = _pid(mesh, "nats")
    calls = Calls()
    async with grpc.aio.insecure_channel(mesh.envoy_address) as channel:
        callers = Callers(channel, metadata)
        load = TaskLoad(callers, calls, run=f"nats-{uuid.uuid4().hex[:8]}")
        await _warm(load)
        ballast = Ballast(store)
        running = asyncio.create_task(load.run_until_stopped())
        try:
            await asyncio.sleep(1.0)  # some tasks before the disk fills
            full_at = time.monotonic()
            filled = await asyncio.to_thread(ballast.fill)
            print(f"  [nats] store full: {filled / 2**20:.1f} MiB of ballast", flush=True)
            await asyncio.sleep(FULL_S)
        finally:
            ballast.free()
            freed_at = time.monotonic()
        outcome = Outcome("nats store full", calls, filled, full_at, freed_at)
        try:
            outcome.recovery_s = await _task_recovery(load, freed_at, recovery_timeout)
        finally:
            load.stop()
            await running
        outcome.nats_restarted = _pid(mesh, "nats") not in (None, nats_before)
        if outcome.recovery_s is None:
            outcome.notes.append(f"no new task completed within {recovery_timeout:g} s")
            outcome.acknowledged += len(load.acknowledged)
            return outcome
        await load.settle(outcome)
    return outcome


def _pid(mesh: Mesh, name: str) -> int | None:
    return next((r.pid for r in mesh.state.load() if r.name == name), None)


async def _task_recovery(
    load: TaskLoad, since: float, timeout: float = RECOVERY_TIMEOUT_S
) -> float | None:
    """Seconds from `since` until a task submitted after it completed (the load goes on
    meanwhile), None if none did within `timeout`."""
    probes: list[str] = []

    async def a_new_task_completed() -> bool:
        for task_id in probes:
            if await load.completed(task_id):
                return True
        task_id = await load.one("probe")
        if task_id is not None:
            probes.append(task_id)
        return False

    if await poll(a_new_task_completed, timeout, interval=0.5) is None:
        return None
    return time.monotonic() - since


# -- scenario 2: PostgreSQL's data full ----------------------------------------------------


async def postgres_data_full(mesh: Mesh, tenant: str = "") -> Outcome:
    """Documents ingested, tasks submitted and sessions created while PostgreSQL's data
    directory is full, then after it is freed."""
    tenant = tenant or f"disk-pg-{uuid.uuid4().hex[:8]}"
    metadata = api_key_metadata(mesh, tenant)
    data = mesh.config.run_dir / "postgres"
    calls = Calls()
    collection = f"disk-{uuid.uuid4().hex[:6]}"
    documents: list[str] = []
    sessions: list[str] = []
    stop = asyncio.Event()

    async def ingest_one(n: int) -> bool:
        document_id = f"doc-{n}"
        started = time.monotonic()
        reply = await calls.make("ingest", lambda: callers.ingest(collection, document_id))
        if reply is None:
            return False
        result = reply.results[0]
        if result.HasField("error") and result.error.code:
            calls.calls.pop()  # the call was OK; its one document was not
            calls.record("ingest", started, result.error)
            return False
        documents.append(document_id)
        return True

    async def create_one(n: int) -> bool:
        reply = await calls.make("session", lambda: callers.create_session(f"full disk {n}"))
        if reply is not None:
            sessions.append(reply.session.session_id)
        return reply is not None

    async def keep_calling(one: Callable[[int], Awaitable[bool]]) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            await one(n)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), INTERVAL_S)

    async with grpc.aio.insecure_channel(mesh.envoy_address) as channel:
        callers = Callers(channel, metadata)
        load = TaskLoad(callers, calls, run=f"pg-{uuid.uuid4().hex[:8]}")
        await _warm(load)
        if await poll(lambda: ingest_one(0), 60, interval=1.0) is None:
            raise AssertionError("RagService did not ingest a document within 60 s")
        ballast = Ballast(data)
        running = [
            asyncio.create_task(load.run_until_stopped()),
            asyncio.create_task(keep_calling(ingest_one)),
            asyncio.create_task(keep_calling(create_one)),
        ]
        restarted = False
        try:
            await asyncio.sleep(1.0)
            full_at = time.monotonic()
            filled = await asyncio.to_thread(ballast.fill)
            print(f"  [postgres] data full: {filled / 2**20:.1f} MiB of ballast", flush=True)
            await asyncio.sleep(FULL_S)
        finally:
            ballast.free()
            freed_at = time.monotonic()
            if not postmaster_running(mesh):
                print("  [postgres] the postmaster died: starting it again", flush=True)
                await asyncio.to_thread(mesh.start_postgres)
                restarted = True
        outcome = Outcome("postgres data full", calls, filled, full_at, freed_at)
        outcome.postgres_restarted = restarted
        try:
            outcome.recovery_s = await _every_kind_recovery(calls, freed_at)
        finally:
            stop.set()
            load.stop()
            await asyncio.gather(*running)
        if outcome.recovery_s is None:
            outcome.notes.append(
                f"not every kind of call succeeded within {RECOVERY_TIMEOUT_S:g} s of freeing"
            )
        if not postmaster_running(mesh):
            outcome.notes.append("the postmaster is not running after recovery")
        await load.settle(outcome)
        outcome.acknowledged += len(documents) + len(sessions)
        count = await callers.document_count(collection)
        if count < len(documents):
            outcome.lost.append(
                f"documents: {count} of {len(documents)} acknowledged in {collection}"
            )
        for session_id in sessions:
            try:
                await callers.get_session(session_id)
            except grpc.aio.AioRpcError as error:
                outcome.lost.append(f"session {session_id}: {error.code().name}")
    return outcome


async def _every_kind_recovery(calls: Calls, since: float) -> float | None:
    """Seconds from `since` to the end of the first call after it that succeeded, for the
    last kind to succeed (the load keeps calling)."""
    kinds = ("submit", "ingest", "session")

    def recovered() -> bool:
        ok = {c.kind for c in calls.calls if c.started >= since and c.code == grpc.StatusCode.OK}
        return all(k in ok for k in kinds)

    async def check() -> bool:
        return recovered()

    if await poll(check, RECOVERY_TIMEOUT_S) is None:
        return None
    firsts = [
        min(
            c.started + c.took
            for c in calls.calls
            if c.kind == k and c.started >= since and c.code == grpc.StatusCode.OK
        )
        for k in kinds
    ]
    return max(firsts) - since
