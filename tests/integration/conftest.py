"""Session fixtures: the real mesh, started through the launcher users run."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from switchboard.inference.v1 import inference_service_pb2_grpc

from services.launcher._config import isolated_config
from services.launcher._mesh import Mesh


@pytest.fixture(scope="session")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    mesh = Mesh(isolated_config(tmp_path_factory.mktemp("run")), progress=print)
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
