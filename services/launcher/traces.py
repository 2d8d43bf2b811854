"""`switchboard trace`: the embedded trace store's spans as a terminal waterfall.

Every process appends its finished spans as JSON lines to `<run_dir>/traces/*.jsonl`.
`load_spans` reads them all, skipping malformed lines and the partial last line of a
file still being written; `find_traces` picks the traces a trace id or a request id
(`switchboard.request_id`, the `request_id` of an error's `ErrorInfo`) names;
`render_waterfall` draws one trace, `slowest` lists the slowest root spans.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

REQUEST_ID = "switchboard.request_id"
BAR_WIDTH = 30
_ATTRIBUTE_PREFIXES = ("gen_ai.", "switchboard.", "db.", "messaging.")
_ATTRIBUTE_NAMES = frozenset({"rpc.grpc.status_code"})
_VALUE_CHARS = 60
_ERROR = "✗"


@dataclass(frozen=True)
class Link:
    trace_id: str
    span_id: str
    attributes: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Span:
    """One finished span as the store holds it."""

    trace_id: str
    span_id: str
    parent_id: str | None
    name: str
    start_ns: int
    end_ns: int
    kind: str = "internal"
    service: str = ""
    process: str = ""
    status: str = "unset"
    error: str | None = None
    attributes: Mapping[str, Any] = field(default_factory=dict)
    links: tuple[Link, ...] = ()

    @property
    def duration_ns(self) -> int:
        return max(0, self.end_ns - self.start_ns)

    @property
    def request_id(self) -> str | None:
        value = self.attributes.get(REQUEST_ID)
        return value if isinstance(value, str) and value else None

    @property
    def failed(self) -> bool:
        return self.status == "error"


@dataclass(frozen=True)
class SpanStore:
    """What `load_spans` read: the spans, and from how many files and skipped lines."""

    directory: Path
    spans: tuple[Span, ...]
    files: int
    skipped: int

    def by_id(self) -> dict[tuple[str, str], Span]:
        return {(s.trace_id, s.span_id): s for s in self.spans}


@dataclass(frozen=True)
class SpanNode:
    span: Span
    depth: int
    children: tuple[SpanNode, ...]

    def walk(self) -> Iterator[SpanNode]:
        yield self
        for child in self.children:
            yield from child.walk()


def parse_span(line: str) -> Span | None:
    """The span a JSON line holds, or None for a malformed (or partially written) one."""
    try:
        raw = json.loads(line)
    except ValueError:
        return None
    if not isinstance(raw, dict):
        return None
    trace_id, span_id, parent_id = raw.get("trace_id"), raw.get("span_id"), raw.get("parent_id")
    name, start_ns, end_ns = raw.get("name"), raw.get("start_ns"), raw.get("end_ns")
    attributes, links = raw.get("attributes") or {}, raw.get("links") or []
    if not (
        isinstance(trace_id, str)
        and trace_id
        and isinstance(span_id, str)
        and span_id
        and (parent_id is None or isinstance(parent_id, str))
        and isinstance(name, str)
        and _is_int(start_ns)
        and _is_int(end_ns)
        and isinstance(attributes, dict)
        and isinstance(links, list)
    ):
        return None
    parsed_links = tuple(
        Link(
            trace_id=link["trace_id"].lower(),
            span_id=link["span_id"].lower(),
            attributes=link.get("attributes") or {},
        )
        for link in links
        if isinstance(link, dict)
        and isinstance(link.get("trace_id"), str)
        and isinstance(link.get("span_id"), str)
    )
    return Span(
        trace_id=trace_id.lower(),
        span_id=span_id.lower(),
        parent_id=parent_id.lower() if parent_id else None,
        name=name,
        start_ns=start_ns,
        end_ns=end_ns,
        kind=str(raw.get("kind") or "internal"),
        service=str(raw.get("service") or ""),
        process=str(raw.get("process") or ""),
        status=str(raw.get("status") or "unset"),
        error=str(raw["error"]) if raw.get("error") else None,
        attributes=attributes,
        links=parsed_links,
    )


def load_spans(traces_dir: Path) -> SpanStore:
    """Every span in `traces_dir/*.jsonl`; a span written twice is kept once.

    Raises:
        FileNotFoundError: `traces_dir` does not exist.
    """
    if not traces_dir.is_dir():
        raise FileNotFoundError(f"no traces directory {traces_dir}")
    spans: dict[tuple[str, str], Span] = {}
    files = skipped = 0
    for path in sorted(traces_dir.glob("*.jsonl")):
        files += 1
        with path.open(encoding="utf-8", errors="replace") as lines:
            for line in lines:
                if not line.strip():
                    continue
                span = parse_span(line)
                if span is None:
                    skipped += 1
                    continue
                spans.setdefault((span.trace_id, span.span_id), span)
    if skipped:
        logger.debug("skipped %d malformed or partial lines in %s", skipped, traces_dir)
    return SpanStore(
        directory=traces_dir, spans=tuple(spans.values()), files=files, skipped=skipped
    )


def group_traces(spans: Iterable[Span]) -> dict[str, list[Span]]:
    traces: dict[str, list[Span]] = {}
    for span in spans:
        traces.setdefault(span.trace_id, []).append(span)
    return traces


def find_traces(spans: Iterable[Span], ident: str) -> list[list[Span]]:
    """The traces `ident` names: the trace of that id, or every trace a span of which
    carries that request id; earliest first."""
    ident = ident.strip()
    traces = group_traces(spans)
    found = [
        trace
        for trace_id, trace in traces.items()
        if trace_id == ident.lower() or any(s.request_id == ident for s in trace)
    ]
    return sorted(found, key=lambda trace: (min(s.start_ns for s in trace), trace[0].trace_id))


def build_tree(trace: Iterable[Span]) -> list[SpanNode]:
    """The trace's span trees: a span whose parent is missing (or absent from the store)
    is a root; children, like roots, in start order."""
    spans = sorted(trace, key=_start_order)
    ids = {s.span_id for s in spans}
    children: dict[str, list[Span]] = {}
    roots: list[Span] = []
    for span in spans:
        if span.parent_id and span.parent_id in ids and span.parent_id != span.span_id:
            children.setdefault(span.parent_id, []).append(span)
        else:
            roots.append(span)
    placed: set[str] = set()

    def node(span: Span, depth: int) -> SpanNode:
        placed.add(span.span_id)
        kids = [c for c in children.get(span.span_id, []) if c.span_id not in placed]
        return SpanNode(span, depth, tuple(node(c, depth + 1) for c in kids))

    tree = [node(root, 0) for root in roots]
    # Spans whose parents form a cycle hang from no root: show them as roots.
    for span in spans:
        if span.span_id not in placed:
            tree.append(node(span, 0))
    return sorted(tree, key=lambda n: _start_order(n.span))


def render_waterfall(
    trace: Sequence[Span],
    *,
    known: Mapping[tuple[str, str], Span] | None = None,
    width: int = BAR_WIDTH,
) -> list[str]:
    """One trace as text lines: a header, then a line per span in tree order.

    Args:
        trace: the trace's spans.
        known: every stored span by (trace id, span id), to name the targets of links.
        width: the bar's width in characters; the bar spans the trace's whole duration.
    """
    if not trace:
        return []
    tree = build_tree(trace)
    begin = min(s.start_ns for s in trace)
    total = max(s.end_ns for s in trace) - begin
    root = tree[0].span
    request_ids = sorted({s.request_id for s in trace if s.request_id})
    errors = sum(s.failed for s in trace)
    header = (
        f"trace {root.trace_id}  {root.name}  {len(trace)} span{'s' * (len(trace) != 1)}"
        f"  {_ms(total)} ms  {_utc(begin, '%Y-%m-%d %H:%M:%S.%f')[:-3]} UTC"
    )
    if errors:
        header += f"  {_ERROR} {errors} error{'s' * (errors != 1)}"
    lines = [header]
    if request_ids:
        lines.append("request id " + ", ".join(request_ids))
    lines.append(f"{'start ms':>10} {'dur ms':>10}  {'timeline':^{width + 2}}  span")
    for top in tree:
        for node in top.walk():
            span = node.span
            indent = "  " * node.depth
            mark = f"{_ERROR} " if span.failed else ""
            where = f"{span.service}/{span.process}" if span.process else span.service
            attributes = key_attributes(span.attributes)
            text = f"{indent}{mark}{span.name}  [{where}]"
            if attributes:
                text += "  " + " ".join(f"{k}={v}" for k, v in attributes)
            bar = _bar(span.start_ns - begin, span.end_ns - begin, total, width)
            lines.append(
                f"{_ms(span.start_ns - begin):>10} {_ms(span.duration_ns):>10}  |{bar}|  {text}"
            )
            under = " " * (10 + 1 + 10 + 2 + width + 2 + 2) + indent + "  "
            if span.failed:
                lines.append(f"{under}{_ERROR} error: {span.error or '(no description)'}")
            for link in span.links:
                target = (known or {}).get((link.trace_id, link.span_id))
                what = f"{target.name} ({link.span_id})" if target else f"span {link.span_id}"
                lines.append(f"{under}↪ linked to {what} of trace {link.trace_id}")
    return lines


def key_attributes(attributes: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The attributes worth a waterfall's space (gen_ai.*, switchboard.* but the request
    id, rpc.grpc.status_code, db.*, messaging.*), sorted, values shortened."""
    shown = []
    for key in sorted(attributes):
        if key == REQUEST_ID:
            continue
        if key in _ATTRIBUTE_NAMES or key.startswith(_ATTRIBUTE_PREFIXES):
            value = attributes[key]
            text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            text = " ".join(text.split())
            if len(text) > _VALUE_CHARS:
                text = text[: _VALUE_CHARS - 1] + "…"
            shown.append((key, text))
    return shown


