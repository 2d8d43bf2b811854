"""Envoy's OTLP spans as the trace store's records (`services.control.traces`): the
conversion, and the lines an Export appends. No sockets."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

from services.control.traces import (
    BadSpan,
    SpanFile,
    TraceReceiver,
    flat_attributes,
    records_of,
    span_record,
)

TRACE = bytes.fromhex("0af7651916cd43dd8448eb211c80319c")
SPAN = bytes.fromhex("b7ad6b7169203331")
PARENT = bytes.fromhex("00f067aa0ba902b7")
START = 1_764_000_000_123_456_789


def kv(key: str, value: AnyValue) -> KeyValue:
    return KeyValue(key=key, value=value)


def text(value: str) -> AnyValue:
    return AnyValue(string_value=value)


def envoy_span(**fields) -> Span:
    """A span shaped like Envoy's server span for a gRPC call."""
    span = Span(
        trace_id=TRACE,
        span_id=SPAN,
        name="/switchboard.inference.v1.InferenceService/Generate",
        kind=Span.SPAN_KIND_SERVER,
        start_time_unix_nano=START,
        end_time_unix_nano=START + 2_500_000,
        attributes=[
            kv("switchboard.request_id", text("4c1e-rid")),
            kv("http.status_code", text("200")),
            kv("grpc.status_code", text("0")),
        ],
    )
    for name, value in fields.items():
        if isinstance(value, list):
            getattr(span, name).extend(value)
        elif name == "status":
            span.status.CopyFrom(value)
        else:
            setattr(span, name, value)
    return span


def test_a_root_server_span_becomes_the_store_record() -> None:
    record = span_record(envoy_span())

    assert record == {
        "trace_id": "0af7651916cd43dd8448eb211c80319c",
        "span_id": "b7ad6b7169203331",
        "parent_id": None,
        "name": "/switchboard.inference.v1.InferenceService/Generate",
        "kind": "server",
        "service": "envoy",
        "process": "envoy",
        "start_ns": START,
        "end_ns": START + 2_500_000,
        "status": "unset",
        "error": None,
        "attributes": {
            "switchboard.request_id": "4c1e-rid",
            "http.status_code": "200",
            "grpc.status_code": "0",
        },
        "events": [],
        "links": [],
    }
    json.dumps(record)  # a JSON line as it is


def test_a_child_span_names_its_parent_and_its_kind() -> None:
    record = span_record(
        envoy_span(
            parent_span_id=PARENT,
            kind=Span.SPAN_KIND_CLIENT,
            name="async envoy.service.auth.v3.Authorization.Check egress",
        )
    )

    assert record["parent_id"] == "00f067aa0ba902b7"
    assert record["kind"] == "client"


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        (Span.SPAN_KIND_UNSPECIFIED, "internal"),
        (Span.SPAN_KIND_INTERNAL, "internal"),
        (Span.SPAN_KIND_SERVER, "server"),
        (Span.SPAN_KIND_CLIENT, "client"),
        (Span.SPAN_KIND_PRODUCER, "producer"),
        (Span.SPAN_KIND_CONSUMER, "consumer"),
    ],
)
def test_every_span_kind_has_its_word(kind: int, expected: str) -> None:
    assert span_record(envoy_span(kind=kind))["kind"] == expected


def test_an_ok_status_has_no_error() -> None:
    record = span_record(envoy_span(status=Status(code=Status.STATUS_CODE_OK)))
    assert (record["status"], record["error"]) == ("ok", None)


def test_an_error_status_says_its_message() -> None:
    status = Status(code=Status.STATUS_CODE_ERROR, message="upstream reset")
    record = span_record(envoy_span(status=status))
    assert (record["status"], record["error"]) == ("error", "upstream reset")


def test_an_error_without_a_message_says_what_envoy_tagged() -> None:
    """Envoy marks a failed call ERROR with no message; its tags say why."""
    failed = [kv("grpc.status_code", text("14")), kv("grpc.message", text("no healthy upstream"))]
    status = Status(code=Status.STATUS_CODE_ERROR)
    record = span_record(envoy_span(status=status, attributes=failed))
    assert record["error"] == "no healthy upstream"

    unavailable = [kv("http.status_code", text("503")), kv("response_flags", text("UH"))]
    record = span_record(Span(trace_id=TRACE, span_id=SPAN, status=status, attributes=unavailable))
    assert record["error"] == "HTTP status 503"

    bare = span_record(Span(trace_id=TRACE, span_id=SPAN, status=status))
    assert bare["error"] == "error"


