"""The fuzz tests' strategies (`tests/fuzzing.py`): every request type of the contracts is
drawn, the awkward values come up, and the malformed bytes really are malformed."""

from __future__ import annotations

import math

import pytest
from google.protobuf import descriptor_pool, message, message_factory
from google.protobuf.unknown_fields import UnknownFieldSet
from hypothesis import HealthCheck, Phase, find, given, settings
from hypothesis import strategies as st
from switchboard.admission.v1 import admission_pb2
from switchboard.chat.v1 import chat_pb2
from switchboard.execution.v1 import execution_pb2

from services.runtime import public_services
from tests import fuzzing

QUICK = settings(
    max_examples=25,
    phases=[Phase.generate],
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
FIND = settings(
    max_examples=2000,
    database=None,
    deadline=None,
    phases=[Phase.generate],
    derandomize=True,  # the same examples every run: a finding never flickers
)


def request_types() -> list[str]:
    pool = descriptor_pool.Default()
    return sorted(
        {
            m.input_type.full_name
            for s in public_services()
            for m in pool.FindServiceByName(s).methods
        }
    )


def parses(raw: bytes, cls: type[message.Message]) -> bool:
    try:
        cls.FromString(raw)
    except message.DecodeError:
        return False
    return True


@pytest.mark.parametrize("type_name", request_types())
def test_every_request_type_is_drawn_and_survives_the_wire(type_name):
    desc = descriptor_pool.Default().FindMessageTypeByName(type_name)
    cls = message_factory.GetMessageClass(desc)

    @QUICK
    @given(fuzzing.messages(desc))
    def check(drawn: message.Message) -> None:
        assert isinstance(drawn, cls)
        raw = drawn.SerializeToString(deterministic=True)
        assert cls.FromString(raw).SerializeToString(deterministic=True) == raw

    check()


def test_awkward_values_come_up():
    policy = fuzzing.messages(admission_pb2.Policy.DESCRIPTOR)
    assert find(policy, lambda p: p.requests_per_second > 2**31, settings=FIND)
    defined = {
        v.number
        for v in chat_pb2.SessionSettings.DESCRIPTOR.fields_by_name["tier"].enum_type.values
    }
    settings_ = fuzzing.messages(chat_pb2.SessionSettings.DESCRIPTOR)
    assert find(settings_, lambda s: s.tier not in defined, settings=FIND)
    assert find(settings_, lambda s: "\x00" in s.system_prompt, settings=FIND)
    temperatures = fuzzing.floats(32)
    assert math.isnan(find(temperatures, math.isnan, settings=FIND))
    assert find(temperatures, math.isinf, settings=FIND)


def test_edges_of_a_fields_rules_are_drawn():
    # SandboxFile.path: at most 4096 bytes; its edge and one past it come up
    field = execution_pb2.SandboxFile.DESCRIPTOR.fields_by_name["path"]
    rules = fuzzing._rules(field)
    assert rules is not None and rules.string.max_len
    edge = rules.string.max_len
    lengths = fuzzing.texts(rules).map(len)
    assert find(lengths, lambda n: n == edge + 1, settings=FIND)


def test_nested_and_repeated_fields_and_oneofs_are_filled():
    task = fuzzing.messages(execution_pb2.SubmitTaskRequest.DESCRIPTOR)
    found = find(
        task,
        lambda t: len(t.steps) >= 2 and any(s.WhichOneof("kind") for s in t.steps),
        settings=FIND,
    )
    assert found.steps


def test_mutations_keep_the_type_and_change_the_seed():
    seed = chat_pb2.CreateSessionRequest(
        title="t", settings=chat_pb2.SessionSettings(system_prompt="Be brief.")
    )
    changed = fuzzing.mutations(seed)
    assert find(changed, lambda m: m != seed, settings=FIND).DESCRIPTOR is seed.DESCRIPTOR
    # a change deep inside: the seed's other fields stay
    deep = find(
        changed,
        lambda m: m.title == "t" and m.settings.system_prompt != "Be brief.",
        settings=FIND,
    )
    assert deep.title == "t"


def test_requests_come_from_nothing_and_from_seeds():
    seed = execution_pb2.GetTaskRequest(task_id="the-seed")
    drawn = fuzzing.requests(execution_pb2.GetTaskRequest.DESCRIPTOR, (seed,))
    assert find(drawn, lambda m: m.task_id == "the-seed", settings=FIND)
    assert find(drawn, lambda m: m.task_id not in ("the-seed", ""), settings=FIND)


def test_raw_requests_hold_bytes_that_do_not_parse():
    cls = chat_pb2.GetSessionRequest
    raw = fuzzing.raw_requests(cls.DESCRIPTOR)
    assert find(raw, lambda b: not parses(b, cls), settings=FIND)
    assert find(
        raw, lambda b: parses(b, cls) and len(UnknownFieldSet(cls.FromString(b))) > 0, settings=FIND
    )


@pytest.mark.parametrize("bad", fuzzing.INVALID_UTF8)
def test_invalid_utf8_in_a_string_field_does_not_parse(bad):
    number = chat_pb2.GetSessionRequest.DESCRIPTOR.fields_by_name["session_id"].number
    assert not parses(fuzzing.wire_field(number, 2, bad), chat_pb2.GetSessionRequest)
    assert parses(fuzzing.wire_field(number, 2, b"fine"), chat_pb2.GetSessionRequest)


def test_wire_fields_of_every_type_parse_as_unknown_fields():
    for wire_type, payload in ((0, 300), (1, 2**64 - 1), (2, b"xyz"), (5, 7)):
        raw = fuzzing.wire_field(1000, wire_type, payload)
        assert parses(raw, chat_pb2.GetSessionRequest)


@given(st.data())
@QUICK
def test_drawn_strings_are_valid_utf8(data):
    text = data.draw(fuzzing.texts(hints=("a.b",)))
    assert text.encode("utf-8").decode("utf-8") == text
