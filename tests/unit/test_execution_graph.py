"""Task graph validation (what the contract's annotations cannot say) and output
references (pure logic)."""

from __future__ import annotations

import pytest
from google.protobuf import struct_pb2
from switchboard.execution.v1 import execution_pb2 as pb

from services.execution.graph import ancestors, expand, expand_value, validate_task
from services.runtime import InvalidArgument, ResourceExhausted

TOOLS = {"echo", "ledger"}


def tool(name: str, tool_name: str = "echo", deps=(), **arguments) -> pb.Step:
    args = struct_pb2.Struct()
    args.update(arguments)
    return pb.Step(
        name=name, depends_on=list(deps), tool=pb.ToolStep(tool=tool_name, arguments=args)
    )


def submit(*steps: pb.Step) -> pb.SubmitTaskRequest:
    return pb.SubmitTaskRequest(steps=list(steps))


def violations(request: pb.SubmitTaskRequest) -> list[tuple[str, str]]:
    with pytest.raises(InvalidArgument) as exc:
        validate_task(request, tool_exists=TOOLS.__contains__)
    return [(v.field, v.description) for v in exc.value.field_violations]


def test_a_valid_diamond_is_accepted_with_its_ancestors():
    steps = validate_task(
        submit(
            tool("a"),
            tool("b", deps=["a"], text="{{steps.a.output.body}}"),
            tool("c", deps=["a"]),
            tool("d", deps=["b", "c"], text="{{steps.a.output}} and {{ steps.b.output.x.0 }}"),
        ),
        tool_exists=TOOLS.__contains__,
    )
    assert list(steps) == ["a", "b", "c", "d"]
    assert ancestors(steps)["d"] == {"a", "b", "c"}


def test_cycles_are_refused_with_the_path():
    (problem,) = violations(
        submit(tool("a", deps=["c"]), tool("b", deps=["a"]), tool("c", deps=["b"]))
    )
    assert problem[0] == "steps"
    assert "a -> c -> b -> a" in problem[1]


def test_dangling_self_and_duplicate_names():
    problems = violations(submit(tool("a", deps=["ghost"]), tool("a"), tool("b", deps=["b"])))
    assert problems == [
        ("steps[1].name", "duplicate step 'a'"),
        ("steps[0].depends_on", "unknown step 'ghost'"),
        ("steps[2].depends_on", "depends on itself"),
    ]


def test_a_missing_kind_and_an_unknown_tool():
    problems = violations(submit(pb.Step(name="nothing"), tool("t", tool_name="rm-rf")))
    assert [f for f, _ in problems] == ["steps[0]", "steps[1].tool.tool"]


def test_labels_holding_nul_are_refused():
    request = submit(tool("a"))
    request.labels.update({"ok": "fine", "bad\x00key": "v", "k": "bad\x00value"})
    assert sorted(f for f, _ in violations(request)) == ["labels['bad\\x00key']", "labels['k']"]


def test_reading_an_output_that_is_not_a_dependency_is_refused():
    problems = violations(
        submit(
            tool("a"),
            tool("b", text="{{steps.a.output}}"),
            pb.Step(
                name="g",
                depends_on=["a"],
                generate=pb.GenerateStep(prompt="x", context_steps=["b"]),
            ),
            tool("h", deps=["a"], text="{{steps.zzz.output}}"),
        )
    )
    assert problems == [
        ("steps[1]", "reads the output of 'a': not among its dependencies"),
        ("steps[2]", "reads the output of 'b': not among its dependencies"),
        ("steps[3]", "reads the output of 'zzz': unknown step"),
    ]


def test_size_caps_are_resource_exhausted():
    with pytest.raises(ResourceExhausted) as exc:
        validate_task(
            submit(pb.Step(name="c", code=pb.CodeStep(code="x" * 70_000))),
            tool_exists=TOOLS.__contains__,
        )
    assert exc.value.reason == "CODE_TOO_LARGE"
    big = [tool(f"s{i}", text="y" * 3000) for i in range(100)]
    with pytest.raises(ResourceExhausted) as exc:
        validate_task(submit(*big), tool_exists=TOOLS.__contains__)
    assert exc.value.reason == "TASK_TOO_LARGE"


def test_references_expand_to_text_or_whole_values():
    outputs = {"a": {"body": {"n": 3, "items": ["x", "y"]}}, "b": "plain"}
    assert expand("n={{steps.a.output.body.n}}, {{steps.b.output}}", outputs) == "n=3, plain"
    assert expand("{{steps.a.output.body.items}}", outputs) == '["x","y"]'
    assert expand_value(
        {"v": "{{steps.a.output.body}}", "l": ["{{steps.a.output.body.items.1}}"]}, outputs
    ) == {
        "v": {"n": 3, "items": ["x", "y"]},
        "l": ["y"],
    }
    with pytest.raises(KeyError):
        expand("{{steps.a.output.missing}}", outputs)
