"""ExecutionService end to end: tasks over NATS JetStream with state in PostgreSQL,
workers started by the launcher, steps calling the mesh, the sandbox and tools."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import time
import uuid
from collections import Counter
from pathlib import Path

import grpc
import nats
import psycopg
import pytest
import yaml
from aiohttp import web
from google.protobuf import struct_pb2
from switchboard.events.v1 import events_pb2 as ev
from switchboard.execution.v1 import execution_pb2 as pb
from switchboard.execution.v1 import execution_service_pb2_grpc

from services.runtime import error_details
from tests.integration.conftest import as_tenant
from tests.polling import eventually

TOOLS = Path(__file__).parents[2] / "services" / "execution" / "tools.yaml"


def new_tenant() -> str:
    return f"tenant-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def execution(envoy_target: str):
    async with grpc.aio.insecure_channel(envoy_target) as channel:
        yield execution_service_pb2_grpc.ExecutionServiceStub(channel)


class Ledger:
    """An HTTP tool with a side effect: one entry per idempotency key, however often
    the same call arrives."""

    def __init__(self) -> None:
        self.entries: dict[str, dict] = {}
        self.calls: Counter[str] = Counter()
        self.fail_always = 0
        self.delay = 0.0  # seconds each call takes, like a real payment API
        self.env: dict[str, str] = {}
        self.flaky_down = False
        self.flaky_calls = 0

    async def record(self, request: web.Request) -> web.Response:
        key = request.headers.get("Idempotency-Key", "")
        self.calls[key] += 1
        body = await request.json()
        await asyncio.sleep(self.delay)
        self.entries.setdefault(key, body)
        return web.json_response({"recorded": key, "entries": len(self.entries)})

    async def broken(self, request: web.Request) -> web.Response:
        self.fail_always += 1
        return web.json_response({"error": "down"}, status=503)

    async def flaky(self, request: web.Request) -> web.Response:
        """Down (503) while `flaky_down`, else fine: a dependency's short outage."""
        self.flaky_calls += 1
        if self.flaky_down:
            return web.json_response({"error": "restarting"}, status=503)
        return web.json_response({"ok": True})


@pytest.fixture(scope="module")
async def tools(mesh, tmp_path_factory):
    """Starts the ledger, registers it (and a tool that always fails) and restarts the
    execution processes with that registry; puts the defaults back afterwards."""
    ledger = Ledger()
    app = web.Application()
    app.router.add_post("/ledger", ledger.record)
    app.router.add_post("/broken", ledger.broken)
    app.router.add_post("/flaky", ledger.flaky)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    config = yaml.safe_load(TOOLS.read_text())
    config["allowed_hosts"] = [f"127.0.0.1:{port}"]
    config["tools"]["ledger"] = {"kind": "http", "url": f"http://127.0.0.1:{port}/ledger"}
    config["tools"]["broken"] = {
        "kind": "http",
        "url": f"http://127.0.0.1:{port}/broken",
        "max_attempts": 1,
        "breaker_fail_max": 1000,
    }
    config["tools"]["flaky"] = {  # its circuit opens after 2 failures, for 2 s
        "kind": "http",
        "url": f"http://127.0.0.1:{port}/flaky",
        "max_attempts": 1,
        "breaker_fail_max": 2,
        "breaker_reset": "2s",
    }
    path = tmp_path_factory.mktemp("tools") / "tools.yaml"
    path.write_text(yaml.safe_dump(config))
    ledger.env = {"SWITCHBOARD_EXECUTION_TOOLS": str(path), "SWITCHBOARD_EXECUTION_ACK_WAIT": "3s"}
    for name in ("execution", "worker-0"):
        await asyncio.to_thread(mesh.start_service, name, env=ledger.env)
    try:
        yield ledger
    finally:
        for name in ("execution", "worker-0"):
            await asyncio.to_thread(mesh.start_service, name)
        await runner.cleanup()


