"""Task and step state in PostgreSQL: the durable record the workers resume from.

Why PostgreSQL and not JetStream KV: a step's completion, its output and the queueing
of the steps it unblocks must change together, and a task must be found by its
idempotency key and listed by state and labels. One transaction per transition gives
that; JetStream carries the work and the event log, and both are replayed from here
when a publish is lost (messages carry ids, so a replay is de-duplicated).

A step is claimed with a lease: a worker that holds a RUNNING step renews `lease_until`
with its heartbeats. A message for a step whose lease is live is put back until the
lease ends (the holder may be alive, or may have died an instant before JetStream
redelivered): if the holder finishes, the message then finds the step completed and is
dropped; if it died, the step runs again.

A task's stored `state` is RUNNING from its submission until it ends (the transitions
below and in the SQL functions only tell live tasks from ended ones). What clients see
is PENDING until its first step starts (no step has an attempt yet), then RUNNING:
`public_state` derives it when a task is read, and ListTasks filters on the same
condition, so that no transition has to move a task from PENDING to RUNNING.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import IntEnum
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from switchboard.execution.v1 import execution_pb2 as pb

from services.runtime import (
    AlreadyExists,
    Database,
    NotFound,
    Unavailable,
    dependency_unavailable,
)

logger = logging.getLogger(__name__)

_MIGRATION_LOCK = 0x5B_AD_05

MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE exec_tasks (
        task_id         uuid        PRIMARY KEY,
        tenant_id       text        NOT NULL,
        idempotency_key text,
        request_hash    text        NOT NULL,
        request         bytea       NOT NULL,
        state           smallint    NOT NULL,
        error           bytea,
        labels          jsonb       NOT NULL DEFAULT '{}',
        priority        smallint    NOT NULL DEFAULT 0,
        create_time     timestamptz NOT NULL DEFAULT now(),
        update_time     timestamptz NOT NULL DEFAULT now(),
        end_time        timestamptz,
        UNIQUE (tenant_id, idempotency_key)
    );
    CREATE INDEX exec_tasks_tenant_state ON exec_tasks (tenant_id, state, create_time);
    CREATE TABLE exec_steps (
        task_id     uuid        NOT NULL REFERENCES exec_tasks ON DELETE CASCADE,
        name        text        NOT NULL,
        position    integer     NOT NULL,
        depends_on  text[]      NOT NULL,
        state       smallint    NOT NULL,
        attempt     integer     NOT NULL DEFAULT 0,
        output      jsonb,
        error       bytea,
        lease_until timestamptz,
        start_time  timestamptz,
        end_time    timestamptz,
        PRIMARY KEY (task_id, name)
    );
    CREATE INDEX exec_steps_queued ON exec_steps (state) WHERE state = 2;
    """,
    # A step's completion and what it unblocks, in one call (one round trip). The
    # numbers are the proto enums': StepState WAITING 1, QUEUED 2, RUNNING 3,
    # COMPLETED 4; TaskState RUNNING 2, COMPLETED 3. Each statement of a plpgsql
    # function sees what committed before it, so of two siblings completing at once the
    # second (after the task row lock) sees the first and queues their successor.
    2: """
    CREATE FUNCTION exec_advance(p_task uuid, OUT queued text[], OUT finished boolean)
    LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM 1 FROM exec_tasks WHERE task_id = p_task FOR UPDATE;
        WITH q AS (
            UPDATE exec_steps w SET state = 2
            WHERE w.task_id = p_task AND w.state = 1 AND NOT EXISTS (
                SELECT 1 FROM exec_steps d
                WHERE d.task_id = w.task_id AND d.name = ANY (w.depends_on) AND d.state <> 4)
            RETURNING w.name)
        SELECT coalesce(array_agg(name), ARRAY[]::text[]) INTO queued FROM q;
        IF EXISTS (SELECT 1 FROM exec_steps WHERE task_id = p_task AND state <> 4) THEN
            UPDATE exec_tasks SET update_time = now() WHERE task_id = p_task;
            finished := false;
        ELSE
            UPDATE exec_tasks SET state = 3, update_time = now(), end_time = now()
            WHERE task_id = p_task AND state = 2;
            finished := FOUND;
        END IF;
    END $$;

    CREATE FUNCTION exec_complete(
        p_task uuid, p_step text, p_output jsonb, OUT queued text[], OUT finished boolean)
    LANGUAGE plpgsql AS $$
    BEGIN
        UPDATE exec_steps SET state = 4, output = p_output, end_time = now(),
            lease_until = NULL
        WHERE task_id = p_task AND name = p_step AND state = 3;
        IF NOT FOUND THEN  -- cancelled meanwhile, or completed by a duplicate
            queued := ARRAY[]::text[];
            finished := false;
            RETURN;
        END IF;
        SELECT a.queued, a.finished INTO queued, finished FROM exec_advance(p_task) a;
    END $$;
    """,
    # A completion that also claims the first step it unblocked, for its worker to run
    # next: the claim `claim_many` makes (attempt + 1, RUNNING, lease), in the same
    # transaction, with the outputs that step's references read.
    3: """
    CREATE FUNCTION exec_complete_claim(
        p_task uuid, p_step text, p_output jsonb, p_lease interval,
        OUT queued text[], OUT finished boolean,
        OUT next_step text, OUT next_attempt integer, OUT next_outputs jsonb)
    LANGUAGE plpgsql AS $$
    BEGIN
        SELECT c.queued, c.finished INTO queued, finished
        FROM exec_complete(p_task, p_step, p_output) c;
        IF cardinality(queued) = 0 THEN
            RETURN;
        END IF;
        UPDATE exec_steps s SET state = 3, attempt = s.attempt + 1,
            lease_until = clock_timestamp() + p_lease,
            start_time = coalesce(s.start_time, now()), error = NULL
        WHERE s.task_id = p_task AND s.name = queued[1] AND s.state = 2
        RETURNING s.name, s.attempt INTO next_step, next_attempt;
        IF FOUND THEN
            SELECT coalesce(jsonb_object_agg(d.name, d.output), '{}') INTO next_outputs
            FROM exec_steps d WHERE d.task_id = p_task AND d.state = 4;
        END IF;
    END $$;
    """,
}

