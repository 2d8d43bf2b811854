"""Traces: OpenTelemetry spans of every call and of the work behind it.

Each process writes its finished spans, one JSON object per line, to
`<SWITCHBOARD_TRACES_DIR>/<process>.jsonl` (the embedded store `switchboard trace`
reads), and to an OpenTelemetry collector too when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
`SWITCHBOARD_TRACE_SAMPLING` (0..1) is the share of new traces sampled; a call that
arrives with a W3C `traceparent` follows its caller's decision. Without the variable, or
at 0, tracing is off and costs one flag test per call.

The context travels as `traceparent`: in gRPC metadata (`propagated_metadata`), HTTP
headers, and JetStream message headers (`inject` / `extract`).

A span record (the store's line):
`{"trace_id", "span_id", "parent_id", "name", "kind", "service", "process", "start_ns",
"end_ns", "status", "error", "attributes", "events", "links"}`.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import (
    INVALID_SPAN,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)

logger = logging.getLogger(__name__)

TRACEPARENT = "traceparent"
SAMPLING_ENV = "SWITCHBOARD_TRACE_SAMPLING"
TRACES_DIR_ENV = "SWITCHBOARD_TRACES_DIR"
REQUEST_ID = "switchboard.request_id"

_KINDS = {
    SpanKind.SERVER: "server",
    SpanKind.CLIENT: "client",
    SpanKind.INTERNAL: "internal",
    SpanKind.PRODUCER: "producer",
    SpanKind.CONSUMER: "consumer",
}

NEW_TRACE = otel_context.Context()
"""As a span's `parent`: the span starts a trace of its own."""

_tracer: trace.Tracer | None = None
"""This process's tracer, or None while tracing is off."""
_provider: TracerProvider | None = None


def enabled() -> bool:
    return _tracer is not None


# ---- the store's records -----------------------------------------------------------------


def _value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def span_record(span: ReadableSpan, *, process: str) -> dict[str, Any]:
    """`span` as a line of the embedded store."""
    ctx = span.context
    parent = span.parent
    status = span.status
    return {
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_id": f"{parent.span_id:016x}" if parent is not None else None,
        "name": span.name,
        "kind": _KINDS.get(span.kind, "internal"),
        "service": span.resource.attributes.get("service.name", ""),
        "process": process,
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": status.status_code.name.lower(),
        "error": status.description if status.status_code is StatusCode.ERROR else None,
        "attributes": {k: _value(v) for k, v in (span.attributes or {}).items()},
        "events": [
            {
                "name": e.name,
                "time_ns": e.timestamp,
                "attributes": {k: _value(v) for k, v in (e.attributes or {}).items()},
            }
            for e in span.events
        ],
        "links": [
            {
                "trace_id": f"{link.context.trace_id:032x}",
                "span_id": f"{link.context.span_id:016x}",
                "attributes": {k: _value(v) for k, v in (link.attributes or {}).items()},
            }
            for link in span.links
        ],
    }


class JsonLinesExporter(SpanExporter):
    """Appends finished spans to one file, a JSON object per line (the batch processor
    calls it from its own thread)."""

    def __init__(self, path: Path, *, process: str) -> None:
        self._path = path
        self._process = process
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8")

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(
            json.dumps(span_record(s, process=self._process), default=str) + "\n" for s in spans
        )
        with self._lock:
            try:
                self._file.write(lines)
                self._file.flush()
            except OSError:  # a full disk loses spans, never the call
                logger.warning("cannot write spans to %s", self._path, exc_info=True)
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            self._file.close()


# ---- span ids a later attempt can name ---------------------------------------------------

_next_span_id: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "next_span_id", default=None
)


class _Ids(RandomIdGenerator):
    """Random ids, except a span id asked for by `derived_span_id` (the next span
    started in that context takes it)."""

    def generate_span_id(self) -> int:
        if (forced := _next_span_id.get()) is not None:
            _next_span_id.set(None)
            return forced
        return super().generate_span_id()


