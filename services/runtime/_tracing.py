"""Traces: OpenTelemetry spans of every call and of the work behind it.

Each process writes its finished spans, one JSON object per line, to
`<SWITCHBOARD_TRACES_DIR>/<process>.jsonl` (the embedded store `switchboard trace`
reads), and sends them to an OpenTelemetry collector too when
`OTEL_EXPORTER_OTLP_ENDPOINT` is set (the SDK's OTLP/gRPC exporter).
`SWITCHBOARD_TRACE_SAMPLING` (0..1) is the share of new traces sampled; a call that
arrives with a W3C `traceparent` follows its caller's decision, and an unsampled trace's
context still travels (flag 00). Without the variable, or at 0, tracing is off and costs
one test per call.

Spans are this module's own, not the OpenTelemetry SDK's: the SDK's span costs about
60 µs of CPU to start, fill and end (attribute validation, locks, processors), and at
full sampling a task's dozen spans cost more than its work. Here a span is a slotted
record, ended onto a queue that a background thread writes (and converts to the SDK's
spans only for an OTLP collector). The model is OpenTelemetry's: W3C trace context,
span kinds, attributes, status, links, the semantic conventions' names.

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
import random
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from opentelemetry.trace import SpanKind

logger = logging.getLogger(__name__)

TRACEPARENT = "traceparent"
SAMPLING_ENV = "SWITCHBOARD_TRACE_SAMPLING"
TRACES_DIR_ENV = "SWITCHBOARD_TRACES_DIR"
REQUEST_ID = "switchboard.request_id"
FLUSH_EVERY_S = 0.5
FLUSH_AT = 512
"""Finished spans wait at most FLUSH_EVERY_S, or until this many are queued."""
MAX_QUEUED = 20_000
"""Spans beyond this many unwritten ones are dropped (counted), never the calls."""

_KINDS = {
    SpanKind.SERVER: "server",
    SpanKind.CLIENT: "client",
    SpanKind.INTERNAL: "internal",
    SpanKind.PRODUCER: "producer",
    SpanKind.CONSUMER: "consumer",
}


class SpanContext(NamedTuple):
    """A span's identity as it travels: W3C trace context."""

    trace_id: int
    span_id: int
    sampled: bool = True
    is_remote: bool = False

    @property
    def is_valid(self) -> bool:
        return self.trace_id != 0 and self.span_id != 0


INVALID_CONTEXT = SpanContext(0, 0, False)


@dataclass(frozen=True)
class Link:
    """A link to another span (an earlier attempt's)."""

    context: SpanContext
    attributes: Mapping[str, Any]


class NonRecordingSpan:
    """A span that records nothing: a remote parent, an unsampled span (whose context
    still travels), or INVALID_SPAN while tracing is off."""

    __slots__ = ("_context",)

    def __init__(self, context: SpanContext) -> None:
        self._context = context

    def get_span_context(self) -> SpanContext:
        return self._context

    def is_recording(self) -> bool:
        return False

    def set_attribute(self, key: str, value: Any) -> None:
        pass

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        pass

    def set_error(self, description: str) -> None:
        pass

    def end(self) -> None:
        pass


INVALID_SPAN = NonRecordingSpan(INVALID_CONTEXT)
NEW_TRACE = NonRecordingSpan(INVALID_CONTEXT)
"""As a span's `parent`: the span starts a trace of its own."""


