"""RagService end to end: through Envoy, on the real PostgreSQL + pgvector and the real
Triton embedder, started by the launcher."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import grpc
import numpy as np
import psycopg
import pytest
from google.rpc import error_details_pb2
from prometheus_client.parser import text_string_to_metric_families
from switchboard.rag.v1 import rag_pb2, rag_service_pb2_grpc

from services.demo import HANDBOOK
from services.launcher import service_processes
from services.rag.schema import APP_ROLE, TENANT_TABLES
from services.rag.store import Mode, RagStore
from services.runtime import error_details
from tests.integration.conftest import as_tenant
from tests.polling import eventually

GRPCURL = str(Path(sys.executable).parent / "grpcurl")
QUESTIONS = Path(__file__).parents[1] / "data" / "handbook_questions.jsonl"
"""The labelled questions on the demo's handbook (`services.demo.HANDBOOK`), each with the
document and the passage that answers it."""
MODES = (
    rag_pb2.RETRIEVAL_MODE_VECTOR,
    rag_pb2.RETRIEVAL_MODE_FULL_TEXT,
    rag_pb2.RETRIEVAL_MODE_HYBRID,
)


@pytest.fixture
async def rag(envoy_target: str):
    async with grpc.aio.insecure_channel(envoy_target) as channel:
        yield rag_service_pb2_grpc.RagServiceStub(channel)


def new_tenant() -> str:
    return f"tenant-{uuid.uuid4().hex[:12]}"


def doc(document_id: str, text: str, collection: str = "docs", **metadata: str):
    return rag_pb2.IngestDocumentsRequest(
        document=rag_pb2.Document(
            document_id=document_id, collection=collection, text=text, metadata=metadata
        )
    )


async def ingest(stub, tenant: str, *requests, timeout: float = 60):
    async def stream():
        for request in requests:
            yield request

    return await stub.IngestDocuments(stream(), metadata=as_tenant(tenant), timeout=timeout)


async def retrieve(stub, tenant: str, collection: str, query: str, **fields):
    fields.setdefault("top_k", 5)
    return await stub.Retrieve(
        rag_pb2.RetrieveRequest(collection=collection, query=query, **fields),
        metadata=as_tenant(tenant),
        timeout=10,
    )


def app_url(mesh) -> str:
    return mesh.database_url.replace("postgres@", f"{APP_ROLE}@", 1)


FACTS = {
    "leave": "Parental leave is sixteen weeks at full pay, for every parent, from day one.",
    "battery": "The R7 robot's battery pack is swapped after 500 charge cycles or 18 months.",
    "badge": "A lost office badge is reported to security at extension 4471 within one hour.",
    "vpn": "The VPN gateway listens on port 8443 and requires a hardware key to connect.",
}


# ---- ingestion and retrieval -----------------------------------------------------------


async def test_ingested_documents_are_retrieved_with_text_to_cite(rag):
    tenant = new_tenant()
    body = " ".join(
        f"Section {i}: the quarterly report covers topic number {i}." for i in range(60)
    )
    reply = await ingest(
        rag,
        tenant,
        *[doc(name, text, team="ops") for name, text in FACTS.items()],
        doc("report", body, team="finance"),
    )
    assert reply.documents_ingested == 5 and reply.documents_failed == 0
    report = reply.results[-1]
    assert report.document_id == "report" and report.chunks > 1 and not report.error.code
    assert reply.chunks_ingested == 4 + report.chunks
    assert reply.usage.prompt_tokens == sum(r.tokens for r in reply.results) > 0

    for mode in MODES:
        found = await retrieve(rag, tenant, "docs", "How many weeks of parental leave?", mode=mode)
        assert found.mode == mode
        best = found.chunks[0]
        assert best.document_id == "leave", (mode, found)
        assert best.text == FACTS["leave"][best.start_char : best.end_char]
        assert best.metadata == {"team": "ops"}
        # per document, not the table's sequence that other tenants' ingests advance
        assert best.chunk_id == f"{best.document_id}#{best.chunk_index}"
        scores = [c.score for c in found.chunks]
        assert scores == sorted(scores, reverse=True)

    chunks = (await retrieve(rag, tenant, "docs", "quarterly report topic", top_k=100)).chunks
    pieces = sorted((c for c in chunks if c.document_id == "report"), key=lambda c: c.chunk_index)
    assert [c.chunk_index for c in pieces] == list(range(report.chunks))
    for piece in pieces:
        assert body[piece.start_char : piece.end_char] == piece.text


async def test_hybrid_is_the_default_and_metadata_filters_apply(rag):
    tenant = new_tenant()
    await ingest(
        rag,
        tenant,
        doc("a", "Battery swaps happen at the east dock.", team="ops"),
        doc("b", "Battery recycling is handled by the vendor.", team="finance"),
    )
    found = await retrieve(rag, tenant, "docs", "battery", top_k=10)
    assert found.mode == rag_pb2.RETRIEVAL_MODE_HYBRID
    assert {c.document_id for c in found.chunks} == {"a", "b"}
    for mode in MODES:
        only = await retrieve(
            rag, tenant, "docs", "battery", top_k=10, mode=mode, metadata_filter={"team": "finance"}
        )
        assert [c.document_id for c in only.chunks] == ["b"], mode
    none = await retrieve(rag, tenant, "docs", "battery", metadata_filter={"team": "people"})
    assert list(none.chunks) == []


async def test_reingesting_replaces_a_document_atomically(rag):
    """Readers polling while a document flips between versions of different sizes see
    one whole version every time, never a mix or a half-written one."""
    tenant = new_tenant()
    versions = {
        "old": " ".join(f"Version old paragraph {i} text." for i in range(150)),
        "new": " ".join(f"Version new paragraph {i}." for i in range(60)),
    }
    reply = await ingest(rag, tenant, doc("flip", versions["old"]))
    sizes = {"old": reply.results[0].chunks}
    reply = await ingest(rag, tenant, doc("flip", versions["new"]))
    assert reply.results[0].replaced
    sizes["new"] = reply.results[0].chunks
    assert sizes["old"] != sizes["new"]
    writing = True
    seen: set[str] = set()

    async def writer():
        nonlocal writing
        try:
            for i in range(8):
                await ingest(rag, tenant, doc("flip", versions["old" if i % 2 == 0 else "new"]))
        finally:
            writing = False

    async def reader():
        while writing:
            found = await retrieve(
                rag,
                tenant,
                "docs",
                "version paragraph",
                top_k=100,
                mode=rag_pb2.RETRIEVAL_MODE_FULL_TEXT,
            )
            labels = {c.text.split()[1] for c in found.chunks if c.text.startswith("Version")}
            assert len(labels) == 1, labels
            (label,) = labels
            assert len(found.chunks) == sizes[label]
            seen.add(label)

    await asyncio.gather(writer(), reader(), reader())
    assert seen == {"old", "new"}
    (collection,) = (
        await rag.ListCollections(rag_pb2.ListCollectionsRequest(), metadata=as_tenant(tenant))
    ).collections
    assert (collection.document_count, collection.chunk_count) == (1, sizes["new"])


async def test_delete_and_list_collections_with_counts_and_pages(rag):
    tenant = new_tenant()
    for name in ("alpha", "beta", "gamma"):
        await ingest(
            rag,
            tenant,
            doc("one", FACTS["vpn"], collection=name),
            doc("two", FACTS["badge"], collection=name),
        )
    page = await rag.ListCollections(
        rag_pb2.ListCollectionsRequest(page_size=2), metadata=as_tenant(tenant)
    )
    assert [c.name for c in page.collections] == ["alpha", "beta"]
    assert page.next_page_token
    rest = await rag.ListCollections(
        rag_pb2.ListCollectionsRequest(page_size=2, page_token=page.next_page_token),
        metadata=as_tenant(tenant),
    )
    assert [c.name for c in rest.collections] == ["gamma"] and not rest.next_page_token
    gamma = rest.collections[0]
    assert (gamma.document_count, gamma.chunk_count, gamma.dimensions) == (2, 2, 384)
    assert gamma.embedding_model == "embedder"
    assert gamma.update_time.ToDatetime() >= gamma.create_time.ToDatetime()

    deleted = await rag.DeleteDocument(
        rag_pb2.DeleteDocumentRequest(collection="gamma", document_id="one"),
        metadata=as_tenant(tenant),
    )
    assert deleted.chunks_deleted == 1
    found = await retrieve(rag, tenant, "gamma", "VPN port 8443 hardware key", top_k=10)
    assert [c.document_id for c in found.chunks] == ["two"]
    (gamma,) = (
        await rag.ListCollections(
            rag_pb2.ListCollectionsRequest(page_size=1, page_token=page.next_page_token),
            metadata=as_tenant(tenant),
        )
    ).collections
    assert (gamma.document_count, gamma.chunk_count) == (1, 1)

    for request, reason in (
        (
            rag_pb2.DeleteDocumentRequest(collection="gamma", document_id="one"),
            "DOCUMENT_NOT_FOUND",
        ),
        (
            rag_pb2.DeleteDocumentRequest(collection="delta", document_id="one"),
            "COLLECTION_NOT_FOUND",
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await rag.DeleteDocument(request, metadata=as_tenant(tenant))
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_details(exc.value).error_info.reason == reason


# ---- bad input -------------------------------------------------------------------------


async def test_one_document_unary_is_stored_and_its_failures_are_the_call_s_status(rag):
    tenant = new_tenant()
    reply = await rag.IngestDocument(
        rag_pb2.IngestDocumentRequest(document=doc("leave", FACTS["leave"]).document),
        metadata=as_tenant(tenant),
        timeout=60,
    )
    assert (reply.result.document_id, reply.result.chunks, reply.result.replaced) == (
        "leave",
        1,
        False,
    )
    assert not reply.result.HasField("error") and reply.usage.prompt_tokens > 0
    found = await retrieve(rag, tenant, "docs", "how long is parental leave")
    assert found.chunks[0].document_id == "leave"
    bad = {
        "empty": (doc("e", "").document, grpc.StatusCode.INVALID_ARGUMENT, "EMPTY_DOCUMENT"),
        "huge": (
            doc("h", "word " * 300_000).document,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "DOCUMENT_TOO_LARGE",
        ),
        "collection": (
            doc("c", "text", collection="no/slashes").document,
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_REQUEST",
        ),
    }
    for name, (document, code, reason) in bad.items():
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await rag.IngestDocument(
                rag_pb2.IngestDocumentRequest(document=document),
                metadata=as_tenant(tenant),
                timeout=60,
            )
        assert failed.value.code() == code, name
        assert error_details(failed.value).error_info.reason == reason, name
    (collection,) = (
        await rag.ListCollections(rag_pb2.ListCollectionsRequest(), metadata=as_tenant(tenant))
    ).collections
    assert collection.document_count == 1  # nothing of the refused documents was stored


async def test_bad_documents_fail_alone_and_the_rest_of_the_stream_is_ingested(rag):
    tenant = new_tenant()
    reply = await ingest(
        rag,
        tenant,
        doc("ok-1", FACTS["leave"]),
        doc("empty", ""),
        doc("huge", "word " * 300_000),  # 1.5 MB: over the 1 MiB limit, under the message cap
        rag_pb2.IngestDocumentsRequest(
            document=rag_pb2.Document(
                document_id="latin1", collection="docs", text_utf8="café".encode("latin-1")
            )
        ),
        rag_pb2.IngestDocumentsRequest(
            document=rag_pb2.Document(
                document_id="binary", collection="docs", text_utf8=bytes(range(256)) * 4
            )
        ),
        rag_pb2.IngestDocumentsRequest(
            document=rag_pb2.Document(
                document_id="nul", collection="docs", text_utf8=b"\x00\x01\x02 abc"
            )
        ),
        doc("bad-collection", "text", collection="no/slashes"),
        doc("ok-2", FACTS["vpn"]),
    )
    by_id = {r.document_id: r for r in reply.results}
    assert [r.document_id for r in reply.results] == [
        "ok-1",
        "empty",
        "huge",
        "latin1",
        "binary",
        "nul",
        "bad-collection",
        "ok-2",
    ]
    assert (reply.documents_ingested, reply.documents_failed) == (2, 6)
    expected = {
        "empty": (grpc.StatusCode.INVALID_ARGUMENT, "EMPTY_DOCUMENT"),
        "huge": (grpc.StatusCode.RESOURCE_EXHAUSTED, "DOCUMENT_TOO_LARGE"),
        "latin1": (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_UTF8"),
        "binary": (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_UTF8"),
        "nul": (grpc.StatusCode.INVALID_ARGUMENT, "BINARY_CONTENT"),
        "bad-collection": (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST"),
    }
    for document_id, (code, reason) in expected.items():
        result = by_id[document_id]
        assert result.error.code == code.value[0], document_id
        assert result.chunks == 0
        (info,) = [d for d in result.error.details if d.type_url.endswith("ErrorInfo")]
        unpacked = error_details_pb2.ErrorInfo()
        info.Unpack(unpacked)
        assert unpacked.reason == reason
        assert unpacked.metadata["document_id"] == document_id
    found = await retrieve(
        rag, tenant, "docs", "anything at all", top_k=100, mode=rag_pb2.RETRIEVAL_MODE_VECTOR
    )
    assert {c.document_id for c in found.chunks} == {"ok-1", "ok-2"}


@pytest.mark.parametrize(
    ("fields", "violations"),
    [
        ({"top_k": 0}, ["top_k"]),
        ({"top_k": -1}, ["top_k"]),
        ({"top_k": 101}, ["top_k"]),
        ({"query": "  "}, ["query"]),
        ({"collection": "", "top_k": 0}, ["collection", "top_k"]),
    ],
)
async def test_invalid_retrieve_requests_name_the_fields(rag, fields, violations):
    request = {"collection": "docs", "query": "battery", "top_k": 5, **fields}
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await rag.Retrieve(rag_pb2.RetrieveRequest(**request), metadata=as_tenant(new_tenant()))
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error_details(exc.value)
    assert details.error_info.reason == "INVALID_REQUEST"
    assert [v.field for v in details.field_violations] == violations


async def test_unknown_collection_and_missing_tenant(rag, mesh):
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await retrieve(rag, new_tenant(), "nowhere", "battery")
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    info = error_details(exc.value).error_info
    assert (info.reason, info.metadata["collection"]) == ("COLLECTION_NOT_FOUND", "nowhere")
    # Through Envoy every call has its key's tenant; the service's own port (and the
    # internal listener) still refuse a call that names none.
    async with grpc.aio.insecure_channel(f"{mesh.config.host}:{mesh.config.rag_port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await rag_service_pb2_grpc.RagServiceStub(channel).Retrieve(
                rag_pb2.RetrieveRequest(collection="docs", query="q", top_k=1), timeout=5
            )
    assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_details(exc.value).error_info.reason == "TENANT_MISSING"


async def test_a_message_over_the_size_cap_ends_the_stream_and_stores_nothing(rag):
    tenant = new_tenant()
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await ingest(
            rag, tenant, doc("small", FACTS["leave"]), doc("giant", "x" * (5 * 1024 * 1024))
        )
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    listed = await rag.ListCollections(rag_pb2.ListCollectionsRequest(), metadata=as_tenant(tenant))
    # "small" may or may not have been stored before the stream broke, but not in part
    for collection in listed.collections:
        assert (collection.document_count, collection.chunk_count) == (1, 1)


def assert_whole_documents(mesh, tenant: str) -> int:
    """Every stored document of `tenant` has all its chunks, and the collection counters
    agree; returns how many documents are stored."""
    with psycopg.connect(mesh.database_url) as conn:  # the owner: sees every tenant
        documents = conn.execute(
            "SELECT document_id, chunk_count FROM rag_documents WHERE tenant_id = %s", (tenant,)
        ).fetchall()
        for document_id, chunk_count in documents:
            (stored,) = conn.execute(
                "SELECT count(*) FROM rag_chunks WHERE tenant_id = %s AND document_id = %s",
                (tenant, document_id),
            ).fetchone()
            assert stored == chunk_count > 0, document_id
        counts = conn.execute(
            "SELECT document_count, chunk_count FROM rag_collections WHERE tenant_id = %s",
            (tenant,),
        ).fetchall()
    assert counts in ([], [(len(documents), sum(c for _, c in documents))])
    return len(documents)


def long_documents(sent: list[int], *, pause_after: int | None = None):
    """200 long documents; with `pause_after`, the client stops sending after that many
    (so a deadline expires while the call waits, not in the middle of a write, which
    the gRPC client reports as INTERNAL instead)."""

    async def stream():
        for i in range(200):
            if i == pause_after:
                await asyncio.sleep(30)
            sent.append(i)
            yield doc(f"d{i}", " ".join(f"Long document {i} sentence {j}." for j in range(1500)))

    return stream()


async def test_expired_deadlines_and_cancelled_ingests_leave_whole_documents_only(rag, mesh):
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await rag.Retrieve(
            rag_pb2.RetrieveRequest(collection="docs", query="battery", top_k=3),
            metadata=as_tenant(new_tenant()),
            timeout=0.0001,
        )
    assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    expiring, cancelled = new_tenant(), new_tenant()
    sent: list[int] = []
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await rag.IngestDocuments(
            long_documents(sent, pause_after=6), metadata=as_tenant(expiring), timeout=1.5
        )
    assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0 < len(sent) < 200

    sent.clear()
    call = rag.IngestDocuments(
        long_documents(sent, pause_after=6), metadata=as_tenant(cancelled), timeout=60
    )

    async def partly_stored() -> bool:  # so the cancel lands in the middle of the stream
        return await asyncio.to_thread(stored_documents, mesh, cancelled) > 0

    await eventually(partly_stored, timeout=30, what="the first documents were stored")
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert 0 < len(sent) < 200

    async def server_done() -> bool:  # it rolls back what was in flight, then ends the call
        return await asyncio.to_thread(rag_calls_in_flight, mesh) == 0

    await eventually(server_done, what="the RAG service finished the cancelled call")
    for tenant in (expiring, cancelled):
        assert assert_whole_documents(mesh, tenant) < 200


def stored_documents(mesh, tenant: str) -> int:
    with psycopg.connect(mesh.database_url) as conn:  # the owner: sees every tenant
        (count,) = conn.execute(
            "SELECT count(*) FROM rag_documents WHERE tenant_id = %s", (tenant,)
        ).fetchone()
    return count


def rag_calls_in_flight(mesh) -> float:
    """RPCs the RAG service is handling now (its Prometheus gauge)."""
    (port,) = [
        spec.metrics_port(mesh.config, slot)
        for spec, slot in service_processes(mesh.config)
        if spec.process_name(mesh.config, slot) == "rag"
    ]
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        for family in text_string_to_metric_families(reply.read().decode()):
            for sample in family.samples:
                if sample.name == "switchboard_rpc_in_flight" and sample.labels == {
                    "service": "switchboard.rag.v1.RagService"
                }:
                    return sample.value
    raise AssertionError(f"{url} has no in-flight gauge for the RAG service")


def run_grpcurl(target: str, key: str, method: str, data: str, *, check: bool = True):
    return subprocess.run(
        [GRPCURL, "-plaintext", "-H", f"authorization: Bearer {key}", "-d", "@", target,
         f"switchboard.rag.v1.RagService/{method}"],
        input=data, capture_output=True, text=True, timeout=60, check=check,
    )  # fmt: skip


def test_grpcurl_ingests_and_retrieves(envoy_target, credentials):
    key = credentials.key(new_tenant())
    docs = "\n".join(
        json.dumps({"document": {"documentId": k, "collection": "cli", "text": v}})
        for k, v in FACTS.items()
    )
    reply = run_grpcurl(envoy_target, key, "IngestDocuments", docs)
    assert json.loads(reply.stdout)["documents_ingested"] == 4
    query = {"collection": "cli", "query": "VPN port", "topK": 2}
    found = run_grpcurl(envoy_target, key, "Retrieve", json.dumps(query))
    assert json.loads(found.stdout)["chunks"][0]["document_id"] == "vpn"
    bad = run_grpcurl(envoy_target, key, "Retrieve", json.dumps({**query, "topK": 0}), check=False)
    assert bad.returncode != 0
    assert "InvalidArgument" in bad.stderr and "top_k" in bad.stderr


# ---- embedder down ---------------------------------------------------------------------


async def test_embedder_down_is_unavailable_and_keeps_the_old_version(rag, mesh):
    tenant = new_tenant()
    await ingest(rag, tenant, doc("kept", FACTS["battery"]))
    # RAG's only way to the embedder is InferenceService: point it at a closed port
    await asyncio.to_thread(
        mesh.start_service, "rag", env={"SWITCHBOARD_INFERENCE_TARGET": "127.0.0.1:9"}
    )
    try:
        reply = await ingest(rag, tenant, doc("kept", FACTS["vpn"]), doc("fresh", FACTS["badge"]))
        for result in reply.results:
            assert result.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
            assert result.chunks == 0
        assert reply.documents_failed == 2
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await retrieve(rag, tenant, "docs", "battery", mode=rag_pb2.RETRIEVAL_MODE_VECTOR)
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
        details = error_details(exc.value)
        assert details.error_info.reason == "DEPENDENCY_UNAVAILABLE"
        assert details.retry_info is not None
        # full-text search needs no embedding and still answers, from the old version
        found = await retrieve(
            rag, tenant, "docs", "battery charge cycles", mode=rag_pb2.RETRIEVAL_MODE_FULL_TEXT
        )
        assert [(c.document_id, c.text) for c in found.chunks] == [("kept", FACTS["battery"])]
    finally:
        await asyncio.to_thread(mesh.start_service, "rag")
    listed = await rag.ListCollections(rag_pb2.ListCollectionsRequest(), metadata=as_tenant(tenant))
    assert [(c.document_count, c.chunk_count) for c in listed.collections] == [(1, 1)]


# ---- tenant isolation ------------------------------------------------------------------


QUERIES = [
    "How many weeks of parental leave?",
    "When is the robot battery replaced?",
    "Who do I tell about a lost badge?",
    "Which port does the VPN use?",
]


async def test_tenant_isolation_over_thousands_of_queries(rag):
    """Tenant B holds, in a collection of the same name, documents that are exactly A's
    queries (so B's chunks are the nearest neighbours and best full-text matches of
    every query); not one of B's rows reaches A, in any mode or with any filter."""
    a, b = new_tenant(), new_tenant()
    await ingest(rag, a, *[doc(f"a-{k}", v, team="ops") for k, v in FACTS.items()])
    await ingest(rag, b, *[doc(f"b-{i}", q, team="ops") for i, q in enumerate(QUERIES)])
    gate = asyncio.Semaphore(16)
    rows = 0

    async def one(i: int) -> None:
        nonlocal rows
        query = QUERIES[i % len(QUERIES)]
        mode = MODES[i % len(MODES)]
        extra = {"metadata_filter": {"team": "ops"}} if i % 2 else {}
        async with gate:
            found = await retrieve(rag, a, "docs", query, top_k=10, mode=mode, **extra)
        assert found.chunks, (query, mode)
        for chunk in found.chunks:
            assert chunk.document_id.startswith("a-"), chunk
            assert chunk.text in FACTS.values()
        rows += len(found.chunks)

    await asyncio.gather(*(one(i) for i in range(2100)))
    assert rows >= 2100
    # and B sees its own rows, so the check above is not vacuous
    own = await retrieve(rag, b, "docs", QUERIES[0], mode=rag_pb2.RETRIEVAL_MODE_VECTOR)
    assert own.chunks[0].document_id == "b-0" and own.chunks[0].score > 0.99


