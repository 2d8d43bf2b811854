"""Configuration of the execution service and its workers."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from services.runtime import load_config

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExecutionConfig:
    """Read from `SWITCHBOARD_*`; the launcher sets the URLs and the mesh target."""

    database_url: str
    """PostgreSQL holding task and step state (`SWITCHBOARD_DATABASE_URL`)."""
    nats_url: str
    """NATS with JetStream (`SWITCHBOARD_NATS_URL`)."""
    inference_target: str = ""
    """The mesh (Envoy) for generate and retrieve steps and gRPC tools."""
    execution_tools: Path = Path(__file__).with_name("tools.yaml")
    """The tool registry (YAML)."""
    execution_workers: int = 16
    """Steps one worker process runs at once."""
    execution_ack_wait: timedelta = timedelta(seconds=10)
    """A step whose worker stops heartbeating for this long is redelivered."""
    execution_max_deliver: int = 20
    """Deliveries of one step before it is dead-lettered (its worker keeps dying)."""
    execution_republish_after: timedelta = timedelta(seconds=30)
    """A step QUEUED this long without being taken has its work message sent again."""
    execution_event_retention: timedelta = timedelta(days=7)
    """How long a task's events stay in JetStream for WatchTask (NATS keeps about 0.5 KB of
    memory per task whose events it holds)."""
    execution_duplicate_window: timedelta = timedelta(minutes=10)
    """How long JetStream remembers a publish's id to drop a republish after a crash (about
    0.2 KB of NATS memory per message within it); longer than any crash-to-republish gap."""
    execution_sandbox_pool: int = 2
    """Pre-started sandboxes kept warm for RunCode and code steps (0 = none)."""
    nats_stream_replicas: int = 1
    """Copies JetStream keeps of each stream this service makes (1: one NATS server; 3 on
    a 3-node cluster, so that losing a node loses nothing)."""

    def __post_init__(self) -> None:
        if not self.database_url or not self.nats_url:
            raise ValueError("SWITCHBOARD_DATABASE_URL and SWITCHBOARD_NATS_URL are required")
        if not 1 <= self.nats_stream_replicas <= 5:
            raise ValueError("SWITCHBOARD_NATS_STREAM_REPLICAS must be 1..5")
        if self.execution_workers < 1 or self.execution_max_deliver < 2:
            raise ValueError("SWITCHBOARD_EXECUTION_WORKERS >= 1, _MAX_DELIVER >= 2")
        if self.execution_duplicate_window < timedelta(seconds=60):
            raise ValueError("SWITCHBOARD_EXECUTION_DUPLICATE_WINDOW must be at least 60s")
        if self.execution_event_retention < self.execution_duplicate_window:
            raise ValueError(
                "SWITCHBOARD_EXECUTION_EVENT_RETENTION must be at least the duplicate window"
            )


def load_execution_config() -> ExecutionConfig:
    return load_config(ExecutionConfig, prefix="SWITCHBOARD_")
