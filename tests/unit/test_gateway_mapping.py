"""The gateway's pure mapping: OpenAI request bodies → InferenceService requests, replies
→ OpenAI bodies and SSE events, and errors → OpenAI's JSON error with the gRPC path's
status and reason (also the edge's refusals on `/v1/`). No sockets, no processes."""

from __future__ import annotations

import base64
import json
from datetime import timedelta

import grpc
import numpy as np
import pytest
from envoy.service.auth.v3 import external_auth_pb2
from envoy.type.v3 import http_status_pb2
from switchboard.common.v1 import common_pb2
from switchboard.inference.v1 import inference_pb2 as pb

from services.auth.authz import denied
from services.gateway import chat_call, completion_call, embed_call, responses, sse
from services.gateway import requests as gateway_requests
from services.runtime import (
    FieldViolation,
    InvalidArgument,
    NotFound,
    QuotaViolation,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    http_error,
    invalid,
    validate_request,
)

USER = {"role": "user", "content": "What does Envoy do?"}


def violations(error: pytest.ExceptionInfo[InvalidArgument]) -> dict[str, str]:
    return {v.field: v.description for v in error.value.field_violations}


# -- requests ------------------------------------------------------------------------------


def test_the_last_user_message_is_the_prompt_and_the_others_are_passages() -> None:
    call = chat_call(
        {
            "model": "auto",
            "messages": [
                {"role": "system", "content": "Envoy is a proxy."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]},
                {"role": "assistant", "content": None, "tool_calls": []},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What does"},
                        {"type": "text", "text": "Envoy do?"},
                    ],
                },
            ],
        }
    )
    request = call.request
    assert request.prompt == "What does\nEnvoy do?"
    assert [(p.source_id, p.text) for p in request.context] == [
        ("messages[0]", "Envoy is a proxy."),
        ("messages[1]", "Hi"),
        ("messages[2]", "Hello."),
    ]
    assert request.model == "" and request.tier == common_pb2.MODEL_TIER_UNSPECIFIED
    assert not call.stream and not request.report_queue_position
    validate_request(request)  # what the gateway sends meets the contract


@pytest.mark.parametrize(
    ("model", "name", "tier"),
    [
        (None, "", common_pb2.MODEL_TIER_UNSPECIFIED),
        ("auto", "", common_pb2.MODEL_TIER_UNSPECIFIED),
        ("small", "", common_pb2.MODEL_TIER_SMALL),
        ("large", "", common_pb2.MODEL_TIER_LARGE),
        ("generator_large", "generator_large", common_pb2.MODEL_TIER_UNSPECIFIED),
    ],
)
def test_model_names_a_model_a_tier_or_auto(model, name, tier) -> None:
    body = {"messages": [USER], **({"model": model} if model else {})}
    request = chat_call(body).request
    assert (request.model, request.tier) == (name, tier)


def test_sampling_streaming_and_affinity_fields() -> None:
    call = chat_call(
        {
            "messages": [USER],
            "max_tokens": 7,
            "max_completion_tokens": 9,
            "temperature": 1,
            "stream": True,
            "stream_options": {"include_usage": True},
            "user": "alice",
            "n": 1,
            "top_p": 0.5,  # accepted and ignored
        }
    )
    assert call.request.parameters.max_tokens == 9  # the newer name wins
    assert call.request.parameters.temperature == 1.0
    assert call.stream and call.include_usage and call.request.report_queue_position
    assert call.request.session_id == "alice"
    assert chat_call(
        {"messages": [USER], "user": "alice"}, session_id="s-1"
    ).request.session_id == ("s-1")


def test_stop_is_one_sequence_or_several() -> None:
    def stops(value: object) -> list[str]:
        return list(chat_call({"messages": [USER], "stop": value}).request.parameters.stop)

    assert stops("\nUser:") == ["\nUser:"]
    assert stops(["END", "###"]) == ["END", "###"]
    assert stops(None) == []
    assert completion_call({"prompt": "hi", "stop": "."}).request.parameters.stop == ["."]


