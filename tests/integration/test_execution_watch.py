"""WatchTask at scale through Envoy: a thousand watchers of fifty tasks, watchers that
join tasks mid-way, and watchers across a NATS restart, each seeing every event of its
task once, in order; JetStream consumers do not grow with the watchers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.request
import uuid
from collections import Counter

import grpc
import pytest
from switchboard.events.v1 import events_pb2 as ev
from switchboard.execution.v1 import execution_pb2 as pb
from switchboard.execution.v1 import execution_service_pb2_grpc

from services.execution.bus import EVENT_STREAM
from services.execution.tail import TailSettings
from tests.integration.conftest import as_tenant
from tests.polling import eventually

FINAL = (ev.TASK_EVENT_TYPE_COMPLETED, ev.TASK_EVENT_TYPE_FAILED, ev.TASK_EVENT_TYPE_CANCELLED)
CHANNELS = 1
"""Client connections to Envoy the streams share: one carries 1,000 (Envoy takes 4,096
streams per client connection, and opens more connections upstream past 1,024)."""
OPENING = 100
"""Streams being opened at once, at most: each call is first checked by the auth service
(ext_authz), which refuses what it cannot answer within a second; a burst of 1,000 on two
cores got a few hundred refused (UNAVAILABLE) before any reached the execution service."""


def chain(length: int) -> list[pb.Step]:
    """Steps each calling ListModels through the mesh, one after the other."""
    return [
        pb.Step(
            name=f"s{i}",
            depends_on=[f"s{i - 1}"] if i else [],
            tool=pb.ToolStep(tool="list_models"),
        )
        for i in range(length)
    ]


def sequence(event: pb.WatchTaskResponse) -> int:
    return (event.step_event if event.HasField("step_event") else event.task_event).sequence


def final(event: pb.WatchTaskResponse) -> bool:
    return event.HasField("task_event") and event.task_event.type in FINAL


@pytest.fixture
async def stubs(envoy_target: str):
    channels = [grpc.aio.insecure_channel(envoy_target) for _ in range(CHANNELS)]
    try:
        yield [execution_service_pb2_grpc.ExecutionServiceStub(c) for c in channels]
    finally:
        for channel in channels:
            await channel.close()


async def submit(stub, tenant: str, steps: list[pb.Step]) -> pb.Task:
    reply = await stub.SubmitTask(
        pb.SubmitTaskRequest(steps=steps), metadata=as_tenant(tenant), timeout=30
    )
    return reply.task


async def follow(
    stub, tenant: str, task_id: str, *, after: int = 0, errors: Counter | None = None
) -> list[pb.WatchTaskResponse]:
    """The task's events after `after`, until the stream ends (after the task's final
    event, or at once for a cursor at or past it). With `errors`, a stream that ends
    UNAVAILABLE is resumed from the last event received (counted there)."""
    events: list[pb.WatchTaskResponse] = []
    while True:
        cursor = sequence(events[-1]) if events else after
        call = stub.WatchTask(
            pb.WatchTaskRequest(task_id=task_id, after_sequence=cursor),
            metadata=as_tenant(tenant),
            timeout=240,
        )
        try:
            async for event in call:
                events.append(event)
            return events
        except grpc.aio.AioRpcError as error:
            if errors is None or error.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            errors[error.code().name] += 1
            await asyncio.sleep(0.5)  # a client's back-off before it resumes


def event_consumers(mesh) -> tuple[int, int]:
    """JetStream consumers now: on the event stream, and on every stream."""
    host, port = mesh.config.host, mesh.config.nats_monitor_port
    url = f"http://{host}:{port}/jsz?consumers=true"
    with urllib.request.urlopen(url, timeout=5) as reply:
        report = json.load(reply)
    events = total = 0
    for account in report.get("account_details", []):
        for stream in account.get("stream_detail", []):
            count = len(stream.get("consumer_detail") or [])
            total += count
            if stream["name"] == EVENT_STREAM:
                events += count
    return events, total


class ConsumerGauge:
    """The most JetStream consumers seen while it runs, sampled from NATS monitoring."""

    def __init__(self, mesh) -> None:
        self._mesh = mesh
        self.events = self.total = self.samples = 0
        self._task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        while True:
            events, total = await asyncio.to_thread(event_consumers, self._mesh)
            self.events, self.total = max(self.events, events), max(self.total, total)
            self.samples += 1
            await asyncio.sleep(0.2)  # the sampling period, not a wait for a condition

    async def __aenter__(self) -> ConsumerGauge:
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


LIVE_CONSUMERS = 1 + 1
"""The API process's live consumer, and a replaced one not yet deleted."""