async def test_one_pooled_connection_alternating_tenants_leaks_nothing(rag, mesh):
    a, b = new_tenant(), new_tenant()
    await ingest(rag, a, doc("mine", FACTS["leave"]))
    await ingest(rag, b, doc("theirs", FACTS["leave"]))
    store = RagStore(app_url(mesh), pool_size=1)
    await store.open(mesh.database_url)
    try:
        for i in range(200):
            tenant, own = (a, "mine") if i % 2 == 0 else (b, "theirs")
            mode = (Mode.FULL_TEXT, Mode.VECTOR, Mode.HYBRID)[i % 3]
            hits = await store.search(
                tenant,
                collection="docs",
                mode=mode,
                query="parental leave",
                vector=_unit(),
                top_k=10,
                metadata_filter={},
                candidates=50,
            )
            assert [h.document_id for h in hits] == [own]
            async with store.tenant(tenant) as conn:
                cur = await conn.execute("SELECT DISTINCT tenant_id FROM rag_chunks")
                assert [r[0] for r in await cur.fetchall()] == [tenant]
        # the same (only) connection, outside any tenant transaction: nothing is visible
        async with store._db.connection() as conn:
            cur = await conn.execute(
                "SELECT current_setting('switchboard.tenant_id', true),"
                " (SELECT count(*) FROM rag_chunks), (SELECT count(*) FROM rag_collections)"
            )
            setting, chunks, collections = await cur.fetchone()
        assert not setting and chunks == 0 and collections == 0
    finally:
        await store.close()


