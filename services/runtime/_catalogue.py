"""The mesh's vocabulary, in one place: its services and the gRPC services each serves,
and the model tiers. Names come from the contracts' descriptors, never from string
literals, so a renamed service or a new tier is a change to `proto/` and this file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import MappingProxyType

from switchboard.admission.v1 import admission_service_pb2
from switchboard.auth.v1 import auth_service_pb2
from switchboard.chat.v1 import chat_service_pb2
from switchboard.common.v1 import common_pb2
from switchboard.execution.v1 import execution_service_pb2
from switchboard.inference.v1 import inference_service_pb2
from switchboard.rag.v1 import rag_service_pb2

logger = logging.getLogger(__name__)


def _full_name(module: object, service: str) -> str:
    return module.DESCRIPTOR.services_by_name[service].full_name  # type: ignore[attr-defined]


@dataclass(frozen=True)
class MeshService:
    """One kind of Switchboard process and the public gRPC services it serves."""

    name: str
    """The process kind: the package `services.<name>` and the launcher's name for it."""
    grpc_services: tuple[str, ...]
    """Fully-qualified names of the public gRPC services it serves (none for a worker)."""
    http_prefixes: tuple[str, ...] = ()
    """Path prefixes of the public HTTP API it serves (plain HTTP/1.1, not gRPC), which
    the edge routes to it after the same API-key check as every gRPC call."""

    @property
    def http(self) -> bool:
        """Whether it is an HTTP server (health at HTTP_HEALTH_PATH) rather than gRPC."""
        return bool(self.http_prefixes)


INFERENCE = MeshService("inference", (_full_name(inference_service_pb2, "InferenceService"),))
ADMISSION = MeshService("admission", (_full_name(admission_service_pb2, "AdmissionService"),))
RAG = MeshService("rag", (_full_name(rag_service_pb2, "RagService"),))
EXECUTION = MeshService("execution", (_full_name(execution_service_pb2, "ExecutionService"),))
WORKER = MeshService("worker", ())
CHAT = MeshService("chat", (_full_name(chat_service_pb2, "ChatService"),))
AUTH = MeshService("auth", (_full_name(auth_service_pb2, "KeyService"),))
GATEWAY = MeshService("gateway", (), http_prefixes=("/v1/",))
"""The OpenAI-compatible HTTP API (`/v1/chat/completions`, `/v1/embeddings`, ...), a
client of InferenceService's public contract."""

MESH: tuple[MeshService, ...] = (INFERENCE, ADMISSION, RAG, EXECUTION, WORKER, CHAT, AUTH, GATEWAY)
"""Every kind of process of the mesh, in the order the launcher starts them."""

HTTP_HEALTH_PATH = "/healthz"
"""Where an HTTP process of the mesh answers 200 while it is ready, 503 otherwise."""


def http_prefixes() -> tuple[str, ...]:
    """Path prefixes of every public HTTP API of the mesh (the edge routes them)."""
    return tuple(prefix for service in MESH for prefix in service.http_prefixes)


def public_services() -> tuple[str, ...]:
    """Full names of every public Switchboard service (the catalogue reflection shows)."""
    return tuple(name for service in MESH for name in service.grpc_services)


TIERS: MappingProxyType[int, str] = MappingProxyType(
    {
        value: name.removeprefix("MODEL_TIER_").lower()
        for name, value in common_pb2.ModelTier.items()
        if value != common_pb2.MODEL_TIER_UNSPECIFIED
    }
)
"""Model tier (`switchboard.common.v1.ModelTier`) → its name in configuration and
metrics (`small`, `large`), cheapest first."""
TIER_VALUES: MappingProxyType[str, int] = MappingProxyType({v: k for k, v in TIERS.items()})
"""Tier name → `ModelTier` value."""
