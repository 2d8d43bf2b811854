"""Ingestion: validate a document, chunk it, embed the chunks, store it atomically.

Each document succeeds or fails on its own: a failure is an outcome carrying the error,
never an exception that would end the stream. A streamed message is not validated by
the runtime, so each one is checked here against the contract (`request_violations`)
and what its annotations cannot say, first: its `document_id` and `collection` are
echoed in the error's ErrorInfo metadata only once they are known to be valid (an
invalid one is named by its field violation, not quoted). Embedding happens before
the transaction opens, so an embedder failure writes nothing and an earlier version of
the document stays intact.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass

import numpy as np
from switchboard.rag.v1 import rag_pb2

from services.rag.chunking import chunk_text
from services.rag.embedder import Embedder
from services.rag.store import RagStore, StoredChunk
from services.runtime import (
    FieldViolation,
    InvalidArgument,
    ResourceExhausted,
    SwitchboardError,
    invalid,
    request_violations,
)

logger = logging.getLogger(__name__)

COLLECTION_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")
"""A collection name, as the contract's annotations bound it (for names read back from
a page token, which no annotation sees)."""
_EMBED_CALLS_PER_DOCUMENT = 4
"""Embed calls one document keeps in flight (Triton batches them with other calls)."""


@dataclass(frozen=True)
class IngestSettings:
    chunk_tokens: int
    overlap_tokens: int
    max_document_bytes: int
    embed_batch: int


@dataclass
class Outcome:
    """What became of one document."""

    document_id: str
    collection: str
    chunks: int = 0
    tokens: int = 0
    replaced: bool = False
    error: SwitchboardError | None = None


def validate_collection(name: str, field: str) -> FieldViolation | None:
    if not COLLECTION_NAME.fullmatch(name):
        return FieldViolation(field, "must be 1..128 characters of [A-Za-z0-9_.-]")
    return None


def without_nul(value: str, field: str) -> FieldViolation | None:
    """PostgreSQL text holds no NUL character; the annotations do not say so."""
    return FieldViolation(field, "must not hold a NUL character") if "\x00" in value else None


def metadata_nul_violations(metadata: Mapping[str, str], field: str) -> list[FieldViolation]:
    """The entries of a metadata map (bounded by the annotations) holding a NUL."""
    return [
        FieldViolation(f"{field}[{key!r}]", "keys and values must not hold a NUL character")
        for key, value in metadata.items()
        if "\x00" in key or "\x00" in value
    ]


def document_violations(
    request: rag_pb2.IngestDocumentsRequest, settings: IngestSettings
) -> list[FieldViolation]:
    """Every way one IngestDocuments message breaks the contract: its annotations, then
    what they cannot say (NUL characters, the overlap within half the chunk size). The
    content (empty, binary, too large) is `_document_text`'s."""
    problems = request_violations(request)
    doc = request.document
    if bad := without_nul(doc.document_id, "document.document_id"):
        problems.append(bad)
    problems += metadata_nul_violations(doc.metadata, "document.metadata")
    options = request.chunking
    chunk_tokens = options.chunk_tokens or settings.chunk_tokens
    overlap_bounded = not any(p.field == "chunking.overlap_tokens" for p in problems)
    if overlap_bounded and options.HasField("overlap_tokens"):
        if options.overlap_tokens > chunk_tokens // 2:
            problems.append(
                FieldViolation(
                    "chunking.overlap_tokens",
                    f"must be at most half the chunk size ({chunk_tokens // 2})",
                )
            )
    return problems


def _document_text(request: rag_pb2.IngestDocumentsRequest, settings: IngestSettings) -> str:
    """The text of a document whose fields are valid (`document_violations`).

    Raises:
        InvalidArgument: empty, non-UTF-8 or binary text.
        ResourceExhausted: `DOCUMENT_TOO_LARGE`.
    """
    doc = request.document
    meta = {"document_id": doc.document_id, "collection": doc.collection}
    kind = doc.WhichOneof("content")
    size = len(doc.text.encode()) if kind == "text" else len(doc.text_utf8)
    if size > settings.max_document_bytes:
        raise ResourceExhausted(
            f"document {doc.document_id!r} is {size} bytes; the limit is "
            f"{settings.max_document_bytes} bytes of UTF-8 text",
            reason="DOCUMENT_TOO_LARGE",
            metadata={**meta, "limit_bytes": str(settings.max_document_bytes)},
        )
    if kind == "text_utf8":
        try:
            text = doc.text_utf8.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidArgument(
                f"document {doc.document_id!r} is not valid UTF-8 (byte {exc.start})",
                reason="INVALID_UTF8",
                metadata=meta,
                field_violations=[FieldViolation("document.text_utf8", "must be UTF-8 text")],
            ) from None
    else:
        text = doc.text
    if "\x00" in text:
        raise InvalidArgument(
            f"document {doc.document_id!r} holds NUL characters: binary content is not text",
            reason="BINARY_CONTENT",
            metadata=meta,
            field_violations=[FieldViolation(f"document.{kind}", "must be text, not binary")],
        )
    if not text.strip():
        raise InvalidArgument(
            f"document {doc.document_id!r} has no text",
            reason="EMPTY_DOCUMENT",
            metadata=meta,
            field_violations=[FieldViolation("document.text", "required, not blank")],
        )
    return text


