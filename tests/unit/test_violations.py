"""The violation generator the conformance test uses agrees with protovalidate: every
request it makes breaks the rule it says, at the field it names."""

from __future__ import annotations

from google.protobuf import descriptor_pool, message_factory

from services.runtime import public_services, request_violations
from tests.violations import at_bounds, reported, unbreakable_rules, violations


def filled(descriptor, depth: int = 0):
    """A request with every singular sub-message set (so their rules are reachable) and
    one element in every repeated message field."""
    request = message_factory.GetMessageClass(descriptor)()
    if depth > 4:
        return request
    for field in descriptor.fields:
        sub = field.message_type
        if sub is None or sub.full_name.startswith("google.") or sub.GetOptions().map_entry:
            continue
        if field.is_repeated:
            getattr(request, field.name).add().CopyFrom(filled(sub, depth + 1))
        elif field.containing_oneof is None:
            getattr(request, field.name).CopyFrom(filled(sub, depth + 1))
    return request


def requests():
    pool = descriptor_pool.Default()
    return [m.input_type for s in public_services() for m in pool.FindServiceByName(s).methods]


def test_each_generated_request_breaks_the_rule_it_names():
    checked = 0
    for descriptor in requests():
        base = filled(descriptor)
        already = [v.field for v in request_violations(base)]
        for violation in violations(base):
            if reported(violation.field, already):
                continue  # the filled base breaks it already: nothing to learn
            fields = [v.field for v in request_violations(violation.request)]
            assert reported(violation.field, fields), (descriptor.name, violation.rule, fields)
            checked += 1
    assert checked >= 40


def test_every_rule_in_the_contracts_can_be_broken():
    problems = [p for d in requests() for p in unbreakable_rules(d)]
    assert problems == []


def test_values_at_the_edges_break_no_rule_of_their_field():
    checked = 0
    for descriptor in requests():
        for edge in at_bounds(filled(descriptor)):
            fields = [v.field for v in request_violations(edge.request)]
            if "extreme" in edge.rule:
                continue  # no rule of its own: whatever the service says, it must not fail
            assert not reported(edge.field, fields), (descriptor.name, edge.rule, fields)
            checked += 1
    assert checked >= 30
