"""RAG pure logic: chunking, rank fusion, ef_search sizing, request validation."""

from __future__ import annotations

import asyncio

import pytest
from switchboard.rag.v1 import rag_pb2

from services.rag.chunking import chunk_text
from services.rag.config import RagConfig
from services.rag.ingest import (
    IngestSettings,
    Outcome,
    _document_text,
    document_violations,
    in_order,
)
from services.rag.retrieval import hybrid_candidates, parse_retrieve
from services.rag.store import MAX_EF_SEARCH, Hit, Mode, ef_search_for, fuse
from services.runtime import InvalidArgument, ResourceExhausted, count_tokens

SETTINGS = IngestSettings(chunk_tokens=32, overlap_tokens=8, max_document_bytes=1000, embed_batch=8)


def test_chunks_cover_the_text_with_the_requested_overlap():
    text = " ".join(f"word{i}." for i in range(100))  # 200 tokens
    chunks = list(chunk_text(text, chunk_tokens=32, overlap_tokens=8))
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert all(c.tokens == 32 for c in chunks[:-1])
    for chunk in chunks:
        assert text[chunk.start_char : chunk.end_char] == chunk.text
        assert count_tokens(chunk.text) == chunk.tokens
    for before, after in zip(chunks, chunks[1:], strict=False):
        shared = text[after.start_char : before.end_char]
        assert count_tokens(shared) == 8
    assert chunks[0].start_char == 0 and chunks[-1].end_char == len(text)
    # 200 tokens, step 24: windows start at 0, 24, ..., 168 (the one that reaches the end)
    assert len(chunks) == 8


def test_a_short_text_is_one_chunk_and_offsets_count_code_points():
    text = "  Ünïcödé façade — naïve café.  "
    (chunk,) = chunk_text(text, chunk_tokens=16, overlap_tokens=0)
    assert chunk.text == "Ünïcödé façade — naïve café."
    assert text[chunk.start_char : chunk.end_char] == chunk.text


def test_chunk_sizes_out_of_range_are_refused():
    with pytest.raises(ValueError):
        list(chunk_text("a b c", chunk_tokens=8, overlap_tokens=0))
    with pytest.raises(ValueError):
        list(chunk_text("a b c", chunk_tokens=32, overlap_tokens=17))


def _hit(chunk_id: int) -> Hit:
    return Hit(chunk_id, f"d{chunk_id}", 0, "t", {}, 0.0, 0, 1)


def test_fusion_rewards_chunks_both_rankings_agree_on():
    vector = [_hit(1), _hit(2), _hit(3)]
    text = [_hit(3), _hit(4), _hit(1)]
    fused = fuse([vector, text], top_k=4, k=60)
    assert [h.chunk_id for h in fused] == [1, 3, 2, 4]
    assert fused[0].score == pytest.approx(1 / 61 + 1 / 63)
    assert fused[2].score == pytest.approx(1 / 62)


def test_fusion_with_one_empty_ranking_keeps_the_other_order():
    ranked = [_hit(5), _hit(6), _hit(7)]
    assert [h.chunk_id for h in fuse([ranked, []], top_k=2)] == [5, 6]


def test_ef_search_grows_with_the_filter_selectivity_and_is_capped():
    assert ef_search_for(100, selectivity=1.0, limit=10) == 100
    assert ef_search_for(100, selectivity=0.25, limit=10) == 400
    assert ef_search_for(100, selectivity=0.001, limit=10) == MAX_EF_SEARCH
    assert ef_search_for(40, selectivity=1.0, limit=150) == 150


def test_hybrid_candidates_are_deeper_than_top_k():
    assert hybrid_candidates(1) == 50
    assert hybrid_candidates(40) == 120
    assert hybrid_candidates(100) == 300


def _ingest(**document) -> rag_pb2.IngestDocumentsRequest:
    return rag_pb2.IngestDocumentsRequest(document=rag_pb2.Document(**document))


def _reason(exc: pytest.ExceptionInfo) -> tuple[str, dict[str, str], list[str]]:
    err = exc.value
    return err.reason, err.metadata, [v.field for v in err.field_violations]


def test_document_validation_names_each_bad_field():
    problems = document_violations(
        _ingest(document_id="", collection="bad name!", text="x"), SETTINGS
    )
    assert [p.field for p in problems] == ["document.document_id", "document.collection"]


