"""Envoy's own spans in the trace store: the mesh's Envoy traces a call on the public
port and exports its spans to the control plane, which writes them to
`<traces_dir>/envoy.jsonl`. Envoy is the root of a call that arrives without a
`traceparent` (its server span; a key Envoy cannot check itself adds the ext_authz check
as a child), and continues the trace of one that arrives with it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import pytest
from switchboard.inference.v1 import inference_pb2, inference_service_pb2_grpc

from services.launcher import Mesh
from tests.integration.conftest import Credentials
from tests.polling import eventually

LIST_MODELS = "/switchboard.inference.v1.InferenceService/ListModels"
AUTHZ_SPAN = "async envoy.service.auth.v3.Authorization.Check egress"
CLIENT_TRACE = "5b8aa5a2d2c872e8321cf37308d69df2"
CLIENT_SPAN = "051581bf3cb55c13"
EXPORT_WAIT_S = 20.0
"""Envoy exports its spans every 5 s (or once 5 are waiting)."""


def spans(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


async def list_models(target: str, metadata: tuple[tuple[str, str], ...]) -> str:
    """One authenticated call through the public port; Envoy's `x-request-id` for it."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
        call = stub.ListModels(inference_pb2.ListModelsRequest(), metadata=metadata, timeout=10)
        await call
        assert await call.code() == grpc.StatusCode.OK
        return dict(await call.initial_metadata())["x-request-id"]


@pytest.fixture(scope="module")
async def older_key(mesh: Mesh) -> tuple[tuple[str, str], ...]:
    """A key of the older `sb_` form: Envoy asks the auth service about it (ext_authz)."""
    async with mesh.key_store(signed=False) as store:
        _, token = await store.create("tests", "traces")
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture
def envoy_spans(mesh: Mesh) -> Path:
    assert mesh.config.trace_sampling == 1.0
    return mesh.config.traces_dir / "envoy.jsonl"


async def server_span(path: Path, request_id: str) -> dict[str, Any]:
    """Envoy's server span of the call `request_id` names, once it is in the store."""
    found: list[dict[str, Any]] = []

    def exported() -> bool:
        found[:] = [
            s
            for s in spans(path)
            if s["kind"] == "server" and s["attributes"].get("switchboard.request_id") == request_id
        ]
        return bool(found)

    await eventually(exported, timeout=EXPORT_WAIT_S, what=f"Envoy's span of {request_id}")
    (span,) = found
    return span


async def in_services(path: Path, parent: dict[str, Any]) -> list[dict[str, Any]]:
    """The services' spans (not Envoy's) whose parent is `parent`, once there are any."""
    found: list[dict[str, Any]] = []

    def exported() -> bool:
        found[:] = [
            s
            for other in path.parent.glob("*.jsonl")
            if other != path
            for s in spans(other)
            if s["parent_id"] == parent["span_id"]
        ]
        return bool(found)

    await eventually(exported, timeout=EXPORT_WAIT_S, what=f"the services' children of {parent}")
    return found


async def children(path: Path, parent: dict[str, Any], count: int) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []

    def exported() -> bool:
        found[:] = [s for s in spans(path) if s["parent_id"] == parent["span_id"]]
        return len(found) >= count

    await eventually(exported, timeout=EXPORT_WAIT_S, what=f"{count} children of {parent}")
    return found


async def test_envoy_roots_the_trace_of_a_call_without_traceparent(
    envoy_target: str, credentials: Credentials, envoy_spans: Path
) -> None:
    request_id = await list_models(envoy_target, credentials.metadata("tests"))

    span = await server_span(envoy_spans, request_id)
    assert span["parent_id"] is None
    assert span["name"] == LIST_MODELS
    assert (span["service"], span["process"]) == ("envoy", "envoy")
    assert span["status"] != "error"
    assert span["start_ns"] <= span["end_ns"]
    assert span["attributes"]["grpc.status_code"] == "0"
    assert span["attributes"]["upstream_cluster"] == "inference"

    # the routed call continues Envoy's span: the inference replica's server span
    (routed,) = await in_services(envoy_spans, span)
    assert routed["name"].endswith("InferenceService/ListModels")
    assert (routed["trace_id"], routed["kind"]) == (span["trace_id"], "server")
    # a tenant's key is checked by Envoy itself: no ext_authz span
    assert [s for s in spans(envoy_spans) if s["parent_id"] == span["span_id"]] == []


async def test_a_key_envoy_asks_the_auth_service_about_adds_the_check_to_the_trace(
    envoy_target: str, older_key: tuple[tuple[str, str], ...], envoy_spans: Path
) -> None:
    request_id = await list_models(envoy_target, older_key)
    span = await server_span(envoy_spans, request_id)
    (authz,) = await children(envoy_spans, span, 1)
    assert authz["name"] == AUTHZ_SPAN
    assert authz["kind"] == "client"
    assert authz["trace_id"] == span["trace_id"]
    assert authz["attributes"]["ext_authz_status"] == "ext_authz_ok"


async def test_envoy_continues_the_trace_a_client_sends(
    envoy_target: str, credentials: Credentials, envoy_spans: Path
) -> None:
    traceparent = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    request_id = await list_models(
        envoy_target, (*credentials.metadata("tests"), ("traceparent", traceparent))
    )

    span = await server_span(envoy_spans, request_id)
    assert (span["trace_id"], span["parent_id"]) == (CLIENT_TRACE, CLIENT_SPAN)
    (routed,) = await in_services(envoy_spans, span)
    assert (routed["trace_id"], routed["parent_id"]) == (CLIENT_TRACE, span["span_id"])


async def test_the_auth_service_continues_envoy_s_key_check(
    envoy_target: str, older_key: tuple[tuple[str, str], ...], envoy_spans: Path
) -> None:
    """Envoy's gRPC client passes the ext_authz span's context on: the auth service's
    span of the check is its child (the services write their spans next to Envoy's),
    and knows the call by Envoy's request id."""
    request_id = await list_models(envoy_target, older_key)
    span = await server_span(envoy_spans, request_id)
    (authz,) = [s for s in await children(envoy_spans, span, 1) if s["name"] == AUTHZ_SPAN]

    (check,) = await in_services(envoy_spans, authz)
    assert check["trace_id"] == span["trace_id"]
    assert check["kind"] == "server"
    assert check["attributes"]["switchboard.request_id"] == request_id
