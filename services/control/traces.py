"""Envoy's spans into the embedded trace store: an OTLP trace receiver on the control
plane's gRPC server.

Envoy's OpenTelemetry tracer exports the spans of the calls it traces over OTLP/gRPC
(`opentelemetry.proto.collector.trace.v1.TraceService/Export`) to the cluster through
which it reaches the control plane, the way it fetches its config. `TraceReceiver`
turns each span into the store's record (`span_record`, the same JSON object every
Switchboard process writes) and appends one line per span to `<traces_dir>/envoy.jsonl`.

The file has one writer, this process: an Export's spans are written as one `write` in
append mode, in a thread (the event loop keeps serving Envoy's ADS stream meanwhile),
one Export at a time, so two batches never interleave and a reader sees whole lines.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

logger = logging.getLogger(__name__)

ENVOY = "envoy"
"""The service and process name of Envoy's spans, and the store's file for them."""

SpanRecord = dict[str, Any]
Attribute = str | int | float | bool | list[Any]

_KINDS = {
    Span.SPAN_KIND_UNSPECIFIED: "internal",
    Span.SPAN_KIND_INTERNAL: "internal",
    Span.SPAN_KIND_SERVER: "server",
    Span.SPAN_KIND_CLIENT: "client",
    Span.SPAN_KIND_PRODUCER: "producer",
    Span.SPAN_KIND_CONSUMER: "consumer",
}
_STATUSES = {
    Status.STATUS_CODE_UNSET: "unset",
    Status.STATUS_CODE_OK: "ok",
    Status.STATUS_CODE_ERROR: "error",
}
_ERROR_TAGS = (
    ("grpc.message", "{}", ("",)),
    ("grpc.status_code", "gRPC status {}", ("", "0")),
    ("http.status_code", "HTTP status {}", ("", "200")),
    ("response_flags", "Envoy response flags {}", ("", "-")),
)
"""Envoy's tags that say why a span failed, most telling first: (key, wording, values
that say nothing)."""
_TRACE_ID_BYTES = 16
_SPAN_ID_BYTES = 8


class BadSpan(ValueError):
    """A span the store cannot hold: its trace or span id is not a valid one."""


def span_record(span: Span, *, service: str = ENVOY, process: str = ENVOY) -> SpanRecord:
    """The trace store's record of one OTLP span.

    Attributes are flattened: a key-value list becomes one attribute per entry
    (`outer.inner`), bytes become hex, arrays lists of such values.

    Raises:
        BadSpan: the trace id is not 16 non-zero bytes, the span id (or a parent's) not 8.
    """
    status = _STATUSES.get(span.status.code, "unset")
    attributes = flat_attributes(span.attributes)
    return {
        "trace_id": _id(span.trace_id, _TRACE_ID_BYTES, "trace id"),
        "span_id": _id(span.span_id, _SPAN_ID_BYTES, "span id"),
        "parent_id": (
            _id(span.parent_span_id, _SPAN_ID_BYTES, "parent span id")
            if span.parent_span_id
            else None
        ),
        "name": span.name,
        "kind": _KINDS.get(span.kind, "internal"),
        "service": service,
        "process": process,
        "start_ns": int(span.start_time_unix_nano),
        "end_ns": int(span.end_time_unix_nano),
        "status": status,
        "error": _error(span.status, attributes) if status == "error" else None,
        "attributes": attributes,
        "events": [
            {
                "name": event.name,
                "time_ns": int(event.time_unix_nano),
                "attributes": flat_attributes(event.attributes),
            }
            for event in span.events
        ],
        "links": [
            {
                "trace_id": _id(link.trace_id, _TRACE_ID_BYTES, "link's trace id"),
                "span_id": _id(link.span_id, _SPAN_ID_BYTES, "link's span id"),
                "attributes": flat_attributes(link.attributes),
            }
            for link in span.links
        ],
    }


def flat_attributes(pairs: Iterable[KeyValue]) -> dict[str, Attribute]:
    """OTLP key-values as one flat mapping (see `span_record`); an empty value is left out."""
    flat: dict[str, Attribute] = {}
    for pair in pairs:
        _flatten(pair.key, pair.value, flat)
    return flat


def records_of(request: trace_service_pb2.ExportTraceServiceRequest) -> tuple[list[str], int, str]:
    """An Export's spans as the store's lines, with how many spans were refused and why
    (the first reason)."""
    lines: list[str] = []
    rejected, reason = 0, ""
    for resource_spans in request.resource_spans:
        resource = flat_attributes(resource_spans.resource.attributes)
        service = resource.get("service.name")
        service = service if isinstance(service, str) and service else ENVOY
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                try:
                    record = span_record(span, service=service)
                except BadSpan as error:
                    rejected += 1
                    reason = reason or str(error)
                    continue
                lines.append(json.dumps(record, separators=(",", ":")) + "\n")
    return lines, rejected, reason


class SpanFile:
    """The store's file of one process's spans, appended to by one writer."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._file: IO[str] | None = None

    def append(self, lines: Iterable[str]) -> None:
        """Appends `lines` (each ending in a newline) in one write; blocking."""
        text = "".join(lines)
        if not text:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        self._file.write(text)
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class TraceReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """`opentelemetry.proto.collector.trace.v1.TraceService`: each Export's spans,
    appended to `path` (module docstring)."""

    def __init__(self, *, path: Path) -> None:
        self._file = SpanFile(path)
        self._lock = asyncio.Lock()

    @property
    def path(self) -> Path:
        return self._file.path

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Serve OTLP trace export on `server`, next to whatever else it serves."""
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, server)

    async def Export(  # noqa: N802 - the gRPC method's name
        self,
        request: trace_service_pb2.ExportTraceServiceRequest,
        context: grpc.aio.ServicerContext,
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        lines, rejected, reason = records_of(request)
        async with self._lock:
            await asyncio.to_thread(self._file.append, lines)
        response = trace_service_pb2.ExportTraceServiceResponse()
        if rejected:
            logger.warning("refused %d span(s) of an OTLP export: %s", rejected, reason)
            response.partial_success.rejected_spans = rejected
            response.partial_success.error_message = reason
        return response

    async def shutdown(self) -> None:
        """Closes the file once the Export writing now (if any) is done; idempotent."""
        async with self._lock:
            self._file.close()


def _id(raw: bytes, size: int, what: str) -> str:
    if len(raw) != size or not any(raw):
        raise BadSpan(f"{what} {raw.hex() or '(empty)'} is not {size} bytes, not all zero")
    return raw.hex()


def _error(status: Status, attributes: Mapping[str, Attribute]) -> str:
    """What went wrong, as well as the span says it: the status's message, else what
    Envoy tags its spans with (the gRPC message or status, the HTTP status, its flags)."""
    if status.message:
        return status.message
    for key, label, fine in _ERROR_TAGS:
        value = attributes.get(key)
        if value is not None and str(value) not in fine:
            return label.format(value)
    return "error"


def _flatten(key: str, value: AnyValue, into: dict[str, Attribute]) -> None:
    if value.HasField("kvlist_value"):
        for pair in value.kvlist_value.values:
            _flatten(f"{key}.{pair.key}", pair.value, into)
        return
    scalar = _value(value)
    if scalar is not None:
        into[key] = scalar


def _value(value: AnyValue) -> Attribute | None:
    which = value.WhichOneof("value")
    if which == "array_value":
        return [v for v in (_value(item) for item in value.array_value.values) if v is not None]
    if which == "kvlist_value":
        flat: dict[str, Attribute] = {}
        _flatten("", value, flat)
        return json.dumps({k.lstrip("."): v for k, v in flat.items()}, sort_keys=True)
    if which == "bytes_value":
        return value.bytes_value.hex()
    if which in ("string_value", "bool_value", "int_value", "double_value"):
        return getattr(value, which)  # type: ignore[no-any-return]
    return None
