"""A mesh of its own for the control plane's tests: every service as two replicas, two
Tritons, started through the launcher users run, stopped by PID even when a test fails.
Its replicas are killed, scaled and rolled out, which the session mesh of
tests/integration must never see. It lives as long as this package's tests: stopped
before the integration tests start theirs."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import timedelta

import pytest

from services.launcher import Mesh, isolated_config

REPLICAS = {
    "inference_replicas": 2,
    "admission_replicas": 2,
    "rag_replicas": 2,
    "execution_replicas": 2,
    "workers": 2,
    "auth_replicas": 2,
    "gateway_replicas": 2,
    "chat_replicas": 2,
}


@pytest.fixture(scope="package")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    config = isolated_config(tmp_path_factory.mktemp("control-run"), triton_replicas=2)
    config = dataclasses.replace(config, auth_cache_ttl=timedelta(seconds=2), **REPLICAS)
    mesh = Mesh(config, progress=print)
    try:
        mesh.up()
        yield mesh
    finally:
        mesh.down()
