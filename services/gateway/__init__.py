"""The gateway: an OpenAI-compatible HTTP API (`/v1/chat/completions` with SSE,
`/v1/completions`, `/v1/embeddings`, `/v1/models`) on Envoy's public port. The process
embeds an InferenceService (router, breakers, admission gate) and calls its RPCs
in-process through the generated stub on a `LocalChannel`: a request is checked against
the same contract and gets the same API keys, admission, model routing, session affinity,
usage accounting and errors as a gRPC caller, without a second gRPC hop.

`requests` and `responses` are the pure mapping between OpenAI's bodies and the
contract's messages, `sse` the event framing, `handlers` the calls, `server` the process.
"""

from __future__ import annotations

import logging

from services.gateway.config import GatewayConfig, load_gateway_config
from services.gateway.handlers import SESSION_HEADER, TIMEOUT_HEADER, Api
from services.gateway.requests import (
    AUTO,
    EmbedCall,
    GenerateCall,
    chat_call,
    completion_call,
    embed_call,
)
from services.gateway.server import Gateway, main, serve

logger = logging.getLogger(__name__)

__all__ = [
    "AUTO",
    "SESSION_HEADER",
    "TIMEOUT_HEADER",
    "Api",
    "EmbedCall",
    "Gateway",
    "GatewayConfig",
    "GenerateCall",
    "chat_call",
    "completion_call",
    "embed_call",
    "load_gateway_config",
    "main",
    "serve",
]
