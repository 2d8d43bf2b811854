"""Requests that break one constraint of their contract each, made from the descriptors.

Given a valid request, `violations` walks its message type's `buf.validate` field rules
(into nested messages and the elements of repeated ones) and yields, for
each rule it knows how to break, a copy of the request that breaks exactly that rule,
with the path of the field a service must name in its field violation. A new rule in
`proto/` is exercised without a line changed here; a rule kind this module cannot break
is reported by `unbreakable_rules`, so that nothing is skipped silently.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from buf.validate import validate_pb2
from google.protobuf import descriptor, message, message_factory

_IGNORE_ZERO = validate_pb2.IGNORE_IF_ZERO_VALUE
_INT_RANGES = {
    "int32": (-(2**31), 2**31 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint32": (0, 2**32 - 1),
    "uint64": (0, 2**64 - 1),
    "sint32": (-(2**31), 2**31 - 1),
    "sint64": (-(2**63), 2**63 - 1),
}
_BREAKABLE = {
    "string": {"min_len", "max_len", "pattern"},
    "enum": {"defined_only"},
    "repeated": {"min_items", "max_items", "items"},
    "map": {"max_pairs", "keys", "values"},
    "duration": {"gte", "lte", "gt", "lt"},
    **{kind: {"gte", "lte", "gt", "lt"} for kind in (*_INT_RANGES, "float", "double")},
}
_NOT_MATCHING = ("", "-", " ", "x" * 300, "\x00", "a b", "ä", "A-", ".", "_x")


def reported(expected: str, reported_fields: list[str]) -> bool:
    """True if a service's field violations name `expected` (a list element or map entry
    of it, `tags[0]`, `labels["k"]`, counts too)."""
    return any(f == expected or f.startswith(f"{expected}[") for f in reported_fields)


@dataclass(frozen=True)
class Violation:
    field: str
    """The field path a service must name (`parameters.max_tokens`, `steps[0].name`)."""
    rule: str
    """Which rule it breaks, e.g. `string.max_len`."""
    request: message.Message
    """The whole request, breaking only this rule."""
    site: str
    """Where the rule is written: `package.Message.field`."""


def violations(request: message.Message) -> Iterator[Violation]:
    """One Violation per rule of `request`'s type (and its set or required sub-messages)
    that can be broken."""
    yield from _walk(request, request, ())


def at_bounds(request: message.Message) -> Iterator[Violation]:
    """Copies of `request` with one field at the edge of what its rules allow (a number
    at its bound, a string or list of exactly the longest or shortest length), and every
    integer field without rules at its type's extremes. Each `Violation` here names a
    field the service must not refuse (nor fail on)."""
    yield from _walk(request, request, (), edges=True)


def rule_sites(root: descriptor.Descriptor) -> set[str]:
    """`package.Message.field` of every field with rules reachable from `root` (through
    message fields, but not into elements a service checks on their own)."""
    sites: set[str] = set()
    seen: set[str] = set()

    def visit(msg: descriptor.Descriptor) -> None:
        if msg.full_name in seen or msg.full_name.startswith("google."):
            return
        seen.add(msg.full_name)
        for field in msg.fields:
            rules = _rules(field)
            if rules is not None and (rules.WhichOneof("type") or rules.required):
                sites.add(f"{msg.full_name}.{field.name}")
            sub = field.message_type
            if sub is not None and not sub.GetOptions().map_entry and not _items_ignored(rules):
                visit(sub)

    visit(root)
    return sites


def unbreakable_rules(root: descriptor.Descriptor) -> list[str]:
    """`field: rule` for every rule reachable from `root` that `violations` cannot break."""
    found: list[str] = []
    seen: set[str] = set()

    def visit(msg: descriptor.Descriptor) -> None:
        if msg.full_name in seen or msg.full_name.startswith("google."):
            return
        seen.add(msg.full_name)
        for field in msg.fields:
            rules = _rules(field)
            if rules is not None:
                kind = rules.WhichOneof("type")
                if kind is not None:
                    for rule, _ in getattr(rules, kind).ListFields():
                        if rule.name not in _BREAKABLE.get(kind, set()):
                            found.append(f"{msg.full_name}.{field.name}: {kind}.{rule.name}")
            if field.message_type is not None:
                visit(field.message_type)

    visit(root)
    return found


# -- walking -------------------------------------------------------------------------------


Path = tuple[tuple[str, int | str | None], ...]


def _path_text(path: Path) -> str:
    text = ""
    for name, index in path:
        text = f"{text}.{name}" if text else name
        if index is not None:
            text += f"[{index!r}]" if isinstance(index, str) else f"[{index}]"
    return text


def _rules(field: descriptor.FieldDescriptor) -> Any:
    options = field.GetOptions()
    return (
        options.Extensions[validate_pb2.field] if options.HasExtension(validate_pb2.field) else None
    )


def _at(root: message.Message, path: Path) -> message.Message:
    node = root
    for name, index in path:
        node = getattr(node, name)
        if index is not None:
            node = node[index]
    return node


def _walk(
    root: message.Message, node: message.Message, path: Path, *, edges: bool = False
) -> Iterator[Violation]:
    for field in node.DESCRIPTOR.fields:
        here = (*path, (field.name, None))
        rules = _rules(field)
        makers = _edges(field, rules) if edges else _breakers(field, rules, None) if rules else ()
        if makers:
            for rule, mutate in makers:
                copy = type(root)()
                copy.CopyFrom(root)
                target = _at(copy, path)
                mutate(target)
                site = f"{node.DESCRIPTOR.full_name}.{field.name}"
                yield Violation(_path_text(here), rule, copy, site)
        if field.message_type is None or field.message_type.full_name.startswith("google."):
            continue
        if field.is_repeated:
            if field.message_type.GetOptions().map_entry or _items_ignored(rules):
                continue
            for index in range(len(getattr(node, field.name))):
                yield from _walk(
                    root,
                    getattr(node, field.name)[index],
                    (*path, (field.name, index)),
                    edges=edges,
                )
        elif node.HasField(field.name):
            yield from _walk(root, getattr(node, field.name), here, edges=edges)


def _edges(field: descriptor.FieldDescriptor, rules: Any) -> list[tuple[str, Any]]:
    kind = rules.WhichOneof("type") if rules is not None else None
    scalar = _SCALAR_KINDS.get(field.type)
    if kind is None and scalar in _INT_RANGES and not field.is_repeated:
        low, high = _INT_RANGES[scalar]
        return [(f"{scalar} extreme", _setter(field, v)) for v in (low, high) if v]
    if kind is None or field.is_repeated and kind != "repeated":
        return []
    typed = getattr(rules, kind)
    found: list[tuple[str, Any]] = []
    if kind in _INT_RANGES or kind in ("float", "double"):
        for rule in ("gte", "lte"):
            if typed.HasField(rule):
                found.append((f"{kind}.{rule} (at)", _setter(field, getattr(typed, rule))))
    elif kind == "string":
        for rule in ("min_len", "max_len"):
            if typed.HasField(rule) and getattr(typed, rule) > 0 and not typed.HasField("pattern"):
                value = "x" * getattr(typed, rule)
                found.append((f"string.{rule} (at)", _setter(field, value)))
    elif kind == "duration":
        for rule in ("gte", "lte"):
            if typed.HasField(rule):
                bound = getattr(typed, rule).ToNanoseconds()
                found.append((f"duration.{rule} (at)", _setter(field, bound)))
    return found


_SCALAR_KINDS = {
    descriptor.FieldDescriptor.TYPE_INT32: "int32",
    descriptor.FieldDescriptor.TYPE_INT64: "int64",
    descriptor.FieldDescriptor.TYPE_UINT32: "uint32",
    descriptor.FieldDescriptor.TYPE_UINT64: "uint64",
    descriptor.FieldDescriptor.TYPE_SINT32: "sint32",
    descriptor.FieldDescriptor.TYPE_SINT64: "sint64",
}


def _items_ignored(rules: Any) -> bool:
    """The field's elements are not checked with the request (a service checks each on
    its own, as SubmitTasks does its tasks)."""
    return (
        rules is not None
        and rules.WhichOneof("type") == "repeated"
        and rules.repeated.items.ignore == validate_pb2.IGNORE_ALWAYS
    )


def _breakers(field: descriptor.FieldDescriptor, rules: Any, current: Any) -> Iterator[Any]:
    name = field.name
    kind = rules.WhichOneof("type")
    ignore_zero = rules.ignore == _IGNORE_ZERO
    if rules.required and field.message_type is not None and not field.is_repeated:
        yield "required", lambda m: m.ClearField(name)
    if kind is None:
        return
    typed = getattr(rules, kind)
    if kind == "repeated":
        yield from _repeated(field, typed)
        return
    if kind == "map":
        yield from _map(field, typed)
        return
    for rule, bad in _bad_scalars(kind, typed, field):
        if ignore_zero and _is_zero(bad):
            continue
        yield f"{kind}.{rule}", _setter(field, bad)


def _bad_scalars(kind: str, typed: Any, field: Any) -> Iterator[tuple[str, Any]]:
    if kind == "string":
        if typed.HasField("min_len") and typed.min_len > 0:
            yield "min_len", "x" * (typed.min_len - 1)
        if typed.HasField("max_len"):
            yield "max_len", "x" * (typed.max_len + 1)
        if typed.HasField("pattern"):
            pattern = re.compile(typed.pattern)
            # the empty string, and a non-empty one (for fields where empty = unset)
            if not pattern.search(""):
                yield "pattern", ""
            yield "pattern", next(s for s in _NOT_MATCHING if s and not pattern.search(s))
    elif kind == "enum":
        if typed.defined_only:
            defined = {v.number for v in field.enum_type.values}
            yield "defined_only", max(defined) + 1000
    elif kind == "duration":
        for rule, step in (("gte", -1), ("gt", 0), ("lte", 1), ("lt", 0)):
            if typed.HasField(rule):
                bound = getattr(typed, rule).ToNanoseconds()
                yield rule, bound + step * 1_000_000_000
    elif kind in ("float", "double"):
        for rule, step in (("gte", -1), ("gt", 0), ("lte", 1), ("lt", 0)):
            if typed.HasField(rule):
                yield rule, getattr(typed, rule) + step * max(1.0, abs(getattr(typed, rule)))
        if any(typed.HasField(r) for r in ("gte", "gt", "lte", "lt")):
            yield "nan", float("nan")
    elif kind in _INT_RANGES:
        low, high = _INT_RANGES[kind]
        for rule, step in (("gte", -1), ("gt", 0), ("lte", 1), ("lt", 0)):
            if typed.HasField(rule):
                value = getattr(typed, rule) + step
                if low <= value <= high:
                    yield rule, value


def _setter(field: Any, value: Any) -> Any:
    name = field.name
    if (
        field.message_type is not None
        and field.message_type.full_name == "google.protobuf.Duration"
    ):

        def set_duration(m: Any) -> None:
            getattr(m, name).FromNanoseconds(value)

        return set_duration
    return lambda m: setattr(m, name, value)


def _repeated(field: Any, typed: Any) -> Iterator[tuple[str, Any]]:
    name = field.name

    def element(m: Any) -> Any:
        items = getattr(m, name)
        if field.message_type is not None:
            return items[0] if items else message_factory.GetMessageClass(field.message_type)()
        return items[0] if items else ""

    if typed.HasField("min_items") and typed.min_items > 0:
        yield "repeated.min_items", lambda m: _resize(m, name, typed.min_items - 1, element(m))
    if typed.HasField("max_items"):
        yield "repeated.max_items", lambda m: _resize(m, name, typed.max_items + 1, element(m))
    items = typed.items
    if items.WhichOneof("type") == "string":
        for rule, bad in _bad_scalars("string", items.string, field):
            if items.ignore == _IGNORE_ZERO and _is_zero(bad):
                continue
            yield f"repeated.items.string.{rule}", lambda m, bad=bad: _resize(m, name, 1, bad)


def _resize(m: Any, name: str, count: int, element: Any) -> None:
    items = getattr(m, name)
    if isinstance(element, message.Message):
        element = type(element)(**{f.name: v for f, v in element.ListFields()})
        del items[:]
        for _ in range(count):
            items.add().CopyFrom(element)
    else:
        del items[:]
        items.extend([element] * count)


def _map(field: Any, typed: Any) -> Iterator[tuple[str, Any]]:
    name = field.name
    value_field = field.message_type.fields_by_name["value"]
    plain = "v" if value_field.type == value_field.TYPE_STRING else None
    if plain is None:
        return
    if typed.HasField("max_pairs"):

        def too_many(m: Any) -> None:
            for i in range(typed.max_pairs + 1):
                getattr(m, name)[f"k{i}"] = plain

        yield "map.max_pairs", too_many
    if typed.keys.WhichOneof("type") == "string":
        for rule, bad in _bad_scalars("string", typed.keys.string, field):
            if bad:
                yield (
                    f"map.keys.string.{rule}",
                    lambda m, bad=bad: getattr(m, name).__setitem__(bad, plain),
                )
    if typed.values.WhichOneof("type") == "string":
        for rule, bad in _bad_scalars("string", typed.values.string, field):
            yield (
                f"map.values.string.{rule}",
                lambda m, bad=bad: getattr(m, name).__setitem__("k", bad),
            )


def _is_zero(value: Any) -> bool:
    return value == 0 or value == "" or value is False