@pytest.mark.timeout(300)
async def test_a_thousand_watchers_of_fifty_tasks_get_every_event_in_order(stubs, mesh):
    """The worker is held while the 1,000 streams open (each gets its task's first
    events from the history), then released: every later event reaches 1,000 open
    streams live."""
    tenant = f"tenant-{uuid.uuid4().hex[:12]}"
    await asyncio.to_thread(mesh.stop_component, "worker-0")
    held = True
    try:
        tasks = await asyncio.gather(
            *(submit(stubs[i % CHANNELS], tenant, chain(3)) for i in range(50))
        )
        errors: Counter[str] = Counter()
        received: Counter[int] = Counter()
        opening = asyncio.Semaphore(OPENING)

        async def watcher(n: int) -> list[pb.WatchTaskResponse]:
            task = tasks[n % len(tasks)]
            events: list[pb.WatchTaskResponse] = []
            await opening.acquire()
            call = stubs[n % CHANNELS].WatchTask(
                pb.WatchTaskRequest(task_id=task.task_id),
                metadata=as_tenant(tenant),
                timeout=240,
            )
            try:
                async for event in call:
                    events.append(event)
                    received[n] += 1
                    if len(events) == 1:
                        opening.release()
                    if final(event):
                        return events
                raise AssertionError(f"the stream of {task.task_id} ended before its end")
            except grpc.aio.AioRpcError as error:
                errors[error.code().name] += 1
                raise
            finally:
                if not events:
                    opening.release()

        started = time.monotonic()
        async with ConsumerGauge(mesh) as gauge:
            watchers = [asyncio.create_task(watcher(n)) for n in range(1000)]
            # SUBMITTED and the first step's QUEUED: every stream is open and reads
            await eventually(
                lambda: sum(1 for c in received.values() if c >= 2) == 1000 or errors,
                timeout=120,
                what="1,000 streams open",
            )
            assert not errors, errors
            opened = time.monotonic() - started
            await asyncio.to_thread(mesh.start_service, "worker-0")
            held = False
            seen = await asyncio.wait_for(asyncio.gather(*watchers, return_exceptions=True), 180)
    finally:
        if held:
            await asyncio.to_thread(mesh.start_service, "worker-0")
    took = time.monotonic() - started
    print(
        f"\n1,000 watchers of 50 tasks over {CHANNELS} channel(s): all open in {opened:.1f} s, "
        f"done in {took:.1f} s; JetStream consumers at most {gauge.events} on {EVENT_STREAM}, "
        f"{gauge.total} in all ({gauge.samples} samples)"
    )
    assert not errors, errors
    whole = {t.task_id: await follow(stubs[0], tenant, t.task_id) for t in tasks}
    for n, events in enumerate(seen):
        expected = whole[tasks[n % len(tasks)].task_id]
        assert [e.SerializeToString() for e in events] == [e.SerializeToString() for e in expected]
    for events in whole.values():
        assert [sequence(e) for e in events] == list(range(1, len(events) + 1))
        assert events[-1].task_event.type == ev.TASK_EVENT_TYPE_COMPLETED
        assert len(events) == 1 + 3 * 3 + 1
    assert gauge.samples > 0
    assert gauge.events <= LIVE_CONSUMERS + TailSettings().history_reads


