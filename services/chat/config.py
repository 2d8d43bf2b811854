"""The chat service's configuration, read from `SWITCHBOARD_*`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from services.chat.live import Limits
from services.chat.stream import LogLimits

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChatConfig:
    """Read from `SWITCHBOARD_*`; the launcher sets the URLs, the targets and the
    replica's name."""

    database_url: str
    """PostgreSQL holding sessions and history (`SWITCHBOARD_DATABASE_URL`)."""
    nats_url: str = ""
    """NATS with JetStream, holding the sessions' events and turn leases that every
    replica shares (`SWITCHBOARD_NATS_URL`). Empty: one chat process on its own, its
    sessions' events in its memory (a resume must come back to it)."""
    inference_target: str = ""
    """Where InferenceService is reached (the mesh)."""
    rag_target: str = ""
    """Where RagService is reached (the mesh)."""
    execution_target: str = ""
    """Where ExecutionService is reached (the mesh)."""
    chat_replica_id: str = ""
    """This replica's name in turn leases and logs (`SWITCHBOARD_CHAT_REPLICA_ID`);
    the process id is added to it."""
    chat_max_message_bytes: int = 32 * 1024
    """Largest user message, in UTF-8 bytes; a larger one gets an ErrorFrame."""
    chat_resume_grace_s: float = 0.5
    """Seconds an answer keeps generating after its client dropped, for a resume."""
    chat_idle_ttl_s: float = 120.0
    """Seconds an idle session stays live on a replica after its streams end."""
    chat_flow_window: int = 256
    """Events a stream may fall behind before what feeds it waits: its session's log
    reader (JetStream keeps the rest), or without NATS its session's generation."""
    chat_turn_lease_s: float = 5.0
    """Seconds a turn's lease holds unrenewed: how soon after its replica dies another
    one stores the partial answer and tells the session's streams."""
    chat_shutdown_grace_s: float = 10.0
    """Seconds the turns of a stopping replica may take to finish after its calls have
    (its clients resumed elsewhere get the rest); later ones are interrupted."""
    chat_event_max_age: timedelta = timedelta(hours=24)
    """How long a session's events are kept for resumes (with NATS)."""
    chat_events_per_session: int = 100_000
    """Events kept per session for resumes (with NATS); its oldest go first."""
    chat_event_bytes: int = 1 << 30
    """Bytes of events kept for every session together (with NATS)."""

    def __post_init__(self) -> None:
        if not self.database_url:
            raise ValueError("SWITCHBOARD_DATABASE_URL must name the chat database")
        if not (self.inference_target and self.rag_target and self.execution_target):
            raise ValueError(
                "SWITCHBOARD_INFERENCE_TARGET, SWITCHBOARD_RAG_TARGET and"
                " SWITCHBOARD_EXECUTION_TARGET must say where the other services are"
            )
        if self.chat_max_message_bytes < 1 or self.chat_flow_window < 1:
            raise ValueError("the message limit and the flow window must be positive")
        if not 0 <= self.chat_resume_grace_s <= 60:
            raise ValueError("SWITCHBOARD_CHAT_RESUME_GRACE_S must be 0..60")
        if self.chat_turn_lease_s < 0.3 or self.chat_shutdown_grace_s < 0:
            raise ValueError("the turn lease must be >= 0.3 s, the shutdown grace >= 0")

    @property
    def limits(self) -> Limits:
        return Limits(
            max_message_bytes=self.chat_max_message_bytes,
            resume_grace=self.chat_resume_grace_s,
            idle_ttl=self.chat_idle_ttl_s,
        )

    @property
    def log_limits(self) -> LogLimits:
        return LogLimits(
            max_age=self.chat_event_max_age,
            max_bytes=self.chat_event_bytes,
            max_per_session=self.chat_events_per_session,
            reader_window=self.chat_flow_window,
        )
