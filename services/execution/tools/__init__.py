"""Tool steps: calls to registered HTTP and gRPC tools, with timeouts, retries and breakers.

`_registry` reads and checks the tools' YAML (`load_tools`); `_methods` finds a gRPC
tool's method in the generated code; `_executor` runs a call's attempts (time limits,
retries, the tool's circuit breaker, the idempotency key); `_http` and `_grpc` make one
attempt each and say what the tool's answer means.
"""

from __future__ import annotations

from services.execution.tools._executor import ToolExecutor
from services.execution.tools._grpc import IDEMPOTENCY_METADATA
from services.execution.tools._http import IDEMPOTENCY_HEADER, MAX_RESPONSE_BYTES
from services.execution.tools._registry import (
    GrpcToolSpec,
    HttpToolSpec,
    ToolsConfig,
    ToolSpec,
    load_tools,
)

__all__ = [
    "IDEMPOTENCY_HEADER",
    "IDEMPOTENCY_METADATA",
    "MAX_RESPONSE_BYTES",
    "GrpcToolSpec",
    "HttpToolSpec",
    "ToolExecutor",
    "ToolSpec",
    "ToolsConfig",
    "load_tools",
]
