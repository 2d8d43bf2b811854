"""RagService's contract: the request rules its annotations state (checked by the
runtime, or per streamed document by the ingestor), what is echoed in errors, and chunk
ids that say nothing of other tenants."""

from __future__ import annotations

import pytest
from switchboard.inference.v1 import inference_pb2
from switchboard.rag.v1 import rag_pb2

from services.rag.ingest import Ingestor, IngestSettings, document_violations
from services.rag.servicer import RagServicer
from services.rag.store import Hit, Mode, public_chunk_id
from services.runtime import InvalidArgument, _context, request_violations

SETTINGS = IngestSettings(chunk_tokens=32, overlap_tokens=8, max_document_bytes=1000, embed_batch=8)


def _fields(message) -> list[str]:
    return sorted(v.field for v in request_violations(message))


def _ingest(chunking: rag_pb2.ChunkingOptions | None = None, **document):
    document.setdefault("document_id", "doc-1")
    document.setdefault("collection", "docs")
    document.setdefault("text", "Some text.")
    return rag_pb2.IngestDocumentsRequest(document=rag_pb2.Document(**document), chunking=chunking)


def _retrieve(**fields) -> rag_pb2.RetrieveRequest:
    return rag_pb2.RetrieveRequest(**{"collection": "docs", "query": "q", "top_k": 5, **fields})


# -- the annotations ---------------------------------------------------------------------


def test_valid_requests_at_their_bounds_break_no_rule():
    metadata = {f"{i:02d}" + "k" * 62: "v" * 1024 for i in range(32)}
    valid = [
        _ingest(
            document_id="d" * 256,
            collection="A-z_0.9" + "c" * 121,
            metadata=metadata,
            chunking=rag_pb2.ChunkingOptions(chunk_tokens=2048, overlap_tokens=1024),
        ),
        _ingest(chunking=rag_pb2.ChunkingOptions(chunk_tokens=0, overlap_tokens=0)),
        _ingest(chunking=rag_pb2.ChunkingOptions(chunk_tokens=16)),
        _retrieve(query="q" * 8192, top_k=1, metadata_filter=metadata),
        _retrieve(top_k=100, mode=rag_pb2.RETRIEVAL_MODE_FULL_TEXT),
        rag_pb2.DeleteDocumentRequest(collection="c" * 128, document_id="d" * 256),
        rag_pb2.ListCollectionsRequest(page_size=1000, page_token="t" * 512),
        rag_pb2.ListCollectionsRequest(),
    ]
    for message in valid:
        assert request_violations(message) == [], message


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (rag_pb2.IngestDocumentsRequest(), "document"),
        (_ingest(document_id=""), "document.document_id"),
        (_ingest(document_id="d" * 257), "document.document_id"),
        (_ingest(collection=""), "document.collection"),
        (_ingest(collection="c" * 129), "document.collection"),
        (_ingest(collection="no/slashes"), "document.collection"),
        (_ingest(metadata={str(i): "v" for i in range(33)}), "document.metadata"),
        (_ingest(metadata={"": "v"}), "document.metadata['']"),
        (_ingest(metadata={"k" * 65: "v"}), f"document.metadata['{'k' * 65}']"),
        (_ingest(metadata={"k": "v" * 1025}), "document.metadata['k']"),
        (_ingest(rag_pb2.ChunkingOptions(chunk_tokens=15)), "chunking.chunk_tokens"),
        (_ingest(rag_pb2.ChunkingOptions(chunk_tokens=2049)), "chunking.chunk_tokens"),
        (_ingest(rag_pb2.ChunkingOptions(chunk_tokens=-1)), "chunking.chunk_tokens"),
        (_ingest(rag_pb2.ChunkingOptions(overlap_tokens=-1)), "chunking.overlap_tokens"),
        (_ingest(rag_pb2.ChunkingOptions(overlap_tokens=1025)), "chunking.overlap_tokens"),
        (_retrieve(collection=""), "collection"),
        (_retrieve(collection="c" * 129), "collection"),
        (_retrieve(collection="bad name!"), "collection"),
        (_retrieve(query=""), "query"),
        (_retrieve(query="q" * 8193), "query"),
        (_retrieve(top_k=0), "top_k"),
        (_retrieve(top_k=-3), "top_k"),
        (_retrieve(top_k=101), "top_k"),
        (_retrieve(mode=9), "mode"),
        (_retrieve(metadata_filter={str(i): "v" for i in range(33)}), "metadata_filter"),
        (_retrieve(metadata_filter={"": "v"}), "metadata_filter['']"),
        (_retrieve(metadata_filter={"k": "v" * 1025}), "metadata_filter['k']"),
        (rag_pb2.DeleteDocumentRequest(collection="docs"), "document_id"),
        (rag_pb2.DeleteDocumentRequest(collection="docs", document_id="d" * 257), "document_id"),
        (rag_pb2.DeleteDocumentRequest(document_id="d"), "collection"),
        (rag_pb2.DeleteDocumentRequest(collection="c" * 129, document_id="d"), "collection"),
        (rag_pb2.DeleteDocumentRequest(collection="a b", document_id="d"), "collection"),
        (rag_pb2.ListCollectionsRequest(page_size=-1), "page_size"),
        (rag_pb2.ListCollectionsRequest(page_size=1001), "page_size"),
        (rag_pb2.ListCollectionsRequest(page_token="t" * 513), "page_token"),
    ],
)
def test_each_rule_names_its_field(message, field):
    assert _fields(message) == [field]


# -- streamed documents: checked one by one, echoed only once valid ----------------------


