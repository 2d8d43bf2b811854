"""What the control plane supervises: one `Kind` per kind of process (each Switchboard
service, and Triton), which knows how to start the replica in a slot, where it listens
and how to tell that it is ready.

A replica lives in a slot: its ports are the slot's (`ServiceSpec.port`), so a
replica restarted in place keeps its address, and a rollout's new replica takes a free
slot beside the old one.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.launcher import _triton
from services.launcher._config import REPO_ROOT, LauncherConfig
from services.launcher._services import (
    MAX_SLOTS,
    SERVICES,
    MeshAddresses,
    ServiceSpec,
    service_env,
)
from services.runtime import HTTP_HEALTH_PATH

logger = logging.getLogger(__name__)

TRITON = "triton"


@dataclass(frozen=True)
class Command:
    """How to start one replica."""

    argv: list[str]
    env: dict[str, str]
    cwd: Path | None = None


class Kind:
    """One kind of supervised process."""

    name: str
    numbered: bool
    scalable: bool
    """Whether `scale` and `rollout` apply (Triton's replica set is fixed)."""
    start_timeout: float
    """How long a new replica may take to become ready before it counts as failed."""
    most: int = 0
    """The most replicas it may run (0: the control plane's maximum)."""
    spare_module: str | None = None
    """The module a warm spare of it preloads (`services.runtime.spare`); None: none."""

    def process_name(self, slot: int) -> str:
        return f"{self.name}-{slot}" if self.numbered or slot else self.name

    def slot_of(self, name: str) -> int | None:
        for slot in range(self.slots):
            if self.process_name(slot) == name:
                return slot
        return None

    @property
    def slots(self) -> int:
        return MAX_SLOTS

    def address(self, slot: int) -> tuple[str, int]:
        raise NotImplementedError

    def ports(self, slot: int) -> list[tuple[str, int]]:
        """Every address the replica in `slot` listens on."""
        return [self.address(slot)]

    def command(self, slot: int, extra_env: Mapping[str, str]) -> Command:
        raise NotImplementedError

    async def ready(self, slot: int) -> bool:
        raise NotImplementedError

    def cleanup(self, slot: int) -> None:
        """What a stopped or killed replica leaves behind, removed."""


class ServiceKind(Kind):
    """A Switchboard service: `python -m services.<name>`, ready when its gRPC health
    (HTTP health for the gateway) says SERVING."""

    start_timeout = 60.0
    scalable = True

    def __init__(self, spec: ServiceSpec, config: LauncherConfig, mesh: MeshAddresses) -> None:
        self.spec = spec
        self.name = spec.name
        self.numbered = spec.numbered
        self.most = spec.most
        self.spare_module = spec.module
        self._config = config
        self._mesh = mesh

    def address(self, slot: int) -> tuple[str, int]:
        return self._config.host, self.spec.port(self._config, slot)

    def ports(self, slot: int) -> list[tuple[str, int]]:
        return [self.address(slot), (self._config.host, self.spec.metrics_port(self._config, slot))]

    def command(self, slot: int, extra_env: Mapping[str, str]) -> Command:
        env = {**service_env(self._config, self.spec, slot, self._mesh), **extra_env}
        return Command([sys.executable, "-m", self.spec.module], env, REPO_ROOT)

    async def ready(self, slot: int) -> bool:
        host, port = self.address(slot)
        if self.spec.http:
            return await asyncio.to_thread(_http_ok, f"http://{host}:{port}{HTTP_HEALTH_PATH}")
        async with grpc.aio.insecure_channel(f"{host}:{port}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=self.spec.health_service), timeout=1.0
            )
        return reply.status == health_pb2.HealthCheckResponse.SERVING


class TritonKind(Kind):
    """An embedded Triton server: `triton-<i>` on the launcher's Triton ports, ready when
    its `/v2/health/ready` answers 200. Its set is fixed (the inference replicas are
    given every Triton's address at start): it is restarted, not scaled."""

    name = TRITON
    numbered = True
    scalable = False

    def __init__(self, config: LauncherConfig) -> None:
        self._config = config
        self.start_timeout = config.start_timeout_s

    @property
    def slots(self) -> int:
        return self._config.triton_replicas

    def address(self, slot: int) -> tuple[str, int]:
        return self._config.host, self._config.triton_ports(slot)[1]

    def ports(self, slot: int) -> list[tuple[str, int]]:
        return [(self._config.host, port) for port in self._config.triton_ports(slot)]

    def command(self, slot: int, extra_env: Mapping[str, str]) -> Command:
        repo, backend_dir, gpu = _triton.run_files(self._config)
        http, grpc_port, metrics = self._config.triton_ports(slot)
        argv, env = _triton.tritonserver_command(
            model_repo=repo,
            backend_dir=backend_dir,
            http_port=http,
            grpc_port=grpc_port,
            metrics_port=metrics,
            models=_triton.MODELS,
            gpu=gpu,
        )
        return Command(argv, {**env, **extra_env})

    async def ready(self, slot: int) -> bool:
        http = self._config.triton_ports(slot)[0]
        return await asyncio.to_thread(
            _http_ok, f"http://{self._config.host}:{http}/v2/health/ready"
        )

    def cleanup(self, slot: int) -> None:
        _triton.remove_shm_regions(self._config.triton_ports(slot)[1])


def mesh_kinds(config: LauncherConfig, mesh: MeshAddresses) -> dict[str, Kind]:
    """Every kind the control plane supervises, in start order (Triton first, when
    embedded)."""
    kinds: dict[str, Kind] = {}
    if not config.triton_url:
        kinds[TRITON] = TritonKind(config)
    for spec in SERVICES:
        kinds[spec.name] = ServiceKind(spec, config, mesh)
    return kinds


def initial_counts(config: LauncherConfig) -> dict[str, int]:
    """How many replicas of each kind `up` starts."""
    counts = {spec.name: spec.replicas(config) for spec in SERVICES}
    if not config.triton_url:
        counts = {TRITON: config.triton_replicas, **counts}
    return counts


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as reply:  # noqa: S310 - loopback only
            return 200 <= reply.status < 300
    except OSError:
        return False
