"""Configuration of the RAG service."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from services.rag.chunking import MAX_CHUNK_TOKENS, MIN_CHUNK_TOKENS
from services.rag.schema import APP_ROLE
from services.runtime import load_config

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RagConfig:
    """Read from `SWITCHBOARD_*`; the launcher sets the database URL and the Envoy target."""

    database_url: str
    """The database's owner (`SWITCHBOARD_DATABASE_URL`): used only to apply migrations
    and grant the service's role at start."""
    rag_database_url: str = ""
    """Where the service reads and writes, as the unprivileged role `switchboard_rag`;
    empty = `database_url` with its user replaced by that role (and no password)."""
    inference_target: str = ""
    """Where InferenceService.Embed is reached (Envoy)."""
    rag_embedding_model: str = ""
    """The embedder to ask for; empty = the inference service's default."""
    rag_chunk_tokens: int = 160
    """Default chunk size in tokens (MiniLM reads about 256 word pieces)."""
    rag_overlap_tokens: int = 32
    """Default tokens shared by consecutive chunks."""
    rag_max_document_bytes: int = 1024 * 1024
    """Largest document text accepted, in UTF-8 bytes (RESOURCE_EXHAUSTED above)."""
    rag_ingest_concurrency: int = 4
    """Documents of one IngestDocuments stream chunked, embedded and stored at once; the
    stream is read no further ahead than this, so memory stays bounded."""
    rag_embed_batch: int = 64
    """Chunks per Embed call."""
    rag_ef_search: int = 100
    """HNSW candidate list size for an unfiltered vector search (pgvector's default is
    40); raised for filtered searches in proportion to the filter's selectivity."""
    rag_exact_scan_max: int = 10_000
    """A collection of at most this many chunks is searched exactly (no index)."""
    rag_pool_size: int = 8
    """Database connections."""

    def __post_init__(self) -> None:
        if not self.database_url:
            raise ValueError("SWITCHBOARD_DATABASE_URL must name the RAG database")
        if not MIN_CHUNK_TOKENS <= self.rag_chunk_tokens <= MAX_CHUNK_TOKENS:
            raise ValueError(
                f"SWITCHBOARD_RAG_CHUNK_TOKENS must be {MIN_CHUNK_TOKENS}..{MAX_CHUNK_TOKENS}"
            )
        if not 0 <= self.rag_overlap_tokens <= self.rag_chunk_tokens // 2:
            raise ValueError("SWITCHBOARD_RAG_OVERLAP_TOKENS must be 0..chunk_tokens/2")
        if self.rag_ingest_concurrency < 1 or self.rag_pool_size < 2:
            raise ValueError("ingest concurrency must be >= 1 and the pool size >= 2")
        if not 1 <= self.rag_ef_search <= 1000:
            raise ValueError("SWITCHBOARD_RAG_EF_SEARCH must be 1..1000")

    @property
    def app_database_url(self) -> str:
        if self.rag_database_url:
            return self.rag_database_url
        parts = urlsplit(self.database_url)
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit(parts._replace(netloc=f"{APP_ROLE}@{host}"))


def load_rag_config() -> RagConfig:
    return load_config(RagConfig, prefix="SWITCHBOARD_")