class Span:
    """A recorded span: ended once, then queued for the store (and a collector)."""

    __slots__ = (
        "name",
        "kind",
        "_context",
        "parent_id",
        "start_ns",
        "end_ns",
        "attributes",
        "links",
        "error",
    )

    def __init__(
        self,
        name: str,
        kind: SpanKind,
        context: SpanContext,
        parent_id: int,
        attributes: dict[str, Any],
        links: Sequence[Link],
    ) -> None:
        self.name = name
        self.kind = kind
        self._context = context
        self.parent_id = parent_id
        self.attributes = attributes
        self.links = links
        self.error: str | None = None
        self.end_ns = 0
        self.start_ns = time.time_ns()

    def get_span_context(self) -> SpanContext:
        return self._context

    def is_recording(self) -> bool:
        return self.end_ns == 0

    def set_attribute(self, key: str, value: Any) -> None:
        self.attributes[key] = value

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        self.attributes.update(attributes)

    def set_error(self, description: str) -> None:
        self.error = description

    def end(self) -> None:
        if self.end_ns:
            return
        self.end_ns = time.time_ns()
        if _exporter is not None:
            _exporter.add(self)


AnySpan = Span | NonRecordingSpan


# ---- the store's records, and the thread that writes them --------------------------------


def _value(value: Any) -> Any:
    if isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, list | tuple):
        return [_value(v) for v in value]
    return str(value)


_encode = json.JSONEncoder(default=str, separators=(",", ":")).encode
_LINE = (
    '{"trace_id":"%032x","span_id":"%016x","parent_id":%s,"name":%s,"kind":"%s",'
    '"service":%s,"process":%s,"start_ns":%d,"end_ns":%d,"status":"%s","error":%s,'
    '"attributes":%s,"events":[],"links":%s}\n'
)


def span_line(span: Span, *, service: str, process: str) -> str:
    """`span` as a line of the embedded store (a JSON object; the module's docstring);
    `service` and `process` are given as JSON strings."""
    ctx = span.get_span_context()
    dumps = _encode
    links = (
        dumps(
            [
                {
                    "trace_id": f"{link.context.trace_id:032x}",
                    "span_id": f"{link.context.span_id:016x}",
                    "attributes": dict(link.attributes),
                }
                for link in span.links
            ]
        )
        if span.links
        else "[]"
    )
    return _LINE % (
        ctx.trace_id,
        ctx.span_id,
        f'"{span.parent_id:016x}"' if span.parent_id else "null",
        dumps(span.name),
        _KINDS.get(span.kind, "internal"),
        service,
        process,
        span.start_ns,
        span.end_ns,
        "error" if span.error is not None else "unset",
        dumps(span.error),
        dumps(span.attributes),
        links,
    )


class _Exporter:
    """Finished spans, written in batches by a background thread: JSON lines to `path`
    (when given) and the SDK's OTLP exporter (when given)."""

    def __init__(self, *, service: str, process: str, path: Path | None, otlp: Any | None) -> None:
        self._service = service
        self._process = process
        # as JSON strings, once: they go into every line as they are
        self._names = json.dumps(service), json.dumps(process)
        self._otlp = otlp
        self._file = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a", encoding="utf-8")
        self._queue: deque[Span] = deque()
        self._wake = threading.Event()
        self._stopping = False
        self._lock = threading.Lock()
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="spans", daemon=True)
        self._thread.start()

    def add(self, span: Span) -> None:
        if len(self._queue) >= MAX_QUEUED:
            self.dropped += 1
            return
        self._queue.append(span)
        if len(self._queue) >= FLUSH_AT:
            self._wake.set()

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(FLUSH_EVERY_S)
            self._wake.clear()
            self.flush()

    def flush(self) -> None:
        with self._lock:
            while self._queue:
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), 2048))]
                self._write(batch)

    def _write(self, batch: list[Span]) -> None:
        if self._file is not None:
            lines = "".join(
                span_line(s, service=self._names[0], process=self._names[1]) for s in batch
            )
            try:
                self._file.write(lines)
                self._file.flush()
            except OSError:  # a full disk loses spans, never the calls
                logger.warning("cannot write spans", exc_info=True)
        if self._otlp is not None:
            try:
                self._otlp.export([_sdk_span(s, self._resource) for s in batch])
            except Exception:  # noqa: BLE001 - a collector's failure loses spans only
                logger.warning("cannot export spans to the collector", exc_info=True)

    @property
    def _resource(self) -> Any:
        from opentelemetry.sdk.resources import Resource

        return Resource.create(
            {"service.name": self._service, "service.instance.id": self._process}
        )

    def close(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=5)
        self.flush()
        if self._file is not None:
            self._file.close()
        if self._otlp is not None:
            self._otlp.shutdown()