def _unit() -> np.ndarray:
    vector = np.zeros(384, dtype=np.float32)
    vector[0] = 1.0
    return vector


def test_writes_with_another_tenants_id_are_refused_by_the_database(mesh):
    a, b = new_tenant(), new_tenant()
    with psycopg.connect(app_url(mesh)) as conn:
        with conn.transaction():
            conn.execute("SELECT set_config('switchboard.tenant_id', %s, true)", (a,))
            conn.execute(
                "INSERT INTO rag_collections (tenant_id, name, embedding_model, dimensions)"
                " VALUES (%s, 'x', 'embedder', 384)",
                (a,),
            )
        for statement, params in (
            (
                "INSERT INTO rag_collections (tenant_id, name, embedding_model, dimensions)"
                " VALUES (%s, 'x', 'embedder', 384)",
                (b,),
            ),
            ("UPDATE rag_collections SET tenant_id = %s", (b,)),
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
                with conn.transaction():
                    conn.execute("SELECT set_config('switchboard.tenant_id', %s, true)", (a,))
                    conn.execute(statement, params)
        # with no tenant set the row is invisible, so it can be neither read nor changed
        assert conn.execute("SELECT count(*) FROM rag_collections").fetchone() == (0,)
        assert conn.execute("DELETE FROM rag_collections").rowcount == 0
        conn.rollback()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("ALTER TABLE rag_chunks DISABLE ROW LEVEL SECURITY")
        conn.rollback()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SET ROLE postgres")


def test_the_catalog_shows_forced_rls_and_an_unprivileged_role(mesh):
    with psycopg.connect(mesh.database_url) as conn:
        role = conn.execute(
            "SELECT rolsuper, rolbypassrls, rolcreaterole, rolcreatedb, rolcanlogin"
            " FROM pg_roles WHERE rolname = %s",
            (APP_ROLE,),
        ).fetchone()
        assert role == (False, False, False, False, True)
        member_of = conn.execute(
            "SELECT count(*) FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.member"
            " WHERE r.rolname = %s",
            (APP_ROLE,),
        ).fetchone()
        assert member_of == (0,)
        for table in TENANT_TABLES:
            owner, rls, forced = conn.execute(
                "SELECT pg_get_userbyid(relowner), relrowsecurity, relforcerowsecurity"
                " FROM pg_class WHERE oid = %s::regclass",
                (table,),
            ).fetchone()
            assert owner != APP_ROLE and rls and forced, table
            policies = conn.execute(
                "SELECT cmd, qual, with_check FROM pg_policies WHERE tablename = %s", (table,)
            ).fetchall()
            assert len(policies) == 1, table
            cmd, qual, with_check = policies[0]
            assert cmd == "ALL"
            for expression in (qual, with_check):
                assert "current_setting('switchboard.tenant_id'::text, true)" in expression
        index = conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'rag_chunks_embedding'"
        ).fetchone()
        assert "hnsw" in index[0] and "vector_cosine_ops" in index[0]
        # so that full-text conditions may use the GIN index under row-level security
        leakproof = conn.execute(
            "SELECT proleakproof FROM pg_proc"
            " WHERE oid = 'ts_match_vq(tsvector, tsquery)'::regprocedure"
        ).fetchone()
        assert leakproof == (True,)


