"""Documents, chunks and embeddings in PostgreSQL + pgvector, one tenant per transaction.

Every method opens a transaction as the unprivileged service role and first sets
`switchboard.tenant_id` for that transaction alone (`set_config(..., true)`, the
function form of `SET LOCAL`); row-level security does the rest, so a forgotten
`WHERE tenant_id = ...` cannot leak rows, and a pooled connection carries no tenant
from one transaction to the next.

Vector search: a collection of at most `exact_scan_max` chunks is scanned exactly (the
distance expression is wrapped so the HNSW index cannot serve it); a larger one uses
the HNSW index with `hnsw.ef_search` raised by the filter's selectivity (pgvector 0.6
filters after the index scan, so a filter matching 10% of the rows needs about 10x
the candidates), and falls back to the exact scan if the index still returns too few.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector_async
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from services.rag.schema import TENANT_SETTING, migrate
from services.runtime import (
    Database,
    FailedPrecondition,
    NotFound,
    Unavailable,
    dependency_unavailable,
)

logger = logging.getLogger(__name__)

RRF_K = 60
"""Reciprocal-rank fusion constant: score = sum over lists of 1 / (RRF_K + rank)."""
MAX_EF_SEARCH = 1000


class Mode(Enum):
    VECTOR = "vector"
    FULL_TEXT = "full_text"
    HYBRID = "hybrid"


@dataclass(frozen=True, slots=True)
class StoredChunk:
    """A chunk ready to store: its place in the document, its text and its vector."""

    index: int
    start_char: int
    end_char: int
    text: str
    embedding: np.ndarray


@dataclass(frozen=True, slots=True)
class CollectionInfo:
    name: str
    document_count: int
    chunk_count: int
    embedding_model: str
    dimensions: int
    create_time: datetime
    update_time: datetime


def public_chunk_id(document_id: str, chunk_index: int) -> str:
    """The id a client sees for a chunk (RetrievedChunk.chunk_id): its document's id and
    its index in the document, unique within the collection.

    The table's own `chunk_id` comes from one sequence shared by every tenant: its
    values would tell a tenant how many chunks the others ingested, so it never leaves
    the service.
    """
    return f"{document_id}#{chunk_index}"


@dataclass(frozen=True, slots=True)
class Hit:
    chunk_id: int
    """The row's key, internal (see `public_chunk_id`)."""
    document_id: str
    chunk_index: int
    text: str
    metadata: dict[str, str]
    score: float
    start_char: int
    end_char: int

    @property
    def public_id(self) -> str:
        return public_chunk_id(self.document_id, self.chunk_index)


def _unavailable(exc: Exception) -> Unavailable:
    return dependency_unavailable("postgresql", "RAG database", exc)


def _collection_not_found(name: str) -> NotFound:
    return NotFound(
        f"collection {name!r} does not exist",
        reason="COLLECTION_NOT_FOUND",
        metadata={"collection": name},
    )


_CHUNK_COLUMNS = sql.SQL(
    "c.chunk_id, c.document_id, c.chunk_index, c.text, c.metadata, c.start_char, c.end_char"
)
_TSQUERY = "replace(plainto_tsquery('english', %(query)s)::text, ' & ', ' | ')::tsquery"
"""Any of the query's words, not all: a question rarely repeats a passage's every word."""


def _filters(metadata_filter: Mapping[str, str]) -> sql.Composable:
    clause = sql.SQL("c.collection = %(collection)s")
    if metadata_filter:
        clause = sql.SQL("{} AND c.metadata @> %(filter)s").format(clause)
    return clause