def _sdk_span(span: Span, resource: Any) -> Any:
    """`span` as the SDK's ReadableSpan, for its OTLP exporter."""
    from opentelemetry import trace as api
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.trace import Status, StatusCode

    def context(ctx: SpanContext) -> api.SpanContext:
        return api.SpanContext(
            ctx.trace_id, ctx.span_id, ctx.is_remote, api.TraceFlags(1 if ctx.sampled else 0)
        )

    ctx = span.get_span_context()
    parent = SpanContext(ctx.trace_id, span.parent_id) if span.parent_id else None
    return ReadableSpan(
        name=span.name,
        context=context(ctx),
        parent=context(parent) if parent else None,
        resource=resource,
        attributes={k: _value(v) for k, v in span.attributes.items()},
        links=[api.Link(context(link.context), dict(link.attributes)) for link in span.links],
        kind=span.kind,
        status=Status(StatusCode.ERROR, span.error) if span.error is not None else Status(),
        start_time=span.start_ns,
        end_time=span.end_ns,
    )


# ---- setup -------------------------------------------------------------------------------

_sampling = 0.0
"""The share of new traces sampled; 0 while tracing is off."""
_exporter: _Exporter | None = None


def enabled() -> bool:
    return _sampling > 0


def configure_tracing(*, service: str, process: str, env: Mapping[str, str] | None = None) -> None:
    """Starts this process's tracing from the environment (see the module's docstring);
    leaves it off when the sampling is 0 or unset."""
    global _sampling, _exporter
    env = os.environ if env is None else env
    try:
        sampling = float(env.get(SAMPLING_ENV, "0") or 0)
    except ValueError:
        raise ValueError(f"{SAMPLING_ENV} must be a number within 0..1") from None
    if not 0 <= sampling <= 1:
        raise ValueError(f"{SAMPLING_ENV} must be within 0..1")
    if _exporter is not None:
        _exporter.close()
    _sampling, _exporter = 0.0, None
    if sampling == 0:
        return
    directory = env.get(TRACES_DIR_ENV)
    collector = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    otlp = None
    if collector:  # OTLP over gRPC; the exporter reads the other OTEL_EXPORTER_OTLP_* itself
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        otlp = OTLPSpanExporter(endpoint=collector)
    _exporter = _Exporter(
        service=service,
        process=process,
        path=Path(directory) / f"{process}.jsonl" if directory else None,
        otlp=otlp,
    )
    _sampling = sampling


def flush_traces() -> None:
    """Writes (and exports) the spans still queued (before the process exits)."""
    if _exporter is not None:
        _exporter.flush()


# ---- the current span ----------------------------------------------------------------------

_current: contextvars.ContextVar[AnySpan] = contextvars.ContextVar(
    "current_span", default=INVALID_SPAN
)


def current_span(context: AnySpan | None = None) -> AnySpan:
    """The current span (or `context`, as `extract` made it; a non-recording one outside
    a trace): for attributes, and its context."""
    return _current.get() if context is None else context


def in_trace() -> bool:
    """Whether the current span is recorded (a sampled trace is under way)."""
    return _current.get().is_recording()


def trace_id_of(span: AnySpan) -> str:
    """`span`'s trace id in hex ("" for an invalid span)."""
    ctx = span.get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else ""


def current_trace_id() -> str:
    """The current trace's id in hex, or "" outside one."""
    return trace_id_of(_current.get())


def activate(span: AnySpan) -> contextvars.Token[AnySpan] | None:
    """Makes `span` the current one; returns the token `deactivate` takes."""
    if span is INVALID_SPAN:
        return None
    return _current.set(span)