# ---- retrieval quality ------------------------------------------------------------------


async def test_recall_at_5_on_the_labelled_handbook(rag):
    """Questions with the passage that answers them: hybrid retrieval must be at least as
    good as the better of vector and full-text search."""
    documents = [json.loads(line) for line in HANDBOOK.read_text().splitlines()]
    questions = [json.loads(line) for line in QUESTIONS.read_text().splitlines()]
    tenant = new_tenant()
    reply = await ingest(
        rag,
        tenant,
        *[
            doc(d["document_id"], d["text"], collection="handbook", **d["metadata"])
            for d in documents
        ],
        timeout=120,
    )
    assert reply.documents_failed == 0
    recall: dict[str, float] = {}
    for mode in MODES:
        hits = 0
        for q in questions:
            found = await retrieve(rag, tenant, "handbook", q["question"], top_k=5, mode=mode)
            hits += any(
                c.document_id == q["document_id"] and q["answer"] in c.text for c in found.chunks
            )
        recall[rag_pb2.RetrievalMode.Name(mode)] = hits / len(questions)
    print("recall@5", recall)
    vector, full_text, hybrid = (recall[rag_pb2.RetrievalMode.Name(m)] for m in MODES)
    assert hybrid >= max(vector, full_text), recall
    assert hybrid >= 0.8, recall