def test_only_the_system_messages_and_the_most_recent_others_fit_the_passages() -> None:
    turns = [{"role": "user" if i % 2 else "assistant", "content": f"turn {i}"} for i in range(100)]
    messages = [{"role": "system", "content": "rules"}, *turns, USER]
    context = chat_call({"messages": messages}).request.context
    assert len(context) == gateway_requests.MAX_PASSAGES
    assert context[0].text == "rules" and context[-1].text == "turn 99"
    assert context[1].text == f"turn {100 - gateway_requests.MAX_PASSAGES + 1}"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ([USER], "body"),
        ({}, "messages"),
        ({"messages": None}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "system", "content": "only rules"}]}, "messages"),
        ({"messages": [{"role": "user", "content": "   "}]}, "messages[0].content"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"messages": ["hi"]}, "messages[0]"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content[0]",
        ),
        ({"messages": [USER], "model": 4}, "model"),
        ({"messages": [USER], "max_tokens": "10"}, "max_tokens"),
        ({"messages": [USER], "max_tokens": 2.5}, "max_tokens"),
        ({"messages": [USER], "max_tokens": True}, "max_tokens"),
        ({"messages": [USER], "max_tokens": 2**40}, "max_tokens"),
        ({"messages": [USER], "temperature": "hot"}, "temperature"),
        ({"messages": [USER], "stream": "yes"}, "stream"),
        (
            {"messages": [USER], "stream_options": {"include_usage": 1}},
            "stream_options.include_usage",
        ),
        ({"messages": [USER], "n": 2}, "n"),
        ({"messages": [USER], "user": ["alice"]}, "user"),
        ({"messages": [USER], "stop": 3}, "stop"),
        ({"messages": [USER], "stop": ["END", 3]}, "stop"),
    ],
)
def test_malformed_chat_requests_name_the_parameter(body, field) -> None:
    with pytest.raises(InvalidArgument) as error:
        chat_call(body)
    assert field in violations(error)
    assert error.value.reason == "INVALID_REQUEST"


def test_every_violation_is_reported_at_once() -> None:
    with pytest.raises(InvalidArgument) as error:
        chat_call({"messages": [], "max_tokens": "x", "temperature": False})
    assert set(violations(error)) == {"messages", "max_tokens", "temperature"}


def test_text_completions_take_one_prompt() -> None:
    call = completion_call({"prompt": ["Say hi"], "model": "small", "max_tokens": 3})
    assert call.request.prompt == "Say hi" and not call.request.context
    assert call.request.tier == common_pb2.MODEL_TIER_SMALL
    for body, field in [
        ({}, "prompt"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": 1}, "prompt"),
    ]:
        with pytest.raises(InvalidArgument) as error:
            completion_call(body)
        assert field in violations(error)


def test_embeddings_take_text_and_say_how_to_encode() -> None:
    call = embed_call({"input": "a cat", "model": "embedder", "encoding_format": "base64"})
    assert list(call.request.texts) == ["a cat"] and call.request.model == "embedder"
    assert call.base64 and call.dimensions is None
    many = embed_call({"input": ["a", "b"], "dimensions": 384})
    assert list(many.request.texts) == ["a", "b"] and many.request.model == ""
    assert not many.base64 and many.dimensions == 384
    for body, field in [
        ({}, "input"),
        ({"input": []}, "input"),
        ({"input": [[1, 2, 3]]}, "input"),
        ({"input": [1, 2]}, "input"),
        ({"input": {"text": "a"}}, "input"),
        ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "a", "dimensions": "384"}, "dimensions"),
    ]:
        with pytest.raises(InvalidArgument) as error:
            embed_call(body)
        assert field in violations(error), body


def test_the_contracts_field_paths_are_named_as_request_parameters() -> None:
    chat = gateway_requests.param_names("messages")
    assert chat("prompt") == "messages"
    assert chat("context[3].text") == "messages"
    assert chat("parameters.max_tokens") == "max_tokens"
    assert chat("parameters.temperature") == "temperature"
    assert chat("parameters.stop[4]") == "stop"
    assert chat("session_id") == "user"
    assert chat("texts[2]") == "input"
    assert chat("messages[0].content") == "messages[0].content"  # already a parameter
    assert gateway_requests.param_names("prompt")("prompt") == "prompt"