TERMINAL_TASK = {pb.TASK_STATE_COMPLETED, pb.TASK_STATE_FAILED, pb.TASK_STATE_CANCELLED}
TERMINAL_STEP = {pb.STEP_STATE_COMPLETED, pb.STEP_STATE_FAILED, pb.STEP_STATE_CANCELLED}


class Claim(IntEnum):
    """What a worker should do with a step message."""

    RUN = 1
    DUPLICATE = 2
    """The step already ended (or is not ready): ack the message."""
    BUSY = 4
    """Another worker holds the step's live lease: try again when it ends."""
    FOLLOW_UP = 3
    """The step completed but what follows may not have been published: publish it."""
    REPORT = 5
    """The step (or one its worker ran after it) failed the task, and the failure may not
    have been published: publish it."""


@dataclass(frozen=True, slots=True)
class StepRow:
    task_id: str
    name: str
    state: int
    attempt: int
    output: Any
    error: bytes | None
    start_time: datetime | None
    end_time: datetime | None


@dataclass(frozen=True, slots=True)
class TaskRow:
    task_id: str
    tenant_id: str
    idempotency_key: str
    request: pb.SubmitTaskRequest
    state: int
    error: bytes | None
    labels: dict[str, str]
    priority: int
    create_time: datetime
    update_time: datetime
    end_time: datetime | None
    steps: tuple[StepRow, ...]


@dataclass(frozen=True, slots=True)
class ClaimedTask:
    """What running one of a task's steps needs of it."""

    task_id: str
    tenant_id: str
    request: pb.SubmitTaskRequest


