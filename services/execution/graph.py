"""A task's step graph: validation before anything runs, and output references.

The contract's `buf.validate` annotations (names, counts, ranges, enums, lengths) are
checked before this module sees a task: by the runtime for SubmitTask, per task by the
engine for SubmitTasks. What they cannot say is checked here, on the task as a whole:
size caps, a kind per step, unique names, dependencies that exist and form no cycle,
references (`{{steps.NAME.output.PATH}}`) only to the step's own (direct or indirect)
dependencies, known tools, no NUL in labels (PostgreSQL's jsonb cannot hold it). Every
problem becomes a field violation of one INVALID_ARGUMENT; oversized tasks or code are
RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from google.protobuf import json_format
from switchboard.execution.v1 import execution_pb2 as pb

from services.runtime import FieldViolation, ResourceExhausted, invalid

MAX_TASK_BYTES = 256 * 1024
MAX_CODE_BYTES = 64 * 1024
REFERENCE = re.compile(r"\{\{\s*steps\.([a-z][a-z0-9_-]{0,62})\.output((?:\.[^.\s}]+)*)\s*\}\}")
KINDS = ("generate", "retrieve", "code", "tool")


def references(text: str) -> Iterator[str]:
    """Names of the steps `text` refers to."""
    for match in REFERENCE.finditer(text):
        yield match.group(1)


def _strings(value: Any) -> Iterator[str]:
    """Every string inside a JSON-like value."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def step_inputs(step: pb.Step) -> list[str]:
    """The step's texts that may hold references (code is taken literally)."""
    kind = step.WhichOneof("kind")
    if kind == "generate":
        return [step.generate.prompt]
    if kind == "retrieve":
        return [step.retrieve.query]
    if kind == "code":
        return list(step.code.inputs.values())
    if kind == "tool":
        return list(_strings(json_format.MessageToDict(step.tool.arguments)))
    return []


def step_needs(step: pb.Step) -> set[str]:
    """Steps whose outputs this step reads."""
    needs = {name for text in step_inputs(step) for name in references(text)}
    if step.WhichOneof("kind") == "generate":
        needs.update(step.generate.context_steps)
    return needs


def ancestors(steps: Mapping[str, pb.Step]) -> dict[str, set[str]]:
    """Each step's direct and indirect dependencies (the graph must be acyclic)."""
    memo: dict[str, set[str]] = {}

    def visit(name: str) -> set[str]:
        if name not in memo:
            direct = set(steps[name].depends_on)
            memo[name] = direct.union(*(visit(d) for d in direct))
        return memo[name]

    for name in steps:
        visit(name)
    return memo


def _cycle(steps: Mapping[str, pb.Step]) -> list[str] | None:
    """One cycle, as a path of names, or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        path.append(name)
        for dep in steps[name].depends_on:
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[name] = 2
        return None

    for name in steps:
        if name not in state and (found := visit(name)):
            return found
    return None


def nul_problems(labels: Mapping[str, str], field: str) -> list[FieldViolation]:
    """A violation per label whose key or value holds NUL (which jsonb cannot store)."""
    return [
        FieldViolation(f"{field}[{key[:63]!r}]", "keys and values must not contain NUL")
        for key, value in labels.items()
        if "\x00" in key or "\x00" in value
    ]


def validate_task(
    request: pb.SubmitTaskRequest, *, tool_exists: Callable[[str], bool]
) -> dict[str, pb.Step]:
    """The task's steps by name, once the whole request is valid. The request's
    `buf.validate` constraints must have been checked already (see the module's doc).

    Raises:
        InvalidArgument: every problem found, as field violations.
        ResourceExhausted: `TASK_TOO_LARGE` / `CODE_TOO_LARGE`.
    """
    size = request.ByteSize()
    if size > MAX_TASK_BYTES:
        raise ResourceExhausted(
            f"the task is {size} bytes; the limit is {MAX_TASK_BYTES}",
            reason="TASK_TOO_LARGE",
            metadata={"limit_bytes": str(MAX_TASK_BYTES)},
        )
    for i, step in enumerate(request.steps):
        if len(step.code.code.encode()) > MAX_CODE_BYTES:
            raise ResourceExhausted(
                f"steps[{i}].code.code is over {MAX_CODE_BYTES} bytes",
                reason="CODE_TOO_LARGE",
                metadata={"step": step.name, "limit_bytes": str(MAX_CODE_BYTES)},
            )
    problems = nul_problems(request.labels, "labels")
    steps: dict[str, pb.Step] = {}
    for i, step in enumerate(request.steps):
        where = f"steps[{i}]"
        if step.name in steps:
            problems.append(FieldViolation(f"{where}.name", f"duplicate step {step.name!r}"))
        else:
            steps[step.name] = step
        problems += _step_problems(where, step, tool_exists)
    names = {s.name for s in request.steps}
    for i, step in enumerate(request.steps):
        for dep in step.depends_on:
            if dep not in names:
                problems.append(FieldViolation(f"steps[{i}].depends_on", f"unknown step {dep!r}"))
            elif dep == step.name:
                problems.append(FieldViolation(f"steps[{i}].depends_on", "depends on itself"))
    if problems:
        raise invalid(problems, what="SubmitTaskRequest")
    if cycle := _cycle(steps):
        raise invalid(
            [FieldViolation("steps", f"dependency cycle: {' -> '.join(cycle)}")],
            what="SubmitTaskRequest",
        )
    upstream = ancestors(steps)
    for i, step in enumerate(request.steps):
        for needed in sorted(step_needs(step) - upstream[step.name]):
            reason = "unknown step" if needed not in steps else "not among its dependencies"
            problems.append(
                FieldViolation(f"steps[{i}]", f"reads the output of {needed!r}: {reason}")
            )
    if problems:
        raise invalid(problems, what="SubmitTaskRequest")
    return steps


def _step_problems(
    where: str, step: pb.Step, tool_exists: Callable[[str], bool]
) -> Iterable[FieldViolation]:
    kind = step.WhichOneof("kind")
    if kind is None:
        yield FieldViolation(where, f"a step needs a kind: one of {', '.join(KINDS)}")
    elif kind == "tool" and not tool_exists(step.tool.tool):
        yield FieldViolation(f"{where}.tool.tool", f"unknown tool {step.tool.tool!r}")


# ---- expanding references at run time -----------------------------------------------------


def _lookup(value: Any, path: str) -> Any:
    for part in filter(None, path.split(".")):
        if isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        elif isinstance(value, Mapping) and part in value:
            value = value[part]
        else:
            raise KeyError(part)
    return value


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def expand(text: str, outputs: Mapping[str, Any]) -> str:
    """`text` with each reference replaced by the referenced output's text.

    Raises:
        KeyError: a path that the output does not have.
    """
    return REFERENCE.sub(lambda m: _text(_lookup(outputs[m.group(1)], m.group(2))), text)


def expand_value(value: Any, outputs: Mapping[str, Any]) -> Any:
    """A JSON-like value with references expanded; a string that is exactly one
    reference becomes the referenced JSON value itself."""
    if isinstance(value, str):
        whole = REFERENCE.fullmatch(value.strip())
        if whole:
            return _lookup(outputs[whole.group(1)], whole.group(2))
        return expand(value, outputs)
    if isinstance(value, Mapping):
        return {k: expand_value(v, outputs) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_value(v, outputs) for v in value]
    return value