def _with_meta(error: SwitchboardError, meta: dict[str, str]) -> SwitchboardError:
    error.metadata.update(meta)
    return error


class Ingestor:
    """Turns IngestDocumentsRequests into stored documents for one service."""

    def __init__(self, store: RagStore, embedder: Embedder, settings: IngestSettings) -> None:
        self._store = store
        self._embedder = embedder
        self._settings = settings

    async def ingest(self, tenant_id: str, request: rag_pb2.IngestDocumentsRequest) -> Outcome:
        doc = request.document
        outcome = Outcome(doc.document_id, doc.collection)
        if problems := document_violations(request, self._settings):
            # the id and the collection are echoed only if they are not what is wrong
            bad = {p.field for p in problems}
            echo = {
                name: value
                for name, value in (
                    ("document_id", doc.document_id),
                    ("collection", doc.collection),
                )
                if f"document.{name}" not in bad and "document" not in bad
            }
            outcome.error = _with_meta(invalid(problems, what="document"), echo)
            logger.info("document not ingested", extra={**echo, "reason": outcome.error.reason})
            return outcome
        try:
            text = _document_text(request, self._settings)
            options = request.chunking
            chunk_tokens = options.chunk_tokens or self._settings.chunk_tokens
            overlap = (
                options.overlap_tokens
                if options.HasField("overlap_tokens")
                else min(self._settings.overlap_tokens, chunk_tokens // 2)
            )
            chunks = list(chunk_text(text, chunk_tokens=chunk_tokens, overlap_tokens=overlap))
            vectors = await self._embed([c.text for c in chunks])
            outcome.replaced = await self._store.replace_document(
                tenant_id,
                collection=doc.collection,
                document_id=doc.document_id,
                metadata=dict(doc.metadata),
                chunks=[
                    StoredChunk(c.index, c.start_char, c.end_char, c.text, vectors[i])
                    for i, c in enumerate(chunks)
                ],
                tokens=sum(c.tokens for c in chunks),
                chars=len(text),
                embedding_model=self._embedder.model_name,
                dimensions=int(vectors.shape[1]),
            )
        except SwitchboardError as error:
            _with_meta(error, {"document_id": doc.document_id, "collection": doc.collection})
            logger.info(
                "document not ingested",
                extra={"document_id": doc.document_id, "reason": error.reason},
            )
            outcome.error = error
            return outcome
        outcome.chunks = len(chunks)
        outcome.tokens = sum(c.tokens for c in chunks)
        return outcome

    async def _embed(self, texts: list[str]) -> np.ndarray:
        size = self._settings.embed_batch
        batches = [texts[i : i + size] for i in range(0, len(texts), size)]
        gate = asyncio.Semaphore(_EMBED_CALLS_PER_DOCUMENT)

        async def one(batch: list[str]) -> np.ndarray:
            async with gate:
                return await self._embedder.embed(batch)

        parts = await asyncio.gather(*(one(b) for b in batches))
        return np.concatenate(parts, axis=0)


async def in_order(
    items: AsyncIterator[rag_pb2.IngestDocumentsRequest],
    handle: Callable[[rag_pb2.IngestDocumentsRequest], Awaitable[Outcome]],
    *,
    concurrency: int,
) -> AsyncIterator[Outcome]:
    """Handles up to `concurrency` items at once, yielding outcomes in stream order and
    reading no further ahead than that (a slow document holds the stream back rather
    than letting it pile up in memory). Pending work is cancelled if the caller stops."""
    pending: deque[asyncio.Task[Outcome]] = deque()
    try:
        async for item in items:
            pending.append(asyncio.create_task(handle(item)))
            if len(pending) >= concurrency:
                yield await pending.popleft()
        while pending:
            yield await pending.popleft()
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
