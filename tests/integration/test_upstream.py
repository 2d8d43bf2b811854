"""A tier served by an OpenAI-compatible upstream instead of Triton.

The upstream is a real OpenAI-compatible server: the mesh's own HTTP API (`/v1` on
Envoy's public port, behind its API keys and admission). A second inference service,
started here on a free port with the mesh's Triton for its embedder, serves
`relay_small` from that upstream (the mesh's `generator_small`) and `dead_large` from an
endpoint nobody listens on.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
import yaml
from switchboard.inference.v1 import inference_pb2, inference_service_pb2_grpc

from services.inference import InferenceConfig, InferenceService
from services.runtime import ServerConfig, create_server
from tests.integration.conftest import as_tenant

KEY_ENV = "SWITCHBOARD_TEST_UPSTREAM_KEY"
PASSAGES = [
    "Envoy is an edge and service proxy. It speaks HTTP/2 and gRPC.",
    "PostgreSQL stores the chat history. pgvector adds vector search to it.",
]
PROMPT = "What does pgvector add?"


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
async def relay(mesh, tmp_path, monkeypatch) -> AsyncIterator[tuple[str, object]]:
    """A relay inference service, and the tenant whose key it sends upstream."""
    tenant = f"upstream-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv(KEY_ENV, as_tenant(tenant)[0][1].removeprefix("Bearer "))
    policy = yaml.safe_load(InferenceConfig.model_policy.read_text())
    policy["generators"] = [
        {
            "name": "relay_small",
            "tier": "small",
            "context_tokens": 2048,
            "relative_cost": 1.0,
            "default_max_tokens": 64,
            "upstream": {
                "kind": "openai",
                "base_url": f"http://{mesh.envoy_address}/v1",
                "model": "generator_small",
                "api_key_env": KEY_ENV,
            },
        },
        {
            "name": "dead_large",
            "tier": "large",
            "context_tokens": 8192,
            "relative_cost": 6.0,
            "upstream": {"base_url": f"http://127.0.0.1:{closed_port()}/v1"},
        },
    ]
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(policy))
    service = InferenceService(
        InferenceConfig(triton_urls=mesh.triton_urls, model_policy=path, breaker_fail_max=2)
    )
    await service.start()
    server, port, _ = create_server(ServerConfig(port=0), service)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield tenant, inference_service_pb2_grpc.InferenceServiceStub(channel)
    finally:
        await server.stop(0)
        await service.shutdown()


def request(model: str) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        prompt=PROMPT,
        context=[inference_pb2.Passage(text=p) for p in PASSAGES],
        model=model,
        parameters=inference_pb2.GenerationParameters(max_tokens=32),
    )


async def answer(stub, model: str, metadata) -> tuple[str, inference_pb2.GenerationComplete]:
    replies = [r async for r in stub.Generate(request(model), metadata=metadata, timeout=30)]
    text = "".join(r.token.text for r in replies if r.HasField("token"))
    return text, replies[-1].complete


async def test_an_upstream_tier_streams_what_the_upstream_generates(relay, inference, mesh):
    tenant, stub = relay
    relayed, complete = await answer(stub, "relay_small", (("x-tenant-id", tenant),))
    direct, _ = await answer(inference, "generator_small", as_tenant(tenant))
    assert relayed and relayed == direct  # the same passages reached the same model
    assert "pgvector" in relayed
    assert complete.model.name == "relay_small"
    assert complete.backend == f"http://{mesh.envoy_address}/v1#generator_small"
    assert complete.usage.completion_tokens > 0


async def test_listed_with_its_upstream_as_its_backend(relay, mesh):
    _, stub = relay
    models = {m.name: m for m in (await stub.ListModels(inference_pb2.ListModelsRequest())).models}
    (backend,) = models["relay_small"].backends
    assert backend.address == f"http://{mesh.envoy_address}/v1"
    assert models["relay_small"].healthy
    assert not models["dead_large"].healthy
    assert all(b.address.startswith("127.0.0.1:") for b in models["embedder"].backends)


async def test_a_dead_upstream_falls_back_to_another_tier_then_its_circuit_opens(relay):
    tenant, stub = relay
    metadata = (("x-tenant-id", tenant),)
    for _ in range(3):  # breaker_fail_max=2: the third call does not even try it
        text, complete = await answer(stub, "dead_large", metadata)
        assert text and complete.model.name == "relay_small"
    models = (await stub.ListModels(inference_pb2.ListModelsRequest())).models
    (dead,) = next(m for m in models if m.name == "dead_large").backends
    assert dead.state == inference_pb2.BACKEND_STATE_OPEN


async def test_bad_upstream_configuration_fails_at_start(tmp_path):
    policy = yaml.safe_load(InferenceConfig.model_policy.read_text())
    policy["generators"][0]["upstream"] = {"kind": "grpc", "base_url": "http://x/v1"}
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(policy))
    with pytest.raises(ValueError, match="unknown upstream kind"):
        await InferenceService(
            InferenceConfig(triton_urls=("127.0.0.1:1",), model_policy=path)
        ).start()