def deactivate(token: contextvars.Token[AnySpan] | None) -> None:
    """Undoes `activate` (quietly, when the context it was made in is gone: a stream
    finished from another task)."""
    if token is None:
        return
    try:
        _current.reset(token)
    except ValueError:
        pass


@contextmanager
def attached(context: AnySpan | None) -> Iterator[None]:
    """`context` (one `extract` made) is the current one inside the block: what the block
    sends on carries its trace."""
    token = activate(context) if context is not None and _sampling else None
    try:
        yield
    finally:
        deactivate(token)


# ---- propagation ---------------------------------------------------------------------------


def traceparent(span_context: SpanContext | None = None) -> str | None:
    """The W3C `traceparent` of `span_context` (the current span's by default), or None
    without a valid one."""
    ctx = span_context or _current.get().get_span_context()
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{'01' if ctx.sampled else '00'}"


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
    return SpanContext(trace_id, span_id, bool(flags & 1), True)


def inject(headers: dict[str, str]) -> dict[str, str]:
    """`headers` with the current span's `traceparent` (when there is one)."""
    if _sampling and (value := traceparent()) is not None:
        headers[TRACEPARENT] = value
    return headers


def extract(headers: Mapping[str, str] | None) -> NonRecordingSpan | None:
    """The remote parent `headers`' traceparent names (as a span's `parent`), or None."""
    remote = parse_traceparent((headers or {}).get(TRACEPARENT))
    return None if remote is None else NonRecordingSpan(remote)


# ---- spans ----------------------------------------------------------------------------------


def derived_span_id(*parts: object) -> int:
    """A span id that is a function of `parts`: the span of a step's attempt n is known
    to attempt n+1 (which links to it) without being stored anywhere."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") or 1


def link_to(trace_id: int, span_id: int, **attributes: Any) -> Link:
    """A link to a span (an earlier attempt's) by its ids."""
    return Link(SpanContext(trace_id, span_id, True, True), attributes)


_random = random.Random()


def start_span(
    name: str,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    parent: AnySpan | None = None,
    attributes: Mapping[str, Any] | None = None,
    links: Sequence[Link] = (),
    span_id: int | None = None,
) -> AnySpan:
    """A started span (INVALID_SPAN while tracing is off): a child of `parent` (a span,
    `extract`'s remote parent, or NEW_TRACE), or of the current span. The caller ends
    it. A new trace is sampled at the configured share; a child follows its parent."""
    if not _sampling:
        return INVALID_SPAN
    above = (parent if parent is not None else _current.get()).get_span_context()
    own = span_id or _random.getrandbits(64) or 1
    if above.is_valid:
        ctx = SpanContext(above.trace_id, own, above.sampled)
    else:
        trace_id = _random.getrandbits(128) or 1
        ctx = SpanContext(trace_id, own, _sampling >= 1 or _random.random() < _sampling)
    if not ctx.sampled:
        return NonRecordingSpan(ctx)
    return Span(
        name,
        kind,
        ctx,
        above.span_id if above.is_valid else 0,
        dict(attributes) if attributes else {},
        links,
    )


def fail(span: AnySpan, error: BaseException | str) -> None:
    """Marks `span` failed with `error`'s description."""
    span.set_error(str(error) or type(error).__name__)


@contextmanager
def span(name: str, **options: Any) -> Iterator[AnySpan]:
    """A span around a block (`options` as `start_span` takes them): current inside it,
    failed when the block raises (a cancellation is recorded as such, not as an
    error)."""
    if not _sampling:
        yield INVALID_SPAN
        return
    current = start_span(name, **options)
    token = _current.set(current)
    try:
        yield current
    except BaseException as exc:
        if isinstance(exc, GeneratorExit) or type(exc).__name__ == "CancelledError":
            current.set_attribute("switchboard.cancelled", True)
        else:
            fail(current, exc)
        raise
    finally:
        deactivate(token)
        current.end()
