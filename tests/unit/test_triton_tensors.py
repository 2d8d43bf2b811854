"""The raw tensor contents the router sends to and reads from Triton (tritonclient's
layouts), checked against the layout Triton documents."""

from __future__ import annotations

import struct

from services.inference.triton import (
    decode_bytes,
    decode_int32,
    encode_bytes,
    encode_int32,
    generate_request,
)


def test_bytes_tensors_are_length_prefixed_elements():
    items = [b"hello ", b"", "wörld".encode()]
    layout = b"".join(struct.pack("<I", len(item)) + item for item in items)
    assert encode_bytes(items) == layout
    assert decode_bytes(layout) == items
    assert decode_bytes(b"") == []


def test_int32_tensors_are_little_endian():
    assert encode_int32(-5) == struct.pack("<i", -5)
    assert decode_int32(struct.pack("<i", 2**31 - 1) + b"rest") == 2**31 - 1


def test_a_generation_request_carries_prompt_passages_and_max_tokens():
    request = generate_request("generator_small", "Why?", ["Cats purr.", "Dogs bark."], 64)
    assert [(i.name, i.datatype, list(i.shape)) for i in request.inputs] == [
        ("PROMPT", "BYTES", [1]),
        ("CONTEXT", "BYTES", [2]),
        ("MAX_TOKENS", "INT32", [1]),
    ]
    prompt, context, max_tokens = request.raw_input_contents
    assert decode_bytes(prompt) == [b"Why?"]
    assert decode_bytes(context) == [b"Cats purr.", b"Dogs bark."]
    assert decode_int32(max_tokens) == 64