def slowest(spans: Iterable[Span], n: int) -> list[str]:
    """The `n` slowest root spans (a chat turn, an RPC no other span called), slowest
    first: trace id, root name, service, duration, start (UTC), and an error mark when
    the root or a span under it failed."""
    rows: list[tuple[SpanNode, bool]] = []
    for trace in group_traces(spans).values():
        for top in build_tree(trace):
            rows.append((top, any(node.span.failed for node in top.walk())))
    rows.sort(key=lambda row: (-row[0].span.duration_ns, row[0].span.start_ns))
    lines = []
    for top, failed in rows[:n]:
        span = top.span
        lines.append(
            f"{span.trace_id}  {_ms(span.duration_ns):>10} ms  {_utc(span.start_ns, '%H:%M:%S')}"
            f"  {span.service:<12} {span.name}" + (f"  {_ERROR} error" if failed else "")
        )
    return lines


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _start_order(span: Span) -> tuple[int, int, str]:
    return (span.start_ns, -span.end_ns, span.span_id)


def _ms(ns: int) -> str:
    return f"{ns / 1e6:.1f}"


def _utc(ns: int, pattern: str) -> str:
    moment = datetime.fromtimestamp(ns // 1_000_000_000, tz=UTC)
    return moment.replace(microsecond=ns // 1000 % 1_000_000).strftime(pattern)


def _bar(start: int, end: int, total: int, width: int) -> str:
    """`width` cells, those the span covers filled (at least one)."""
    if total <= 0:
        first, last = 0, 1
    else:
        first = min(width - 1, math.floor(start * width / total))
        last = max(first + 1, min(width, math.ceil(end * width / total)))
    return " " * first + "█" * (last - first) + " " * (width - last)