def test_a_streamed_document_is_checked_against_the_contract_and_beyond():
    assert document_violations(_ingest(), SETTINGS) == []
    cases = {
        "document.document_id": _ingest(document_id="a\x00b"),
        "document.metadata['k']": _ingest(metadata={"k": "v\x00"}),
        "chunking.overlap_tokens": _ingest(rag_pb2.ChunkingOptions(overlap_tokens=17)),
    }
    for field, request in cases.items():
        assert [p.field for p in document_violations(request, SETTINGS)] == [field]
    # the overlap is bounded by half of the chunk size actually used
    within = _ingest(rag_pb2.ChunkingOptions(chunk_tokens=64, overlap_tokens=32))
    assert document_violations(within, SETTINGS) == []
    over = _ingest(rag_pb2.ChunkingOptions(chunk_tokens=64, overlap_tokens=33))
    (problem,) = document_violations(over, SETTINGS)
    assert (problem.field, problem.description) == (
        "chunking.overlap_tokens",
        "must be at most half the chunk size (32)",
    )
    # an overlap out of the contract's range is reported once, not twice
    (problem,) = document_violations(
        _ingest(rag_pb2.ChunkingOptions(overlap_tokens=5000)), SETTINGS
    )
    assert problem.field == "chunking.overlap_tokens"


class _Unused:
    """A store or embedder an invalid document must never reach."""

    def __getattr__(self, name: str):
        raise AssertionError(f"an invalid document reached {name}")


async def test_an_invalid_document_fails_alone_and_echoes_only_valid_names():
    ingestor = Ingestor(_Unused(), _Unused(), SETTINGS)  # type: ignore[arg-type]
    long_id = "x" * 100_000
    outcome = await ingestor.ingest("acme", _ingest(document_id=long_id, collection="ok"))
    error = outcome.error
    assert isinstance(error, InvalidArgument) and error.reason == "INVALID_REQUEST"
    assert [v.field for v in error.field_violations] == ["document.document_id"]
    assert error.metadata == {"collection": "ok"}, "the bad id is not echoed"
    assert long_id not in error.message
    assert outcome.chunks == 0

    outcome = await ingestor.ingest("acme", _ingest(document_id="doc-7", collection="a/b"))
    assert outcome.error is not None
    assert outcome.error.metadata == {"document_id": "doc-7"}
    assert [v.field for v in outcome.error.field_violations] == ["document.collection"]

    outcome = await ingestor.ingest("acme", rag_pb2.IngestDocumentsRequest())
    assert outcome.error is not None and outcome.error.metadata == {}
    assert [v.field for v in outcome.error.field_violations] == ["document"]


async def test_a_valid_document_with_no_text_names_its_id():
    ingestor = Ingestor(_Unused(), _Unused(), SETTINGS)  # type: ignore[arg-type]
    outcome = await ingestor.ingest("acme", _ingest(text=" \n "))
    assert outcome.error is not None and outcome.error.reason == "EMPTY_DOCUMENT"
    assert outcome.error.metadata == {"document_id": "doc-1", "collection": "docs"}


# -- the servicer ------------------------------------------------------------------------


class _Store:
    def __init__(self) -> None:
        self.deleted: list[tuple[str, str, str]] = []

    async def delete_document(self, tenant: str, *, collection: str, document_id: str) -> int:
        self.deleted.append((tenant, collection, document_id))
        return 3


class _Retriever:
    def __init__(self, hits: list[Hit]) -> None:
        self._hits = hits

    async def retrieve(self, tenant: str, request: rag_pb2.RetrieveRequest):
        return Mode.HYBRID, self._hits


def _servicer(store=None, hits=()) -> RagServicer:
    return RagServicer(store or _Unused(), _Unused(), _Retriever(list(hits)), concurrency=1)  # type: ignore[arg-type]


def _as_tenant(tenant: str):
    return _context.tenant_id.set(tenant)


async def test_delete_document_refuses_a_nul_the_annotations_cannot_see():
    store = _Store()
    token = _as_tenant("acme")
    try:
        with pytest.raises(InvalidArgument) as refused:
            await _servicer(store).DeleteDocument(
                rag_pb2.DeleteDocumentRequest(collection="docs", document_id="a\x00b"), None
            )
        assert [v.field for v in refused.value.field_violations] == ["document_id"]
        reply = await _servicer(store).DeleteDocument(
            rag_pb2.DeleteDocumentRequest(collection="docs", document_id="d"), None
        )
    finally:
        _context.tenant_id.reset(token)
    assert reply.chunks_deleted == 3
    assert store.deleted == [("acme", "docs", "d")]


async def test_chunk_ids_are_per_document_not_the_shared_sequence():
    # the rows' own keys are large: other tenants ingested many chunks meanwhile
    hits = [
        Hit(9_876_543, "handbook", 3, "text", {}, 0.9, 0, 4),
        Hit(9_876_544, "handbook", 4, "text", {}, 0.8, 0, 4),
        Hit(17, "faq#2", 0, "text", {}, 0.7, 0, 4),
    ]
    token = _as_tenant("acme")
    try:
        reply = await _servicer(hits=hits).Retrieve(_retrieve(), None)
    finally:
        _context.tenant_id.reset(token)
    ids = [c.chunk_id for c in reply.chunks]
    assert ids == ["handbook#3", "handbook#4", "faq#2#0"]
    assert not any(str(h.chunk_id) in i for h, i in zip(hits, ids, strict=True))
    # the index follows the last '#', so a document id holding one cannot collide
    assert public_chunk_id("faq#2", 0) != public_chunk_id("faq", 20)
    # and the longest id still fits a Passage.source_id
    longest = public_chunk_id("d" * 256, 2**31 - 1)
    assert request_violations(inference_pb2.Passage(source_id=longest, text="t")) == []
