"""Engine and worker logic that needs no network: batched task creation, heartbeats."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

from google.rpc import status_pb2
from switchboard.execution.v1 import execution_pb2 as pb

from services.execution.bus import WorkSettings
from services.execution.engine import Engine, Worker, _Beat
from services.execution.store import Claim, ClaimedTask, ClaimResult, StepRow, TaskRow


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


class FakeMsg:
    def __init__(self) -> None:
        self.beats = 0

    async def in_progress(self) -> None:
        self.beats += 1


async def test_one_loop_heartbeats_long_steps_and_cancels_a_step_whose_task_ended():
    store = FakeStore()
    bus = SimpleNamespace(settings=WorkSettings(ack_wait=timedelta(seconds=0.3)))
    worker = Worker(SimpleNamespace(store=store, bus=bus), runner=None)  # type: ignore[arg-type]
    beats = asyncio.create_task(worker._heartbeats())
    run = asyncio.create_task(asyncio.sleep(10))
    msg = FakeMsg()
    worker._beats[run] = _Beat("task", "step", msg, due=0.0)  # type: ignore[arg-type]
    try:
        await asyncio.sleep(0.35)
        assert msg.beats >= 2 and store.renewed[0] == ("task", "step")
        store.renew_result = False
        await asyncio.sleep(0.2)
        assert run.cancelled()
    finally:
        beats.cancel()
        run.cancel()
        await asyncio.gather(beats, run, return_exceptions=True)


class ShortSteps:
    """Each step takes 0.1 s: less than a beat interval."""

    async def run(self, step: pb.Step, outputs: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0.1)
        return {"step": step.name}


async def test_a_chain_of_short_steps_beats_its_one_message_on_schedule():
    """A worker runs a chain under its first step's message: ten 0.1 s steps outlast the
    0.6 s ack wait, so the message must be beaten though no single step lasts a beat
    interval (0.2 s)."""
    store = FakeStore()
    bus = SimpleNamespace(settings=WorkSettings(ack_wait=timedelta(seconds=0.6)))
    worker = Worker(SimpleNamespace(store=store, bus=bus), runner=ShortSteps())  # type: ignore[arg-type]
    beats = asyncio.create_task(worker._heartbeats())
    msg = FakeMsg()
    task = ClaimedTask("task", "tenant", pb.SubmitTaskRequest())
    beat = _Beat("task", "s0", msg, due=time.monotonic() + worker._beat_every)  # type: ignore[arg-type]
    try:
        for i in range(10):
            step = pb.Step(name=f"s{i}", tool=pb.ToolStep(tool="echo"))
            assert await worker._run(task, step, {}, beat) == {"step": f"s{i}"}
    finally:
        beats.cancel()
        await asyncio.gather(beats, return_exceptions=True)
    assert msg.beats >= 3
    assert len(store.renewed) == msg.beats
    assert all(task_id == "task" and step.startswith("s") for task_id, step in store.renewed)


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
