"""Session fixtures: the real mesh, started through the launcher users run."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import replace

import grpc
import pytest
from switchboard.inference.v1 import inference_service_pb2_grpc

from services.launcher._config import LauncherConfig
from services.launcher._mesh import Mesh
from services.launcher._procs import port_owner

HOST = "127.0.0.1"


def _free_base(span: int = 60) -> int:
    """A base port with `span` free ports above it (so parallel runs do not collide)."""
    for _ in range(200):
        base = random.randrange(20_000, 45_000, 100)
        if all(port_owner(HOST, base + i) is None for i in range(span)):
            return base
    raise RuntimeError("no free port range found")


@pytest.fixture(scope="session")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    base = _free_base()
    config = replace(
        LauncherConfig(),
        run_dir=tmp_path_factory.mktemp("run"),
        envoy_port=base,
        envoy_admin_port=base + 1,
        envoy_base_id=base,
        postgres_port=base + 2,
        nats_port=base + 3,
        nats_monitor_port=base + 4,
        inference_port=base + 5,
        metrics_base_port=base + 10,
        triton_base_port=base + 30,
        triton_replicas=2,
        gpu="off",
    )
    mesh = Mesh(config, progress=print)
    try:
        mesh.up()
        yield mesh
    finally:
        mesh.down()


@pytest.fixture(scope="session")
def envoy_target(mesh: Mesh) -> str:
    return mesh.envoy_address


@pytest.fixture
async def inference(envoy_target: str):
    """The generated Python client, through Envoy."""
    async with grpc.aio.insecure_channel(envoy_target) as channel:
        yield inference_service_pb2_grpc.InferenceServiceStub(channel)