@dataclass(frozen=True, slots=True)
class ClaimResult:
    claim: Claim
    task: ClaimedTask | None = None
    attempt: int = 0
    outputs: Mapping[str, Any] | None = None
    """Outputs of the step's ancestors, for expanding its references."""
    lease_left: float = 0.0
    """Seconds until a BUSY step's lease ends."""


@dataclass(frozen=True, slots=True)
class Progress:
    """What a transition changed, for the events and work messages to publish."""

    queued: tuple[str, ...] = ()
    task_state: int = 0
    """The task's new state if this transition ended it, else 0."""


@dataclass(frozen=True, slots=True)
class Completion:
    """A completed step: what it changed, and the step it unblocked that its worker
    now holds (RUNNING, leased) to run next, if any."""

    progress: Progress
    next_step: str | None = None
    next_attempt: int = 0
    next_outputs: Mapping[str, Any] | None = None


def public_state(stored: int, attempts: Sequence[int]) -> int:
    """The state a client sees of a task stored as `stored` whose steps have had
    `attempts`: a live task none of whose steps has started is PENDING."""
    if stored == pb.TASK_STATE_RUNNING and not any(attempts):
        return pb.TASK_STATE_PENDING
    return stored


_STARTED = (
    "EXISTS (SELECT 1 FROM exec_steps s WHERE s.task_id = exec_tasks.task_id AND s.attempt > 0)"
)
"""A task (in a query on exec_tasks) one of whose steps has started."""


@functools.lru_cache(maxsize=4096)
def _request(data: bytes) -> pb.SubmitTaskRequest:
    """A stored request, parsed once per process (callers must not change it)."""
    return pb.SubmitTaskRequest.FromString(data)


def _new_task(
    task_id: str,
    tenant_id: str,
    request: pb.SubmitTaskRequest,
    states: Sequence[int],
    created: datetime,
) -> TaskRow:
    """The row of a task just inserted."""
    steps = tuple(
        StepRow(task_id, s.name, state, 0, None, None, None, None)
        for s, state in zip(request.steps, states, strict=True)
    )
    return TaskRow(
        task_id=task_id,
        tenant_id=tenant_id,
        idempotency_key=request.idempotency_key,
        request=request,
        state=pb.TASK_STATE_PENDING,
        error=None,
        labels=dict(request.labels),
        priority=request.priority,
        create_time=created,
        update_time=created,
        end_time=None,
        steps=steps,
    )


def request_hash(request: pb.SubmitTaskRequest) -> str:
    return hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()


def key_reused(key: str, task_id: str) -> AlreadyExists:
    return AlreadyExists(
        f"idempotency key {key!r} was used for a different task ({task_id})",
        reason="IDEMPOTENCY_KEY_REUSED",
        metadata={"idempotency_key": key, "task_id": task_id},
    )


def _unavailable(exc: Exception) -> Unavailable:
    return dependency_unavailable("postgresql", "execution database", exc)


def _not_found(task_id: str) -> NotFound:
    return NotFound(
        f"task {task_id!r} does not exist", reason="TASK_NOT_FOUND", metadata={"task_id": task_id}
    )


def _valid_uuid(task_id: str) -> bool:
    try:
        uuid.UUID(task_id)
    except ValueError:
        return False
    return True


