"""RAG retrieval at 100,000 chunks: latency and recall@10 against exact search.

Synthetic 384-d vectors with structure like sentence embeddings (points on a 128-d
latent mixture of 1,000 topics, projected to 384-d with noise, L2-normalised) and a
text of 30 words per chunk drawn mostly from its topic's vocabulary. Queries are
perturbed copies of random chunks (cosine ~0.8 to their source, reported) with 4 of the
source's words. Ground truth: exact cosine top-10 computed with NumPy.

Every query runs through `RagStore.search`, the service's own SQL path (the tenant's
RLS-scoped transaction, the HNSW index with `hnsw.ef_search`), on the real PostgreSQL +
pgvector the launcher starts; query embedding and gRPC are not included (the mesh-tax
and embed benchmarks measure those). Arms: vector search at several `ef_search`
values, hybrid (vector + full-text fused), and a metadata filter keeping 10% of rows
(ef_search raised by selectivity, exact fallback).
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg.types.json import Jsonb

from bench._common import ms, percentile, print_table, running_mesh, write_result
from services.rag.schema import APP_ROLE
from services.rag.store import Mode, RagStore

NAME = "rag-retrieval"
CHUNKS = 100_000
DIMENSIONS = 384
LATENT = 128
TOPICS = 1_000
DOCUMENTS = 1_000
QUERIES = 300
EF_SEARCH = (10, 40, 100)
SERVICE_EF = 100
"""The RAG service's default `SWITCHBOARD_RAG_EF_SEARCH`."""
TENANT = "bench"
COLLECTION = "big"


def _dataset(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[str]]:
    projection = rng.normal(size=(LATENT, DIMENSIONS)).astype(np.float32)
    centers = 2.0 * rng.normal(size=(TOPICS, LATENT)).astype(np.float32)
    topic = rng.integers(0, TOPICS, CHUNKS)
    latent = centers[topic] + rng.normal(size=(CHUNKS, LATENT)).astype(np.float32)
    vectors = latent @ projection + 0.5 * rng.normal(size=(CHUNKS, DIMENSIONS)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    vocabulary = rng.integers(0, 20_000, size=(TOPICS, 60))
    texts = []
    for i in range(CHUNKS):
        words = np.concatenate([rng.choice(vocabulary[topic[i]], 22), rng.integers(0, 20_000, 8)])
        texts.append(" ".join(f"w{w}" for w in words))
    return vectors, topic, texts


def _load(owner_url: str, vectors: np.ndarray, texts: list[str]) -> float:
    """Bulk-loads the chunks as the owner; returns the seconds the HNSW build took.

    COPY is not allowed through row-level security, so this set-up step runs as the
    owner, and, as a bulk load should, builds the HNSW index once after the rows are in
    (the same definition, read back from the catalog) instead of row by row.
    """
    with psycopg.connect(owner_url, autocommit=True) as conn:
        register_vector(conn)
        conn.execute(
            "INSERT INTO rag_collections (tenant_id, name, embedding_model, dimensions,"
            " document_count, chunk_count) VALUES (%s, %s, 'synthetic', %s, %s, %s)",
            (TENANT, COLLECTION, DIMENSIONS, DOCUMENTS, CHUNKS),
        )
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO rag_documents (tenant_id, collection, document_id, chunk_count,"
                " token_count, char_count) VALUES (%s, %s, %s, %s, 0, 0)",
                [(TENANT, COLLECTION, f"d{i}", CHUNKS // DOCUMENTS) for i in range(DOCUMENTS)],
            )
        (indexdef,) = conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'rag_chunks_embedding'"
        ).fetchone()
        conn.execute("DROP INDEX rag_chunks_embedding")
        with conn.cursor() as cur:
            with cur.copy(
                "COPY rag_chunks (tenant_id, collection, document_id, chunk_index, start_char,"
                " end_char, text, metadata, embedding) FROM STDIN WITH (FORMAT BINARY)"
            ) as copy:
                copy.set_types(
                    ["text", "text", "text", "int4", "int4", "int4", "text", "jsonb", "vector"]
                )
                for i in range(CHUNKS):
                    copy.write_row(
                        (TENANT, COLLECTION, f"d{i % DOCUMENTS}", i, 0, len(texts[i]), texts[i],
                         Jsonb({"shard": str(i % 10)}), vectors[i])
                    )  # fmt: skip
        conn.execute("SET maintenance_work_mem = '1GB'")
        started = time.perf_counter()
        conn.execute(indexdef)
        built = time.perf_counter() - started
        conn.execute("ANALYZE rag_chunks")
    return built


def _queries(
    rng: np.random.Generator, vectors: np.ndarray, texts: list[str]
) -> tuple[np.ndarray, list[str], np.ndarray]:
    sources = rng.integers(0, CHUNKS, QUERIES)
    noise = rng.normal(size=(QUERIES, DIMENSIONS)).astype(np.float32)
    noise *= 0.75 / np.linalg.norm(noise, axis=1, keepdims=True)
    queries = vectors[sources] + noise
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    words = [" ".join(rng.choice(texts[s].split(), 4, replace=False)) for s in sources]
    source_cosine = np.einsum("ij,ij->i", queries, vectors[sources])
    return queries, words, source_cosine


def _exact_top10(vectors: np.ndarray, queries: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    scores = queries @ vectors.T
    if mask is not None:
        scores[:, ~mask] = -np.inf
    return np.argsort(-scores, axis=1)[:, :10]


async def _arm(
    store: RagStore,
    queries: np.ndarray,
    words: list[str],
    *,
    mode: Mode,
    metadata_filter: dict[str, str] | None = None,
) -> tuple[list[float], list[list[int]]]:
    latencies, found = [], []
    for vector, text in zip(queries, words, strict=True):
        started = time.perf_counter()
        hits = await store.search(
            TENANT,
            collection=COLLECTION,
            mode=mode,
            query=text,
            vector=vector,
            top_k=10,
            metadata_filter=metadata_filter or {},
            candidates=50,
        )
        latencies.append(time.perf_counter() - started)
        found.append([h.chunk_index for h in hits])
    return latencies, found


def _recall(found: list[list[int]], truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)]))


