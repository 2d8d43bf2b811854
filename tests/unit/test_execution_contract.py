"""ExecutionService's request constraints, read from the contract's `buf.validate`
annotations: each rule names its field by path, and a valid request breaks none."""

from __future__ import annotations

import pytest
from google.protobuf import duration_pb2
from switchboard.execution.v1 import execution_pb2 as pb
from switchboard.inference.v1 import inference_pb2

from services.runtime import request_violations


def fields(request) -> list[str]:
    return sorted(v.field for v in request_violations(request))


def step(**overrides) -> pb.Step:
    fields_ = {"name": "a", "tool": pb.ToolStep(tool="echo")}
    fields_.update(overrides)
    return pb.Step(**fields_)


def test_a_valid_task_breaks_no_rule():
    request = pb.SubmitTaskRequest(
        idempotency_key="k" * 256,
        steps=[
            step(name="g" + "x" * 62, max_attempts=10, timeout=duration_pb2.Duration(seconds=3600)),
            step(
                name="r",
                depends_on=["a"],
                retrieve=pb.RetrieveStep(
                    collection="docs.v1", query="q", top_k=100, mode=3, metadata_filter={"k": "v"}
                ),
            ),
            step(name="c", code=pb.CodeStep(code="print(1)", inputs={"x": "y"})),
            step(name="p", generate=pb.GenerateStep(prompt="hi", tier=2, context_steps=["r"])),
        ],
        labels={"team": "a"},
        priority=2,
    )
    assert request_violations(request) == []


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (pb.SubmitTaskRequest(), ["steps"]),
        (pb.SubmitTaskRequest(steps=[step()] * 101), ["steps"]),
        (pb.SubmitTaskRequest(steps=[step()], idempotency_key="k" * 257), ["idempotency_key"]),
        (pb.SubmitTaskRequest(steps=[step()], idempotency_key="a\x00b"), ["idempotency_key"]),
        (pb.SubmitTaskRequest(steps=[step()], priority=3), ["priority"]),
        (pb.SubmitTaskRequest(steps=[step()], priority=40_000), ["priority"]),
        (pb.SubmitTaskRequest(steps=[step()], labels={"k" * 64: "v"}), [f"labels['{'k' * 64}']"]),
        (pb.SubmitTaskRequest(steps=[step()], labels={"k": "v" * 257}), ["labels['k']"]),
        (
            pb.SubmitTaskRequest(steps=[step()], labels={f"k{i}": "v" for i in range(65)}),
            ["labels"],
        ),
    ],
)
def test_task_rules(request_, expected):
    assert fields(request_) == expected