class TaskStore:
    def __init__(self, database_url: str, *, pool_size: int = 8) -> None:
        self._db = Database(database_url, max_size=pool_size)

    async def open(self) -> None:
        await self._db.open(prefix="exec", lock=_MIGRATION_LOCK, migrations=MIGRATIONS)

    async def close(self) -> None:
        await self._db.close()

    async def healthy(self) -> bool:
        return await self._db.healthy()

    # ---- submission ------------------------------------------------------------------

    async def create(self, tenant_id: str, request: pb.SubmitTaskRequest) -> tuple[TaskRow, bool]:
        """Stores a new task with its root steps QUEUED; returns (task, existing).

        Raises:
            AlreadyExists: `IDEMPOTENCY_KEY_REUSED`, the key names a different task.
        """
        digest = request_hash(request)
        key = request.idempotency_key or None
        task_id = str(uuid.uuid4())
        states = [
            pb.STEP_STATE_WAITING if s.depends_on else pb.STEP_STATE_QUEUED for s in request.steps
        ]
        try:
            async with self._db.connection() as conn:
                # the task and its steps in one statement (one round trip, one transaction)
                cur = await conn.execute(
                    "WITH t AS (INSERT INTO exec_tasks (task_id, tenant_id, idempotency_key,"
                    " request_hash, request, state, labels, priority)"
                    " VALUES (%(id)s, %(tenant)s, %(key)s, %(hash)s, %(request)s, %(state)s,"
                    " %(labels)s, %(priority)s)"
                    " ON CONFLICT (tenant_id, idempotency_key) DO NOTHING"
                    " RETURNING task_id, create_time),"
                    " s AS (INSERT INTO exec_steps (task_id, name, position, depends_on, state)"
                    " SELECT t.task_id, u.name, u.position - 1,"
                    " ARRAY(SELECT jsonb_array_elements_text(u.deps)), u.state"
                    " FROM t, unnest(%(names)s::text[], %(deps)s::jsonb[], %(states)s::int[])"
                    " WITH ORDINALITY AS u(name, deps, state, position))"
                    " SELECT create_time FROM t",
                    {"id": task_id, "tenant": tenant_id, "key": key, "hash": digest,
                     "request": request.SerializeToString(), "state": pb.TASK_STATE_RUNNING,
                     "labels": Jsonb(dict(request.labels)), "priority": request.priority,
                     "names": [s.name for s in request.steps],
                     "deps": [Jsonb(list(s.depends_on)) for s in request.steps],
                     "states": states},
                )  # fmt: skip
                row = await cur.fetchone()
                if row is None:
                    existing, existing_hash = await self._by_key(conn, tenant_id, key or "")
                    if existing_hash != digest:
                        raise key_reused(key or "", existing)
                    return await self._load(conn, existing, tenant_id), True
        except psycopg.OperationalError as exc:
            raise _unavailable(exc) from exc
        (created,) = row
        return _new_task(task_id, tenant_id, request, states, created), False

    async def create_many(
        self, requests: Sequence[tuple[str, pb.SubmitTaskRequest]]
    ) -> list[TaskRow]:
        """Stores new tasks of (tenant, request) without idempotency keys (nothing can
        conflict), in one statement and one commit; returns them in the same order."""
        assert not any(r.idempotency_key for _, r in requests), "keyed tasks: create()"
        ids = [str(uuid.uuid4()) for _ in requests]
        states = [
            [pb.STEP_STATE_WAITING if s.depends_on else pb.STEP_STATE_QUEUED for s in r.steps]
            for _, r in requests
        ]
        steps = [
            (task_id, position, step, state)
            for task_id, (_, request), task_states in zip(ids, requests, states, strict=True)
            for position, (step, state) in enumerate(zip(request.steps, task_states, strict=True))
        ]
        try:
            async with self._db.connection() as conn:
                cur = await conn.execute(
                    "WITH t AS (INSERT INTO exec_tasks (task_id, tenant_id, request_hash,"
                    " request, state, labels, priority)"
                    " SELECT * FROM unnest(%(ids)s::uuid[], %(tenants)s::text[],"
                    " %(hashes)s::text[], %(requests)s::bytea[], %(states)s::smallint[],"
                    " %(labels)s::jsonb[], %(priorities)s::smallint[])"
                    " RETURNING task_id, create_time),"
                    " s AS (INSERT INTO exec_steps (task_id, name, position, depends_on, state)"
                    " SELECT t.task_id, u.name, u.position,"
                    " ARRAY(SELECT jsonb_array_elements_text(u.deps)), u.state"
                    " FROM t JOIN unnest(%(step_tasks)s::uuid[], %(names)s::text[],"
                    " %(positions)s::int[], %(deps)s::jsonb[], %(step_states)s::int[])"
                    " AS u(task_id, name, position, deps, state) ON u.task_id = t.task_id)"
                    " SELECT task_id::text, create_time FROM t",
                    {"ids": ids, "tenants": [t for t, _ in requests],
                     "hashes": [request_hash(r) for _, r in requests],
                     "requests": [r.SerializeToString() for _, r in requests],
                     "states": [pb.TASK_STATE_RUNNING] * len(requests),
                     "labels": [Jsonb(dict(r.labels)) for _, r in requests],
                     "priorities": [r.priority for _, r in requests],
                     "step_tasks": [task_id for task_id, _, _, _ in steps],
                     "names": [step.name for _, _, step, _ in steps],
                     "positions": [position for _, position, _, _ in steps],
                     "deps": [Jsonb(list(step.depends_on)) for _, _, step, _ in steps],
                     "step_states": [state for _, _, _, state in steps]},
                )  # fmt: skip
                created = dict(await cur.fetchall())
        except psycopg.OperationalError as exc:
            raise _unavailable(exc) from exc
        rows = zip(ids, requests, states, strict=True)
        return [
            _new_task(task_id, tenant_id, request, task_states, created[task_id])
            for task_id, (tenant_id, request), task_states in rows
        ]

    async def _by_key(
        self, conn: psycopg.AsyncConnection, tenant_id: str, key: str
    ) -> tuple[str, str]:
        """(task_id, request_hash) of the tenant's task with this idempotency key."""
        cur = await conn.execute(
            "SELECT task_id::text, request_hash FROM exec_tasks"
            " WHERE tenant_id = %s AND idempotency_key = %s",
            (tenant_id, key),
        )
        row = await cur.fetchone()
        assert row is not None, "the conflicting row exists"
        return row[0], row[1]

    # ---- reads ---------------------------------------------------------------------

    async def get(self, task_id: str, tenant_id: str | None) -> TaskRow:
        """The task (of `tenant_id`, when given).

        Raises:
            NotFound: `TASK_NOT_FOUND`, also for another tenant's task.
        """
        if not _valid_uuid(task_id):
            raise _not_found(task_id)
        try:
            async with self._db.connection() as conn:
                return await self._load(conn, task_id, tenant_id)
        except psycopg.OperationalError as exc:
            raise _unavailable(exc) from exc

    async def _load(
        self, conn: psycopg.AsyncConnection, task_id: str, tenant_id: str | None
    ) -> TaskRow:
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute("SELECT * FROM exec_tasks WHERE task_id = %s", (task_id,))
        row = await cur.fetchone()
        if row is None or (tenant_id is not None and row["tenant_id"] != tenant_id):
            raise _not_found(task_id)
        await cur.execute(
            "SELECT * FROM exec_steps WHERE task_id = %s ORDER BY position", (task_id,)
        )
        steps = tuple(
            StepRow(
                task_id=task_id,
                name=s["name"],
                state=s["state"],
                attempt=s["attempt"],
                output=s["output"],
                error=s["error"],
                start_time=s["start_time"],
                end_time=s["end_time"],
            )
            for s in await cur.fetchall()
        )
        return TaskRow(
            task_id=str(row["task_id"]),
            tenant_id=row["tenant_id"],
            idempotency_key=row["idempotency_key"] or "",
            request=pb.SubmitTaskRequest.FromString(row["request"]),
            state=public_state(row["state"], [s.attempt for s in steps]),
            error=row["error"],
            labels=row["labels"],
            priority=row["priority"],
            create_time=row["create_time"],
            update_time=row["update_time"],
            end_time=row["end_time"],
            steps=steps,
        )

    async def list(
        self,
        tenant_id: str,
        *,
        state: int,
        labels: Mapping[str, str],
        before: tuple[datetime, str] | None,
        limit: int,
    ) -> list[TaskRow]:
        clauses, params = ["tenant_id = %s"], [tenant_id]
        if state == pb.TASK_STATE_PENDING:  # see the module's doc
            clauses.append(f"state = %s AND NOT {_STARTED}")
            params.append(pb.TASK_STATE_RUNNING)
        elif state == pb.TASK_STATE_RUNNING:
            clauses.append(f"state = %s AND {_STARTED}")
            params.append(pb.TASK_STATE_RUNNING)
        elif state:
            clauses.append("state = %s")
            params.append(state)
        if labels:
            clauses.append("labels @> %s")
            params.append(Jsonb(dict(labels)))
        if before:
            clauses.append("(create_time, task_id) < (%s, %s::uuid)")
            params.extend(before)
        try:
            async with self._db.connection() as conn:
                cur = await conn.execute(
                    f"SELECT task_id::text FROM exec_tasks WHERE {' AND '.join(clauses)}"  # noqa: S608
                    " ORDER BY create_time DESC, task_id DESC LIMIT %s",
                    (*params, limit),
                )
                ids = [r[0] for r in await cur.fetchall()]
                return [await self._load(conn, task_id, tenant_id) for task_id in ids]
        except psycopg.OperationalError as exc:
            raise _unavailable(exc) from exc

    async def stale(
        self, older_than: timedelta, limit: int = 500
    ) -> list[tuple[str, str, int, int]]:
        """(task, step) QUEUED for longer than `older_than`, or RUNNING with a lease that
        ran out that long ago: their work message may have been lost (between a commit
        and its publish), so they are published again (by id, so a real duplicate is
        dropped)."""
        async with self._db.connection() as conn:
            cur = await conn.execute(
                "SELECT s.task_id::text, s.name, s.state, s.attempt"
                " FROM exec_steps s JOIN exec_tasks t USING (task_id)"
                " WHERE t.state = %s AND ((s.state = %s AND t.update_time < now() - %s)"
                "   OR (s.state = %s AND s.lease_until < now() - %s)) LIMIT %s",
                (pb.TASK_STATE_RUNNING, pb.STEP_STATE_QUEUED, older_than,
                 pb.STEP_STATE_RUNNING, older_than, limit),
            )  # fmt: skip
            return [(r[0], r[1], r[2], r[3]) for r in await cur.fetchall()]

    # ---- the worker's transitions ----------------------------------------------------

    async def claim_many(
        self, steps: Sequence[tuple[str, str]], *, lease: timedelta
    ) -> list[ClaimResult]:
        """Takes each (task, step) to run (attempt + 1, RUNNING, lease), or says why not:
        one statement takes every step that can run; the others are looked at one by
        one. Of a step named twice, only the first is taken."""
        async with self._db.connection() as conn:
            cur = await conn.execute(
                "UPDATE exec_steps s SET state = %(running)s, attempt = s.attempt + 1,"
                " lease_until = clock_timestamp() + %(lease)s,"
                " start_time = coalesce(s.start_time, now()), error = NULL"
                " FROM exec_tasks t,"
                " unnest(%(tasks)s::uuid[], %(steps)s::text[]) AS u(task_id, name)"
                " WHERE s.task_id = u.task_id AND s.name = u.name AND t.task_id = s.task_id"
                " AND t.state = %(task_running)s AND (s.state = %(queued)s OR (s.state ="
                " %(running)s AND coalesce(s.lease_until <= clock_timestamp(), true)))"
                " RETURNING s.task_id::text, s.name, s.attempt, t.tenant_id, t.request,"
                " (SELECT coalesce(jsonb_object_agg(d.name, d.output), '{}') FROM exec_steps d"
                " WHERE d.task_id = s.task_id AND d.state = %(completed)s)",
                {"tasks": [t for t, _ in steps], "steps": [n for _, n in steps], "lease": lease,
                 "running": pb.STEP_STATE_RUNNING, "queued": pb.STEP_STATE_QUEUED,
                 "completed": pb.STEP_STATE_COMPLETED, "task_running": pb.TASK_STATE_RUNNING},
            )  # fmt: skip
            taken = {
                (task_id, name): ClaimResult(
                    Claim.RUN,
                    ClaimedTask(task_id, tenant_id, _request(bytes(request))),
                    attempt,
                    outputs,
                )
                for task_id, name, attempt, tenant_id, request, outputs in await cur.fetchall()
            }
            results = []
            for task_id, name in steps:
                result = taken.pop((task_id, name), None)
                if result is None:
                    result = await self._unclaimable(conn, task_id, name)
                results.append(result)
            return results

    async def _unclaimable(
        self, conn: psycopg.AsyncConnection, task_id: str, step: str
    ) -> ClaimResult:
        """Why a step could not be claimed."""
        cur = await conn.execute(
            "SELECT t.state, s.state,"
            " greatest(extract(epoch FROM s.lease_until - clock_timestamp()), 0)"
            " FROM exec_tasks t JOIN exec_steps s USING (task_id)"
            " WHERE task_id = %s AND s.name = %s",
            (task_id, step),
        )
        row = await cur.fetchone()
        if row is None:
            return ClaimResult(Claim.DUPLICATE)
        task_state, step_state, lease_left = row
        if step_state == pb.STEP_STATE_COMPLETED and task_state in (
            pb.TASK_STATE_RUNNING,
            pb.TASK_STATE_COMPLETED,
        ):
            return ClaimResult(Claim.FOLLOW_UP)
        if task_state == pb.TASK_STATE_FAILED and step_state in (
            pb.STEP_STATE_FAILED,
            pb.STEP_STATE_COMPLETED,  # a later step of its chain failed the task
        ):
            return ClaimResult(Claim.REPORT)
        if step_state == pb.STEP_STATE_RUNNING and task_state == pb.TASK_STATE_RUNNING:
            return ClaimResult(Claim.BUSY, lease_left=float(lease_left or 0.0))
        # ended, cancelled, or WAITING (it is queued again when its inputs are ready)
        return ClaimResult(Claim.DUPLICATE)

    async def renew(self, task_id: str, step: str, *, lease: timedelta) -> bool:
        """Extends a running step's lease; False if the task ended (e.g. was cancelled)."""
        async with self._db.connection() as conn:
            cur = await conn.execute(
                "UPDATE exec_steps s SET lease_until = clock_timestamp() + %s FROM exec_tasks t"
                " WHERE s.task_id = %s AND s.name = %s AND t.task_id = s.task_id"
                " AND t.state = %s AND s.state = %s",
                (lease, task_id, step, pb.TASK_STATE_RUNNING, pb.STEP_STATE_RUNNING),
            )
            return cur.rowcount == 1

    async def complete_many(
        self, steps: Sequence[tuple[str, str, Any]], *, lease: timedelta
    ) -> list[Completion]:
        """Completes each (task, step, output): records the output, queues every step it
        unblocked, ends the task when every step completed, and claims the first step it
        unblocked for the caller to run next (`exec_complete_claim`). One statement, one
        transaction, one commit for all; taken in task order, so that two of them never
        wait on each other's task locks."""
        order = sorted(range(len(steps)), key=lambda i: steps[i][:2])
        async with self._db.connection() as conn:
            cur = await conn.execute(
                "SELECT c.queued, c.finished, c.next_step, c.next_attempt, c.next_outputs"
                " FROM unnest(%s::uuid[], %s::text[], %s::jsonb[]) WITH ORDINALITY"
                " AS u(task_id, name, output, n),"
                " LATERAL exec_complete_claim(u.task_id, u.name, u.output, %s) c ORDER BY u.n",
                (
                    [steps[i][0] for i in order],
                    [steps[i][1] for i in order],
                    [Jsonb(steps[i][2]) for i in order],
                    lease,
                ),
            )
            rows = await cur.fetchall()
        completions: list[Completion] = [Completion(Progress())] * len(steps)
        for i, (queued, finished, step, attempt, outputs) in zip(order, rows, strict=True):
            progress = Progress(tuple(queued), pb.TASK_STATE_COMPLETED if finished else 0)
            completions[i] = Completion(progress, step, attempt or 0, outputs)
        return completions

    async def follow_up(self, task_id: str) -> Progress:
        """Re-derives what a completed step unblocked (after a crash before publishing):
        the steps queued now, those already QUEUED, whose messages may be lost, and those
        RUNNING, which a worker may have taken without a message (running the step its
        last one unblocked) and died with."""
        async with self._db.connection() as conn, conn.transaction():
            await conn.execute("SELECT exec_advance(%s)", (task_id,))
            cur = await conn.execute(
                "SELECT name FROM exec_steps WHERE task_id = %s AND state IN (%s, %s)"
                " ORDER BY position",
                (task_id, pb.STEP_STATE_QUEUED, pb.STEP_STATE_RUNNING),
            )
            queued = tuple(r[0] for r in await cur.fetchall())
            cur = await conn.execute("SELECT state FROM exec_tasks WHERE task_id = %s", (task_id,))
            (state,) = await cur.fetchone()  # type: ignore[misc]
        # the task may have completed now or before the crash: its event is sent again
        return Progress(queued, pb.TASK_STATE_COMPLETED if state == pb.TASK_STATE_COMPLETED else 0)

    async def retry(self, task_id: str, step: str, error: bytes, *, counted: bool = True) -> bool:
        """Puts a failed attempt back in the queue; False if the task ended meanwhile.
        Not `counted`, the attempt is given back (the call was never made): the next
        claim has the same number."""
        async with self._db.connection() as conn:
            cur = await conn.execute(
                "UPDATE exec_steps SET state = %s, error = %s, lease_until = NULL,"
                " attempt = attempt - %s"
                " WHERE task_id = %s AND name = %s AND state = %s",
                (pb.STEP_STATE_QUEUED, error, 0 if counted else 1, task_id, step,
                 pb.STEP_STATE_RUNNING),
            )  # fmt: skip
            return cur.rowcount == 1

    async def fail(self, task_id: str, step: str, error: bytes) -> bool:
        """Fails the step and its task (steps not started are cancelled); False if the
        task had already ended."""
        async with self._db.connection() as conn, conn.transaction():
            cur = await conn.execute(
                "UPDATE exec_tasks SET state = %s, error = %s, update_time = now(),"
                " end_time = now() WHERE task_id = %s AND state = %s",
                (pb.TASK_STATE_FAILED, error, task_id, pb.TASK_STATE_RUNNING),
            )
            if cur.rowcount == 0:
                return False
            await conn.execute(
                "UPDATE exec_steps SET state = %s, error = %s, end_time = now(),"
                " lease_until = NULL WHERE task_id = %s AND name = %s",
                (pb.STEP_STATE_FAILED, error, task_id, step),
            )
            await self._cancel_unfinished(conn, task_id)
        return True

    async def cancel(self, task_id: str, tenant_id: str) -> tuple[TaskRow, Sequence[str]]:
        """Cancels a running task; returns it and the steps that were cancelled.

        Raises:
            NotFound: `TASK_NOT_FOUND`.
        """
        if not _valid_uuid(task_id):
            raise _not_found(task_id)
        async with self._db.connection() as conn, conn.transaction():
            task = await self._load(conn, task_id, tenant_id)
            cancelled: Sequence[str] = ()
            if task.state not in TERMINAL_TASK:
                await conn.execute(
                    "UPDATE exec_tasks SET state = %s, update_time = now(), end_time = now()"
                    " WHERE task_id = %s",
                    (pb.TASK_STATE_CANCELLED, task_id),
                )
                cancelled = await self._cancel_unfinished(conn, task_id)
                task = await self._load(conn, task_id, tenant_id)
        return task, cancelled

    async def _cancel_unfinished(self, conn: psycopg.AsyncConnection, task_id: str) -> list[str]:
        cur = await conn.execute(
            "UPDATE exec_steps SET state = %s, end_time = now(), lease_until = NULL"
            " WHERE task_id = %s AND state NOT IN (%s, %s, %s) RETURNING name",
            (pb.STEP_STATE_CANCELLED, task_id, *sorted(TERMINAL_STEP)),
        )
        return [r[0] for r in await cur.fetchall()]
