"""Engine and worker logic that needs no network: batched task creation, heartbeats on a
fake clock, failure reporting, step retries."""

from __future__ import annotations

import asyncio
import json
import random
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from google.rpc import status_pb2
from switchboard.execution.v1 import execution_pb2 as pb

import services.execution.engine as engine_module
from services.execution.bus import WorkSettings
from services.execution.engine import Engine
from services.execution.heartbeats import Heartbeats
from services.execution.steps import StepFailure
from services.execution.store import Claim, ClaimedTask, ClaimResult, StepRow, TaskRow
from services.execution.worker_loop import Worker
from services.runtime import RetryPolicy, Unavailable
from tests.polling import eventually


def request(name: str = "one") -> pb.SubmitTaskRequest:
    return pb.SubmitTaskRequest(steps=[pb.Step(name=name, tool=pb.ToolStep(tool="echo"))])


class FakeStore:
    """Creates tasks; refuses a batch holding a step named `bad`, and that one alone."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.singles = 0
        self.renewed: list[tuple[str, str]] = []
        self.renew_result = True

    async def create_many(self, requests: list[tuple[str, pb.SubmitTaskRequest]]) -> list[Any]:
        self.batches.append(len(requests))
        if any(r.steps[0].name == "bad" for _, r in requests):
            raise ValueError("bad row")
        return [f"task:{tenant}:{r.steps[0].name}" for tenant, r in requests]

    async def create(self, tenant: str, r: pb.SubmitTaskRequest) -> tuple[Any, bool]:
        self.singles += 1
        if r.steps[0].name == "bad":
            raise ValueError("bad row")
        return f"task:{tenant}:{r.steps[0].name}", False

    async def complete_many(self, steps: list[Any]) -> list[Any]:
        raise NotImplementedError

    async def renew(self, task_id: str, step: str, *, lease: timedelta) -> bool:
        self.renewed.append((task_id, step))
        return self.renew_result


async def test_concurrent_creations_share_one_batch():
    store = FakeStore()
    engine = Engine(store, bus=None)  # type: ignore[arg-type]
    created = await asyncio.gather(*(engine._creates((f"t{i}", request())) for i in range(5)))
    assert created == [f"task:t{i}:one" for i in range(5)]
    assert sum(store.batches) == 5 and len(store.batches) < 5
    assert store.singles == 0


async def test_a_failing_batch_is_retried_one_by_one_and_only_the_bad_request_fails():
    store = FakeStore()
    engine = Engine(store, bus=None)  # type: ignore[arg-type]
    names = ["a", "bad", "c"]
    created = await asyncio.gather(*(engine._creates(("t", request(n))) for n in names))
    assert created[0] == "task:t:a" and created[2] == "task:t:c"
    assert isinstance(created[1], ValueError)


class Clock:
    """Monotonic seconds that move only when the test says."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeMsg:
    def __init__(self) -> None:
        self.beats = 0
        self.headers: dict[str, str] | None = None  # as nats' Msg without headers

    async def in_progress(self) -> None:
        self.beats += 1


async def test_heartbeats_beat_due_steps_and_cancel_a_step_whose_task_ended():
    store, clock = FakeStore(), Clock()
    lease = timedelta(seconds=3)
    heartbeats = Heartbeats(
        lease=lease, renew=lambda t, s: store.renew(t, s, lease=lease), clock=clock
    )
    run = asyncio.create_task(asyncio.Event().wait())
    msg = FakeMsg()
    heartbeats.track(run, heartbeats.chain(task_id="task", step="step", msg=msg))
    await heartbeats.beat_due()
    assert msg.beats == 0  # due a third of the lease after the chain began
    clock.advance(1)
    await heartbeats.beat_due()
    await heartbeats.beat_due()
    assert msg.beats == 1 and store.renewed == [("task", "step")]
    store.renew_result = False  # the task was cancelled meanwhile
    clock.advance(1)
    await heartbeats.beat_due()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert msg.beats == 2


