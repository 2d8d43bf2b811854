"""The RAG service: documents chunked, embedded through Triton, stored in pgvector.

`chunking`, `ingest` and `retrieval` are plain logic; `store` owns PostgreSQL (schema,
row-level security, search SQL); `embedder` is the client of InferenceService.Embed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grpc
from switchboard.rag.v1 import rag_service_pb2, rag_service_pb2_grpc

from services.rag.config import RagConfig, load_rag_config
from services.rag.embedder import Embedder
from services.rag.ingest import Ingestor, IngestSettings
from services.rag.retrieval import Retriever
from services.rag.servicer import RagServicer
from services.rag.store import RagStore

logger = logging.getLogger(__name__)

__all__ = ["RagConfig", "RagService"]

SERVICE_NAME = rag_service_pb2.DESCRIPTOR.services_by_name["RagService"].full_name


class RagService:
    """The runtime's view of the service: the store's and the embedder's lifecycle."""

    name = "rag"
    service_names: Sequence[str] = (SERVICE_NAME,)

    def __init__(self, config: RagConfig | None = None) -> None:
        self._config = config or load_rag_config()
        self.store: RagStore | None = None
        self.embedder: Embedder | None = None

    async def start(self) -> None:
        config = self._config
        self.store = RagStore(
            config.app_database_url,
            pool_size=config.rag_pool_size,
            ef_search=config.rag_ef_search,
            exact_scan_max=config.rag_exact_scan_max,
        )
        await self.store.open(config.database_url)
        self.embedder = Embedder(config.inference_target, model=config.rag_embedding_model)

    def register(self, server: grpc.aio.Server) -> None:
        assert self.store is not None and self.embedder is not None, "start() first"
        config = self._config
        ingestor = Ingestor(
            self.store,
            self.embedder,
            IngestSettings(
                chunk_tokens=config.rag_chunk_tokens,
                overlap_tokens=config.rag_overlap_tokens,
                max_document_bytes=config.rag_max_document_bytes,
                embed_batch=config.rag_embed_batch,
            ),
        )
        rag_service_pb2_grpc.add_RagServiceServicer_to_server(
            RagServicer(
                self.store,
                ingestor,
                Retriever(self.store, self.embedder),
                concurrency=config.rag_ingest_concurrency,
            ),
            server,
        )

    async def ready(self) -> bool:
        """Serving while the database answers (the embedder's failures are per call)."""
        return self.store is not None and await self.store.healthy()

    async def shutdown(self) -> None:
        if self.embedder is not None:
            await self.embedder.close()
        if self.store is not None:
            await self.store.close()