def derived_span_id(*parts: object) -> int:
    """A span id that is a function of `parts`: the span of a step's attempt n is known
    to attempt n+1 (which links to it) without being stored anywhere."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") or 1


# ---- setup -------------------------------------------------------------------------------


def configure_tracing(*, service: str, process: str, env: Mapping[str, str] | None = None) -> None:
    """Starts this process's tracer from the environment (see the module's docstring);
    leaves tracing off when the sampling is 0 or unset."""
    global _tracer, _provider
    env = os.environ if env is None else env
    try:
        sampling = float(env.get(SAMPLING_ENV, "0") or 0)
    except ValueError:
        raise ValueError(f"{SAMPLING_ENV} must be a number within 0..1") from None
    if not 0 <= sampling <= 1:
        raise ValueError(f"{SAMPLING_ENV} must be within 0..1")
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None
    if sampling == 0:
        return
    provider = TracerProvider(
        resource=Resource.create({"service.name": service, "service.instance.id": process}),
        sampler=ParentBased(TraceIdRatioBased(sampling)),
        id_generator=_Ids(),
    )
    if directory := env.get(TRACES_DIR_ENV):
        exporter = JsonLinesExporter(Path(directory) / f"{process}.jsonl", process=process)
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
    collector = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if collector:  # OTLP over gRPC; the exporter reads the other OTEL_EXPORTER_OTLP_* itself
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=collector)))
    _provider = provider
    _tracer = provider.get_tracer("switchboard")


def flush_traces() -> None:
    """Exports the spans still buffered (before the process exits)."""
    if _provider is not None:
        _provider.force_flush(2000)


# ---- propagation ---------------------------------------------------------------------------


def traceparent(span_context: SpanContext | None = None) -> str | None:
    """The W3C `traceparent` of `span_context` (the current span's by default), or None
    without a valid one."""
    ctx = span_context or trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def parse_traceparent(value: str | None) -> SpanContext | None:
    """The remote span context a `traceparent` names, or None when it is absent or
    malformed (a malformed one is ignored, as the W3C text asks)."""
    if not value or len(value) < 55:
        return None
    parts = value.strip().split("-")
    if len(parts) < 4 or parts[0] == "ff" or len(parts[1]) != 32 or len(parts[2]) != 16:
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3][:2], 16)
    except ValueError:
        return None
    if trace_id == 0 or span_id == 0:
        return None
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags & 1))


def inject(headers: dict[str, str]) -> dict[str, str]:
    """`headers` with the current span's `traceparent` (when there is one)."""
    if _tracer is not None and (value := traceparent()) is not None:
        headers[TRACEPARENT] = value
    return headers


def extract(headers: Mapping[str, str] | None) -> otel_context.Context | None:
    """A context whose parent is the span `headers`' traceparent names, or None."""
    remote = parse_traceparent((headers or {}).get(TRACEPARENT))
    if remote is None:
        return None
    return trace.set_span_in_context(NonRecordingSpan(remote))


# ---- spans ----------------------------------------------------------------------------------


def start_span(
    name: str,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    parent: otel_context.Context | None = None,
    attributes: Mapping[str, Any] | None = None,
    links: Sequence[trace.Link] = (),
    span_id: int | None = None,
) -> Span:
    """A started span (INVALID_SPAN while tracing is off): a child of `parent`'s span, or
    of the current one. The caller ends it."""
    if _tracer is None:
        return INVALID_SPAN
    if span_id is not None:
        _next_span_id.set(span_id)
    try:
        return _tracer.start_span(name, parent, kind, attributes, links)
    finally:
        if span_id is not None:
            _next_span_id.set(None)


def activate(span: Span) -> object | None:
    """Makes `span` the current one; returns the token `deactivate` takes."""
    if span is INVALID_SPAN:
        return None
    return otel_context.attach(trace.set_span_in_context(span))


def deactivate(token: object | None) -> None:
    """Undoes `activate` (quietly, when the context it was made in is gone: a stream
    finished from another task)."""
    if token is None:
        return
    try:
        otel_context._RUNTIME_CONTEXT.detach(token)  # type: ignore[arg-type]
    except ValueError:
        pass


@contextmanager
def attached(context: otel_context.Context | None) -> Iterator[None]:
    """`context` (one `extract` made) is the current one inside the block: what the block
    sends on carries its trace."""
    if context is None or _tracer is None:
        yield
        return
    token = otel_context.attach(context)
    try:
        yield
    finally:
        deactivate(token)


def fail(span: Span, error: BaseException | str) -> None:
    """Marks `span` failed with `error`'s description."""
    if span.is_recording():
        span.set_status(Status(StatusCode.ERROR, str(error) or type(error).__name__))


@contextmanager
def span(name: str, **options: Any) -> Iterator[Span]:
    """A span around a block (`options` as `start_span` takes them): current inside it,
    failed when the block raises (a cancellation is recorded as such, not as an
    error)."""
    if _tracer is None:
        yield INVALID_SPAN
        return
    current = start_span(name, **options)
    token = activate(current)
    try:
        yield current
    except BaseException as exc:
        if isinstance(exc, GeneratorExit):
            current.set_attribute("switchboard.cancelled", True)
        elif exc.__class__.__name__ == "CancelledError":
            current.set_attribute("switchboard.cancelled", True)
        else:
            fail(current, exc)
        raise
    finally:
        deactivate(token)
        current.end()


def current_span(context: otel_context.Context | None = None) -> Span:
    """The current span (or `context`'s; a non-recording one while tracing is off): for
    attributes."""
    return trace.get_current_span(context)


def in_trace() -> bool:
    """Whether the current span is recorded (a sampled trace is under way)."""
    return _tracer is not None and trace.get_current_span().is_recording()


def current_trace_id() -> str:
    """The current trace's id in hex, or "" outside one."""
    return trace_id_of(trace.get_current_span())


def link_to(trace_id: int, span_id: int, **attributes: Any) -> trace.Link:
    """A link to a span (an earlier attempt's) by its ids."""
    context = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(1))
    return trace.Link(context, attributes)


def trace_id_of(span: Span) -> str:
    """`span`'s trace id in hex ("" for an invalid span)."""
    ctx = span.get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else ""