@pytest.mark.parametrize(
    ("bad_step", "expected"),
    [
        (step(name=""), ["steps[0].name"]),
        (step(name="Bad Name"), ["steps[0].name"]),
        (step(name="9lives"), ["steps[0].name"]),
        (step(name="a" * 64), ["steps[0].name"]),
        (step(depends_on=[""]), ["steps[0].depends_on[0]"]),
        (step(depends_on=["d" * 64]), ["steps[0].depends_on[0]"]),
        (step(depends_on=["d"] * 101), ["steps[0].depends_on"]),
        (step(max_attempts=-1), ["steps[0].max_attempts"]),
        (step(max_attempts=11), ["steps[0].max_attempts"]),
        (step(timeout=duration_pb2.Duration()), ["steps[0].timeout"]),
        (step(timeout=duration_pb2.Duration(seconds=-5)), ["steps[0].timeout"]),
        (step(timeout=duration_pb2.Duration(seconds=3601)), ["steps[0].timeout"]),
        # once an OverflowError (INTERNAL) when turned into a timedelta
        (step(timeout=duration_pb2.Duration(seconds=10**12)), ["steps[0].timeout"]),
        (step(generate=pb.GenerateStep(prompt=" \n\t")), ["steps[0].generate.prompt"]),
        (step(generate=pb.GenerateStep(prompt="p", model="m" * 129)), ["steps[0].generate.model"]),
        (step(generate=pb.GenerateStep(prompt="p", tier=7)), ["steps[0].generate.tier"]),
        (
            step(
                generate=pb.GenerateStep(
                    prompt="p", parameters=inference_pb2.GenerationParameters(temperature=3)
                )
            ),
            ["steps[0].generate.parameters.temperature"],
        ),
        (
            step(generate=pb.GenerateStep(prompt="p", context_steps=["x" * 64])),
            ["steps[0].generate.context_steps[0]"],
        ),
        (
            step(retrieve=pb.RetrieveStep(collection="", query="q", top_k=1)),
            ["steps[0].retrieve.collection"],
        ),
        (
            step(retrieve=pb.RetrieveStep(collection="bad name!", query="q", top_k=1)),
            ["steps[0].retrieve.collection"],
        ),
        (
            step(retrieve=pb.RetrieveStep(collection="c" * 129, query="q", top_k=1)),
            ["steps[0].retrieve.collection"],
        ),
        (
            step(retrieve=pb.RetrieveStep(collection="c", query=" ", top_k=1)),
            ["steps[0].retrieve.query"],
        ),
        (
            step(retrieve=pb.RetrieveStep(collection="c", query="q", top_k=0)),
            ["steps[0].retrieve.top_k"],
        ),
        (
            step(retrieve=pb.RetrieveStep(collection="c", query="q", top_k=101)),
            ["steps[0].retrieve.top_k"],
        ),
        (
            step(retrieve=pb.RetrieveStep(collection="c", query="q", top_k=1, mode=9)),
            ["steps[0].retrieve.mode"],
        ),
        (
            step(
                retrieve=pb.RetrieveStep(
                    collection="c", query="q", top_k=1, metadata_filter={"k" * 65: "v" * 1025}
                )
            ),
            [f"steps[0].retrieve.metadata_filter['{'k' * 65}']"] * 2,
        ),
        (
            step(
                retrieve=pb.RetrieveStep(
                    collection="c",
                    query="q",
                    top_k=1,
                    metadata_filter={str(i): "" for i in range(33)},
                )
            ),
            ["steps[0].retrieve.metadata_filter"],
        ),
        (step(code=pb.CodeStep(code="")), ["steps[0].code.code"]),
        (
            step(code=pb.CodeStep(code="1", inputs={"i" * 129: ""})),
            [f"steps[0].code.inputs['{'i' * 129}']"],
        ),
        (
            step(code=pb.CodeStep(code="1", inputs={str(i): "" for i in range(101)})),
            ["steps[0].code.inputs"],
        ),
        (step(tool=pb.ToolStep(tool="")), ["steps[0].tool.tool"]),
        (step(tool=pb.ToolStep(tool="t" * 65)), ["steps[0].tool.tool"]),
    ],
)
def test_step_rules(bad_step, expected):
    assert fields(pb.SubmitTaskRequest(steps=[bad_step])) == expected


def test_a_batch_checks_only_its_size_and_leaves_each_task_to_be_checked_alone():
    bad = pb.SubmitTaskRequest(priority=9, steps=[step(name="Bad")])
    assert request_violations(pb.SubmitTasksRequest(tasks=[bad])) == []
    assert fields(pb.SubmitTasksRequest()) == ["tasks"]
    assert fields(pb.SubmitTasksRequest(tasks=[pb.SubmitTaskRequest()] * 501)) == ["tasks"]
    assert fields(pb.SubmitTasksRequest(tasks=[pb.SubmitTaskRequest()] * 500)) == []


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (pb.GetTaskRequest(task_id="t" * 65), ["task_id"]),
        (pb.CancelTaskRequest(task_id="t" * 65), ["task_id"]),
        (pb.WatchTaskRequest(task_id="t" * 65, after_sequence=2**64 - 1), ["task_id"]),
        (pb.ListTasksRequest(state=6), ["state"]),
        (pb.ListTasksRequest(page_size=-1), ["page_size"]),
        (pb.ListTasksRequest(page_size=1001), ["page_size"]),
        (pb.ListTasksRequest(page_token="x" * 513), ["page_token"]),
        (pb.ListTasksRequest(labels={"k" * 64: "v"}), [f"labels['{'k' * 64}']"]),
        (pb.RunCodeRequest(timeout=duration_pb2.Duration(seconds=-1)), ["timeout"]),
        (pb.RunCodeRequest(timeout=duration_pb2.Duration(seconds=2**62)), ["timeout"]),
        (pb.RunCodeRequest(files=[pb.SandboxFile(path="")]), ["files[0].path"]),
        (pb.RunCodeRequest(files=[pb.SandboxFile(path="p" * 1025)]), ["files[0].path"]),
    ],
)
def test_other_request_rules(request_, expected):
    assert fields(request_) == expected


@pytest.mark.parametrize(
    "request_",
    [
        pb.GetTaskRequest(task_id="00000000-0000-0000-0000-000000000001"),
        pb.WatchTaskRequest(task_id="nope", after_sequence=2**64 - 1),
        pb.ListTasksRequest(state=1, page_size=1000, labels={"k": "v"}),
        pb.ListTasksRequest(),
        pb.RunCodeRequest(
            code="1", timeout=duration_pb2.Duration(seconds=3600), files=[pb.SandboxFile(path="a")]
        ),
    ],
)
def test_valid_requests_break_no_rule(request_):
    assert request_violations(request_) == []