def _vector_query(*, exact: bool, metadata_filter: Mapping[str, str]) -> sql.Composed:
    # `+ 0` keeps the planner off the HNSW index (it only serves the bare operator)
    order = sql.SQL("(c.embedding <=> %(vector)s) + 0" if exact else "c.embedding <=> %(vector)s")
    return sql.SQL(
        "SELECT {cols}, 1 - (c.embedding <=> %(vector)s) AS score FROM rag_chunks c "
        "WHERE {where} ORDER BY {order} LIMIT %(limit)s"
    ).format(cols=_CHUNK_COLUMNS, where=_filters(metadata_filter), order=order)


def _text_query(*, metadata_filter: Mapping[str, str]) -> sql.Composed:
    return sql.SQL(
        "SELECT {cols}, ts_rank_cd(c.tsv, t.q) AS score FROM rag_chunks c, (SELECT {tsq} AS q) t "
        "WHERE {where} AND c.tsv @@ t.q ORDER BY score DESC, c.chunk_id LIMIT %(limit)s"
    ).format(cols=_CHUNK_COLUMNS, tsq=sql.SQL(_TSQUERY), where=_filters(metadata_filter))


def _hit(row: Mapping[str, Any]) -> Hit:
    return Hit(
        chunk_id=row["chunk_id"],
        document_id=row["document_id"],
        chunk_index=row["chunk_index"],
        text=row["text"],
        metadata=row["metadata"],
        score=float(row["score"]),
        start_char=row["start_char"],
        end_char=row["end_char"],
    )


def fuse(ranked_lists: Sequence[Sequence[Hit]], *, top_k: int, k: int = RRF_K) -> list[Hit]:
    """Reciprocal-rank fusion: each list adds 1/(k + rank) to a chunk's score (rank from 1).

    Ties keep the order of first appearance, earlier lists first.
    """
    scores: dict[int, float] = {}
    hits: dict[int, Hit] = {}
    for ranked in ranked_lists:
        for rank, hit in enumerate(ranked, start=1):
            scores[hit.chunk_id] = scores.get(hit.chunk_id, 0.0) + 1.0 / (k + rank)
            hits.setdefault(hit.chunk_id, hit)
    order = sorted(scores, key=lambda cid: -scores[cid])  # stable: first appearance wins ties
    return [_with_score(hits[cid], scores[cid]) for cid in order[:top_k]]


def _with_score(hit: Hit, score: float) -> Hit:
    return Hit(**{**{f: getattr(hit, f) for f in Hit.__slots__}, "score": score})  # type: ignore[arg-type]


def ef_search_for(base: int, *, selectivity: float, limit: int) -> int:
    """The HNSW candidate list for a search whose filter keeps `selectivity` of the rows."""
    wanted = max(base, limit) / max(selectivity, 1e-6)
    return int(min(MAX_EF_SEARCH, max(base, limit, math.ceil(wanted))))


