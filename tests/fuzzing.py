"""Hypothesis strategies for any request of the contracts, built from its descriptor.

`messages(descriptor)` draws whole messages: every scalar type at its extremes (NaN and
infinities among the floats, the integer types' bounds), strings that are valid UTF-8
but awkward (controls, bidirectional overrides, noncharacters, the longest code point,
lengths at the edges of the field's `buf.validate` rules), bytes, enums with numbers no
contract defines, repeated fields, maps, oneofs and nested messages, bounded in depth and
size. `mutations(seed)` changes a few fields of a valid request, so that requests also get
past validation into the services' own logic. `raw_requests(descriptor)` draws what
no client library would send: random bytes, a valid encoding cut short or with bytes
flipped, a string field holding invalid UTF-8, fields of numbers the contract does not
define (with wire types that contradict it).

Pure: no processes, no sockets (`tests/unit/test_fuzzing.py` checks it).
"""

from __future__ import annotations

import logging
import math
import struct
from functools import lru_cache
from typing import Any

from buf.validate import validate_pb2
from google.protobuf import descriptor, message, message_factory
from hypothesis import strategies as st

logger = logging.getLogger(__name__)

FD = descriptor.FieldDescriptor

MAX_DEPTH = 4
"""Nested messages deeper than this are left unset."""
MAX_ITEMS = 4
"""Elements of a repeated field or entries of a map, usually (a rule's edge may ask for
more)."""
MAX_TEXT = 24
"""Characters of an ordinary drawn string (the edges and the long ones come on top)."""
MAX_EDGE_ITEMS = 257
"""The most elements drawn for a repeated field (one past its rule's `max_items`)."""
LONG_TEXT = (255, 256, 1025, 4097, 65_537)
"""Lengths of the long strings drawn now and then: around the usual limits."""
RARE = 32
"""One string (or bytes) field in this many is a long one."""

_INT_RANGES = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1),
    FD.TYPE_FIXED64: (0, 2**64 - 1),
}

AWKWARD_TEXT = (
    "",
    " ",
    "\x00",
    "\x00abc",
    "a\x00b",
    "\t\r\n",
    "\u202e\u202dflip",  # bidirectional overrides
    "\ufeff",  # byte order mark
    "\ufffd",  # the replacement character
    "\ufffe\uffff",  # noncharacters
    "\U0010ffff",  # the last code point
    "\U0001f600" * 3,
    "e\u0301\u0301\u0301",  # combining marks
    "\u200d\u200b",  # zero-width joiner and space
    "ä",
    "..",
    "../../etc/passwd",
    "/",
    "a/b",
    "-",
    "_x",
    "*",
    "%s%n%x",
    "{}",
    "{{steps.x.output}}",
    "' OR 1=1 --",
    "\\",
    "null",
    "0",
    "-1",
    "1e309",
    "NaN",
    "00000000-0000-0000-0000-000000000000",
    "ffffffff-ffff-ffff-ffff-ffffffffffff",
    "sb_0123456789ab_secret",
    "0123456789ab",
)
"""Valid UTF-8 that code tends to get wrong (invalid UTF-8 cannot be set on a message:
`raw_requests` sends it on the wire)."""
AWKWARD_BYTES = (b"", b"\x00", b"\xff" * 8, b"\xc0\x80", b"\xed\xa0\x80", b"PK\x03\x04", b"\x7fELF")
AWKWARD_DOUBLES = (
    0.0,
    -0.0,
    1.0,
    -1.0,
    math.nan,
    math.inf,
    -math.inf,
    5e-324,
    1.7976931348623157e308,
)
AWKWARD_FLOATS = (0.0, -0.0, 1.0, -1.0, math.nan, math.inf, -math.inf, 1e-45, 3.4028234663852886e38)


# -- values of one field -----------------------------------------------------------------------


def _rules(field: descriptor.FieldDescriptor) -> Any:
    options = field.GetOptions()
    if options.HasExtension(validate_pb2.field):
        return options.Extensions[validate_pb2.field]
    return None


def _edges(rules: Any, kind: str) -> list[Any]:
    """The values at and just past each bound of a `buf.validate` rule of `kind`."""
    if rules is None or rules.WhichOneof("type") != kind:
        return []
    typed = getattr(rules, kind)
    found: list[Any] = []
    for bound in ("gte", "gt", "lte", "lt", "min_len", "max_len", "min_items", "max_items"):
        if bound in typed.DESCRIPTOR.fields_by_name and typed.HasField(bound):
            found.append(getattr(typed, bound))
    return found