def test_attributes_are_flat_and_typed() -> None:
    pairs = [
        kv("s", text("x")),
        kv("b", AnyValue(bool_value=True)),
        kv("i", AnyValue(int_value=-7)),
        kv("d", AnyValue(double_value=0.25)),
        kv("raw", AnyValue(bytes_value=b"\x01\xff")),
        kv("list", AnyValue(array_value=ArrayValue(values=[text("a"), AnyValue(int_value=2)]))),
        kv(
            "peer",
            AnyValue(
                kvlist_value=KeyValueList(
                    values=[kv("port", AnyValue(int_value=80)), kv("host", text("h"))]
                )
            ),
        ),
        kv("empty", AnyValue()),
    ]

    assert flat_attributes(pairs) == {
        "s": "x",
        "b": True,
        "i": -7,
        "d": 0.25,
        "raw": "01ff",
        "list": ["a", 2],
        "peer.port": 80,
        "peer.host": "h",
    }


def test_events_and_links_keep_their_times_ids_and_attributes() -> None:
    span = envoy_span(
        events=[
            Span.Event(
                name="retry", time_unix_nano=START + 5, attributes=[kv("attempt", text("2"))]
            )
        ],
        links=[Span.Link(trace_id=TRACE, span_id=PARENT, attributes=[kv("why", text("x"))])],
    )

    record = span_record(span)

    assert record["events"] == [
        {"name": "retry", "time_ns": START + 5, "attributes": {"attempt": "2"}}
    ]
    assert record["links"] == [
        {
            "trace_id": "0af7651916cd43dd8448eb211c80319c",
            "span_id": "00f067aa0ba902b7",
            "attributes": {"why": "x"},
        }
    ]


@pytest.mark.parametrize(
    "fields",
    [
        {"trace_id": b""},
        {"trace_id": bytes(16)},
        {"trace_id": TRACE[:8]},
        {"span_id": b""},
        {"span_id": SPAN + b"\x00"},
        {"parent_span_id": bytes(8)},
    ],
)
def test_a_span_without_valid_ids_is_refused(fields: dict[str, bytes]) -> None:
    with pytest.raises(BadSpan):
        span_record(envoy_span(**fields))


def export(*spans: Span, service: str | None = "envoy") -> ExportTraceServiceRequest:
    resource_spans = ResourceSpans(scope_spans=[ScopeSpans(spans=spans)])
    if service is not None:
        resource_spans.resource.attributes.append(kv("service.name", text(service)))
    return ExportTraceServiceRequest(resource_spans=[resource_spans])


def test_an_export_is_one_json_line_per_span_and_counts_what_it_refused() -> None:
    lines, rejected, reason = records_of(
        export(envoy_span(), envoy_span(span_id=b""), envoy_span(span_id=PARENT))
    )

    assert [json.loads(line)["span_id"] for line in lines] == [SPAN.hex(), PARENT.hex()]
    assert all(line.endswith("\n") and line.count("\n") == 1 for line in lines)
    assert rejected == 1
    assert "span id" in reason


def test_the_service_is_the_resource_s_and_envoy_without_one() -> None:
    (line,) = records_of(export(envoy_span(), service="edge-b"))[0]
    assert (json.loads(line)["service"], json.loads(line)["process"]) == ("edge-b", "envoy")
    (line,) = records_of(export(envoy_span(), service=None))[0]
    assert json.loads(line)["service"] == "envoy"


def test_the_span_file_appends_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "traces" / "envoy.jsonl"
    path.parent.mkdir()
    path.write_text('{"earlier": 1}\n')
    spans = SpanFile(path)
    try:
        spans.append([])
        spans.append(records_of(export(envoy_span()))[0])
        spans.append(records_of(export(envoy_span(span_id=PARENT)))[0])
    finally:
        spans.close()
        spans.close()

    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records[0] == {"earlier": 1}
    assert [r["span_id"] for r in records[1:]] == [SPAN.hex(), PARENT.hex()]


async def test_the_receiver_writes_each_export_and_reports_refused_spans(tmp_path: Path) -> None:
    path = tmp_path / "traces" / "envoy.jsonl"
    receiver = TraceReceiver(path=path)

    answers = await asyncio.gather(
        receiver.Export(export(envoy_span()), None),  # type: ignore[arg-type]
        receiver.Export(export(envoy_span(span_id=PARENT), envoy_span(trace_id=b"")), None),  # type: ignore[arg-type]
    )
    await receiver.shutdown()
    await receiver.shutdown()

    assert not answers[0].HasField("partial_success")
    assert answers[1].partial_success.rejected_spans == 1
    assert sorted(json.loads(line)["span_id"] for line in path.read_text().splitlines()) == sorted(
        [SPAN.hex(), PARENT.hex()]
    )
