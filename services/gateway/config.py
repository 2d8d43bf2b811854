"""Configuration of the gateway (the OpenAI-compatible HTTP API)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from services.runtime import load_config

logger = logging.getLogger(__name__)

PREFIX = "SWITCHBOARD_GATEWAY_"


@dataclass(frozen=True)
class GatewayConfig:
    """Read from `SWITCHBOARD_GATEWAY_*`. The InferenceService the gateway embeds reads
    its own configuration (`SWITCHBOARD_TRITON_URLS`, `SWITCHBOARD_MODEL_POLICY`,
    `SWITCHBOARD_ADMISSION_TARGET`, ...), as an inference replica does."""

    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int = 0
    """Port of the Prometheus `/metrics` endpoint; 0 disables it."""
    max_body_bytes: int = 1 << 20
    """Largest request body read; a larger one is refused with 413 before it is read
    whole (a declared Content-Length at once, a chunked body once it passes the limit)."""
    timeout: timedelta = timedelta(minutes=10)
    """A call's deadline (admission queueing included) when the client states none
    (`x-switchboard-timeout`, or the OpenAI SDK's `x-stainless-read-timeout`)."""
    max_timeout: timedelta = timedelta(hours=1)
    """The longest deadline a client may ask for."""
    drain: timedelta = timedelta(seconds=1)
    """How long the gateway reports unhealthy before it stops accepting requests."""
    grace: timedelta = timedelta(seconds=10)
    """How long requests in flight may take to finish after the drain."""
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536 or not 0 <= self.metrics_port < 65536:
            raise ValueError("ports must be within 0..65535")
        if self.max_body_bytes < 1024:
            raise ValueError("SWITCHBOARD_GATEWAY_MAX_BODY_BYTES must be at least 1024")
        if not timedelta(0) < self.timeout <= self.max_timeout:
            raise ValueError("SWITCHBOARD_GATEWAY_TIMEOUT must be positive and <= MAX_TIMEOUT")


def load_gateway_config() -> GatewayConfig:
    return load_config(GatewayConfig, prefix=PREFIX)