async def test_the_heartbeat_loop_looks_four_times_per_interval():
    store, clock = FakeStore(), Clock()
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        if len(waits) == 8:
            raise asyncio.CancelledError
        waits.append(seconds)
        clock.advance(seconds)

    lease = timedelta(seconds=3)
    heartbeats = Heartbeats(
        lease=lease, renew=lambda t, s: store.renew(t, s, lease=lease), clock=clock, sleep=sleep
    )
    run = asyncio.create_task(asyncio.Event().wait())
    msg = FakeMsg()
    heartbeats.track(run, heartbeats.chain(task_id="task", step="step", msg=msg))
    with pytest.raises(asyncio.CancelledError):
        await heartbeats.run()
    run.cancel()
    assert waits == [0.25] * 8  # two intervals of a second
    assert msg.beats == 2


class ShortSteps:
    """Each step takes 0.25 s of the fake clock, less than a beat interval; the
    heartbeat loop looks while it runs."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.heartbeats: Heartbeats | None = None

    async def run(self, step: pb.Step, outputs: Any, **kwargs: Any) -> Any:
        assert self.heartbeats is not None
        self.clock.advance(0.25)
        await self.heartbeats.beat_due()
        return {"step": step.name}


async def test_a_chain_of_short_steps_beats_its_one_message_on_schedule():
    """A worker runs a chain under its first step's message: ten 0.25 s steps outlast
    the 1.5 s ack wait, so the message must be beaten though no single step lasts a beat
    interval (0.5 s)."""
    store, clock = FakeStore(), Clock()
    steps = ShortSteps(clock)
    bus = SimpleNamespace(settings=WorkSettings(ack_wait=timedelta(seconds=1.5)))
    worker = Worker(SimpleNamespace(store=store, bus=bus), runner=steps, clock=clock)  # type: ignore[arg-type]
    steps.heartbeats = worker.heartbeats
    msg = FakeMsg()
    task = ClaimedTask("task", "tenant", pb.SubmitTaskRequest())
    beat = worker.heartbeats.chain(task_id="task", step="s0", msg=msg)  # type: ignore[arg-type]
    for i in range(10):
        step = pb.Step(name=f"s{i}", tool=pb.ToolStep(tool="echo"))
        assert await worker._run(task, step, {}, beat) == {"step": f"s{i}"}
    assert msg.beats == 5  # at 0.5, 1, 1.5, 2 and 2.5 s
    assert store.renewed == [("task", f"s{i}") for i in (1, 3, 5, 7, 9)]


class ReportingStore(FakeStore):
    """A task that failed at `b`, a step `a`'s worker ran in `a`'s chain and died before
    publishing the failure; `c` was cancelled by it."""

    def __init__(self) -> None:
        super().__init__()
        error = status_pb2.Status(code=14, message="b broke").SerializeToString()
        now = datetime.now(UTC)
        self.task = TaskRow(
            task_id="task", tenant_id="tenant", idempotency_key="",
            request=pb.SubmitTaskRequest(), state=pb.TASK_STATE_FAILED, error=error,
            labels={}, priority=0, create_time=now, update_time=now, end_time=now,
            steps=(
                StepRow("task", "a", pb.STEP_STATE_COMPLETED, 1, {"ok": 1}, None, now, now),
                StepRow("task", "b", pb.STEP_STATE_FAILED, 2, None, error, now, now),
                StepRow("task", "c", pb.STEP_STATE_CANCELLED, 0, None, None, None, now),
            ),
        )  # fmt: skip

    async def claim_many(self, steps: list[Any], *, lease: timedelta) -> list[ClaimResult]:
        return [ClaimResult(Claim.REPORT) for _ in steps]

    async def get(self, task_id: str, tenant_id: str | None) -> TaskRow:
        return self.task


class RecordingBus:
    settings = WorkSettings()

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    async def publish_events(self, events: list[pb.WatchTaskResponse]) -> list[int]:
        for e in events:
            which = e.step_event if e.HasField("step_event") else e.task_event
            self.sent.append(("event", which.event_id))
        return list(range(len(events)))

    async def dead_letter(self, task_id: str, step: str, payload: bytes, attempt: int) -> None:
        self.sent.append(("dead", f"{task_id}:{step}:{attempt}"))


class AckedMsg(FakeMsg):
    def __init__(self, data: bytes) -> None:
        super().__init__()
        self.data = data
        self.acked = False

    async def ack(self) -> None:
        self.acked = True


async def test_a_redelivered_chain_message_reports_the_step_that_failed_the_task():
    """The message is `a`'s, but `b` (run in its chain) failed the task: the failure
    published again is `b`'s, with `c` cancelled, its dead letter, and the task's end."""
    bus = RecordingBus()
    worker = Worker(Engine(ReportingStore(), bus), runner=None)  # type: ignore[arg-type]
    msg = AckedMsg(json.dumps({"task_id": "task", "step": "a"}).encode())
    await worker.handle(msg)  # type: ignore[arg-type]
    assert bus.sent == [
        ("event", "task:b:STEP_EVENT_TYPE_FAILED:2"),
        ("event", "task:c:STEP_EVENT_TYPE_CANCELLED:0"),
        ("dead", "task:b:2"),
        ("event", "task:TASK_EVENT_TYPE_FAILED"),
    ]
    assert msg.acked


class RetryingStore(FakeStore):
    def __init__(self) -> None:
        super().__init__()
        self.retried: list[int] = []
        self.counted: list[bool] = []
        self.failed: list[str] = []

    async def retry(self, task_id: str, step: str, error: bytes, *, counted: bool = True) -> bool:
        self.retried.append(len(error))
        self.counted.append(counted)
        return True

    async def fail(self, task_id: str, step: str, error: bytes) -> bool:
        self.failed.append(step)
        return False  # reported already


class NakedMsg(AckedMsg):
    def __init__(self) -> None:
        super().__init__(b"")
        self.delays: list[float] = []

    async def nak(self, delay: float) -> None:
        self.delays.append(delay)


async def test_a_retryable_failure_comes_back_after_a_full_jitter_backoff():
    """Attempt n's message comes back after a draw in [0, min(30, 0.5 * 2**(n-1))] s; the
    step's own max_attempts ends the retries."""
    store, bus = RetryingStore(), RecordingBus()
    worker = Worker(Engine(store, bus), runner=None, rng=random.Random(7))  # type: ignore[arg-type]
    task = ClaimedTask("task", "tenant", pb.SubmitTaskRequest())
    step = pb.Step(name="s", tool=pb.ToolStep(tool="echo"), max_attempts=3)
    failure = StepFailure(Unavailable("down", reason="DEPENDENCY_UNAVAILABLE"), retryable=True)
    msg = NakedMsg()
    for attempt in (1, 2, 3):
        await worker._failed(task, step, attempt, failure, msg)  # type: ignore[arg-type]
    expected = random.Random(7)
    assert msg.delays == [expected.uniform(0, 0.5), expected.uniform(0, 1.0)]
    assert [event for _, event in bus.sent] == [
        "task:s:STEP_EVENT_TYPE_RETRIED:1",
        "task:s:STEP_EVENT_TYPE_RETRIED:2",
    ]
    assert store.failed == ["s"] and msg.acked


