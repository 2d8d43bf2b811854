"""`switchboard trace`: the trace store read from JSON-line files written here (no
processes, no network): trees, lookups, skipped lines, the waterfall and the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from services.launcher import cli, traces

T0 = 1_750_000_000_000_000_000  # 2025-06-15 15:06:40 UTC
CHAT = "4bf92f3577b34da6a3ce929d0e0e4736"
TASK = "0af7651916cd43dd8448eb211c80319c"
OTHER = "11111111111111111111111111111111"
BAR = 30
UNDER = " " * (10 + 1 + 10 + 2 + BAR + 2 + 2)
"""Where a span's name column starts: an error or link line is indented from there."""


def record(
    trace_id: str,
    span_id: str,
    parent_id: str | None,
    name: str,
    start_ms: float,
    end_ms: float,
    *,
    service: str = "chat",
    process: str = "chat-0",
    status: str = "ok",
    error: str | None = None,
    attributes: dict[str, Any] | None = None,
    links: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "trace_id": trace_id,
        "span_id": span_id,
        "parent_id": parent_id,
        "name": name,
        "kind": "server",
        "service": service,
        "process": process,
        "start_ns": T0 + int(start_ms * 1_000_000),
        "end_ns": T0 + int(end_ms * 1_000_000),
        "status": status,
        "error": error,
        "attributes": attributes or {},
        "events": [],
        "links": links or [],
    }


