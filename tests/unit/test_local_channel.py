"""In-process calls (`LocalChannel`): a generated stub on it gets what a remote caller
gets — responses, the contract's refusals, statuses with their details, deadlines and
cancellation reaching the handler — with no server and no socket."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from google.rpc import error_details_pb2
from switchboard.inference.v1 import inference_pb2, inference_service_pb2_grpc

from services.runtime import (
    REQUEST_ID_HEADER,
    TENANT_HEADER,
    LocalChannel,
    LocalRpcError,
    NotFound,
    require_tenant,
    status_of,
)
from services.runtime._context import request_id, tenant_id
from tests.polling import eventually

TENANT = (TENANT_HEADER, "acme")


class _Inference(inference_service_pb2_grpc.InferenceServiceServicer):
    """Answers from what the call carried; records how its handlers ended."""

    def __init__(self) -> None:
        self.ended: list[str] = []
        self.entered = asyncio.Event()

    async def Embed(self, request, context):  # noqa: N802 - gRPC method name
        if request.model == "missing":
            raise NotFound("no model named 'missing'", reason="MODEL_NOT_FOUND")
        if request.model == "broken":
            raise KeyError("a bug")
        if request.model == "slow":
            try:
                self.entered.set()
                await asyncio.Event().wait()
            finally:
                self.ended.append("slow")
        return inference_pb2.EmbedResponse(model=f"{require_tenant()}/{request_id.get()}")

    async def Generate(self, request, context) -> AsyncIterator[inference_pb2.GenerateResponse]:  # noqa: N802
        try:
            for index in range(request.parameters.max_tokens):
                yield inference_pb2.GenerateResponse(
                    token=inference_pb2.TokenDelta(text=require_tenant(), index=index)
                )
                if request.prompt == "stall" and index == 0:
                    await asyncio.Event().wait()
        finally:
            self.ended.append(request.prompt)


@pytest.fixture
def servicer() -> _Inference:
    return _Inference()


@pytest.fixture
def stub(servicer: _Inference) -> inference_service_pb2_grpc.InferenceServiceStub:
    def register(server: object) -> None:
        inference_service_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)

    return inference_service_pb2_grpc.InferenceServiceStub(LocalChannel(register))


def _embed(model: str = "") -> inference_pb2.EmbedRequest:
    return inference_pb2.EmbedRequest(texts=["hello"], model=model)


def _generate(prompt: str, tokens: int) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        prompt=prompt, parameters=inference_pb2.GenerationParameters(max_tokens=tokens)
    )


async def test_a_unary_call_runs_with_the_callers_tenant_and_request_id(stub) -> None:
    reply = await stub.Embed(_embed(), metadata=(TENANT, (REQUEST_ID_HEADER, "r-1")))
    assert reply.model == "acme/r-1"
    # the call's context is undone once it returns
    assert tenant_id.get() == "" and request_id.get() != "r-1"


async def test_a_services_error_arrives_as_its_status_with_details(stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Embed(_embed("missing"), metadata=(TENANT,))
    assert isinstance(raised.value, LocalRpcError)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    status = status_of(raised.value)
    (detail,) = status.details
    info = error_details_pb2.ErrorInfo()
    assert detail.Unpack(info) and info.reason == "MODEL_NOT_FOUND"


async def test_a_request_the_contract_refuses_never_reaches_the_handler(stub, servicer) -> None:
    with pytest.raises(LocalRpcError) as raised:
        await stub.Embed(inference_pb2.EmbedRequest(), metadata=(TENANT,))  # no texts
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad_request = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad_request) for d in status_of(raised.value).details)
    assert [v.field for v in bad_request.field_violations] == ["texts"]
    assert servicer.ended == []


async def test_a_bug_in_the_handler_is_internal(stub) -> None:
    with pytest.raises(LocalRpcError) as raised:
        await stub.Embed(_embed("broken"), metadata=(TENANT,))
    assert raised.value.code() == grpc.StatusCode.INTERNAL


async def test_a_deadline_cancels_the_handler(stub, servicer) -> None:
    with pytest.raises(LocalRpcError) as raised:
        await stub.Embed(_embed("slow"), metadata=(TENANT,), timeout=0.05)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert servicer.ended == ["slow"]


async def test_a_stream_yields_every_response_then_ends(stub, servicer) -> None:
    call = stub.Generate(_generate("whole", 3), metadata=(TENANT,))
    replies = [reply async for reply in call]
    assert [(r.token.text, r.token.index) for r in replies] == [(TENANT[1], i) for i in range(3)]
    assert servicer.ended == ["whole"] and call.done()
    assert call.cancel() is False  # nothing left to cancel


async def test_cancelling_a_stream_closes_its_handler(stub, servicer) -> None:
    call = stub.Generate(_generate("cut", 5), metadata=(TENANT,))
    first = await anext(call)
    assert first.token.index == 0
    assert call.cancel() is True
    await eventually(lambda: "cut" in servicer.ended, timeout=5, what="the handler closed")
    with pytest.raises(StopAsyncIteration):
        await anext(call)


async def test_a_stream_past_its_deadline_is_deadline_exceeded(stub, servicer) -> None:
    call = stub.Generate(_generate("stall", 5), metadata=(TENANT,), timeout=0.05)
    assert (await anext(call)).token.index == 0
    with pytest.raises(LocalRpcError) as raised:
        await anext(call)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert servicer.ended == ["stall"]


async def test_a_stream_without_a_tenant_is_refused_by_its_handler(stub) -> None:
    with pytest.raises(LocalRpcError) as raised:
        [reply async for reply in stub.Generate(_generate("anyone", 1))]
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
