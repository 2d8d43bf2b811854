"""API keys against the mesh's PostgreSQL: the external-authorization check Envoy asks,
the `switchboard keys` command, and keys enforced end to end at the Envoy edge."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from datetime import timedelta
from pathlib import Path

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2, status_pb2
from prometheus_client.parser import text_string_to_metric_families
from switchboard.rag.v1 import rag_pb2, rag_service_pb2_grpc

from services.auth import AuthConfig, AuthService, keys
from services.auth.signing import SigningKey
from services.launcher import service_processes
from services.runtime import ERROR_DOMAIN, ServerConfig, create_server, error_details
from tests.polling import eventually

GRPCURL = str(Path(sys.executable).parent / "grpcurl")
RAG = "switchboard.rag.v1.RagService"
REVOCATION_BOUND_S = 3.0
"""A revoked key is refused within this (a poll of the revoked keys every second, then
a push to Envoy and its acknowledgement; or the auth replicas' own poll)."""


@pytest.fixture
async def authz(mesh):
    """The auth service on a free port, on the mesh's database, caching for 0 s."""
    service = AuthService(AuthConfig(database_url=mesh.database_url, auth_cache_ttl=timedelta(0)))
    await service.start()
    server, port, _ = create_server(ServerConfig(port=0), service)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield service.store, external_auth_pb2_grpc.AuthorizationStub(channel)
    finally:
        await server.stop(0)
        await service.shutdown()


def check(headers: dict[str, str]) -> external_auth_pb2.CheckRequest:
    request = external_auth_pb2.CheckRequest()
    request.attributes.request.http.headers.update(headers)
    return request


async def test_a_valid_key_sets_the_tenant_and_is_removed(authz):
    store, stub = authz
    tenant = f"tenant-{uuid.uuid4().hex[:8]}"
    _, token = await store.create(tenant, "test")
    for headers in ({"authorization": f"Bearer {token}"}, {"x-api-key": token}):
        spoofed = {"x-tenant-id": "someone-else", "x-switchboard-principal": "operator"}
        reply = await stub.Check(check({**headers, **spoofed}), timeout=5)
        assert reply.status.code == code_pb2.OK
        set_headers = {h.header.key: h.header.value for h in reply.ok_response.headers}
        assert set_headers == {"x-tenant-id": tenant, "x-switchboard-principal": "tenant"}
        assert {h.append_action for h in reply.ok_response.headers} == {
            reply.ok_response.headers[0].OVERWRITE_IF_EXISTS_OR_ADD
        }
        assert set(reply.ok_response.headers_to_remove) == {"authorization", "x-api-key"}


def check_call(headers: dict[str, str], path: str) -> external_auth_pb2.CheckRequest:
    request = check(headers)
    request.attributes.request.http.path = path
    return request


async def test_the_contract_decides_which_credential_may_call_a_method(authz):
    store, stub = authz
    tenant = f"tenant-{uuid.uuid4().hex[:8]}"
    _, tenant_key = await store.create(tenant, "test")
    _, operator_key = await store.create_operator("test")
    update = "/switchboard.admission.v1.AdmissionService/UpdatePolicy"
    generate = "/switchboard.inference.v1.InferenceService/Generate"
    quota = "/switchboard.admission.v1.AdmissionService/GetQuota"

    def bearer(key: str) -> dict[str, str]:
        return {"authorization": f"Bearer {key}", "x-tenant-id": "acme"}

    for key, path, allowed in (
        (tenant_key, update, False),
        (tenant_key, generate, True),
        (tenant_key, quota, True),
        (operator_key, update, True),
        (operator_key, generate, False),
        (operator_key, quota, True),
    ):
        reply = await stub.Check(check_call(bearer(key), path), timeout=5)
        if not allowed:
            assert reply.status.code == code_pb2.PERMISSION_DENIED, (key, path)
            assert reply.denied_response.status.code == 403
            grpc_status = {h.header.key: h.header.value for h in reply.denied_response.headers}
            status = status_pb2.Status.FromString(
                base64.b64decode(grpc_status["grpc-status-details-bin"])
            )
            assert error_details(status).error_info.reason == "PRINCIPAL_NOT_ALLOWED"
            continue
        assert reply.status.code == code_pb2.OK, (key, path)
        set_headers = {h.header.key: h.header.value for h in reply.ok_response.headers}
        if key == operator_key:  # acts on the tenant it names itself
            assert set_headers == {"x-switchboard-principal": "operator"}
        else:
            assert set_headers == {"x-switchboard-principal": "tenant", "x-tenant-id": tenant}


async def test_missing_wrong_and_revoked_keys_are_refused(authz):
    store, stub = authz
    key_id, token = await store.create(f"tenant-{uuid.uuid4().hex[:8]}")
    other_id, other = await store.create(f"tenant-{uuid.uuid4().hex[:8]}")
    forged = token[: -len(other.split("_")[2])] + other.split("_")[2]  # A's id, B's secret
    for headers, reason in (
        ({}, "API_KEY_MISSING"),
        ({"authorization": "Bearer not-a-key"}, "API_KEY_INVALID"),
        ({"authorization": f"Bearer {forged}"}, "API_KEY_INVALID"),
        ({"x-tenant-id": "acme"}, "API_KEY_MISSING"),
    ):
        reply = await stub.Check(check(headers), timeout=5)
        assert reply.status.code == code_pb2.UNAUTHENTICATED, headers
        assert reply.denied_response.status.code == 401
        grpc_status = {h.header.key: h.header.value for h in reply.denied_response.headers}
        assert grpc_status["grpc-status"] == str(code_pb2.UNAUTHENTICATED)
        assert reason.encode() in base64.b64decode(grpc_status["grpc-status-details-bin"])
    assert await store.revoke(key_id)
    reply = await stub.Check(check({"authorization": f"Bearer {token}"}), timeout=5)
    assert reply.status.code == code_pb2.UNAUTHENTICATED
    still = await stub.Check(check({"authorization": f"Bearer {other}"}), timeout=5)
    assert still.status.code == code_pb2.OK and other_id


def test_the_cli_creates_lists_and_revokes_keys(mesh):
    env = {
        **os.environ,
        "SWITCHBOARD_RUN_DIR": str(mesh.config.run_dir),
        "DATABASE_URL": mesh.database_url,
    }
    cli = [sys.executable, "-m", "services.launcher.cli", "keys"]
    tenant = f"tenant-{uuid.uuid4().hex[:8]}"
    created = subprocess.run(
        [*cli, "create", "--tenant", tenant, "--name", "ci"],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    token = created.stdout.split()[-1]
    key_id = created.stdout.split()[1]
    assert keys.parse(token) == (key_id, token)  # a signed token whose jti is the key's id
    claims = jwt.decode(token, options={"verify_signature": False})
    assert (claims["sub"], claims["kind"]) == (tenant, "tenant")
    listed = subprocess.run(
        [*cli, "list", "--tenant", tenant], env=env, capture_output=True, text=True, timeout=60
    )
    assert key_id in listed.stdout and "active" in listed.stdout
    assert token.split(".")[2] not in listed.stdout  # never the key itself
    subprocess.run([*cli, "revoke", key_id], env=env, timeout=60, check=True)
    relisted = subprocess.run(
        [*cli, "list", "--tenant", tenant], env=env, capture_output=True, text=True, timeout=60
    )
    assert "revoked" in relisted.stdout
    bad = subprocess.run(
        [*cli, "create", "--tenant", "no spaces"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "tenant id" in bad.stderr


# ---- end to end through Envoy ----------------------------------------------------------


def new_tenant() -> str:
    return f"tenant-{uuid.uuid4().hex[:12]}"


def rag_calls_started(mesh, method: str) -> float:
    """How many `method` calls the RAG service has begun (its Prometheus counter)."""
    (port,) = [
        spec.metrics_port(mesh.config, slot)
        for spec, slot in service_processes(mesh.config)
        if spec.process_name(mesh.config, slot) == "rag"
    ]
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        for family in text_string_to_metric_families(reply.read().decode()):
            for sample in family.samples:
                if sample.name == "switchboard_rpc_started_total" and sample.labels == {
                    "service": RAG,
                    "method": method,
                }:
                    return sample.value
    return 0.0


async def collections(stub, metadata) -> list[str]:
    reply = await stub.ListCollections(
        rag_pb2.ListCollectionsRequest(), metadata=metadata, timeout=10
    )
    return [c.name for c in reply.collections]


async def ingest(stub, metadata, collection: str) -> rag_pb2.IngestDocumentsResponse:
    async def stream():
        yield rag_pb2.IngestDocumentsRequest(
            document=rag_pb2.Document(
                document_id="doc", collection=collection, text="The VPN listens on 8443."
            )
        )

    return await stub.IngestDocuments(stream(), metadata=metadata, timeout=60)


@pytest.fixture
async def rag(envoy_target):
    async with grpc.aio.insecure_channel(envoy_target) as channel:
        yield rag_service_pb2_grpc.RagServiceStub(channel)


async def test_without_a_valid_key_envoy_refuses_and_no_service_is_reached(rag, mesh, credentials):
    victim = new_tenant()
    delete = rag_pb2.DeleteDocumentRequest(collection="docs", document_id="doc")
    before = rag_calls_started(mesh, "DeleteDocument")
    for metadata, reason in (
        ((), "API_KEY_MISSING"),
        ((("x-tenant-id", victim),), "API_KEY_MISSING"),
        ((("authorization", "Bearer sb_000000000000_" + "A" * 43),), "API_KEY_INVALID"),
        ((("authorization", f"Bearer {foreign_token(victim)}"),), "API_KEY_INVALID"),
        ((("authorization", f"Bearer {tampered_token(credentials, victim)}"),), "API_KEY_INVALID"),
        ((("authorization", "Basic dXNlcjpwYXNz"), ("x-tenant-id", victim)), "API_KEY_MISSING"),
        ((("x-api-key", "not-a-key"),), "API_KEY_INVALID"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await rag.DeleteDocument(delete, metadata=metadata, timeout=5)
        details = error_details(err.value)
        assert details.code == grpc.StatusCode.UNAUTHENTICATED, metadata
        assert (details.error_info.reason, details.error_info.domain) == (reason, ERROR_DOMAIN)
        assert details.error_info.metadata["request_id"]
        assert "API key" in details.message
    # a stream too: refused before any document is read, nothing stored for the victim
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await ingest(rag, (("x-tenant-id", victim),), "stolen")
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert await collections(rag, credentials.metadata(victim)) == []
    assert rag_calls_started(mesh, "DeleteDocument") == before, "a refused call got through"

    # the same call with a key reaches the service (so the counter above can move)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await rag.DeleteDocument(delete, metadata=credentials.metadata(victim), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert rag_calls_started(mesh, "DeleteDocument") == before + 1


def foreign_token(tenant: str) -> str:
    """A well-formed key token for `tenant`, signed by a key that is not the mesh's."""
    other = SigningKey(ec.generate_private_key(ec.SECP256R1()))
    return keys.new_key("tenant", tenant, other).token


def tampered_token(credentials, tenant: str) -> str:
    """A real key of another tenant with its claims rewritten to name `tenant` (the
    signature no longer matches)."""
    header, payload, signature = credentials.key(new_tenant()).split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    forged = json.dumps({**claims, "sub": tenant}).encode()
    return f"{header}.{base64.urlsafe_b64encode(forged).decode().rstrip('=')}.{signature}"


async def test_a_key_acts_for_its_own_tenant_whatever_x_tenant_id_says(rag, credentials):
    a, b = new_tenant(), new_tenant()
    spoofing = (*credentials.metadata(a), ("x-tenant-id", b))
    reply = await ingest(rag, spoofing, "mine")
    assert reply.documents_ingested == 1
    assert await collections(rag, credentials.metadata(a)) == ["mine"]
    assert await collections(rag, credentials.metadata(b)) == []
    assert await collections(rag, spoofing) == ["mine"]  # acts as a, not b
    # the key in `x-api-key` works the same
    as_a = (("x-api-key", credentials.key(a)), ("x-tenant-id", b))
    assert await collections(rag, as_a) == ["mine"]


async def test_a_revoked_key_is_refused_within_the_revocation_bound(rag, mesh, credentials):
    tenant = new_tenant()
    metadata = credentials.metadata(tenant)
    assert await collections(rag, metadata) == []  # valid, checked by Envoy alone
    revoked_at = time.monotonic()
    credentials.revoke(tenant)

    async def refused() -> bool:
        try:
            await collections(rag, metadata)
        except grpc.aio.AioRpcError as err:
            details = error_details(err)
            assert details.code == grpc.StatusCode.UNAUTHENTICATED
            assert details.error_info.reason == "API_KEY_INVALID"
            return True
        return False

    await eventually(
        refused, timeout=REVOCATION_BOUND_S, interval=0.05, what="the revoked key was refused"
    )
    print(f"revoked key refused {time.monotonic() - revoked_at:.2f} s after its revocation")
    # and stays refused (whichever replica, cache or path answers)
    for _ in range(5):
        assert await refused()
    # the tenant's new key works at once
    assert await collections(rag, credentials.metadata(tenant)) == []


async def test_a_tenant_key_is_checked_by_envoy_alone(rag, mesh, credentials):
    """Calls with a tenant's key skip the auth service: Envoy's ext_authz counts no
    check for them, and its shadow policy counts each as allowed."""
    metadata = credentials.metadata(new_tenant())
    assert await collections(rag, metadata) == []
    before = envoy_stats(mesh)
    for _ in range(20):
        assert await collections(rag, metadata) == []
    after = envoy_stats(mesh)
    changed = {
        name: after[name] - before.get(name, 0)
        for name in after
        if name.startswith(("http.public.ext_authz.", "http.public.rbac."))
        and after[name] != before.get(name, 0)
    }
    # every call skipped the check (none asked: ok, denied, error unchanged)
    assert changed == {
        "http.public.ext_authz.disabled": 20,
        "http.public.rbac.shadow_allowed": 20,
    }


async def test_keys_made_before_the_mesh_signed_keys_still_work(rag, mesh):
    """A key in the older `sb_` form (no signing key) is checked by the auth service."""
    tenant = new_tenant()
    async with mesh.key_store(signed=False) as store:
        _, token = await store.create(tenant, "older form")
    assert token.startswith("sb_")
    before = envoy_stats(mesh).get("http.public.ext_authz.ok", 0)
    assert await collections(rag, (("authorization", f"Bearer {token}"),)) == []
    assert envoy_stats(mesh)["http.public.ext_authz.ok"] == before + 1


def envoy_stats(mesh) -> dict[str, int]:
    """Envoy's counters (admin API)."""
    url = f"http://127.0.0.1:{mesh.config.envoy_admin_port}/stats?format=json&type=Counters"
    with urllib.request.urlopen(url, timeout=5) as reply:
        return {s["name"]: int(s["value"]) for s in json.load(reply)["stats"] if "value" in s}


def test_health_and_reflection_need_no_key(envoy_target):
    def grpcurl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [GRPCURL, "-plaintext", *args], capture_output=True, text=True, timeout=60
        )

    listed = grpcurl(envoy_target, "list")
    assert listed.returncode == 0 and RAG in listed.stdout.split()
    described = grpcurl(envoy_target, "describe", RAG)
    assert described.returncode == 0 and "rpc ListCollections" in described.stdout
    health = grpcurl("-d", f'{{"service": "{RAG}"}}', envoy_target, "grpc.health.v1.Health/Check")
    assert health.returncode == 0 and '"SERVING"' in health.stdout
    refused = grpcurl(envoy_target, f"{RAG}/ListCollections")
    assert refused.returncode != 0 and "Unauthenticated" in refused.stderr


async def test_with_the_auth_service_down_the_edge_fails_closed(rag, mesh, credentials):
    """What Envoy cannot decide alone is refused while the auth service is down; a
    tenant's key, which Envoy checks itself, keeps working."""
    tenant = new_tenant()
    metadata = credentials.metadata(tenant)
    unknown = (("authorization", "Bearer sb_000000000000_" + "A" * 43),)
    assert await collections(rag, metadata) == []
    await asyncio.to_thread(mesh.stop_component, "auth")
    try:
        for undecided in (unknown, (*credentials.operator(), ("x-tenant-id", tenant))):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await collections(rag, undecided)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert await collections(rag, metadata) == []
    finally:
        await asyncio.to_thread(mesh.start_service, "auth")

    async def recovered() -> bool:  # Envoy reconnects to the restarted service
        try:
            await collections(rag, unknown)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.UNAVAILABLE:
                return False
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
            return True
        raise AssertionError("a key nobody issued was let through")

    await eventually(
        recovered, timeout=20, interval=0.3, what="checks recovered after auth came back"
    )
