"""RagService servicer: proto in, ingestor / retriever / store call, proto out."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
from switchboard.common.v1 import common_pb2
from switchboard.rag.v1 import rag_pb2, rag_service_pb2_grpc

from services.rag.ingest import Ingestor, Outcome, in_order, validate_collection, without_nul
from services.rag.retrieval import Retriever
from services.rag.store import CollectionInfo, Hit, Mode, RagStore
from services.runtime import (
    invalid,
    page_size,
    page_token,
    read_page_token,
    require_tenant,
)

logger = logging.getLogger(__name__)

_MODES = {
    Mode.VECTOR: rag_pb2.RETRIEVAL_MODE_VECTOR,
    Mode.FULL_TEXT: rag_pb2.RETRIEVAL_MODE_FULL_TEXT,
    Mode.HYBRID: rag_pb2.RETRIEVAL_MODE_HYBRID,
}
_PROGRESS_EVERY = 100


def _result(outcome: Outcome) -> rag_pb2.DocumentResult:
    result = rag_pb2.DocumentResult(
        document_id=outcome.document_id,
        collection=outcome.collection,
        chunks=outcome.chunks,
        tokens=outcome.tokens,
        replaced=outcome.replaced,
    )
    if outcome.error is not None:
        result.error.CopyFrom(outcome.error.to_rpc_status())
    return result


def _chunk(hit: Hit) -> rag_pb2.RetrievedChunk:
    return rag_pb2.RetrievedChunk(
        chunk_id=hit.public_id,
        document_id=hit.document_id,
        chunk_index=hit.chunk_index,
        text=hit.text,
        metadata=hit.metadata,
        score=hit.score,
        start_char=hit.start_char,
        end_char=hit.end_char,
    )


def _collection(info: CollectionInfo) -> rag_pb2.Collection:
    message = rag_pb2.Collection(
        name=info.name,
        document_count=info.document_count,
        chunk_count=info.chunk_count,
        embedding_model=info.embedding_model,
        dimensions=info.dimensions,
    )
    message.create_time.FromDatetime(info.create_time)
    message.update_time.FromDatetime(info.update_time)
    return message


def _collection_after(parts: list[str]) -> str:
    (name,) = parts
    if validate_collection(name, "page_token"):
        raise ValueError(name)
    return name


class RagServicer(rag_service_pb2_grpc.RagServiceServicer):
    def __init__(
        self, store: RagStore, ingestor: Ingestor, retriever: Retriever, *, concurrency: int
    ) -> None:
        self._store = store
        self._ingestor = ingestor
        self._retriever = retriever
        self._concurrency = concurrency

    async def IngestDocuments(  # noqa: N802 - gRPC method name
        self,
        request_iterator: AsyncIterator[rag_pb2.IngestDocumentsRequest],
        context: grpc.aio.ServicerContext,
    ) -> rag_pb2.IngestDocumentsResponse:
        tenant = require_tenant()
        response = rag_pb2.IngestDocumentsResponse()
        prompt_tokens = 0
        outcomes = in_order(
            request_iterator,
            lambda request: self._ingestor.ingest(tenant, request),
            concurrency=self._concurrency,
        )
        async for outcome in outcomes:
            response.results.append(_result(outcome))
            if outcome.error is None:
                response.documents_ingested += 1
                response.chunks_ingested += outcome.chunks
                prompt_tokens += outcome.tokens
            else:
                response.documents_failed += 1
            if len(response.results) % _PROGRESS_EVERY == 0:
                logger.info(
                    "ingesting",
                    extra={
                        "documents": len(response.results),
                        "chunks": response.chunks_ingested,
                    },
                )
        response.usage.CopyFrom(
            common_pb2.TokenUsage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens)
        )
        return response

    async def IngestDocument(  # noqa: N802 - gRPC method name
        self, request: rag_pb2.IngestDocumentRequest, context: grpc.aio.ServicerContext
    ) -> rag_pb2.IngestDocumentResponse:
        one = rag_pb2.IngestDocumentsRequest(document=request.document, chunking=request.chunking)
        outcome = await self._ingestor.ingest(require_tenant(), one)
        if outcome.error is not None:
            raise outcome.error
        return rag_pb2.IngestDocumentResponse(
            result=_result(outcome),
            usage=common_pb2.TokenUsage(prompt_tokens=outcome.tokens, total_tokens=outcome.tokens),
        )

    async def Retrieve(  # noqa: N802 - gRPC method name
        self, request: rag_pb2.RetrieveRequest, context: grpc.aio.ServicerContext
    ) -> rag_pb2.RetrieveResponse:
        mode, hits = await self._retriever.retrieve(require_tenant(), request)
        return rag_pb2.RetrieveResponse(chunks=[_chunk(h) for h in hits], mode=_MODES[mode])

    async def DeleteDocument(  # noqa: N802 - gRPC method name
        self, request: rag_pb2.DeleteDocumentRequest, context: grpc.aio.ServicerContext
    ) -> rag_pb2.DeleteDocumentResponse:
        tenant = require_tenant()
        # the runtime checked the contract's bounds; a NUL is the one thing left
        if bad := without_nul(request.document_id, "document_id"):
            raise invalid([bad], what="DeleteDocumentRequest")
        deleted = await self._store.delete_document(
            tenant, collection=request.collection, document_id=request.document_id
        )
        return rag_pb2.DeleteDocumentResponse(chunks_deleted=deleted)

    async def ListCollections(  # noqa: N802 - gRPC method name
        self, request: rag_pb2.ListCollectionsRequest, context: grpc.aio.ServicerContext
    ) -> rag_pb2.ListCollectionsResponse:
        tenant = require_tenant()
        what = "ListCollectionsRequest"
        size = page_size(request.page_size, what=what)
        after = read_page_token(request.page_token, _collection_after, what=what)
        found = await self._store.collections(tenant, after=after or "", limit=size + 1)
        response = rag_pb2.ListCollectionsResponse(
            collections=[_collection(c) for c in found[:size]]
        )
        if len(found) > size:
            response.next_page_token = page_token(found[size - 1].name)
        return response
