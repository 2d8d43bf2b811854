"""Bytes that are no request message, and page tokens no response gave out: refused as
INVALID_ARGUMENT by the runtime, never UNKNOWN (grpc's answer to a request it cannot
parse) nor INTERNAL. Found by the fuzz tests (tests/integration/test_fuzz.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc.aio import AbortError
from switchboard.admission.v1 import admission_pb2
from switchboard.chat.v1 import chat_pb2

from services.auth.servicer import key_cursor, tenant_cursor
from services.runtime import (
    InvalidArgument,
    Principal,
    _context,
    error_details,
    page_token,
    read_page_token,
)
from services.runtime._interceptors import instrument

GET_SESSION = "/switchboard.chat.v1.ChatService/GetSession"
LIST_POLICIES = "/switchboard.admission.v1.AdmissionService/ListPolicies"
ADMIT_SESSION = "/switchboard.admission.v1.AdmissionService/AdmitSession"
NOT_A_MESSAGE = b"\n\x04abc\x80"  # field 1 (a string) holding invalid UTF-8


class Context:
    """The parts of grpc.aio.ServicerContext the runtime's wrapper uses."""

    def __init__(self, principal: Principal = Principal.TENANT) -> None:
        self._metadata = ((_context.PRINCIPAL_HEADER, principal.header_value),)
        self.status: grpc.Status | None = None

    def invocation_metadata(self) -> Any:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None

    async def abort_with_status(self, status: grpc.Status) -> None:
        self.status = status
        raise AbortError()

    def code(self) -> grpc.StatusCode | None:
        return self.status.code if self.status else None


def refusal(context: Context) -> Any:
    assert context.status is not None, "the call was not refused"

    class Failed(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return context.status.code

        def details(self) -> str:
            return context.status.details

        def trailing_metadata(self) -> Any:
            return context.status.trailing_metadata

    return error_details(Failed())


def unary(method: str, behavior: Any, request_type: Any) -> grpc.RpcMethodHandler:
    """`behavior` as the server registers it: instrumented, reading `request_type`."""
    return instrument(
        method,
        grpc.unary_unary_rpc_method_handler(behavior, request_deserializer=request_type.FromString),
    )


async def test_bytes_that_are_no_message_are_invalid_argument_before_the_handler():
    called = []

    async def behavior(request: Any, context: Any) -> Any:
        called.append(request)
        return chat_pb2.GetSessionResponse()

    handler = unary(GET_SESSION, behavior, chat_pb2.GetSessionRequest)
    request = handler.request_deserializer(NOT_A_MESSAGE)
    context = Context()
    with pytest.raises(AbortError):
        await handler.unary_unary(request, context)
    details = refusal(context)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.error_info.reason == "INVALID_REQUEST"
    assert "switchboard.chat.v1.GetSessionRequest" in details.message
    assert not called
    # a message that parses goes on to the handler
    good = handler.request_deserializer(
        chat_pb2.GetSessionRequest(session_id="s").SerializeToString()
    )
    assert await handler.unary_unary(good, Context()) == chat_pb2.GetSessionResponse()


async def test_a_caller_outside_the_contract_is_told_so_before_its_bytes_are_judged():
    async def behavior(request: Any, context: Any) -> Any:
        raise AssertionError("not reached")

    handler = unary(LIST_POLICIES, behavior, admission_pb2.ListPoliciesRequest)
    context = Context(Principal.TENANT)
    with pytest.raises(AbortError):
        await handler.unary_unary(handler.request_deserializer(b"\xff"), context)
    details = refusal(context)
    assert (details.code, details.error_info.reason) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "PRINCIPAL_NOT_ALLOWED",
    )


async def test_a_stream_ends_invalid_argument_at_its_first_message_that_does_not_parse():
    seen: list[Any] = []

    async def behavior(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        async for request in requests:
            seen.append(request)
            yield admission_pb2.AdmitSessionResponse()

    handler = instrument(
        ADMIT_SESSION,
        grpc.stream_stream_rpc_method_handler(
            behavior, request_deserializer=admission_pb2.AdmitSessionRequest.FromString
        ),
    )
    frames = [
        admission_pb2.AdmitSessionRequest().SerializeToString(),
        b"\xff",
        admission_pb2.AdmitSessionRequest().SerializeToString(),
    ]

    async def stream() -> AsyncIterator[Any]:
        for raw in frames:
            yield handler.request_deserializer(raw)

    context = Context()
    replies = []
    with pytest.raises(AbortError):
        async for reply in handler.stream_stream(stream(), context):
            replies.append(reply)
    assert len(seen) == len(replies) == 1
    assert refusal(context).code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    "token",
    [
        "😀😀😀",  # decodes (non-alphabet characters are skipped) to too few parts
        page_token("only-one-part"),
        "%%%",
        page_token("a", "not a time", "b"),
    ],
)
def test_a_page_token_no_response_gave_out_is_invalid_argument(token):
    def parse(parts: list[str]) -> tuple[str, str, str]:
        from datetime import datetime

        return parts[0], datetime.fromisoformat(parts[1]).isoformat(), parts[2]

    with pytest.raises(InvalidArgument) as refused:
        read_page_token(token, parse, what="ListKeysRequest")
    assert [v.field for v in refused.value.field_violations] == ["page_token"]


def test_a_page_token_given_out_reads_back():
    token = page_token("t", "2026-01-01T00:00:00+00:00", "k")
    assert read_page_token(token, tuple, what="ListKeysRequest") == (
        "t",
        "2026-01-01T00:00:00+00:00",
        "k",
    )
    assert read_page_token("", tuple, what="ListKeysRequest") is None


@pytest.mark.parametrize(
    ("token", "cursor"),
    [
        (page_token("tenant\x00", "2026-01-01T00:00:00+00:00", "0123456789ab"), key_cursor),
        (page_token("tenant\x00"), tenant_cursor),
        (page_token("a", "b"), key_cursor),
        (page_token("a", "b"), tenant_cursor),
    ],
)
def test_a_key_or_tenant_token_that_postgresql_cannot_compare_is_invalid_argument(token, cursor):
    """A NUL reached the key store's query (no stored value has one): INTERNAL before."""
    with pytest.raises(InvalidArgument):
        read_page_token(token, cursor, what="ListKeysRequest")
