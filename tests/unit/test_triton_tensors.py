"""The raw tensor contents the router sends to and reads from Triton (tritonclient's
layouts), checked against the layout Triton documents."""

from __future__ import annotations

import struct
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

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


@given(st.lists(st.binary(max_size=64), max_size=8))
def test_bytes_tensors_match_tritonclient(items):
    """The codec is tritonclient's layout, element for element."""
    theirs = b""
    if items:  # tritonclient has no layout for an empty tensor
        theirs = bytes(serialize_byte_tensor(np.array(items, dtype=np.object_)).item())
    assert encode_bytes(items) == theirs
    assert decode_bytes(theirs) == list(deserialize_bytes_tensor(theirs))


@pytest.mark.parametrize(
    "raw",
    [b"\x05\x00\x00\x00abc", b"\x01", b"\x02\x00\x00\x00ab\x09\x00\x00\x00x"],
    ids=["element cut short", "length cut short", "second element cut short"],
)
def test_a_truncated_bytes_tensor_is_refused(raw):
    with pytest.raises(ValueError, match="past the tensor's end"):
        decode_bytes(raw)


def test_int32_tensors_are_little_endian():
    assert encode_int32(-5) == struct.pack("<i", -5)
    assert decode_int32(struct.pack("<i", 2**31 - 1) + b"rest") == 2**31 - 1
    with pytest.raises(ValueError, match="INT32 tensor of 3 bytes"):
        decode_int32(b"\x01\x00\x00")


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


class _Stream:
    """A ModelStreamInfer call that answers with the given responses."""

    def __init__(self, replies):
        self._replies = replies
        self.cancelled = False

    async def write(self, request):
        pass

    async def done_writing(self):
        pass

    def done(self):
        return False

    def cancel(self):
        self.cancelled = True

    async def __aiter__(self):
        for reply in self._replies:
            yield reply


async def test_a_malformed_token_is_the_backends_failure():
    """A token whose TEXT tensor is cut short fails the generation as the backend's
    failure (the router then tries another backend), not as an internal error."""
    from tritonclient.grpc import service_pb2

    from services.inference.triton import BackendFailure, TritonBackend

    reply = service_pb2.ModelStreamInferResponse()
    reply.infer_response.outputs.add(name="TEXT", datatype="BYTES", shape=[1])
    reply.infer_response.raw_output_contents.append(b"\x09\x00\x00\x00cut")
    generation = _Stream([reply])
    streams = [generation, _Stream([])]
    backend = TritonBackend("127.0.0.1:1")  # its channel never connects: no call uses it
    backend._stub = SimpleNamespace(ModelStreamInfer=lambda: streams.pop(0))
    try:
        with pytest.raises(BackendFailure, match="malformed token"):
            async for _ in backend.generate("generator_small", "Hi", [], 4, timeout=5):
                pass
        assert generation.cancelled, "a failed generation's stream is cancelled"
        assert not streams, "the generation's stream, then the spare"
        assert backend._spare is not None
    finally:
        backend._spare = None
        await backend.close()