def tool_step(name: str, tool: str = "ledger", deps=(), **arguments) -> pb.Step:
    args = struct_pb2.Struct()
    args.update(arguments)
    return pb.Step(name=name, depends_on=list(deps), tool=pb.ToolStep(tool=tool, arguments=args))


def code_step(name: str, code: str, deps=(), **inputs) -> pb.Step:
    return pb.Step(name=name, depends_on=list(deps), code=pb.CodeStep(code=code, inputs=inputs))


async def submit(stub, tenant: str, *steps: pb.Step, key: str = "") -> pb.Task:
    reply = await stub.SubmitTask(
        pb.SubmitTaskRequest(idempotency_key=key, steps=list(steps)),
        metadata=as_tenant(tenant),
        timeout=10,
    )
    return reply.task


async def watch(
    stub, tenant: str, task_id: str, after: int = 0, limit: int | None = None, into=None
):
    """The task's events after `after` (appended to `into` as they arrive, if given)."""
    events = [] if into is None else into
    call = stub.WatchTask(
        pb.WatchTaskRequest(task_id=task_id, after_sequence=after),
        metadata=as_tenant(tenant),
        timeout=120,
    )
    async for event in call:
        events.append(event)
        if limit is not None and len(events) == limit:
            call.cancel()
            break
    return events


def describe(event: pb.WatchTaskResponse) -> tuple:
    if event.HasField("step_event"):
        e = event.step_event
        return (e.step_name, ev.StepEventType.Name(e.type), e.attempt)
    return ("task", ev.TaskEventType.Name(event.task_event.type))


def sequence(event: pb.WatchTaskResponse) -> int:
    return (event.step_event if event.HasField("step_event") else event.task_event).sequence


# ---- the main path -------------------------------------------------------------------------


async def test_a_task_runs_its_steps_in_order_with_references(execution, tools):
    tenant = new_tenant()
    task = await submit(
        execution,
        tenant,
        tool_step("models", tool="list_models"),
        code_step(
            "count",
            "import json\nlen(json.loads(inputs['m'])['models'])",
            deps=["models"],
            m="{{steps.models.output}}",
        ),
        pb.Step(
            name="answer",
            depends_on=["count"],
            generate=pb.GenerateStep(
                prompt="How many models are served? {{steps.count.output.result}} models."
            ),
        ),
        tool_step("record", deps=["answer"], text="{{steps.answer.output.text}}"),
    )
    assert task.state == pb.TASK_STATE_PENDING  # no step has started yet
    events = await watch(execution, tenant, task.task_id)
    assert [describe(e) for e in events] == [
        ("task", "TASK_EVENT_TYPE_SUBMITTED"),
        *[
            (step, kind, attempt)
            for step in ("models", "count", "answer", "record")
            for kind, attempt in (
                ("STEP_EVENT_TYPE_QUEUED", 0),
                ("STEP_EVENT_TYPE_STARTED", 1),
                ("STEP_EVENT_TYPE_COMPLETED", 1),
            )
        ],
        ("task", "TASK_EVENT_TYPE_COMPLETED"),
    ]
    sequences = [sequence(e) for e in events]
    assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)
    done = (
        await execution.GetTask(pb.GetTaskRequest(task_id=task.task_id), metadata=as_tenant(tenant))
    ).task
    assert done.state == pb.TASK_STATE_COMPLETED and done.HasField("end_time")
    outputs = {s.name: s.output for s in done.step_statuses}
    assert outputs["count"].struct_value.fields["result"].string_value == "4"
    answer = outputs["answer"].struct_value.fields["text"].string_value
    assert answer
    key = f"{task.task_id}:record"
    assert tools.entries[key] == {"text": answer}


