"""Every `ErrorInfo.reason` the services can send is in the catalogue of `common.proto`.

Read from the source itself: each construction of an error of the project's tree names a
reason of the catalogue, or its class has one by default. A new raise with an unlisted
reason, or one that gives none where its class has no default, fails here.
"""

from __future__ import annotations

import ast
import base64
import urllib.parse
from pathlib import Path

import pytest

from services.runtime import (
    REASONS,
    FieldViolation,
    InvalidArgument,
    NotFound,
    SwitchboardError,
    bounded,
    error_details,
)

SERVICES = Path(__file__).resolve().parents[2] / "services"
ROOT_ERRORS = {"SwitchboardError"}


def _sources() -> dict[Path, ast.Module]:
    return {path: ast.parse(path.read_text(), str(path)) for path in SERVICES.rglob("*.py")}


def _name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _error_classes(trees: dict[Path, ast.Module]) -> dict[str, str]:
    """Name → default reason ("" when it has none) of every class in the error tree."""
    defs = [n for tree in trees.values() for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    reasons: dict[str, str] = {}
    changed = True
    while changed:
        changed = False
        for cls in defs:
            if cls.name in reasons:
                continue
            parents = [_name(b) for b in cls.bases]
            if cls.name in ROOT_ERRORS or any(p in reasons for p in parents):
                own = [
                    s.value.value
                    for s in cls.body
                    if isinstance(s, ast.Assign)
                    and any(_name(t) == "reason" for t in s.targets)
                    and isinstance(s.value, ast.Constant)
                ]
                inherited = next((reasons[p] for p in parents if p in reasons), "")
                reasons[cls.name] = own[0] if own else inherited
                changed = True
    return reasons


def test_the_catalogue_is_read_from_the_contract():
    assert {"INVALID_REQUEST", "QUOTA_EXCEEDED", "PRINCIPAL_NOT_ALLOWED"} <= REASONS
    assert not any(r.startswith("ERROR_REASON_") or r == "UNSPECIFIED" for r in REASONS)


def test_every_reason_raised_in_the_services_is_in_the_catalogue():
    trees = _sources()
    classes = _error_classes(trees)
    assert {"InvalidArgument", "NotFound", "RelayedError"} <= set(classes)
    problems = []
    for name, default in classes.items():
        if default and default not in REASONS:
            problems.append(f"class {name}: default reason {default!r} is not in the catalogue")
    checked = 0
    for path, tree in trees.items():
        where = path.relative_to(SERVICES.parent)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or _name(node.func) not in classes:
                continue
            cls = _name(node.func)
            given = next((k.value for k in node.keywords if k.arg == "reason"), None)
            if cls == "RelayedError":  # relays the downstream status as it came
                continue
            checked += 1
            if given is None:
                if not classes[cls]:
                    problems.append(f"{where}:{node.lineno}: {cls}(...) gives no reason")
            elif isinstance(given, ast.Constant):
                if given.value not in REASONS:
                    problems.append(f"{where}:{node.lineno}: reason {given.value!r} not listed")
    assert checked > 50, "the scan found too few raises to be reading the services"
    assert not problems, "\n".join(problems)


def test_an_error_class_without_a_default_needs_a_reason():
    with pytest.raises(TypeError):
        NotFound("no such thing")
    assert NotFound("x", reason="TASK_NOT_FOUND").reason == "TASK_NOT_FOUND"
    assert issubclass(NotFound, SwitchboardError)


def test_echoed_values_are_bounded():
    error = InvalidArgument("bad id " + "x" * 100_000, metadata={"task_id": "y" * 100_000})
    status = error.to_rpc_status()
    assert len(status.message.encode()) <= 384
    assert status.message.endswith("…")
    assert bounded("short") == "short"
    assert len(status.SerializeToString()) < 2048


def test_an_error_fits_the_default_metadata_limit_however_much_was_wrong():
    violations = [
        FieldViolation(f"steps[{i}].depends_on[{i}]" + "x" * 500, "ü" * 500) for i in range(1000)
    ]
    error = InvalidArgument("ä" * 10_000, field_violations=violations, metadata={"k": "v" * 999})
    status = error.to_rpc_status()
    blob = base64.b64encode(status.SerializeToString())
    header = urllib.parse.quote(status.message)  # grpc-message is percent-encoded
    assert len(blob) + len(header) < 5 * 1024
    assert status.message.endswith("(992 more field violations not listed)")
    assert error_details(status).field_violations[0].field.startswith("steps[0]")