async def test_a_failure_with_retry_info_comes_back_after_it():
    store, bus = RetryingStore(), RecordingBus()
    worker = Worker(Engine(store, bus), runner=None, rng=random.Random(7))  # type: ignore[arg-type]
    task = ClaimedTask("task", "tenant", pb.SubmitTaskRequest())
    step = pb.Step(name="s", tool=pb.ToolStep(tool="echo"), max_attempts=3)
    busy = Unavailable("busy", reason="DEPENDENCY_UNAVAILABLE", retry_after=timedelta(seconds=4))
    msg = NakedMsg()
    await worker._failed(task, step, 1, StepFailure(busy, retryable=True), msg)  # type: ignore[arg-type]
    assert msg.delays == [4.0] and store.counted == [True]


async def test_a_step_refused_by_an_open_circuit_waits_for_it_spending_no_attempt():
    """However often it meets the open circuit (here past its max_attempts), the step is
    queued again, its attempt given back, after the circuit's wait plus a spread."""
    store, bus = RetryingStore(), RecordingBus()
    worker = Worker(Engine(store, bus), runner=None, rng=random.Random(7))  # type: ignore[arg-type]
    task = ClaimedTask("task", "tenant", pb.SubmitTaskRequest())
    step = pb.Step(name="s", tool=pb.ToolStep(tool="echo"), max_attempts=2)
    open_circuit = Unavailable(
        "tool 'echo' is failing; its circuit is open",
        reason="TOOL_CIRCUIT_OPEN",
        retry_after=timedelta(seconds=20),
    )
    failure = StepFailure(open_circuit, retryable=True)
    assert failure.not_attempted
    msg = NakedMsg()
    for _ in range(4):
        await worker._failed(task, step, 2, failure, msg)  # type: ignore[arg-type]
    assert store.counted == [False] * 4 and store.failed == [] and not msg.acked
    assert all(20.0 <= d <= 20.5 for d in msg.delays) and len(set(msg.delays)) == 4
    # a failure the tool itself answered spends the last attempt: the task fails
    down = StepFailure(Unavailable("down", reason="TOOL_UNAVAILABLE"), retryable=True)
    assert not down.not_attempted
    await worker._failed(task, step, 2, down, msg)  # type: ignore[arg-type]
    assert store.failed == ["s"]