async def test_a_chain_runs_from_step_to_step_without_the_work_queue(execution, tools, mesh):
    """The worker that completes a step runs the step it unblocked itself: a chain of
    five puts one message (its first step's) on the work queue, and every transition
    is still published, in order."""
    tenant = new_tenant()
    nc = await nats.connect(mesh.nats_url)
    try:
        js = nc.jetstream()
        before = (await js.stream_info("SB_WORK")).state.last_seq
        steps = [tool_step(f"s{i}", deps=[f"s{i - 1}"] if i else [], n=i) for i in range(5)]
        task = await submit(execution, tenant, *steps)
        events = [describe(e) for e in await watch(execution, tenant, task.task_id)]
        after = (await js.stream_info("SB_WORK")).state.last_seq
    finally:
        await nc.close()
    assert after - before == 1
    expected = [("task", "TASK_EVENT_TYPE_SUBMITTED")]
    for i in range(5):
        expected += [(f"s{i}", f"STEP_EVENT_TYPE_{kind}", 0 if kind == "QUEUED" else 1)
                     for kind in ("QUEUED", "STARTED", "COMPLETED")]  # fmt: skip
    expected.append(("task", "TASK_EVENT_TYPE_COMPLETED"))
    assert events == expected
    for i in range(5):
        assert tools.calls[f"{task.task_id}:s{i}"] == 1


async def test_independent_steps_run_in_parallel(execution, tools):
    tenant = new_tenant()
    nap = "import time\ntime.sleep(1.5)\n'done'"
    task = await submit(
        execution,
        tenant,
        code_step("left", nap),
        code_step("right", nap),
        code_step("join", "'both'", deps=["left", "right"]),
    )
    events = [describe(e) for e in await watch(execution, tenant, task.task_id)]
    first_done = min(
        events.index(("left", "STEP_EVENT_TYPE_COMPLETED", 1)),
        events.index(("right", "STEP_EVENT_TYPE_COMPLETED", 1)),
    )
    started = [events.index((s, "STEP_EVENT_TYPE_STARTED", 1)) for s in ("left", "right")]
    assert max(started) < first_done, events
    assert events[-1] == ("task", "TASK_EVENT_TYPE_COMPLETED")


async def test_watch_resumes_from_a_cursor_without_gaps_or_duplicates(execution, tools):
    tenant = new_tenant()
    task = await submit(
        execution,
        tenant,
        tool_step("a", n=1),
        tool_step("b", deps=["a"], n=2),
        tool_step("c", deps=["b"], n=3),
    )
    whole = await watch(execution, tenant, task.task_id)
    # numbered per task (the event stream's own sequence counts every tenant's events)
    assert [sequence(e) for e in whole] == list(range(1, len(whole) + 1))
    # the submission's reply points at its own last event: the first step's QUEUED
    assert task.last_sequence == sequence(whole[1]) == 2
    assert describe(whole[1]) == ("a", "STEP_EVENT_TYPE_QUEUED", 0)
    done = await execution.GetTask(
        pb.GetTaskRequest(task_id=task.task_id), metadata=as_tenant(tenant)
    )
    assert done.task.last_sequence == sequence(whole[-1])
    first = await watch(execution, tenant, task.task_id, limit=4)
    rest = await watch(execution, tenant, task.task_id, after=sequence(first[-1]))
    assert [e.SerializeToString() for e in first + rest] == [e.SerializeToString() for e in whole]
    # a cursor at or past the end of the ended task: the stream ends at once, empty
    for after in (len(whole), 2**64 - 1):
        assert await asyncio.wait_for(watch(execution, tenant, task.task_id, after=after), 5) == []


async def test_idempotent_submission(execution, tools):
    tenant = new_tenant()
    steps = [tool_step("once", n=7)]
    key = f"key-{uuid.uuid4().hex}"
    first = await submit(execution, tenant, *steps, key=key)
    again = await execution.SubmitTask(
        pb.SubmitTaskRequest(idempotency_key=key, steps=steps), metadata=as_tenant(tenant)
    )
    assert again.existing and again.task.task_id == first.task_id
    other = await submit(execution, new_tenant(), *steps, key=key)  # keys are per tenant
    assert other.task_id != first.task_id
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await submit(execution, tenant, tool_step("different"), key=key)
    assert exc.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_details(exc.value).error_info.reason == "IDEMPOTENCY_KEY_REUSED"
    await watch(execution, tenant, first.task_id)
    assert tools.calls[f"{first.task_id}:once"] == 1


