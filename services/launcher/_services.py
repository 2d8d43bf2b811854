"""What the launcher runs: one spec per kind of the mesh's processes (`catalogue.MESH`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from services.launcher._config import LauncherConfig
from services.runtime import TENANT_HEADER, MeshService, catalogue

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceSpec:
    """How the launcher runs one kind of the mesh's processes (`catalogue.MESH`)."""

    service: MeshService
    port_field: str
    replicas_field: str | None = None
    """The LauncherConfig field holding the replica count; None = one process."""
    hash_header: str | None = None
    """Envoy spreads calls over the replicas by a consistent hash of this header."""
    entry: str = ""
    """The module run with `python -m`; empty = `services.<name>`."""

    @property
    def name(self) -> str:
        return self.service.name

    @property
    def grpc_services(self) -> tuple[str, ...]:
        """The public gRPC services it serves, which Envoy routes to it."""
        return self.service.grpc_services

    @property
    def module(self) -> str:
        return self.entry or f"services.{self.name}"

    @property
    def public(self) -> bool:
        """Whether Envoy routes gRPC calls to it (a worker serves only health)."""
        return bool(self.grpc_services)

    @property
    def http(self) -> bool:
        """Whether it is an HTTP server: health at HTTP_HEALTH_PATH, routed by path."""
        return self.service.http

    @property
    def health_service(self) -> str:
        """The grpc.health.v1 name it reports SERVING under when ready ("" = the server)."""
        return self.grpc_services[0] if self.grpc_services else ""

    def replicas(self, config: LauncherConfig) -> int:
        return getattr(config, self.replicas_field) if self.replicas_field else 1

    def process_name(self, config: LauncherConfig, replica: int) -> str:
        """`inference` for a single process, `admission-0`, `admission-1` for replicas."""
        return f"{self.name}-{replica}" if self.replicas_field else self.name

    def port(self, config: LauncherConfig, replica: int) -> int:
        """Replica i listens on the configured port + 10·i."""
        return getattr(config, self.port_field) + REPLICA_PORT_STRIDE * replica


REPLICA_PORT_STRIDE = 10
SERVICES: tuple[ServiceSpec, ...] = (
    ServiceSpec(catalogue.INFERENCE, "inference_port"),
    ServiceSpec(
        catalogue.ADMISSION,
        "admission_port",
        replicas_field="admission_replicas",
        hash_header=TENANT_HEADER,
    ),
    ServiceSpec(catalogue.RAG, "rag_port"),
    ServiceSpec(catalogue.EXECUTION, "execution_port"),
    ServiceSpec(
        catalogue.WORKER,
        "worker_port",
        replicas_field="workers",
        entry="services.execution.worker",
    ),
    ServiceSpec(catalogue.CHAT, "chat_port"),
    # Late, so the other processes keep their metrics ports; Envoy starts after them.
    ServiceSpec(catalogue.AUTH, "auth_port"),
    ServiceSpec(catalogue.GATEWAY, "gateway_port"),
)
assert tuple(spec.service for spec in SERVICES) == catalogue.MESH, "one spec per kind"
AUTHORIZATION = "envoy.service.auth.v3.Authorization"
"""Envoy's external authorization, which the auth process also serves; Envoy asks it
about every public call, and clients never reach it."""
AUTH = next(spec for spec in SERVICES if spec.name == "auth")


def service_processes(config: LauncherConfig) -> list[tuple[ServiceSpec, int]]:
    """Every service process as (spec, replica); process k's metrics port is base + k."""
    return [(spec, i) for spec in SERVICES for i in range(spec.replicas(config))]
