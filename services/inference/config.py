"""Configuration of the inference (routing) service."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from services.inference.router import EMBED_TEXTS_HARD_MAX
from services.inference.triton import GENERATION_IDLE
from services.runtime import load_config

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferenceConfig:
    """Read from `SWITCHBOARD_*`; the launcher sets the Triton URLs and the policy path."""

    triton_urls: tuple[str, ...]
    """gRPC addresses of the Triton replicas, comma-separated."""
    model_policy: Path = Path(__file__).with_name("models.yaml")
    breaker_fail_max: int = 3
    """Consecutive failures that open a backend's circuit."""
    breaker_reset: timedelta = timedelta(seconds=5)
    """How long an open circuit waits before one probe call."""
    affinity_slack: int = 4
    """A session stays on its backend while it has at most this many more outstanding
    calls than the least loaded backend."""
    admission_target: str = ""
    """Where AdmissionService is reached (Envoy, which routes by tenant); empty = no
    admission control (unit set-ups). The launcher always sets it."""
    admission_slice: int = 4
    """Leases of a busy tenant's quota kept ahead of need per tenant, tier and priority,
    so that most requests are admitted here with no round trip (0..16; 0 = every
    request asks its tenant's admission replica)."""
    embed_max_texts: int = EMBED_TEXTS_HARD_MAX
    """Most texts one Embed call may carry, 1..512 (the contract's own bound)."""
    generation_idle_timeout: timedelta = GENERATION_IDLE
    """The longest a generation waits for the next thing its backend sends, deadline or
    not: past it the backend counts as failed (another backend or tier is tried while
    nothing was streamed). It bounds a chat turn's answer, which has no deadline of its
    own, when a model server stalls without closing."""

    def __post_init__(self) -> None:
        if not self.triton_urls:
            raise ValueError("SWITCHBOARD_TRITON_URLS must list at least one host:port")
        if self.breaker_fail_max < 1:
            raise ValueError("SWITCHBOARD_BREAKER_FAIL_MAX must be at least 1")
        if not 0 <= self.admission_slice <= 16:
            raise ValueError("SWITCHBOARD_ADMISSION_SLICE must be 0..16")
        if self.generation_idle_timeout <= timedelta(0):
            raise ValueError("SWITCHBOARD_GENERATION_IDLE_TIMEOUT must be positive")
        if not 1 <= self.embed_max_texts <= EMBED_TEXTS_HARD_MAX:
            raise ValueError(f"SWITCHBOARD_EMBED_MAX_TEXTS must be 1..{EMBED_TEXTS_HARD_MAX}")


def load_inference_config() -> InferenceConfig:
    return load_config(InferenceConfig, prefix="SWITCHBOARD_")