class FlakyBus:
    """Takes events and work while `up`; refuses them (UNAVAILABLE) while down."""

    def __init__(self) -> None:
        self.up = False
        self.sent: list[str] = []
        self.refused = 0

    async def publish_events(self, events: list[pb.WatchTaskResponse]) -> None:
        if not self.up:
            self.refused += 1
            raise Unavailable("the message bus is down", reason="DEPENDENCY_UNAVAILABLE")
        self.sent.extend(e.WhichOneof("event") for e in events)

    async def enqueue_all(self, task_id: str, steps: list[str], *, again: str = "") -> None:
        self.sent.extend(f"work:{s}" for s in steps)


def queued_task() -> Any:
    step = SimpleNamespace(name="one", state=pb.STEP_STATE_QUEUED)
    return SimpleNamespace(task_id="t-1", tenant_id="acme", steps=[step])


async def test_a_committed_task_is_answered_while_the_bus_is_down_and_announced_after(
    monkeypatch,
):
    monkeypatch.setattr(engine_module, "ANNOUNCE_WAIT_S", 0.05)
    monkeypatch.setattr(
        engine_module,
        "ANNOUNCE_RETRY",
        RetryPolicy(
            max_attempts=1000,
            backoff=timedelta(milliseconds=1),
            max_backoff=timedelta(milliseconds=5),
        ),
    )
    bus = FlakyBus()
    engine = Engine(FakeStore(), bus)  # type: ignore[arg-type]
    # the bus is down: the call answers, with no sequence yet, and the task is kept
    assert await engine._announced(queued_task()) == 0
    assert bus.sent == [] and len(engine._announcing) == 1
    bus.up = True
    await eventually(lambda: not engine._announcing, what="the announcement goes out")
    assert bus.refused >= 1
    assert bus.sent == ["task_event", "step_event", "work:one"]
    # with the bus up, the call waits for its events and knows their sequence
    assert await engine._announced(queued_task()) == 2


async def test_closing_the_engine_stops_announcements_still_waiting_for_the_bus(monkeypatch):
    monkeypatch.setattr(engine_module, "ANNOUNCE_WAIT_S", 0.01)
    bus = FlakyBus()
    engine = Engine(FakeStore(), bus)  # type: ignore[arg-type]
    assert await engine._announced(queued_task()) == 0
    (job,) = engine._announcing
    await engine.close()
    assert job.cancelled() and not engine._announcing and bus.sent == []
