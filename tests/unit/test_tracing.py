"""The runtime's tracing: traceparent in and out, the store's records, span ids a later
attempt derives, and a server call's span (through the in-process channel)."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from switchboard.inference.v1 import inference_pb2, inference_service_pb2_grpc

from services.runtime import LocalChannel, NotFound, error_details, propagated_metadata, tracing


@pytest.fixture
def traced(tmp_path: Path):
    """Tracing on, every trace sampled, spans written under tmp_path; off afterwards."""
    tracing.configure_tracing(
        service="unit",
        process="unit-0",
        env={tracing.SAMPLING_ENV: "1", tracing.TRACES_DIR_ENV: str(tmp_path)},
    )
    try:
        yield tmp_path / "unit-0.jsonl"
    finally:
        tracing.configure_tracing(service="unit", process="unit-0", env={})


def records(path: Path) -> list[dict]:
    tracing.flush_traces()
    return [json.loads(line) for line in path.read_text().splitlines()]


TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


def test_a_traceparent_is_parsed_and_a_malformed_one_ignored():
    ctx = tracing.parse_traceparent(f"00-{TRACE}-{PARENT}-01")
    assert ctx is not None and ctx.is_remote and ctx.sampled
    assert f"{ctx.trace_id:032x}" == TRACE and f"{ctx.span_id:016x}" == PARENT
    assert tracing.traceparent(ctx) == f"00-{TRACE}-{PARENT}-01"
    for bad in (
        None,
        "",
        "garbage",
        f"ff-{TRACE}-{PARENT}-01",  # a version the W3C text forbids
        f"00-{'0' * 32}-{PARENT}-01",  # an all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",
        f"00-{TRACE[:-1]}x-{PARENT}-01",
        f"00-{TRACE}-{PARENT[:-2]}-01",
    ):
        assert tracing.parse_traceparent(bad) is None, bad


def test_tracing_is_off_without_a_sampling_and_refuses_a_bad_one():
    tracing.configure_tracing(service="unit", process="unit-0", env={})
    assert not tracing.enabled()
    with tracing.span("nothing") as span:
        assert not span.is_recording()
    assert tracing.inject({}) == {}
    for bad in ("2", "-0.1", "lots"):
        with pytest.raises(ValueError, match="SWITCHBOARD_TRACE_SAMPLING"):
            tracing.configure_tracing(
                service="unit", process="unit-0", env={tracing.SAMPLING_ENV: bad}
            )


def test_spans_are_stored_as_records_with_their_parent_links_and_errors(traced):
    parent = tracing.extract({tracing.TRACEPARENT: f"00-{TRACE}-{PARENT}-01"})
    link = tracing.link_to(int(TRACE, 16), 7, **{"switchboard.attempt": 1})
    with pytest.raises(RuntimeError):
        with tracing.span(
            "outer", parent=parent, attributes={"a": 1, "b": ("x", "y")}, links=[link]
        ) as outer:
            headers = tracing.inject({"Nats-Msg-Id": "m"})
            with tracing.span("inner", kind=tracing.SpanKind.CLIENT):
                pass
            raise RuntimeError("it broke")
    inner, stored = records(traced)
    own = f"{outer.get_span_context().span_id:016x}"
    assert headers == {"Nats-Msg-Id": "m", "traceparent": f"00-{TRACE}-{own}-01"}
    assert stored["trace_id"] == TRACE and stored["parent_id"] == PARENT
    assert stored["name"] == "outer" and stored["kind"] == "internal"
    assert stored["service"] == "unit" and stored["process"] == "unit-0"
    assert stored["status"] == "error" and stored["error"] == "it broke"
    assert stored["attributes"] == {"a": 1, "b": ["x", "y"]}
    assert stored["links"] == [
        {"trace_id": TRACE, "span_id": f"{7:016x}", "attributes": {"switchboard.attempt": 1}}
    ]
    assert stored["end_ns"] >= stored["start_ns"] > 0
    assert inner["parent_id"] == own and inner["kind"] == "client"
    assert inner["status"] == "unset" and inner["error"] is None


def test_a_step_attempts_span_id_is_derived_so_the_next_attempt_can_link_it(traced):
    first = tracing.derived_span_id("task-1", "fetch", 1)
    assert first == tracing.derived_span_id("task-1", "fetch", 1)
    assert first != tracing.derived_span_id("task-1", "fetch", 2)
    with tracing.span("attempt", span_id=first):
        with tracing.span("child") as child:
            pass
    assert child.get_span_context().span_id != first  # only the span asked for takes it
    child_record, attempt = records(traced)
    assert attempt["span_id"] == f"{first:016x}"
    assert child_record["parent_id"] == f"{first:016x}"


def test_a_new_trace_is_a_root_whatever_is_current(traced):
    with tracing.span("stream") as stream:
        with tracing.span("turn", parent=tracing.NEW_TRACE) as turn:
            pass
    assert turn.get_span_context().trace_id != stream.get_span_context().trace_id
    turn_record, _ = records(traced)
    assert turn_record["parent_id"] is None


class _Models(inference_service_pb2_grpc.InferenceServiceServicer):
    """Answers ListModels, or refuses it while `failing`; keeps what it would send on."""

    def __init__(self) -> None:
        self.failing = False
        self.seen: list[list[tuple[str, str]]] = []

    async def ListModels(self, request, context):  # noqa: N802 - gRPC method name
        self.seen.append(propagated_metadata())
        if self.failing:
            raise NotFound("no such thing", reason="MODEL_NOT_FOUND")
        return inference_pb2.ListModelsResponse()


async def test_a_call_is_a_server_span_whose_context_travels_and_whose_error_names_it(traced):
    models = _Models()
    channel = LocalChannel(
        lambda server: inference_service_pb2_grpc.add_InferenceServiceServicer_to_server(
            models, server
        )
    )
    stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
    caller = f"00-{TRACE}-{PARENT}-01"
    await stub.ListModels(
        inference_pb2.ListModelsRequest(),
        metadata=(("traceparent", caller), ("x-request-id", "req-1")),
    )
    models.failing = True
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.ListModels(inference_pb2.ListModelsRequest())
    ok, failed = records(traced)
    assert ok["name"] == "switchboard.inference.v1.InferenceService/ListModels"
    assert ok["kind"] == "server" and ok["trace_id"] == TRACE and ok["parent_id"] == PARENT
    assert ok["attributes"]["switchboard.request_id"] == "req-1"
    assert ok["attributes"]["rpc.grpc.status_code"] == 0
    # what the handler sends on continues its span
    assert ("traceparent", f"00-{TRACE}-{ok['span_id']}-01") in models.seen[0]
    # a call with no request id is known by its trace's id, and so is its error
    assert failed["parent_id"] is None and failed["status"] == "error"
    assert failed["attributes"]["switchboard.request_id"] == failed["trace_id"]
    assert failed["error"] == "NOT_FOUND: no such thing"
    info = error_details(raised.value).error_info
    assert info.metadata["trace_id"] == failed["trace_id"]
    assert info.metadata["request_id"] == failed["trace_id"]