class RagStore:
    """The RAG tables, seen through one tenant at a time."""

    def __init__(
        self,
        app_url: str,
        *,
        pool_size: int = 8,
        ef_search: int = 100,
        exact_scan_max: int = 10_000,
    ) -> None:
        # not autocommit: every use is a tenant transaction
        self._db = Database(
            app_url,
            max_size=pool_size,
            autocommit=False,
            configure=register_vector_async,
            name="rag",
        )
        self._ef_search = ef_search
        self._exact_scan_max = exact_scan_max

    async def open(self, owner_url: str) -> None:
        """Migrates as the owner, then opens the service role's pool."""
        async with await psycopg.AsyncConnection.connect(owner_url, autocommit=True) as conn:
            await migrate(conn)
        await self._db.open()

    async def close(self) -> None:
        await self._db.close()

    async def healthy(self) -> bool:
        return await self._db.healthy()

    @asynccontextmanager
    async def tenant(self, tenant_id: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A connection in a transaction that sees only `tenant_id`'s rows.

        Raises:
            Unavailable: the database cannot be reached.
        """
        try:
            async with self._db.connection() as conn, conn.transaction():
                await conn.execute("SELECT set_config(%s, %s, true)", (TENANT_SETTING, tenant_id))
                yield conn
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise _unavailable(exc) from exc
        except psycopg.errors.ConnectionTimeout as exc:  # pool exhausted or server gone
            raise _unavailable(exc) from exc

    # ---- writes ------------------------------------------------------------------------

    async def replace_document(
        self,
        tenant_id: str,
        *,
        collection: str,
        document_id: str,
        metadata: Mapping[str, str],
        chunks: Sequence[StoredChunk],
        tokens: int,
        chars: int,
        embedding_model: str,
        dimensions: int,
    ) -> bool:
        """Stores a document and its chunks in one transaction, replacing any earlier
        version; returns True if one was replaced. Readers see the old version or the
        new one, never a mix.

        Raises:
            FailedPrecondition: the collection holds vectors of another length.
        """
        async with self.tenant(tenant_id) as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(
                "INSERT INTO rag_collections (tenant_id, name, embedding_model, dimensions) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
                (tenant_id, collection, embedding_model, dimensions),
            )
            await cur.execute(
                "SELECT dimensions FROM rag_collections WHERE name = %s", (collection,)
            )
            row = await cur.fetchone()
            if row is None or row["dimensions"] != dimensions:
                raise FailedPrecondition(
                    f"collection {collection!r} holds vectors of another length",
                    reason="EMBEDDING_MISMATCH",
                    metadata={"collection": collection},
                )
            # one writer per document at a time; readers are never blocked
            await cur.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                (f"{tenant_id}/{collection}/{document_id}",),  # a clash only shares a lock
            )
            await cur.execute(
                "DELETE FROM rag_documents WHERE collection = %s AND document_id = %s "
                "RETURNING chunk_count",
                (collection, document_id),
            )
            old = await cur.fetchone()
            await cur.execute(
                "INSERT INTO rag_documents (tenant_id, collection, document_id, metadata,"
                " chunk_count, token_count, char_count) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (tenant_id, collection, document_id, Jsonb(dict(metadata)), len(chunks), tokens,
                 chars),
            )  # fmt: skip
            meta = Jsonb(dict(metadata))
            # COPY is refused on tables with row-level security; executemany pipelines
            await cur.executemany(
                "INSERT INTO rag_chunks (tenant_id, collection, document_id, chunk_index,"
                " start_char, end_char, text, metadata, embedding)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                [
                    (tenant_id, collection, document_id, chunk.index, chunk.start_char,
                     chunk.end_char, chunk.text, meta, chunk.embedding)
                    for chunk in chunks
                ],
            )  # fmt: skip
            await cur.execute(
                "UPDATE rag_collections SET document_count = document_count + %s,"
                " chunk_count = chunk_count + %s, update_time = clock_timestamp() WHERE name = %s",
                (0 if old else 1, len(chunks) - (old["chunk_count"] if old else 0), collection),
            )
        return old is not None

    async def delete_document(self, tenant_id: str, *, collection: str, document_id: str) -> int:
        """Deletes a document and its chunks; returns how many chunks went.

        Raises:
            NotFound: no such collection (`COLLECTION_NOT_FOUND`) or document
                (`DOCUMENT_NOT_FOUND`).
        """
        async with self.tenant(tenant_id) as conn:
            cur = await conn.execute(
                "SELECT 1 FROM rag_collections WHERE name = %s FOR UPDATE", (collection,)
            )
            if await cur.fetchone() is None:
                raise _collection_not_found(collection)
            cur = await conn.execute(
                "DELETE FROM rag_documents WHERE collection = %s AND document_id = %s "
                "RETURNING chunk_count",
                (collection, document_id),
            )
            row = await cur.fetchone()
            if row is None:
                raise NotFound(
                    f"document {document_id!r} does not exist in collection {collection!r}",
                    reason="DOCUMENT_NOT_FOUND",
                    metadata={"collection": collection, "document_id": document_id},
                )
            await conn.execute(
                "UPDATE rag_collections SET document_count = document_count - 1,"
                " chunk_count = chunk_count - %s, update_time = clock_timestamp() WHERE name = %s",
                (row[0], collection),
            )
        return int(row[0])

    # ---- reads -------------------------------------------------------------------------

    async def collections(self, tenant_id: str, *, after: str, limit: int) -> list[CollectionInfo]:
        """The tenant's collections by name, those after `after` first."""
        async with self.tenant(tenant_id) as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(
                "SELECT name, document_count, chunk_count, embedding_model, dimensions,"
                " create_time, update_time FROM rag_collections WHERE name > %s"
                " ORDER BY name LIMIT %s",
                (after, limit),
            )
            return [CollectionInfo(**row) for row in await cur.fetchall()]

    async def search(
        self,
        tenant_id: str,
        *,
        collection: str,
        mode: Mode,
        query: str,
        vector: np.ndarray | None,
        top_k: int,
        metadata_filter: Mapping[str, str],
        candidates: int,
    ) -> list[Hit]:
        """The best `top_k` chunks of a collection for `query` (and its `vector`, needed
        by the vector and hybrid modes). Hybrid fuses the best `candidates` of each.

        Raises:
            NotFound: `COLLECTION_NOT_FOUND`.
        """
        params: dict[str, Any] = {
            "collection": collection,
            "vector": vector,
            "query": query,
            "filter": Jsonb(dict(metadata_filter)),
        }
        async with self.tenant(tenant_id) as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(
                "SELECT chunk_count, (SELECT reltuples FROM pg_class"
                " WHERE oid = 'rag_chunks'::regclass) AS table_rows"
                " FROM rag_collections WHERE name = %s",
                (collection,),
            )
            row = await cur.fetchone()
            if row is None:
                raise _collection_not_found(collection)
            size, table_rows = int(row["chunk_count"]), max(float(row["table_rows"]), 1.0)
            depth = top_k if mode is not Mode.HYBRID else candidates
            vector_hits: list[Hit] = []
            text_hits: list[Hit] = []
            if mode is not Mode.FULL_TEXT:
                vector_hits = await self._vector(
                    cur, params, depth, size=size, table_rows=table_rows,
                    metadata_filter=metadata_filter,
                )  # fmt: skip
            if mode is not Mode.VECTOR:
                await cur.execute(
                    _text_query(metadata_filter=metadata_filter), {**params, "limit": depth}
                )
                text_hits = [_hit(r) for r in await cur.fetchall()]
        if mode is Mode.VECTOR:
            return vector_hits
        if mode is Mode.FULL_TEXT:
            return text_hits
        return fuse([vector_hits, text_hits], top_k=top_k)

    async def _vector(
        self,
        cur: psycopg.AsyncCursor[Any],
        params: dict[str, Any],
        limit: int,
        *,
        size: int,
        table_rows: float,
        metadata_filter: Mapping[str, str],
    ) -> list[Hit]:
        args = {**params, "limit": limit}
        exact = _vector_query(exact=True, metadata_filter=metadata_filter)
        if size <= self._exact_scan_max:
            await cur.execute(exact, args)
            return [_hit(r) for r in await cur.fetchall()]
        # a metadata filter keeps an unknown share of the collection: assume a tenth
        selectivity = min(1.0, size / table_rows) * (0.1 if metadata_filter else 1.0)
        ef = ef_search_for(self._ef_search, selectivity=selectivity, limit=limit)
        await cur.execute("SELECT set_config('hnsw.ef_search', %s, true)", (str(ef),))
        await cur.execute(_vector_query(exact=False, metadata_filter=metadata_filter), args)
        hits = [_hit(r) for r in await cur.fetchall()]
        if len(hits) < min(limit, size):
            # the filter kept fewer rows than the candidate list found: search exactly
            await cur.execute(exact, args)
            hits = [_hit(r) for r in await cur.fetchall()]
        return hits
