"""ExecutionService's API logic without a network: the servicer and engine over an
in-memory store and bus (task states, pages, per-task event sequences, WatchTask's
cursor, SubmitTasks' per-task results)."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from nats.js.errors import NotFoundError
from switchboard.events.v1 import events_pb2 as ev
from switchboard.execution.v1 import execution_pb2 as pb

from services.execution.bus import EVENT_RETENTION, Bus, WorkSettings
from services.execution.code import run_request
from services.execution.config import load_execution_config
from services.execution.engine import Engine
from services.execution.events import step_event, task_event
from services.execution.sandbox import SandboxLimits
from services.execution.servicer import ExecutionServicer, task_cursor
from services.execution.store import TaskRow, _new_task, key_reused, public_state
from services.execution.watch import may_have_expired
from services.runtime import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    _context,
    error_details,
    page_token,
)

TENANT = "acme"
NOW = datetime.now(UTC)


def tool_step(name: str = "a", **fields: Any) -> pb.Step:
    return pb.Step(name=name, tool=pb.ToolStep(tool="echo"), **fields)


class FakeStore:
    def __init__(self) -> None:
        self.tasks: dict[str, TaskRow] = {}
        self.listed: dict[str, Any] = {}

    def _new(self, tenant: str, request: pb.SubmitTaskRequest) -> TaskRow:
        if any(s.name == "boom" for s in request.steps):
            raise RuntimeError("a bug")
        states = [pb.STEP_STATE_WAITING if s.depends_on else pb.STEP_STATE_QUEUED
                  for s in request.steps]  # fmt: skip
        task = _new_task(str(uuid.uuid4()), tenant, request, states, NOW)
        self.tasks[task.task_id] = task
        return task

    async def create(self, tenant: str, request: pb.SubmitTaskRequest) -> tuple[TaskRow, bool]:
        return self._new(tenant, request), False

    async def create_many(self, requests: list[tuple[str, pb.SubmitTaskRequest]]) -> list[Any]:
        if any(s.name == "boom" for _, r in requests for s in r.steps):
            raise RuntimeError("the batch fails; one by one then")
        return [self._new(tenant, request) for tenant, request in requests]

    async def get(self, task_id: str, tenant: str | None) -> TaskRow:
        if task_id not in self.tasks:
            raise NotFound("no", reason="TASK_NOT_FOUND")
        return self.tasks[task_id]

    async def list(self, tenant: str, **query: Any) -> list[TaskRow]:
        self.listed = query
        return []


class FakeBus:
    """Events published and read back in memory, numbered as JetStream would number a
    stream shared with other tasks (so a leak of those numbers would show)."""

    def __init__(self) -> None:
        self.published: list[pb.WatchTaskResponse] = []
        self.history: dict[str, list[bytes]] = {}
        self.work: list[str] = []

    async def publish_events(self, events: list[pb.WatchTaskResponse]) -> None:
        for event in events:
            self.published.append(event)
            which = event.step_event if event.HasField("step_event") else event.task_event
            self.history.setdefault(which.task_id, []).append(event.SerializeToString())

    async def enqueue_all(self, task_id: str, steps: list[str]) -> None:
        self.work += steps

    async def event_count(self, task_id: str) -> int:
        return len(self.history.get(task_id, []))

    async def events(self, task_id: str) -> AsyncIterator[bytes]:
        for data in self.history.get(task_id, []):
            yield data
        await asyncio.Event().wait()  # live: nothing more comes


def servicer(
    event_retention: timedelta = EVENT_RETENTION,
) -> tuple[ExecutionServicer, FakeStore, FakeBus]:
    store, bus = FakeStore(), FakeBus()
    engine = Engine(store, bus)  # type: ignore[arg-type]
    tools = SimpleNamespace(names=frozenset({"echo"}))
    api = ExecutionServicer(
        engine,  # type: ignore[arg-type]
        tools,  # type: ignore[arg-type]
        sandbox=None,
        sandbox_limits=SandboxLimits(),
        task_events=bus.events,
        event_retention=event_retention,
    )
    return api, store, bus


@pytest.fixture(autouse=True)
def _tenant():
    token = _context.tenant_id.set(TENANT)
    yield
    _context.tenant_id.reset(token)


# ---- task states -------------------------------------------------------------------------


def test_a_live_task_is_pending_until_one_of_its_steps_has_started():
    assert public_state(pb.TASK_STATE_RUNNING, [0, 0]) == pb.TASK_STATE_PENDING
    assert public_state(pb.TASK_STATE_RUNNING, [0, 1]) == pb.TASK_STATE_RUNNING
    for final in (pb.TASK_STATE_COMPLETED, pb.TASK_STATE_FAILED, pb.TASK_STATE_CANCELLED):
        assert public_state(final, [0, 0]) == final


async def test_submit_task_returns_the_task_pending_with_its_own_last_sequence():
    api, _, bus = servicer()
    bus.history["someone-else"] = [b""] * 1000  # other tasks' events: not counted
    reply = await api.SubmitTask(
        pb.SubmitTaskRequest(steps=[tool_step("a"), tool_step("b", depends_on=["a"])]), None
    )
    assert reply.task.state == pb.TASK_STATE_PENDING
    assert not reply.existing
    # SUBMITTED, then a's QUEUED: the task's events 1 and 2
    assert reply.task.last_sequence == 2 == await bus.event_count(reply.task.task_id)
    got = await api.GetTask(pb.GetTaskRequest(task_id=reply.task.task_id), None)
    assert got.task.state == pb.TASK_STATE_PENDING and got.task.last_sequence == 2


def test_idempotency_key_reuse_names_the_key_and_the_task():
    error = key_reused("order-7", "t-1")
    assert error.reason == "IDEMPOTENCY_KEY_REUSED"
    assert error.metadata == {"idempotency_key": "order-7", "task_id": "t-1"}


# ---- SubmitTasks ---------------------------------------------------------------------------


async def test_submit_tasks_checks_each_task_alone_and_answers_each():
    api, store, _ = servicer()
    nul = pb.SubmitTaskRequest(steps=[tool_step()], labels={"k": "a\x00b"})
    batch = [
        pb.SubmitTaskRequest(steps=[tool_step()]),
        pb.SubmitTaskRequest(steps=[tool_step()], priority=9),
        pb.SubmitTaskRequest(steps=[tool_step()], priority=40_000),  # once a smallint error
        pb.SubmitTaskRequest(steps=[tool_step("a"), tool_step("Bad Name")]),
        nul,
        pb.SubmitTaskRequest(steps=[tool_step("b")], priority=1),
    ]
    reply = await api.SubmitTasks(pb.SubmitTasksRequest(tasks=batch), None)
    outcomes = [r.WhichOneof("outcome") for r in reply.results]
    assert outcomes == ["submitted", "error", "error", "error", "error", "submitted"]
    refused = [error_details(r.error) for r in reply.results if r.HasField("error")]
    assert {d.code for d in refused} == {grpc.StatusCode.INVALID_ARGUMENT}
    assert [[v.field for v in d.field_violations] for d in refused] == [
        ["priority"],
        ["priority"],
        ["steps[1].name"],
        ["labels['k']"],
    ]
    assert len(store.tasks) == 2


async def test_an_unexpected_failure_of_one_task_is_that_task_s_result_only():
    api, store, _ = servicer()
    batch = [pb.SubmitTaskRequest(steps=[tool_step(name)]) for name in ("a", "boom", "c")]
    reply = await api.SubmitTasks(pb.SubmitTasksRequest(tasks=batch), None)
    assert [r.WhichOneof("outcome") for r in reply.results] == ["submitted", "error", "submitted"]
    assert error_details(reply.results[1].error).code == grpc.StatusCode.INTERNAL
    assert len(store.tasks) == 2


# ---- ListTasks -----------------------------------------------------------------------------


async def test_list_tasks_pages_hold_1_to_1000_tasks_and_100_by_default():
    api, store, _ = servicer()
    await api.ListTasks(pb.ListTasksRequest(), None)
    assert store.listed["limit"] == 101  # one more, to know whether a next page exists
    await api.ListTasks(pb.ListTasksRequest(page_size=1000), None)
    assert store.listed["limit"] == 1001
    with pytest.raises(InvalidArgument):
        await api.ListTasks(pb.ListTasksRequest(page_size=1001), None)


async def test_a_page_token_with_a_bad_id_is_invalid_not_a_database_error():
    api, store, _ = servicer()
    for bad in (
        page_token(NOW.isoformat(), "not-a-uuid"),
        page_token("yesterday", str(uuid.uuid4())),
    ):
        with pytest.raises(InvalidArgument) as exc:
            await api.ListTasks(pb.ListTasksRequest(page_token=bad), None)
        assert [v.field for v in exc.value.field_violations] == ["page_token"]
    task_id = uuid.uuid4()
    token = page_token(NOW.isoformat(), str(task_id).upper())
    await api.ListTasks(pb.ListTasksRequest(page_token=token), None)
    assert store.listed["before"] == (NOW, str(task_id))
    with pytest.raises(ValueError):
        task_cursor([NOW.isoformat(), "x"])


async def test_list_tasks_refuses_nul_in_its_label_filter():
    api, _, _ = servicer()
    with pytest.raises(InvalidArgument) as exc:
        await api.ListTasks(pb.ListTasksRequest(labels={"a\x00": "b"}), None)
    assert [v.field for v in exc.value.field_violations] == ["labels['a\\x00']"]


# ---- WatchTask -----------------------------------------------------------------------------


async def finished_task(api: ExecutionServicer, bus: FakeBus) -> str:
    reply = await api.SubmitTask(pb.SubmitTaskRequest(steps=[tool_step("a")]), None)
    task_id = reply.task.task_id
    await bus.publish_events(
        [
            step_event(
                task_id=task_id,
                tenant_id=TENANT,
                step="a",
                kind=ev.STEP_EVENT_TYPE_STARTED,
                attempt=1,
            ),
            step_event(
                task_id=task_id,
                tenant_id=TENANT,
                step="a",
                kind=ev.STEP_EVENT_TYPE_COMPLETED,
                attempt=1,
                output={"x": 1},
            ),
            task_event(task_id=task_id, tenant_id=TENANT, kind=ev.TASK_EVENT_TYPE_COMPLETED),
        ]
    )
    return task_id


async def watch(api: ExecutionServicer, task_id: str, after: int = 0) -> list[Any]:
    async with asyncio.timeout(2):  # an ended task's stream ends by itself
        request = pb.WatchTaskRequest(task_id=task_id, after_sequence=after)
        return [e async for e in api.WatchTask(request, None)]


def sequences(events: list[pb.WatchTaskResponse]) -> list[int]:
    return [(e.step_event if e.HasField("step_event") else e.task_event).sequence for e in events]


async def test_events_are_numbered_per_task_and_resume_after_a_cursor():
    api, _, bus = servicer()
    task_id = await finished_task(api, bus)
    await finished_task(api, bus)  # another task's events, interleaved in the stream
    whole = await watch(api, task_id)
    assert sequences(whole) == [1, 2, 3, 4, 5]
    assert whole[-1].task_event.type == ev.TASK_EVENT_TYPE_COMPLETED
    rest = await watch(api, task_id, after=2)
    assert sequences(rest) == [3, 4, 5]
    assert [e.SerializeToString() for e in whole[2:]] == [e.SerializeToString() for e in rest]


@pytest.mark.parametrize("after", [5, 6, 2**63, 2**64 - 1])
async def test_a_cursor_at_or_past_the_end_of_an_ended_task_ends_the_stream_at_once(after):
    api, _, bus = servicer()
    task_id = await finished_task(api, bus)
    assert await watch(api, task_id, after=after) == []


def aged(task: TaskRow, by: timedelta) -> TaskRow:
    return dataclasses.replace(task, create_time=task.create_time - by)


def created_ago(task: TaskRow, age: timedelta) -> TaskRow:
    return dataclasses.replace(task, create_time=datetime.now(UTC) - age)


async def test_an_old_task_whose_first_events_expired_is_history_expired():
    api, store, bus = servicer()
    task_id = await finished_task(api, bus)
    store.tasks[task_id] = aged(store.tasks[task_id], EVENT_RETENTION)
    assert sequences(await watch(api, task_id)) == [1, 2, 3, 4, 5]  # all still there
    del bus.history[task_id][:2]  # SUBMITTED and QUEUED expired
    for after in (0, 4):
        with pytest.raises(FailedPrecondition) as exc:
            await watch(api, task_id, after=after)
        assert exc.value.reason == "EVENT_HISTORY_EXPIRED"
    bus.history[task_id].clear()
    with pytest.raises(FailedPrecondition):
        await watch(api, task_id)


async def test_the_configured_retention_decides_which_tasks_may_have_lost_events():
    api, store, bus = servicer(event_retention=timedelta(hours=1))
    task_id = await finished_task(api, bus)
    del bus.history[task_id][:2]
    # ages from now, not from the fake store's clock (NOW: when this module was imported)
    store.tasks[task_id] = created_ago(store.tasks[task_id], timedelta(minutes=59))
    assert sequences(await watch(api, task_id)) == [1, 2, 3]  # young: numbered as it is
    store.tasks[task_id] = created_ago(store.tasks[task_id], timedelta(minutes=61))
    with pytest.raises(FailedPrecondition) as exc:
        await watch(api, task_id)
    assert exc.value.reason == "EVENT_HISTORY_EXPIRED"


async def test_the_streams_keep_events_and_ids_as_long_as_configured():
    settings = WorkSettings(
        event_retention=timedelta(hours=2), duplicate_window=timedelta(minutes=3), replicas=3
    )
    bus = Bus("nats://unused", settings)
    made: list[Any] = []

    async def stream_info(name: str) -> Any:
        raise NotFoundError

    async def add_stream(config: Any) -> Any:
        made.append(config)
        return SimpleNamespace(config=config)  # the stream's info, as NATS stored it

    async def add_consumer(stream: str, config: Any) -> None:
        pass

    bus._js = SimpleNamespace(  # type: ignore[assignment]
        stream_info=stream_info, add_stream=add_stream, add_consumer=add_consumer
    )
    atomic = await bus._ensure_streams()
    # the work and the events accept atomic batches (one disk sync for many messages)
    assert atomic == {"SB_WORK": True, "SB_EVENTS": True, "SB_DEAD": False}
    assert {c.name: c.duplicate_window for c in made} == dict.fromkeys(
        ("SB_WORK", "SB_EVENTS", "SB_DEAD"), 180.0
    )
    assert next(c for c in made if c.name == "SB_EVENTS").max_age == 7200.0
    assert {c.num_replicas for c in made} == {3}  # every stream on three NATS nodes


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"SWITCHBOARD_EXECUTION_DUPLICATE_WINDOW": "30s"}, "DUPLICATE_WINDOW"),
        ({"SWITCHBOARD_NATS_STREAM_REPLICAS": "0"}, "NATS_STREAM_REPLICAS"),
        (
            {
                "SWITCHBOARD_EXECUTION_EVENT_RETENTION": "5m",
                "SWITCHBOARD_EXECUTION_DUPLICATE_WINDOW": "10m",
            },
            "EVENT_RETENTION",
        ),
    ],
)
def test_retention_settings_out_of_range_are_refused(monkeypatch, settings, message):
    monkeypatch.setenv("SWITCHBOARD_DATABASE_URL", "postgresql://unused")
    monkeypatch.setenv("SWITCHBOARD_NATS_URL", "nats://unused")
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        load_execution_config()


async def test_a_young_task_is_numbered_from_its_first_event_whatever_it_is():
    api, _, bus = servicer()
    task_id = await finished_task(api, bus)
    del bus.history[task_id][:2]  # never published (the submission's publish failed)
    assert sequences(await watch(api, task_id)) == [1, 2, 3]


def test_only_a_task_older_than_the_retention_may_have_lost_events():
    assert not may_have_expired(NOW - timedelta(days=6), NOW, timedelta(days=7))
    assert may_have_expired(NOW - timedelta(days=7), NOW, timedelta(days=7))


async def test_the_bus_counts_a_task_s_events_by_its_subject():
    bus = Bus("nats://unused")
    asked: list[str] = []

    async def stream_info(name: str, subjects_filter: str) -> Any:
        asked.append(subjects_filter)
        subjects = {subjects_filter: 7} if subjects_filter.endswith("t1") else None
        return SimpleNamespace(state=SimpleNamespace(subjects=subjects, last_seq=123_456))

    bus._js = SimpleNamespace(stream_info=stream_info)  # type: ignore[assignment]
    assert await bus.event_count("t1") == 7
    assert await bus.event_count("t2") == 0
    assert asked == ["sb.events.t1", "sb.events.t2"]


# ---- RunCode -----------------------------------------------------------------------------


def test_run_code_caps_its_timeout_and_refuses_paths_out_of_its_directory():
    limits = SandboxLimits()
    request = pb.RunCodeRequest(code="1", timeout=duration_pb2.Duration(seconds=3600))
    assert run_request(request, limits).timeout == limits.max_timeout
    bad = pb.RunCodeRequest(
        files=[
            pb.SandboxFile(path=p)
            for p in (
                "ok/file",
                "../x",
                "/etc/x",
                "a//b",
                "a/./b",
                "x" * 256,  # a file name longer than Linux takes (it failed the sandbox)
                "a/\0b",
                f"{'d' * 255}/{'f' * 255}",  # long, but every part fits
            )
        ]
    )
    with pytest.raises(InvalidArgument) as exc:
        run_request(bad, limits)
    assert [v.field for v in exc.value.field_violations] == [
        "files[1].path",
        "files[2].path",
        "files[3].path",
        "files[4].path",
        "files[5].path",
        "files[6].path",
    ]