def integers(kind: int, rules: Any = None) -> st.SearchStrategy[int]:
    """Integers of a protobuf integer type: its bounds, small numbers, the edges of the
    field's rules and anything in its range."""
    low, high = _INT_RANGES[kind]
    special = {low, high, 0, 1, -1, 2, 1 << 31, (1 << 31) - 1, 1 << 32, 1 << 53}
    for rule_kind in ("int32", "int64", "uint32", "uint64", "sint32", "sint64"):
        for edge in _edges(rules, rule_kind):
            special |= {edge - 1, edge, edge + 1}
    in_range = sorted(v for v in special if low <= v <= high)
    return st.one_of(st.sampled_from(in_range), st.integers(low, high))


def floats(width: int, rules: Any = None) -> st.SearchStrategy[float]:
    special = list(AWKWARD_DOUBLES if width == 64 else AWKWARD_FLOATS)
    for kind in ("float", "double"):
        for edge in _edges(rules, kind):
            special += [edge, math.nextafter(edge, math.inf), math.nextafter(edge, -math.inf)]
    return st.one_of(st.sampled_from(special), st.floats(width=width))


def texts(rules: Any = None, hints: tuple[str, ...] = ()) -> st.SearchStrategy[str]:
    """Strings: awkward ones, `hints` (names the contract uses: field names for a field
    mask's paths, ids seen in valid requests), lengths at the edges of the field's rules,
    now and then a long one, and any text."""
    lengths = set()
    for edge in _edges(rules, "string"):
        lengths |= {max(edge - 1, 0), edge, edge + 1}
    common = [st.sampled_from(AWKWARD_TEXT), st.text(max_size=MAX_TEXT)]
    if hints:
        common.append(st.sampled_from(hints))
    if lengths:
        common.append(st.builds(_repeat, st.sampled_from(sorted(lengths)), st.sampled_from("xä")))
    rare = st.builds(_repeat, st.sampled_from(LONG_TEXT), st.sampled_from("xä😀"))
    return _mostly(st.one_of(common), rare)


def _repeat(n: int, char: str) -> str:
    return char * n


