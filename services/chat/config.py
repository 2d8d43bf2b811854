"""The chat service's configuration, read from `SWITCHBOARD_*`."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from services.chat.live import Limits

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChatConfig:
    """Read from `SWITCHBOARD_*`; the launcher sets the database URL and the targets. The
    InferenceService the process embeds reads its own (`SWITCHBOARD_TRITON_URLS`,
    `SWITCHBOARD_MODEL_POLICY`, `SWITCHBOARD_ADMISSION_TARGET`, ...), as an inference
    replica does."""

    database_url: str
    """PostgreSQL holding sessions and history (`SWITCHBOARD_DATABASE_URL`)."""
    rag_target: str = ""
    """Where RagService is reached (the mesh)."""
    execution_target: str = ""
    """Where ExecutionService is reached (the mesh)."""
    chat_max_message_bytes: int = 32 * 1024
    """Largest user message, in UTF-8 bytes; a larger one gets an ErrorFrame."""
    chat_resume_grace_s: float = 0.5
    """Seconds an answer keeps generating after its client dropped, for a resume."""
    chat_idle_ttl_s: float = 120.0
    """Seconds an idle session keeps its events for a resume after its streams end."""
    chat_flow_window: int = 256
    """Events a stream may fall behind before its session's generation waits."""
    nats_url: str = ""
    """NATS, through which chat replicas share sessions' events and owners (see
    `shared`); empty: this process serves its sessions alone (one replica)."""
    nats_stream_replicas: int = 1
    """Copies JetStream keeps of the shared events and owners (3 on a 3-node cluster)."""
    chat_event_retention_s: float = 600.0
    """Seconds the shared log keeps a session's events for a resume on another replica
    (the last `retain_events` of each session at most)."""

    def __post_init__(self) -> None:
        if not self.database_url:
            raise ValueError("SWITCHBOARD_DATABASE_URL must name the chat database")
        if not (self.rag_target and self.execution_target):
            raise ValueError(
                "SWITCHBOARD_RAG_TARGET and SWITCHBOARD_EXECUTION_TARGET must say where the"
                " other services are"
            )
        if self.chat_max_message_bytes < 1 or self.chat_flow_window < 1:
            raise ValueError("the message limit and the flow window must be positive")
        if not 1 <= self.nats_stream_replicas <= 5:
            raise ValueError("SWITCHBOARD_NATS_STREAM_REPLICAS must be 1..5")
        if self.chat_event_retention_s < 10:
            raise ValueError("SWITCHBOARD_CHAT_EVENT_RETENTION_S must be at least 10")
        if not 0 <= self.chat_resume_grace_s <= 60:
            raise ValueError("SWITCHBOARD_CHAT_RESUME_GRACE_S must be 0..60")

    @property
    def limits(self) -> Limits:
        return Limits(
            max_message_bytes=self.chat_max_message_bytes,
            resume_grace=self.chat_resume_grace_s,
            idle_ttl=self.chat_idle_ttl_s,
            flow_window=self.chat_flow_window,
        )
