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
    replicas_field: str = ""
    """The LauncherConfig field holding the number of replicas `up` starts; empty =
    `<name>_replicas`."""
    most: int = 0
    """The most replicas it may run (0: the configured maximum)."""
    numbered: bool = False
    """Whether even its first replica's name carries its slot (`admission-0`); others
    are named `inference`, then `inference-1`, `inference-2`."""
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

    @property
    def index(self) -> int:
        """Its place in `SERVICES` (which spreads the metrics ports)."""
        return SERVICES.index(self)

    def replicas(self, config: LauncherConfig) -> int:
        """How many replicas `up` starts."""
        return int(getattr(config, self.replicas_field or f"{self.name}_replicas"))

    def process_name(self, config: LauncherConfig, slot: int) -> str:
        """`inference`, `inference-1`, ...; `admission-0`, `admission-1` when numbered."""
        return f"{self.name}-{slot}" if self.numbered or slot else self.name

    def slot_of(self, name: str) -> int | None:
        """The slot a process name of this kind stands for (None: not this kind's)."""
        if name == self.name and not self.numbered:
            return 0
        prefix, _, slot = name.rpartition("-")
        if prefix != self.name or not slot.isdigit() or (slot == "0" and not self.numbered):
            return None
        return int(slot) if int(slot) < MAX_SLOTS else None

    def port(self, config: LauncherConfig, slot: int) -> int:
        """The replica in slot s listens on the configured port + 10·s."""
        return getattr(config, self.port_field) + REPLICA_PORT_STRIDE * slot

    def metrics_port(self, config: LauncherConfig, slot: int) -> int:
        """Its Prometheus endpoint: metrics_base_port + 10·slot + its place in SERVICES."""
        return config.metrics_base_port + REPLICA_PORT_STRIDE * slot + self.index


REPLICA_PORT_STRIDE = 10
MAX_SLOTS = 5
"""Slots (ports) each service has: a scale to the maximum of replicas (MAX_SLOTS - 1)
leaves one free for a rollout's surge replica."""
SERVICES: tuple[ServiceSpec, ...] = (
    ServiceSpec(catalogue.INFERENCE, "inference_port"),
    ServiceSpec(
        catalogue.ADMISSION,
        "admission_port",
        numbered=True,
        hash_header=TENANT_HEADER,
    ),
    ServiceSpec(catalogue.RAG, "rag_port"),
    ServiceSpec(catalogue.EXECUTION, "execution_port"),
    ServiceSpec(
        catalogue.WORKER,
        "worker_port",
        replicas_field="workers",
        numbered=True,
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
    """Every service process `up` starts, as (spec, slot)."""
    return [(spec, i) for spec in SERVICES for i in range(spec.replicas(config))]


def spec_of(name: str) -> tuple[ServiceSpec, int] | None:
    """The spec and slot a process name stands for (`admission-1`), if any."""
    for spec in SERVICES:
        slot = spec.slot_of(name)
        if slot is not None:
            return spec, slot
    return None


@dataclass(frozen=True)
class MeshAddresses:
    """Where a service process finds the rest of the mesh."""

    internal: str
    """Envoy's internal listener: every call to another service goes through it."""
    database_url: str
    nats_url: str
    triton_urls: tuple[str, ...]


def service_env(
    config: LauncherConfig, spec: ServiceSpec, slot: int, mesh: MeshAddresses
) -> dict[str, str]:
    """The environment of one service process."""
    prefix = f"SWITCHBOARD_{spec.name.upper()}_"
    # Calls between services go through the internal listener: no key, the tenant of the
    # call being handled travels as x-tenant-id and is trusted there.
    return {
        f"{prefix}REPLICA_ID": spec.process_name(config, slot),
        "SWITCHBOARD_ADMISSION_TARGET": mesh.internal,
        "SWITCHBOARD_INFERENCE_TARGET": mesh.internal,
        "SWITCHBOARD_RAG_TARGET": mesh.internal,
        "SWITCHBOARD_EXECUTION_TARGET": mesh.internal,
        "SWITCHBOARD_ADMISSION_REPLICAS": str(config.admission_replicas),
        f"{prefix}HOST": config.host,
        f"{prefix}PORT": str(spec.port(config, slot)),
        f"{prefix}METRICS_PORT": str(spec.metrics_port(config, slot)),
        "SWITCHBOARD_TRITON_URLS": ",".join(mesh.triton_urls),
        "SWITCHBOARD_MODEL_POLICY": str(config.model_policy),
        "SWITCHBOARD_DATABASE_URL": mesh.database_url,
        "SWITCHBOARD_NATS_URL": mesh.nats_url,
        "SWITCHBOARD_AUTH_CACHE_TTL": f"{config.auth_cache_ttl.total_seconds():g}s",
        "SWITCHBOARD_AUTH_SIGNING_KEY": str(config.signing_key_path),
        "SWITCHBOARD_TRACES_DIR": str(config.traces_dir),
        "SWITCHBOARD_TRACE_SAMPLING": f"{config.trace_sampling:g}",
        "PYTHONUNBUFFERED": "1",
    }