def write(path: Path, records: list[dict[str, Any]], tail: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def chat_turn() -> list[dict[str, Any]]:
    """A chat turn of 100 ms: admission, retrieval (with its query), a failed generation."""
    return [
        record(
            CHAT,
            "a1",
            None,
            "chat.turn",
            0,
            100,
            attributes={"switchboard.request_id": "req-1", "switchboard.tenant": "acme"},
        ),
        # written before its parent and its elder sibling, as processes finish them
        record(
            CHAT,
            "a4",
            "a3",
            "SELECT chunks",
            20,
            30,
            service="rag",
            process="rag-0",
            attributes={"db.system": "postgresql", "http.url": "not shown"},
        ),
        record(
            CHAT,
            "a3",
            "a1",
            "rag.v1.RagService/Retrieve",
            10,
            40,
            service="rag",
            process="rag-0",
            attributes={"rpc.grpc.status_code": 0},
        ),
        record(
            CHAT,
            "a5",
            "a1",
            "inference.v1.InferenceService/Generate",
            40,
            100,
            service="inference",
            process="inference-0",
            status="error",
            error="UNAVAILABLE: triton-1 connection reset",
            attributes={"gen_ai.request.model": "tiny-llm", "rpc.grpc.status_code": 14},
        ),
        record(
            CHAT,
            "a2",
            "a1",
            "admission.v1.AdmissionService/Admit",
            0,
            5,
            service="admission",
            process="admission-1",
            attributes={"switchboard.request_id": "req-1"},
        ),
    ]


def task() -> list[dict[str, Any]]:
    """A task of 20 ms whose redelivered step links the earlier attempt's span."""
    return [
        record(
            TASK,
            "b1",
            None,
            "execution.v1.ExecutionService/SubmitTask",
            500,
            520,
            service="execution",
            process="execution-0",
        ),
        record(
            TASK,
            "b2",
            "b1",
            "execution.step",
            505,
            515,
            service="worker",
            process="worker-0",
            links=[
                {"trace_id": CHAT, "span_id": "a3", "attributes": {}},
                {"trace_id": OTHER, "span_id": "ff", "attributes": {}},
            ],
        ),
    ]


def row(start: str, duration: str, first: int, last: int, text: str) -> str:
    """A waterfall line: its bar fills cells first..last-1 of BAR."""
    bar = " " * first + "█" * (last - first) + " " * (BAR - last)
    return f"{start:>10} {duration:>10}  |{bar}|  {text}"


def shape(nodes: list[traces.SpanNode]) -> list[tuple[int, str]]:
    return [(n.depth, n.span.span_id) for top in nodes for n in top.walk()]


def spans_of(records: list[dict[str, Any]]) -> list[traces.Span]:
    spans = [traces.parse_span(json.dumps(r)) for r in records]
    assert None not in spans
    return spans  # type: ignore[return-value]


def test_tree_nests_children_in_start_order() -> None:
    tree = traces.build_tree(spans_of(chat_turn()))

    assert shape(tree) == [(0, "a1"), (1, "a2"), (1, "a3"), (2, "a4"), (1, "a5")]


def test_a_span_whose_parent_is_not_stored_is_a_root() -> None:
    spans = spans_of(
        [
            record(CHAT, "c2", "c1", "late", 50, 60),
            record(CHAT, "e1", "not-stored", "envoy ingress", 10, 70, service="envoy"),
            record(CHAT, "e2", "e1", "upstream", 20, 30),
        ]
    )

    assert shape(traces.build_tree(spans)) == [(0, "e1"), (1, "e2"), (0, "c2")]


def test_lookup_by_trace_id_and_by_request_id(tmp_path: Path) -> None:
    second_turn = record(
        OTHER, "d1", None, "chat.turn", 900, 950, attributes={"switchboard.request_id": "req-1"}
    )
    write(tmp_path / "chat-0.jsonl", chat_turn()[:2] + task())
    write(tmp_path / "rag-0.jsonl", chat_turn()[2:] + [second_turn])
    spans = traces.load_spans(tmp_path).spans

    by_id = traces.find_traces(spans, CHAT.upper())
    assert [sorted(s.span_id for s in t) for t in by_id] == [["a1", "a2", "a3", "a4", "a5"]]
    by_request = traces.find_traces(spans, "req-1")
    assert [t[0].trace_id for t in by_request] == [CHAT, OTHER]  # earliest first
    assert traces.find_traces(spans, "req-2") == []


def test_partial_and_malformed_lines_are_skipped(tmp_path: Path) -> None:
    good = chat_turn()
    no_trace_id = dict(good[0], trace_id=None)
    bool_start = dict(good[0], span_id="zz", start_ns=True)
    write(
        tmp_path / "traces" / "chat-0.jsonl",
        good[:3],
        tail="not json\n[1, 2]\n\n"
        + json.dumps(no_trace_id)
        + "\n"
        + json.dumps(bool_start)
        + "\n"
        + json.dumps(good[3])[:40],  # the line being written
    )
    write(tmp_path / "traces" / "inference-0.jsonl", good[3:] + good[:1])  # a1 twice
    (tmp_path / "traces" / "notes.txt").write_text("not a trace file")

    store = traces.load_spans(tmp_path / "traces")

    assert sorted(s.span_id for s in store.spans) == ["a1", "a2", "a3", "a4", "a5"]
    assert (store.files, store.skipped) == (2, 5)


def test_missing_directory_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        traces.load_spans(tmp_path / "traces")


def test_waterfall_draws_depth_offsets_bars_attributes_and_errors() -> None:
    lines = traces.render_waterfall(spans_of(chat_turn()))

    assert lines == [
        f"trace {CHAT}  chat.turn  5 spans  100.0 ms  2025-06-15 15:06:40.000 UTC  ✗ 1 error",
        "request id req-1",
        "  start ms     dur ms  " + " " * 12 + "timeline" + " " * 12 + "  span",
        row("0.0", "100.0", 0, 30, "chat.turn  [chat/chat-0]  switchboard.tenant=acme"),
        row("0.0", "5.0", 0, 2, "  admission.v1.AdmissionService/Admit  [admission/admission-1]"),
        row(
            "10.0",
            "30.0",
            3,
            12,
            "  rag.v1.RagService/Retrieve  [rag/rag-0]  rpc.grpc.status_code=0",
        ),
        row("20.0", "10.0", 6, 9, "    SELECT chunks  [rag/rag-0]  db.system=postgresql"),
        row(
            "40.0",
            "60.0",
            12,
            30,
            "  ✗ inference.v1.InferenceService/Generate  [inference/inference-0]"
            "  gen_ai.request.model=tiny-llm rpc.grpc.status_code=14",
        ),
        UNDER + "    ✗ error: UNAVAILABLE: triton-1 connection reset",
    ]


def test_links_name_the_earlier_span_when_it_is_stored() -> None:
    spans = spans_of(chat_turn() + task())
    known = {(s.trace_id, s.span_id): s for s in spans}
    under = UNDER + "    "

    lines = traces.render_waterfall([s for s in spans if s.trace_id == TASK], known=known)

    assert lines[0] == (
        f"trace {TASK}  execution.v1.ExecutionService/SubmitTask  2 spans  20.0 ms"
        "  2025-06-15 15:06:40.500 UTC"
    )
    assert lines[3:] == [
        row("5.0", "10.0", 7, 23, "  execution.step  [worker/worker-0]"),
        f"{under}↪ linked to rag.v1.RagService/Retrieve (a3) of trace {CHAT}",
        f"{under}↪ linked to span ff of trace {OTHER}",
    ]


def test_key_attributes_are_a_short_whitelist() -> None:
    attributes = {
        "switchboard.request_id": "req-1",
        "switchboard.tenant": "acme",
        "gen_ai.usage.output_tokens": 57,
        "messaging.destination.name": "tasks.steps",
        "db.statement": "SELECT  id,\n text FROM chunks WHERE " + "x" * 80,
        "rpc.grpc.status_code": 0,
        "rpc.method": "Generate",
        "net.peer.port": 7051,
    }

    assert traces.key_attributes(attributes) == [
        ("db.statement", "SELECT id, text FROM chunks WHERE " + "x" * 25 + "…"),
        ("gen_ai.usage.output_tokens", "57"),
        ("messaging.destination.name", "tasks.steps"),
        ("rpc.grpc.status_code", "0"),
        ("switchboard.tenant", "acme"),
    ]


def test_slowest_lists_root_spans_by_duration_with_a_limit() -> None:
    quick = record(OTHER, "d1", None, "chat.turn", 900, 901, service="chat")
    spans = spans_of(chat_turn() + task() + [quick])

    assert traces.slowest(spans, 2) == [
        f"{CHAT}       100.0 ms  15:06:40  chat         chat.turn  ✗ error",
        f"{TASK}        20.0 ms  15:06:40  execution    execution.v1.ExecutionService/SubmitTask",
    ]
    assert [line[:32] for line in traces.slowest(spans, 10)] == [CHAT, TASK, OTHER]


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SWITCHBOARD_RUN_DIR", str(tmp_path))
    return tmp_path


def test_cli_prints_the_waterfall_of_a_request_id(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(run_dir / "traces" / "chat-0.jsonl", chat_turn() + task())

    assert cli.main(["trace", "req-1"]) == 0

    out = capsys.readouterr().out
    assert out.splitlines() == traces.render_waterfall(spans_of(chat_turn()))


def test_cli_names_what_it_searched_for_an_unknown_id(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(run_dir / "traces" / "chat-0.jsonl", chat_turn(), tail="{partial")
    write(run_dir / "traces" / "worker-0.jsonl", task())

    assert cli.main(["trace", "abc"]) == 1

    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"switchboard: no trace with id or request id 'abc' in {run_dir / 'traces'}"
        " (7 spans from 2 files, 1 unreadable lines skipped)\n"
    )


def test_cli_without_a_traces_directory(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["trace", "--slowest", "3"]) == 1

    assert capsys.readouterr().err == (
        f"switchboard: no traces yet: {run_dir / 'traces'} does not exist\n"
    )


def test_cli_slowest(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(run_dir / "traces" / "chat-0.jsonl", task() + chat_turn())

    assert cli.main(["trace", "--slowest", "1"]) == 0

    assert capsys.readouterr().out.splitlines() == traces.slowest(spans_of(chat_turn()), 1)


@pytest.mark.parametrize("argv", [["trace"], ["trace", "abc", "--slowest", "2"]])
def test_cli_wants_exactly_one_of_id_and_slowest(
    run_dir: Path, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)

    assert exit_.value.code == 2
    assert "switchboard trace: error:" in capsys.readouterr().err


def test_cli_shows_each_trace_sharing_a_request_id(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    retry = record(
        OTHER, "d1", None, "chat.turn", 900, 950, attributes={"switchboard.request_id": "req-1"}
    )
    write(run_dir / "traces" / "chat-0.jsonl", [retry] + chat_turn() + task())

    assert cli.main(["trace", "req-1"]) == 0

    first = traces.render_waterfall(spans_of(chat_turn()))
    second = traces.render_waterfall(spans_of([retry]))
    expected = ["request id 'req-1' is in 2 traces", "", *first, "", *second]
    assert capsys.readouterr().out.splitlines() == expected