@pytest.mark.parametrize(
    ("document", "reason", "field"),
    [
        ({"text": "   \n\t"}, "EMPTY_DOCUMENT", "document.text"),
        ({}, "EMPTY_DOCUMENT", "document.text"),
        ({"text_utf8": b"caf\xe9"}, "INVALID_UTF8", "document.text_utf8"),
        ({"text_utf8": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"}, "INVALID_UTF8", None),
        ({"text_utf8": b"\x00\x01\x02\x03 ELF-ish"}, "BINARY_CONTENT", None),
        ({"text": "nul\x00inside"}, "BINARY_CONTENT", None),
    ],
)
def test_bad_text_fails_with_a_reason_and_the_document_id(document, reason, field):
    with pytest.raises(InvalidArgument) as exc:
        _document_text(_ingest(document_id="doc-7", collection="c", **document), SETTINGS)
    got, metadata, fields = _reason(exc)
    assert got == reason
    assert metadata["document_id"] == "doc-7"
    if field:
        assert fields == [field]


def test_a_document_over_the_limit_is_resource_exhausted():
    with pytest.raises(ResourceExhausted) as exc:
        _document_text(_ingest(document_id="big", collection="c", text="é" * 501), SETTINGS)
    reason, metadata, _ = _reason(exc)
    assert reason == "DOCUMENT_TOO_LARGE"
    assert metadata == {"document_id": "big", "collection": "c", "limit_bytes": "1000"}


def test_chunking_options_are_checked():
    request = _ingest(document_id="d", collection="c", text="hello")
    request.chunking.chunk_tokens = 4
    request.chunking.overlap_tokens = 3
    problems = document_violations(request, SETTINGS)
    assert [p.field for p in problems] == ["chunking.chunk_tokens", "chunking.overlap_tokens"]


@pytest.mark.parametrize(
    ("request_fields", "fields"),
    [
        ({"collection": "c", "query": " \n", "top_k": 5}, ["query"]),
        ({"collection": "c", "query": "a\x00b", "top_k": 5}, ["query"]),
        (
            {"collection": "c", "query": "q", "top_k": 5, "metadata_filter": {"k": "v\x00"}},
            ["metadata_filter['k']"],
        ),
    ],
)
def test_retrieve_validation_beyond_the_contracts_annotations(request_fields, fields):
    with pytest.raises(InvalidArgument) as exc:
        parse_retrieve(rag_pb2.RetrieveRequest(**request_fields))
    assert [v.field for v in exc.value.field_violations] == fields


def test_retrieve_defaults_to_hybrid():
    request = rag_pb2.RetrieveRequest(collection="c", query="q", top_k=5)
    assert parse_retrieve(request) is Mode.HYBRID


def test_the_service_role_url_drops_the_owner_and_password():
    config = RagConfig(database_url="postgresql://owner:secret@db.local:5433/switchboard")
    assert config.app_database_url == "postgresql://switchboard_rag@db.local:5433/switchboard"
    explicit = RagConfig(database_url="postgresql://o@h/db", rag_database_url="postgresql://x@h/db")
    assert explicit.app_database_url == "postgresql://x@h/db"


async def test_ingest_reads_no_further_ahead_than_its_concurrency_and_keeps_order():
    pulled = 0
    most_ahead = 0
    done = 0

    async def items():
        nonlocal pulled
        for i in range(50):
            pulled += 1
            yield i

    async def handle(i: int) -> Outcome:
        nonlocal done, most_ahead
        most_ahead = max(most_ahead, pulled - done)
        await asyncio.sleep(0.001 * (i % 3))  # finish out of order
        done += 1
        return Outcome(str(i), "c")

    outcomes = [o.document_id async for o in in_order(items(), handle, concurrency=4)]
    assert outcomes == [str(i) for i in range(50)]
    assert most_ahead <= 4


async def test_ingest_cancels_pending_work_when_the_caller_stops():
    started, finished = [], []

    async def items():
        for i in range(10):
            yield i

    async def handle(i: int) -> Outcome:
        started.append(i)
        await asyncio.sleep(0 if i == 0 else 10)
        finished.append(i)
        return Outcome(str(i), "c")

    stream = in_order(items(), handle, concurrency=3)
    assert (await anext(stream)).document_id == "0"
    await stream.aclose()
    assert finished == [0] and len(started) <= 4
