"""The Envoy edge: one port, every public service listed and described, health (these
without an API key), and a call with one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from services.runtime import public_services

GRPCURL = str(Path(sys.executable).parent / "grpcurl")


def grpcurl(
    target: str, *args: str, data: str | None = None, key: str | None = None
) -> subprocess.CompletedProcess:
    flags = ["-plaintext"]
    if key is not None:
        flags += ["-H", f"authorization: Bearer {key}"]
    if data is not None:
        flags += ["-d", data]
    argv = [GRPCURL, *flags, target, *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_grpcurl_lists_every_public_service_through_envoy(envoy_target):
    listed = set(grpcurl(envoy_target, "list").stdout.split())
    expected = set(public_services())
    assert len(expected) == 6  # five data services and the operators' KeyService
    assert expected <= listed


@pytest.mark.parametrize("service", public_services())
def test_grpcurl_describes_each_service(envoy_target, service):
    result = grpcurl(envoy_target, "describe", service)
    assert result.returncode == 0, result.stderr
    assert f"{service} is a service" in result.stdout
    assert "rpc " in result.stdout


def test_health_is_reachable_through_envoy(envoy_target):
    result = grpcurl(
        envoy_target,
        "grpc.health.v1.Health/Check",
        data='{"service": "switchboard.inference.v1.InferenceService"}',
    )
    assert result.returncode == 0, result.stderr
    assert '"SERVING"' in result.stdout


def test_grpcurl_streams_a_generation(envoy_target, credentials):
    result = grpcurl(
        envoy_target,
        "switchboard.inference.v1.InferenceService/Generate",
        key=credentials.key("tests"),
        data='{"prompt": "What does Envoy do?", "context": [{"source_id": "doc-1", "text": '
        '"Envoy is an edge proxy. It routes gRPC calls by service name. Cats sleep a lot."}]}',
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count('"token"') >= 2
    assert '"complete"' in result.stdout and '"usage"' in result.stdout


async def test_unknown_service_is_unimplemented(envoy_target):
    import grpc

    async with grpc.aio.insecure_channel(envoy_target) as channel:
        call = channel.unary_unary("/switchboard.nope.v1.NopeService/Missing")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(b"", timeout=5)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
