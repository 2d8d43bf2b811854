"""Retrieval: validate the query, embed it if the mode needs a vector, search the store."""

from __future__ import annotations

import logging

from switchboard.rag.v1 import rag_pb2

from services.rag.embedder import Embedder
from services.rag.ingest import metadata_nul_violations, without_nul
from services.rag.store import Hit, Mode, RagStore
from services.runtime import FieldViolation, invalid, tracing

logger = logging.getLogger(__name__)

MODES = {
    rag_pb2.RETRIEVAL_MODE_UNSPECIFIED: Mode.HYBRID,
    rag_pb2.RETRIEVAL_MODE_HYBRID: Mode.HYBRID,
    rag_pb2.RETRIEVAL_MODE_VECTOR: Mode.VECTOR,
    rag_pb2.RETRIEVAL_MODE_FULL_TEXT: Mode.FULL_TEXT,
}


def hybrid_candidates(top_k: int) -> int:
    """How deep each ranking goes before fusion: a chunk ranked 40th by one method and
    2nd by the other should still be fused."""
    return min(max(3 * top_k, 50), 300)


def parse_retrieve(request: rag_pb2.RetrieveRequest) -> Mode:
    """The mode of a request the runtime validated against the contract, once what the
    annotations cannot say holds too: a query not blank, no NUL character.

    Raises:
        InvalidArgument: with a field violation per problem.
    """
    problems: list[FieldViolation] = []
    if not request.query.strip():
        problems.append(FieldViolation("query", "must not be blank"))
    elif bad := without_nul(request.query, "query"):
        problems.append(bad)
    problems += metadata_nul_violations(request.metadata_filter, "metadata_filter")
    if problems:
        raise invalid(problems, what="RetrieveRequest")
    return MODES[request.mode]


class Retriever:
    def __init__(self, store: RagStore, embedder: Embedder) -> None:
        self._store = store
        self._embedder = embedder

    async def retrieve(
        self, tenant_id: str, request: rag_pb2.RetrieveRequest
    ) -> tuple[Mode, list[Hit]]:
        """The best chunks for the request, best first.

        Raises:
            InvalidArgument: a bad request. NotFound: `COLLECTION_NOT_FOUND`.
            Unavailable: the embedder or the database is down.
        """
        mode = parse_retrieve(request)
        # the search itself checks the collection: a separate check first would add a
        # database round trip to every query to save an embedding on a rare mistake
        vector = None
        if mode is not Mode.FULL_TEXT:
            vector = (await self._embedder.embed([request.query]))[0]
        hits = await self._store.search(
            tenant_id,
            collection=request.collection,
            mode=mode,
            query=request.query,
            vector=vector,
            top_k=request.top_k,
            metadata_filter=dict(request.metadata_filter),
            candidates=hybrid_candidates(request.top_k),
        )
        span = tracing.current_span()
        if span.is_recording():
            span.set_attributes(
                {
                    "switchboard.retrieval.mode": mode.name.lower(),
                    "switchboard.retrieval.top_k": request.top_k,
                    "switchboard.retrieval.rows": len(hits),
                    "switchboard.retrieval.filtered": bool(request.metadata_filter),
                }
            )
        return mode, hits