# -- responses -----------------------------------------------------------------------------


def complete(finish_reason: int = pb.FINISH_REASON_STOP) -> pb.GenerationComplete:
    return pb.GenerationComplete(
        usage=common_pb2.TokenUsage(prompt_tokens=12, completion_tokens=3, total_tokens=15),
        model=common_pb2.ModelRef(name="generator_small", tier=common_pb2.MODEL_TIER_SMALL),
        backend="triton-0",
        finish_reason=finish_reason,
        citations=[common_pb2.Citation(passage_index=0, source_id="messages[0]", text="Envoy.")],
    )


COMPLETION = responses.Completion(id="chatcmpl-r1", created=1700000000, model="auto")


def test_a_whole_chat_completion_has_usage_and_provenance() -> None:
    body = responses.ChatShape().whole(COMPLETION, "Envoy routes.", complete())
    assert body["object"] == "chat.completion" and body["id"] == "chatcmpl-r1"
    assert body["model"] == "generator_small"
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": "Envoy routes.", "refusal": None}
    assert choice["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
    extra = body["switchboard"]
    assert (extra["model"], extra["tier"], extra["backend"]) == (
        "generator_small",
        "small",
        "triton-0",
    )
    assert extra["citations"][0]["source_id"] == "messages[0]"
    assert responses.provenance_headers(complete()) == {
        "x-switchboard-model": "generator_small",
        "x-switchboard-tier": "small",
        "x-switchboard-backend": "triton-0",
    }


def test_a_chat_stream_is_role_pieces_finish_and_usage() -> None:
    shape = responses.ChatShape()
    first, piece = shape.first(COMPLETION), shape.piece(COMPLETION, "Envoy")
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert piece["object"] == "chat.completion.chunk" and piece["model"] == "auto"
    assert piece["choices"][0] == {
        "index": 0,
        "delta": {"content": "Envoy"},
        "logprobs": None,
        "finish_reason": None,
    }
    last = shape.last(COMPLETION, complete(finish_reason=pb.FINISH_REASON_LENGTH))
    assert last["choices"][0]["finish_reason"] == "length" and last["choices"][0]["delta"] == {}
    assert last["model"] == "generator_small" and last["switchboard"]["backend"] == "triton-0"
    usage = shape.usage_chunk(COMPLETION, complete())
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 15


def test_text_completions_stream_text_pieces() -> None:
    shape = responses.TextShape()
    assert shape.first(COMPLETION) is None
    assert shape.piece(COMPLETION, "hi")["choices"][0]["text"] == "hi"
    whole = shape.whole(COMPLETION, "hi there", complete())
    assert whole["object"] == "text_completion" and whole["choices"][0]["text"] == "hi there"


def test_embeddings_as_floats_or_base64_float32() -> None:
    reply = pb.EmbedResponse(
        embeddings=[pb.Embedding(values=[0.5, -1.0]), pb.Embedding(values=[0.25, 2.0])],
        model="embedder",
        dimensions=2,
        usage=common_pb2.TokenUsage(prompt_tokens=4, total_tokens=4),
    )
    floats = responses.embeddings(reply, as_base64=False)
    assert [d["embedding"] for d in floats["data"]] == [[0.5, -1.0], [0.25, 2.0]]
    assert [d["index"] for d in floats["data"]] == [0, 1]
    assert floats["usage"] == {"prompt_tokens": 4, "total_tokens": 4}
    encoded = responses.embeddings(reply, as_base64=True)["data"][1]["embedding"]
    assert np.frombuffer(base64.b64decode(encoded), dtype="<f4").tolist() == [0.25, 2.0]


def test_models_list_with_their_routing_attributes() -> None:
    reply = pb.ListModelsResponse(
        models=[
            pb.ModelInfo(
                name="generator_small",
                tier=common_pb2.MODEL_TIER_SMALL,
                kind=pb.MODEL_KIND_GENERATOR,
                context_tokens=2048,
                healthy=True,
            )
        ]
    )
    (model,) = responses.models(reply)["data"]
    assert (model["id"], model["object"], model["owned_by"]) == (
        "generator_small",
        "model",
        "switchboard",
    )
    assert model["switchboard"]["tier"] == "small" and model["switchboard"]["kind"] == "generator"


def test_sse_framing() -> None:
    assert sse.event({"a": "line\nbreak"}) == b'data: {"a":"line\\nbreak"}\n\n'
    assert sse.queue_position(3) == b": queue position 3\n\n"
    assert sse.comment("one\ntwo") == b": one\n: two\n\n"
    assert sse.DONE == b"data: [DONE]\n\n"


# -- errors --------------------------------------------------------------------------------


def answer(error) -> tuple[int, dict, dict]:
    mapped = http_error(error.to_rpc_status())
    return mapped.status, dict(mapped.body["error"]), dict(mapped.headers)


def test_invalid_requests_are_400_naming_the_parameter() -> None:
    status, body, headers = answer(invalid([FieldViolation("messages", "must not be empty")]))
    assert status == 400 and headers == {}
    assert body["type"] == "invalid_request_error" and body["code"] == "INVALID_REQUEST"
    assert body["param"] == "messages" and "messages: must not be empty" in body["message"]
    renamed = http_error(
        invalid([FieldViolation("parameters.max_tokens", "at most 4096")]).to_rpc_status(),
        param=gateway_requests.param_names("messages"),
    )
    assert renamed.body["error"]["param"] == "max_tokens"


def test_refusals_are_429_with_retry_after_and_oversized_bodies_413() -> None:
    refusal = ResourceExhausted(
        "over quota",
        reason="QUOTA_EXCEEDED",
        quota_violations=[QuotaViolation("requests_per_second", "10/s")],
        retry_after=timedelta(milliseconds=1200),
    )
    status, body, headers = answer(refusal)
    assert (status, body["type"], body["code"]) == (429, "rate_limit_error", "QUOTA_EXCEEDED")
    assert headers == {"Retry-After": "2"}
    status, body, headers = answer(
        ResourceExhausted("too big", reason="MESSAGE_TOO_LARGE", retry_after=timedelta(seconds=1))
    )
    assert (status, body["code"], headers) == (413, "MESSAGE_TOO_LARGE", {})


@pytest.mark.parametrize(
    ("error", "status", "kind"),
    [
        (NotFound("no model", reason="MODEL_NOT_FOUND"), 404, "invalid_request_error"),
        (Unauthenticated("no key", reason="API_KEY_MISSING"), 401, "authentication_error"),
        (
            Unavailable("down", reason="DEPENDENCY_UNAVAILABLE", retry_after=timedelta(seconds=1)),
            503,
            "server_error",
        ),
    ],
)
def test_other_statuses(error, status, kind) -> None:
    got, body, _ = answer(error)
    assert (got, body["type"], body["code"]) == (status, kind, error.reason)


def test_a_status_without_details_is_named_by_its_code() -> None:
    from google.rpc import status_pb2

    bare = http_error(status_pb2.Status(code=grpc.StatusCode.DEADLINE_EXCEEDED.value[0]))
    assert bare.status == 504 and bare.body["error"]["code"] == "DEADLINE_EXCEEDED"


def test_the_edge_refuses_the_http_api_in_its_json_shape() -> None:
    error = Unauthenticated("the API key is not valid", reason="API_KEY_INVALID")
    reply: external_auth_pb2.CheckResponse = denied(
        error, http_status_pb2.Unauthorized, "/v1/chat/completions"
    )
    response = reply.denied_response
    assert response.status.code == 401
    assert json.loads(response.body) == {
        "error": {
            "message": "the API key is not valid",
            "type": "authentication_error",
            "param": None,
            "code": "API_KEY_INVALID",
        }
    }
    headers = {h.header.key: h.header.value for h in response.headers}
    assert headers["content-type"] == "application/json" and "grpc-status" not in headers
    grpc_reply = denied(
        error, http_status_pb2.Unauthorized, "/switchboard.rag.v1.RagService/Retrieve"
    )
    grpc_headers = {h.header.key: h.header.value for h in grpc_reply.denied_response.headers}
    assert grpc_headers["grpc-status"] == "16" and not grpc_reply.denied_response.body