@pytest.mark.timeout(240)
async def test_watchers_joining_running_tasks_miss_nothing_and_repeat_nothing(stubs, mesh):
    tenant = f"tenant-{uuid.uuid4().hex[:12]}"
    length = 20
    tasks = await asyncio.gather(
        *(submit(stubs[i % CHANNELS], tenant, chain(length)) for i in range(10))
    )
    joined: list[tuple[str, int, bool, asyncio.Task[list[pb.WatchTaskResponse]]]] = []

    async def progress(stub, task_id: str, threshold: int) -> int:
        """The task's last sequence once it reached `threshold` (or the task ended)."""
        last = 0

        async def reached() -> bool:
            nonlocal last
            got = await stub.GetTask(pb.GetTaskRequest(task_id=task_id), metadata=as_tenant(tenant))
            last = got.task.last_sequence
            return last >= threshold or got.task.state == pb.TASK_STATE_COMPLETED

        await eventually(reached, timeout=60, interval=0.02, what="the task progresses")
        return last

    async def join(n: int, task: pb.Task) -> None:
        stub = stubs[n % CHANNELS]
        for threshold in (1, 12, 24, 36, 48):
            last = await progress(stub, task.task_id, threshold)
            running = last < 1 + 3 * length + 1
            for after in (0, last):
                watch = follow(stub, tenant, task.task_id, after=after)
                joined.append((task.task_id, after, running, asyncio.create_task(watch)))

    await asyncio.gather(*(join(n, t) for n, t in enumerate(tasks)))
    results = await asyncio.wait_for(asyncio.gather(*(j[3] for j in joined)), 180)
    whole = {t.task_id: await follow(stubs[0], tenant, t.task_id) for t in tasks}
    for (task_id, after, _, _), events in zip(joined, results, strict=True):
        expected = [e.SerializeToString() for e in whole[task_id] if sequence(e) > after]
        assert [e.SerializeToString() for e in events] == expected, (task_id, after)
    mid_way = sum(1 for j in joined if j[2])
    print(f"\n{mid_way} of {len(joined)} watchers joined their task while it ran")
    assert mid_way >= len(joined) // 4, "too few watchers joined a running task to test it"


@pytest.mark.timeout(240)
async def test_watchers_follow_their_tasks_across_a_nats_restart(stubs, mesh):
    tenant = f"tenant-{uuid.uuid4().hex[:12]}"
    tasks = await asyncio.gather(
        *(submit(stubs[i % CHANNELS], tenant, chain(30)) for i in range(5))
    )
    resumed: Counter[str] = Counter()
    watchers = [
        asyncio.create_task(
            follow(stubs[n % CHANNELS], tenant, tasks[n % 5].task_id, errors=resumed)
        )
        for n in range(100)
    ]

    async def progressed() -> bool:
        got = await stubs[0].GetTask(
            pb.GetTaskRequest(task_id=tasks[0].task_id), metadata=as_tenant(tenant)
        )
        return got.task.last_sequence >= 10

    await eventually(progressed, timeout=60, what="the tasks run before NATS stops")
    await asyncio.to_thread(mesh.stop_component, "nats")
    await asyncio.to_thread(mesh.start_nats)
    restarted = time.time()
    results = await asyncio.wait_for(asyncio.gather(*watchers), 180)
    whole = {t.task_id: await follow(stubs[0], tenant, t.task_id) for t in tasks}
    for n, events in enumerate(results):
        expected = whole[tasks[n % 5].task_id]
        assert [e.SerializeToString() for e in events] == [e.SerializeToString() for e in expected]
    latest = max(
        e.step_event.time.ToNanoseconds() / 1e9
        for events in whole.values()
        for e in events
        if e.HasField("step_event")
    )
    assert latest > restarted, "no event after the restart: the live feed was not tested"
    print(f"\nwatch streams resumed after UNAVAILABLE across the restart: {sum(resumed.values())}")


async def test_the_live_consumer_exists_only_while_tasks_are_watched(stubs, mesh):
    tenant = f"tenant-{uuid.uuid4().hex[:12]}"
    task = await submit(stubs[0], tenant, chain(1))
    events = await follow(stubs[0], tenant, task.task_id)  # a watch, to its final event
    assert final(events[-1])

    async def nothing_watched_nothing_consumed() -> bool:
        return (await asyncio.to_thread(event_consumers, mesh))[0] == 0

    linger = TailSettings().linger.total_seconds()
    await eventually(
        nothing_watched_nothing_consumed,
        timeout=linger + 10,
        interval=0.5,
        what="the live consumer dropped after its linger",
    )
    # and the next watch makes it again, missing nothing
    again = await follow(stubs[0], tenant, task.task_id)
    assert [e.SerializeToString() for e in again] == [e.SerializeToString() for e in events]