# ---- cancellation and failure ----------------------------------------------------------


def sandbox_cpu_seconds() -> list[int]:
    """CPU seconds of every process of the sandbox's outside user (nobody)."""
    out = subprocess.run(
        ["ps", "-u", "65534", "-o", "times="], capture_output=True, text=True, check=False
    ).stdout
    return [int(t) for t in out.split()]


async def test_cancel_stops_running_steps_and_kills_the_sandbox(execution, tools):
    tenant = new_tenant()
    task = await submit(
        execution,
        tenant,
        pb.Step(name="spin", code=pb.CodeStep(code="while True:\n    pass")),
        tool_step("after", deps=["spin"]),
    )
    events: list[pb.WatchTaskResponse] = []
    watcher = asyncio.create_task(watch(execution, tenant, task.task_id, into=events))
    await eventually(
        lambda: any(c >= 2 for c in sandbox_cpu_seconds()),
        timeout=10,
        interval=0.1,
        what="the spinning step runs",
    )
    # a step has started: the task is RUNNING, and listed as such (no longer PENDING)
    got = await execution.GetTask(
        pb.GetTaskRequest(task_id=task.task_id), metadata=as_tenant(tenant)
    )
    assert got.task.state == pb.TASK_STATE_RUNNING
    for state, expected in ((pb.TASK_STATE_RUNNING, [task.task_id]), (pb.TASK_STATE_PENDING, [])):
        listed = await execution.ListTasks(
            pb.ListTasksRequest(state=state), metadata=as_tenant(tenant)
        )
        assert [t.task_id for t in listed.tasks] == expected
    reply = await execution.CancelTask(
        pb.CancelTaskRequest(task_id=task.task_id), metadata=as_tenant(tenant)
    )
    assert reply.task.state == pb.TASK_STATE_CANCELLED
    assert {s.name: s.state for s in reply.task.step_statuses} == {
        "spin": pb.STEP_STATE_CANCELLED,
        "after": pb.STEP_STATE_CANCELLED,
    }
    await asyncio.wait_for(watcher, 10)
    assert describe(events[-1]) == ("task", "TASK_EVENT_TYPE_CANCELLED")
    await eventually(
        lambda: not any(c >= 2 for c in sandbox_cpu_seconds()),
        timeout=5,
        interval=0.1,
        what="the cancelled step's sandbox is killed",
    )
    assert f"{task.task_id}:after" not in tools.calls


async def test_steps_wait_out_an_open_circuit_without_spending_attempts(execution, tools):
    """A dependency down for a moment opens its tool's circuit; the steps that meet the
    open circuit wait for it (its RetryInfo) instead of failing their tasks, though each
    may make only two real attempts."""
    tenant = new_tenant()
    tools.flaky_down = True
    try:
        tasks = []
        for i in range(6):
            step = tool_step("call", tool="flaky", n=i)
            step.max_attempts = 2
            tasks.append(await submit(execution, tenant, step))

        async def circuit_met() -> bool:  # some step was refused by the open circuit
            for task in tasks:
                got = await execution.GetTask(
                    pb.GetTaskRequest(task_id=task.task_id), metadata=as_tenant(tenant)
                )
                if "circuit is open" in got.task.step_statuses[0].error.message:
                    return True
            return False

        await eventually(circuit_met, timeout=30, interval=0.1, what="the circuit opened")
    finally:
        tools.flaky_down = False
    for task in tasks:
        events = [describe(e) for e in await watch(execution, tenant, task.task_id)]
        assert events[-1] == ("task", "TASK_EVENT_TYPE_COMPLETED"), events
        attempts = {e[2] for e in events if e[0] == "call"}
        assert attempts <= {0, 1, 2}, events  # never a third attempt