async def _measure(
    owner_url: str, app_url: str, queries: np.ndarray, words: list[str], truth, filtered_truth
):
    results = {}
    for ef in EF_SEARCH:
        store = RagStore(app_url, pool_size=2, ef_search=ef)
        await store.open(owner_url)  # the migrations already ran: this only opens
        try:
            await _arm(store, queries[:20], words[:20], mode=Mode.VECTOR)  # warm the cache
            latencies, found = await _arm(store, queries, words, mode=Mode.VECTOR)
            results[f"vector_ef{ef}"] = (latencies, _recall(found, truth))
            if ef == SERVICE_EF:
                latencies, found = await _arm(store, queries, words, mode=Mode.HYBRID)
                results["hybrid"] = (latencies, 0.0)  # fuses two rankings: no vector truth
                latencies, found = await _arm(
                    store, queries, words, mode=Mode.VECTOR, metadata_filter={"shard": "3"}
                )
                results["vector_filtered"] = (latencies, _recall(found, filtered_truth))
        finally:
            await store.close()
    return results


def run() -> dict:
    rng = np.random.default_rng(20261124)
    print(f"  generating {CHUNKS:,} chunks", flush=True)
    vectors, _, texts = _dataset(rng)
    queries, words, source_cosine = _queries(rng, vectors, texts)
    truth = _exact_top10(vectors, queries, None)
    filtered_truth = _exact_top10(vectors, queries, np.arange(CHUNKS) % 10 == 3)
    with running_mesh(triton_replicas=1) as mesh:
        print("  loading PostgreSQL", flush=True)
        started = time.perf_counter()
        build_s = _load(mesh.database_url, vectors, texts)
        print(f"  loaded in {time.perf_counter() - started:.1f}s (HNSW build {build_s:.1f}s)")
        app_url = mesh.database_url.replace("postgres@", f"{APP_ROLE}@", 1)
        results = asyncio.run(
            _measure(mesh.database_url, app_url, queries, words, truth, filtered_truth)
        )
    rows = [
        (
            arm,
            "n/a" if arm == "hybrid" else f"{recall:.3f}",
            f"{ms(percentile(lat, 50)):.2f}",
            f"{ms(percentile(lat, 99)):.2f}",
        )
        for arm, (lat, recall) in results.items()
    ]
    print_table("arms", ("arm", "recall@10", "p50_ms", "p99_ms"), rows)
    service = results[f"vector_ef{SERVICE_EF}"]
    metrics = {
        "recall_at_10": service[1],
        "p50_ms": ms(percentile(service[0], 50)),
        "p99_ms": ms(percentile(service[0], 99)),
        "hybrid_p99_ms": ms(percentile(results["hybrid"][0], 99)),
        "hybrid_p50_ms": ms(percentile(results["hybrid"][0], 50)),
        "chunks": CHUNKS,
        "filtered_recall_at_10": results["vector_filtered"][1],
        "filtered_p99_ms": ms(percentile(results["vector_filtered"][0], 99)),
        "hnsw_build_s": build_s,
    }
    for ef in EF_SEARCH:
        latencies, recall = results[f"vector_ef{ef}"]
        metrics[f"recall_at_10_ef{ef}"] = recall
        metrics[f"p99_ms_ef{ef}"] = ms(percentile(latencies, 99))
    notes = (
        f"{CHUNKS:,} synthetic 384-d chunks ({TOPICS:,} topics on a {LATENT}-d latent space), "
        f"{QUERIES} queries at mean cosine {float(np.mean(source_cosine)):.2f} to their source "
        f"chunk; one client, sequential; RagStore.search (RLS transaction, HNSW m=16 "
        f"ef_construction=64) on the launcher's PostgreSQL 16 + pgvector 0.6.2; headline "
        f"metrics at the service default ef_search={SERVICE_EF}; hybrid = vector + full-text "
        "fused by RRF (latency only); filtered = metadata filter keeping "
        "10% of rows (ef_search raised to 1000, exact fallback); no embedding, no gRPC"
    )
    targets = {"recall_at_10": ">= 0.95", "p99_ms": "<= 15"}
    return write_result(NAME, metrics, targets, notes)


if __name__ == "__main__":
    run()