def _mostly(usual: st.SearchStrategy[Any], rare: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`usual`, and one time in RARE `rare`."""
    return st.integers(0, RARE - 1).flatmap(lambda n: rare if n == 0 else usual)


def blobs() -> st.SearchStrategy[bytes]:
    return _mostly(
        st.one_of(st.sampled_from(AWKWARD_BYTES), st.binary(max_size=64)),
        st.builds(lambda n: b"\x00" * n, st.sampled_from((1024, 65_537))),
    )


def enum_numbers(field: descriptor.FieldDescriptor) -> st.SearchStrategy[int]:
    """The enum's values, and (for an open enum, which keeps them) numbers it does not
    define, up to int32's bounds."""
    defined = st.sampled_from([v.number for v in field.enum_type.values])
    if field.enum_type.is_closed:
        return defined
    return st.one_of(defined, integers(FD.TYPE_INT32))


# -- whole messages ----------------------------------------------------------------------------


def messages(
    root: descriptor.Descriptor, *, depth: int = MAX_DEPTH, hints: tuple[str, ...] = ()
) -> st.SearchStrategy[message.Message]:
    """Messages of type `root`, any field set or not, to `depth` levels of nesting.

    `hints` are strings drawn now and then for any string field, besides the names of
    every field reachable from `root` (a field mask's paths, a map's keys)."""
    names = _field_names(root)
    return _message_strategy(root, depth, tuple(dict.fromkeys((*hints, *names))))


@lru_cache(maxsize=4096)
def _message_strategy(
    desc: descriptor.Descriptor, depth: int, hints: tuple[str, ...]
) -> st.SearchStrategy[message.Message]:
    cls = message_factory.GetMessageClass(desc)
    if depth <= 0:
        return st.just(cls())
    plain = [f for f in desc.fields if f.containing_oneof is None]
    oneofs = list(desc.oneofs)
    setters = {f.name: _field_strategy(f, depth, hints) for f in desc.fields}

    @st.composite
    def build(draw: st.DrawFn) -> message.Message:
        msg = cls()
        for field in plain:
            if draw(st.integers(0, 2)) == 0:  # one field in three is set
                _assign(msg, field, draw(setters[field.name]))
        for oneof in oneofs:
            choice = draw(st.integers(-1, len(oneof.fields) - 1))
            if choice >= 0:
                field = oneof.fields[choice]
                _assign(msg, field, draw(setters[field.name]))
        return msg

    return build()


@lru_cache(maxsize=4096)
def _field_strategy(
    field: descriptor.FieldDescriptor, depth: int, hints: tuple[str, ...]
) -> st.SearchStrategy[Any]:
    rules = _rules(field)
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key = field.message_type.fields_by_name["key"]
        value = field.message_type.fields_by_name["value"]
        return st.dictionaries(
            _single(key, depth, hints, None),
            _single(value, depth - 1, hints, None),
            max_size=MAX_ITEMS,
        )
    if field.is_repeated:
        element = _single(field, depth, hints, _item_rules(rules))
        sizes = [MAX_ITEMS]
        for edge in _edges(rules, "repeated"):
            sizes.append(min(edge + 1, MAX_EDGE_ITEMS))
        return _mostly(
            st.lists(element, max_size=MAX_ITEMS),
            st.sampled_from(sorted(set(sizes))).flatmap(
                lambda n: st.lists(element, min_size=n, max_size=n)
            ),
        )
    return _single(field, depth, hints, rules)


def _item_rules(rules: Any) -> Any:
    if rules is not None and rules.WhichOneof("type") == "repeated":
        return rules.repeated.items
    return None


def _single(
    field: descriptor.FieldDescriptor, depth: int, hints: tuple[str, ...], rules: Any
) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == FD.TYPE_MESSAGE:
        return st.deferred(lambda: _message_strategy(field.message_type, depth - 1, hints))
    if kind in _INT_RANGES:
        return integers(kind, rules)
    if kind == FD.TYPE_DOUBLE:
        return floats(64, rules)
    if kind == FD.TYPE_FLOAT:
        return floats(32, rules)
    if kind == FD.TYPE_BOOL:
        return st.booleans()
    if kind == FD.TYPE_STRING:
        return texts(rules, hints)
    if kind == FD.TYPE_BYTES:
        return blobs()
    if kind == FD.TYPE_ENUM:
        return enum_numbers(field)
    raise TypeError(f"{field.full_name}: field type {kind} is not drawn")


def _assign(msg: message.Message, field: descriptor.FieldDescriptor, value: Any) -> None:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        target = getattr(msg, field.name)
        for k, v in value.items():
            if isinstance(v, message.Message):
                target[k].CopyFrom(v)
            else:
                target[k] = v
    elif field.is_repeated:
        target = getattr(msg, field.name)
        if field.message_type is not None:
            for v in value:
                target.add().CopyFrom(v)
        else:
            target.extend(value)
    elif field.message_type is not None:
        getattr(msg, field.name).CopyFrom(value)
    else:
        setattr(msg, field.name, value)


@lru_cache(maxsize=256)
def _field_names(root: descriptor.Descriptor) -> tuple[str, ...]:
    found: dict[str, None] = {}
    seen: set[str] = set()

    def visit(desc: descriptor.Descriptor, prefix: str) -> None:
        if desc.full_name in seen:
            return
        seen.add(desc.full_name)
        for field in desc.fields:
            found[field.name] = None
            if prefix:
                found[f"{prefix}.{field.name}"] = None
            if field.message_type is not None and not field.message_type.GetOptions().map_entry:
                visit(field.message_type, field.name)

    visit(root, "")
    return tuple(found)


# -- a valid request, a few fields changed -----------------------------------------------------


def mutations(
    seed: message.Message, *, hints: tuple[str, ...] = ()
) -> st.SearchStrategy[message.Message]:
    """Copies of `seed` with one to three fields (anywhere in it) drawn anew or cleared."""
    root = seed.DESCRIPTOR
    all_hints = tuple(dict.fromkeys((*hints, *_strings_in(seed), *_field_names(root))))

    @st.composite
    def mutate(draw: st.DrawFn) -> message.Message:
        copy = type(seed)()
        copy.CopyFrom(seed)
        for _ in range(draw(st.integers(1, 3))):
            node = copy
            depth = MAX_DEPTH
            # walk down into set sub-messages now and then
            while True:
                subs = [
                    f
                    for f, _ in node.ListFields()
                    if f.message_type is not None
                    and not f.message_type.GetOptions().map_entry
                    and not f.is_repeated
                ]
                if not subs or depth <= 1 or not draw(st.booleans()):
                    break
                node = getattr(node, draw(st.sampled_from(subs)).name)
                depth -= 1
            fields = list(node.DESCRIPTOR.fields)
            if not fields:
                continue
            field = draw(st.sampled_from(fields))
            node.ClearField(field.name)
            if draw(st.integers(0, 4)):  # mostly a new value, now and then none
                _assign(node, field, draw(_field_strategy(field, depth, all_hints)))
        return copy

    return mutate()


def _strings_in(msg: message.Message) -> list[str]:
    found: list[str] = []
    for field, value in msg.ListFields():
        values = value if field.is_repeated and not isinstance(value, str) else [value]
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            values = list(value.keys())
        for v in values:
            if isinstance(v, str) and v:
                found.append(v)
            elif isinstance(v, message.Message):
                found += _strings_in(v)
    return found


def requests(
    root: descriptor.Descriptor,
    seeds: tuple[message.Message, ...] = (),
    *,
    hints: tuple[str, ...] = (),
) -> st.SearchStrategy[message.Message]:
    """Requests of type `root`: drawn from nothing, or (half the time, given `seeds`)
    valid seeds with a few fields changed."""
    fresh = messages(root, hints=hints)
    if not seeds:
        return fresh
    return st.one_of(fresh, st.one_of([mutations(s, hints=hints) for s in seeds]))


# -- bytes no client library would send --------------------------------------------------------


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _tag(number: int, wire_type: int) -> bytes:
    return _varint((number << 3) | wire_type)


def wire_field(number: int, wire_type: int, payload: bytes | int) -> bytes:
    """One field on the wire: its tag, then a varint (0), 8 bytes (1), a length-delimited
    payload (2) or 4 bytes (5)."""
    if wire_type == 0:
        return _tag(number, 0) + _varint(int(payload))
    if wire_type == 1:
        return _tag(number, 1) + struct.pack("<Q", int(payload) & ((1 << 64) - 1))
    if wire_type == 5:
        return _tag(number, 5) + struct.pack("<I", int(payload) & 0xFFFFFFFF)
    assert isinstance(payload, bytes)
    return _tag(number, 2) + _varint(len(payload)) + payload


INVALID_UTF8 = (b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xe2\x82", b"abc\x80", b"\xf4\x90\x80\x80")
"""Byte strings no valid UTF-8 text encodes: a stray byte, an overlong NUL, a surrogate,
a cut sequence, a code point past U+10FFFF."""


def _string_fields(root: descriptor.Descriptor) -> list[descriptor.FieldDescriptor]:
    return [f for f in root.fields if f.type == FD.TYPE_STRING]


def raw_requests(root: descriptor.Descriptor) -> st.SearchStrategy[bytes]:
    """Serialized requests of type `root` that are malformed, or well-formed in ways a
    library would not write."""
    encoded = messages(root, depth=2).map(lambda m: m.SerializeToString())
    strings = _string_fields(root)
    numbers = [f.number for f in root.fields] or [1]

    def cut(data: bytes, at: int) -> bytes:
        return data[: at % (len(data) + 1)]

    def flip(data: bytes, at: int, byte: int) -> bytes:
        if not data:
            return bytes([byte])
        at %= len(data)
        return data[:at] + bytes([byte]) + data[at + 1 :]

    choices: list[st.SearchStrategy[bytes]] = [
        st.binary(max_size=128),
        st.builds(cut, encoded, st.integers(0, 1 << 16)),
        st.builds(flip, encoded, st.integers(0, 1 << 16), st.integers(0, 255)),
        # a known field number with any wire type, or an unknown field number
        st.builds(
            lambda number, wire_type, blob, value: wire_field(
                number, wire_type, blob if wire_type == 2 else value
            ),
            st.one_of(st.sampled_from(numbers), st.integers(1, (1 << 29) - 1)),
            st.sampled_from((0, 1, 2, 5)),
            st.binary(max_size=16),
            st.integers(0, (1 << 64) - 1),
        ),
        # a length that runs past the end, a varint that never ends, a group tag
        st.sampled_from(
            (
                _tag(numbers[0], 2) + _varint(1 << 20) + b"x",
                _tag(numbers[0], 0) + b"\xff" * 11,
                _tag(numbers[0], 3) + _tag(numbers[0], 4),
                _tag(0, 0) + b"\x00",
            )
        ),
    ]
    if strings:
        choices.append(
            st.builds(
                lambda field, bad, rest: rest + wire_field(field.number, 2, bad),
                st.sampled_from(strings),
                st.sampled_from(INVALID_UTF8),
                encoded,
            )
        )
    return st.one_of(choices)