async def test_a_poison_step_fails_its_task_and_is_dead_lettered(execution, tools, mesh):
    tenant = new_tenant()
    poison = tool_step("poison", tool="broken")
    poison.max_attempts = 3
    healthy = await submit(execution, tenant, tool_step("fine"))
    task = await submit(execution, tenant, poison, tool_step("never", deps=["poison"]))
    events = [describe(e) for e in await watch(execution, tenant, task.task_id)]
    assert events.count(("poison", "STEP_EVENT_TYPE_RETRIED", 1)) == 1
    assert ("poison", "STEP_EVENT_TYPE_RETRIED", 2) in events
    assert ("poison", "STEP_EVENT_TYPE_FAILED", 3) in events
    assert ("never", "STEP_EVENT_TYPE_CANCELLED", 0) in events
    assert events[-1] == ("task", "TASK_EVENT_TYPE_FAILED")
    failed = (
        await execution.GetTask(pb.GetTaskRequest(task_id=task.task_id), metadata=as_tenant(tenant))
    ).task
    assert failed.state == pb.TASK_STATE_FAILED
    assert failed.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert "broken" in failed.error.message
    nc = await nats.connect(mesh.nats_url)
    try:
        dead = await nc.jetstream().get_last_msg("SB_DEAD", f"sb.dead.{task.task_id}")
        assert dead.data
    finally:
        await nc.close()
    assert (await watch(execution, tenant, healthy.task_id))[
        -1
    ].task_event.type == ev.TASK_EVENT_TYPE_COMPLETED


async def test_a_worker_killed_mid_task_resumes_from_the_last_completed_step(
    execution, tools, mesh
):
    tenant = new_tenant()
    task = await submit(
        execution,
        tenant,
        tool_step("first", n=1),
        code_step("slow", "import time\ntime.sleep(4)\n'slept'", deps=["first"]),
        tool_step("last", deps=["slow"], n=3),
    )
    events: list[pb.WatchTaskResponse] = []
    watcher = asyncio.create_task(watch(execution, tenant, task.task_id, into=events))

    def slow_started() -> bool:
        assert not watcher.done()
        return any(describe(e) == ("slow", "STEP_EVENT_TYPE_STARTED", 1) for e in events)

    await eventually(slow_started, timeout=30, what="the slow step starts")
    (worker,) = [r for r in mesh.records() if r.name == "worker-0"]
    killed = time.time()
    os.kill(worker.pid, signal.SIGKILL)
    await asyncio.to_thread(mesh.start_service, "worker-0", env=tools.env)
    await asyncio.wait_for(watcher, 60)
    described = [describe(e) for e in events]
    assert ("slow", "STEP_EVENT_TYPE_STARTED", 2) in described
    # "slow" ran in first's chain, without a message of its own: the redelivered message
    # (after the 3 s ack wait) queues it again, and it runs once its lease ends; the
    # sweeper, which re-sends steps stuck for 30 s, would be far later
    (again,) = [
        e.step_event for e in events if describe(e) == ("slow", "STEP_EVENT_TYPE_STARTED", 2)
    ]
    assert again.time.ToNanoseconds() / 1e9 - killed < 15
    assert described.count(("first", "STEP_EVENT_TYPE_STARTED", 1)) == 1
    assert described[-1] == ("task", "TASK_EVENT_TYPE_COMPLETED")
    assert tools.calls[f"{task.task_id}:first"] == 1 and tools.calls[f"{task.task_id}:last"] == 1


# ---- bad input -------------------------------------------------------------------------------


async def test_invalid_tasks_are_refused_before_anything_runs(execution, tools):
    tenant = new_tenant()
    cases = [
        ([tool_step("a", deps=["b"]), tool_step("b", deps=["a"])], ["steps"]),
        ([tool_step("a", deps=["ghost"])], ["steps[0].depends_on"]),
        ([pb.Step(name="x")], ["steps[0]"]),
        ([tool_step("a", tool="rm-rf")], ["steps[0].tool.tool"]),
        ([tool_step("a"), tool_step("b", text="{{steps.a.output}}")], ["steps[1]"]),
    ]
    for steps, fields in cases:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await submit(execution, tenant, *steps)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = error_details(exc.value)
        assert [v.field for v in details.field_violations] == fields
    listed = await execution.ListTasks(pb.ListTasksRequest(), metadata=as_tenant(tenant))
    assert list(listed.tasks) == []
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await submit(execution, tenant, code_step("big", "x = 1\n" * 20_000))
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_submit_tasks_gives_each_task_its_own_result(execution, tools):
    tenant = new_tenant()
    earlier = await submit(execution, tenant, tool_step("once", n=0), key="batch-key")
    batch = [
        pb.SubmitTaskRequest(steps=[tool_step("a", n=1), tool_step("b", deps=["a"], n=2)]),
        pb.SubmitTaskRequest(steps=[tool_step("a", deps=["b"]), tool_step("b", deps=["a"])]),
        pb.SubmitTaskRequest(steps=[code_step("big", "x = 1\n" * 20_000)]),
        pb.SubmitTaskRequest(idempotency_key="batch-key", steps=[tool_step("once", n=0)]),
        pb.SubmitTaskRequest(steps=[tool_step("c", n=3)], labels={"batch": "yes"}),
    ]
    reply = await execution.SubmitTasks(
        pb.SubmitTasksRequest(tasks=batch), metadata=as_tenant(tenant), timeout=10
    )
    outcomes = [r.WhichOneof("outcome") for r in reply.results]
    assert outcomes == ["submitted", "error", "error", "submitted", "submitted"]
    cyclic = error_details(reply.results[1].error)
    assert cyclic.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in cyclic.field_violations] == ["steps"]
    big = error_details(reply.results[2].error)
    assert big.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert big.error_info.reason == "CODE_TOO_LARGE"
    again = reply.results[3].submitted
    assert again.existing and again.task.task_id == earlier.task_id
    first, last = reply.results[0].submitted.task, reply.results[4].submitted.task
    assert not reply.results[0].submitted.existing and first.last_sequence > 0
    assert dict(last.labels) == {"batch": "yes"}
    for task, steps in ((first, ("a", "b")), (last, ("c",))):
        events = [describe(e) for e in await watch(execution, tenant, task.task_id)]
        assert events[-1] == ("task", "TASK_EVENT_TYPE_COMPLETED")
        for step in steps:
            assert tools.entries[f"{task.task_id}:{step}"] == {"n": "abc".index(step) + 1}
    # only the two new tasks and the earlier one exist: nothing of the refused ones
    listed = await execution.ListTasks(pb.ListTasksRequest(), metadata=as_tenant(tenant))
    assert {t.task_id for t in listed.tasks} == {earlier.task_id, first.task_id, last.task_id}
    # another tenant sees none of them
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await execution.GetTask(
            pb.GetTaskRequest(task_id=first.task_id), metadata=as_tenant(new_tenant())
        )
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND


async def test_submit_tasks_refuses_an_empty_too_long_or_oversized_batch(execution, tools):
    tenant = new_tenant()
    one = pb.SubmitTaskRequest(steps=[tool_step("a")])
    for tasks in ([], [one] * 501):
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await execution.SubmitTasks(
                pb.SubmitTasksRequest(tasks=tasks), metadata=as_tenant(tenant), timeout=10
            )
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in error_details(exc.value).field_violations] == ["tasks"]
    # 5 MiB: over the services' 4 MiB message limit
    huge = pb.SubmitTaskRequest(steps=[code_step("big", "#" * 60_000)])
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await execution.SubmitTasks(
            pb.SubmitTasksRequest(tasks=[huge] * 90), metadata=as_tenant(tenant), timeout=10
        )
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    listed = await execution.ListTasks(pb.ListTasksRequest(), metadata=as_tenant(tenant))
    assert list(listed.tasks) == []


async def test_unknown_and_foreign_tasks_are_not_found(execution, tools):
    owner = new_tenant()
    task = await submit(execution, owner, tool_step("a"))
    for task_id, tenant in (
        (str(uuid.uuid4()), owner),
        ("not-a-uuid", owner),
        (task.task_id, new_tenant()),
    ):
        for call in (
            execution.GetTask(pb.GetTaskRequest(task_id=task_id), metadata=as_tenant(tenant)),
            execution.CancelTask(pb.CancelTaskRequest(task_id=task_id), metadata=as_tenant(tenant)),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await call
            assert exc.value.code() == grpc.StatusCode.NOT_FOUND
            assert error_details(exc.value).error_info.reason == "TASK_NOT_FOUND"


async def test_run_code_under_load_starts_every_sandbox(execution):
    """60 runs, 4 at a time: the warm pool refills while the service serves gRPC, and
    every sandbox must start (a fork in the gRPC process could abort the child)."""
    tenant = new_tenant()
    gate = asyncio.Semaphore(4)

    async def one(i: int) -> pb.RunCodeResponse:
        async with gate:
            return await execution.RunCode(
                pb.RunCodeRequest(code=f"print({i})"), metadata=as_tenant(tenant), timeout=30
            )

    replies = await asyncio.gather(*(one(i) for i in range(60)))
    assert [r.stdout for r in replies] == [f"{i}\n" for i in range(60)]
    assert all(r.termination == pb.TERMINATION_EXITED and r.exit_code == 0 for r in replies)


async def test_run_code_returns_errors_as_results(execution):
    tenant = new_tenant()
    reply = await execution.RunCode(
        pb.RunCodeRequest(code="def broken(:\n"), metadata=as_tenant(tenant), timeout=30
    )
    assert reply.termination == pb.TERMINATION_EXITED and reply.exit_code != 0
    assert reply.exception.startswith("SyntaxError")
    ok = await execution.RunCode(
        pb.RunCodeRequest(code="import sys\nprint(sys.stdin.read().upper())\n6 * 7", stdin="hello",
                          files=[pb.SandboxFile(path="data/in.txt", content=b"x")]),
        metadata=as_tenant(tenant), timeout=30,
    )  # fmt: skip
    assert (ok.stdout, ok.result, ok.exit_code) == ("HELLO\n", "42", 0)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await execution.RunCode(pb.RunCodeRequest(code="x" * 70_000), metadata=as_tenant(tenant))
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await execution.RunCode(
            pb.RunCodeRequest(code="1", files=[pb.SandboxFile(path="../escape", content=b"")]),
            metadata=as_tenant(tenant),
        )
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# ---- reliability ---------------------------------------------------------------------------


def task_states(mesh, tenant: str) -> dict[int, int]:
    with psycopg.connect(mesh.database_url) as conn:
        rows = conn.execute(
            "SELECT state, count(*) FROM exec_tasks WHERE tenant_id = %s GROUP BY state", (tenant,)
        ).fetchall()
    return dict(rows)


async def wait_until_finished(mesh, tenant: str, total: int, *, seconds: float) -> dict[int, int]:
    """The tenant's task count by state once all `total` tasks have ended (or, after
    `seconds`, as they are: the caller's assertion says what did not end)."""

    async def finished() -> bool:
        states = await asyncio.to_thread(task_states, mesh, tenant)
        return states.get(pb.TASK_STATE_RUNNING, 0) == 0 and sum(states.values()) == total

    with contextlib.suppress(AssertionError):
        await eventually(finished, timeout=seconds, interval=0.5)
    return task_states(mesh, tenant)


async def submit_many(stub, tenant: str, count: int) -> list[pb.Task]:
    gate = asyncio.Semaphore(32)

    async def one(i: int) -> pb.Task:
        async with gate:
            return await submit(
                stub, tenant, tool_step("pay", n=i), tool_step("notify", deps=["pay"], n=i)
            )

    return await asyncio.gather(*(one(i) for i in range(count)))


@pytest.mark.timeout(360)
async def test_kill_9_a_worker_20_times_while_1000_tasks_run(execution, tools, mesh):
    """Each task pays into the ledger, then notifies it; a worker killed mid-step has its
    step redelivered, the ledger sees the same idempotency key, and applies it once."""
    tenant = new_tenant()
    tools.delay = 0.05  # so that the 2,000 steps outlast the kills: kills land mid-step
    tasks = await submit_many(execution, tenant, 1000)
    rng = random.Random(20261124)
    for _ in range(20):
        await asyncio.sleep(rng.uniform(0.2, 0.8))
        (worker,) = [r for r in mesh.records() if r.name == "worker-0"]
        os.kill(worker.pid, signal.SIGKILL)
        await asyncio.to_thread(mesh.start_service, "worker-0", env=tools.env)
    states = await wait_until_finished(mesh, tenant, 1000, seconds=240)
    tools.delay = 0.0
    assert states == {pb.TASK_STATE_COMPLETED: 1000}
    for i, task in enumerate(tasks):
        for step in ("pay", "notify"):
            assert tools.entries[f"{task.task_id}:{step}"] == {"n": i}
    keys = [f"{t.task_id}:{s}" for t in tasks for s in ("pay", "notify")]
    assert len(set(keys) & set(tools.entries)) == 2000  # one entry per step, none twice
    with psycopg.connect(mesh.database_url) as conn:
        (rerun,) = conn.execute(
            "SELECT count(*) FROM exec_steps s JOIN exec_tasks t USING (task_id)"
            " WHERE t.tenant_id = %s AND s.attempt > 1",
            (tenant,),
        ).fetchone()
    assert rerun > 0, "no kill landed while a step ran: nothing was tested"
    assert sum(tools.calls[k] for k in keys) >= 2000
    # the event log of every tenth task is whole: each transition once, in order
    for task in tasks[::10]:
        kinds = Counter(describe(e)[:2] for e in await watch(execution, tenant, task.task_id))
        for step in ("pay", "notify"):
            assert kinds[(step, "STEP_EVENT_TYPE_QUEUED")] == 1, kinds
            assert kinds[(step, "STEP_EVENT_TYPE_COMPLETED")] == 1, kinds
        assert kinds[("task", "TASK_EVENT_TYPE_COMPLETED")] == 1, kinds


@pytest.mark.timeout(240)
async def test_restarting_nats_loses_no_acknowledged_task(execution, tools, mesh):
    """A submission needs PostgreSQL, not NATS: while NATS is down a task is committed
    and answered within the announcement's wait (1 s), and announced once NATS is back."""
    tenant = new_tenant()
    accepted: list[pb.Task] = []
    slowest = 0.0
    outage: list[float] = []
    during: list[pb.Task] = []

    async def keep_submitting() -> None:
        nonlocal slowest
        for i in range(150):
            started = time.monotonic()
            task = await submit(execution, tenant, tool_step("pay", n=i), key=f"nats-{i}")
            slowest = max(slowest, time.monotonic() - started)
            accepted.append(task)
            if len(outage) == 1:
                during.append(task)
            await asyncio.sleep(0.02)

    submitting = asyncio.create_task(keep_submitting())
    await eventually(lambda: len(accepted) >= 10, what="tasks accepted before NATS stops")
    await asyncio.to_thread(mesh.stop_component, "nats")
    outage.append(time.monotonic())
    await eventually(lambda: len(during) >= 3, timeout=20, what="tasks accepted without NATS")
    await asyncio.to_thread(mesh.start_nats)
    outage.append(time.monotonic())
    await submitting
    assert slowest < 3.0, f"a submission took {slowest:.1f} s"
    states = await wait_until_finished(mesh, tenant, len(accepted), seconds=120)
    with psycopg.connect(mesh.database_url) as conn:
        done = {
            r[0]
            for r in conn.execute(
                "SELECT task_id::text FROM exec_tasks WHERE tenant_id = %s AND state = %s",
                (tenant, pb.TASK_STATE_COMPLETED),
            ).fetchall()
        }
    assert {t.task_id for t in accepted} <= done, states
    assert len(accepted) > 0
