"""API keys against the mesh's PostgreSQL: the external-authorization check Envoy asks,
and the `switchboard keys` command."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from datetime import timedelta

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2

from services.auth import AuthConfig, AuthService
from services.runtime import ServerConfig, create_server


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
        reply = await stub.Check(check({**headers, "x-tenant-id": "someone-else"}), timeout=5)
        assert reply.status.code == code_pb2.OK
        (header,) = reply.ok_response.headers
        assert (header.header.key, header.header.value) == ("x-tenant-id", tenant)
        assert header.append_action == header.OVERWRITE_IF_EXISTS_OR_ADD
        assert set(reply.ok_response.headers_to_remove) == {"authorization", "x-api-key"}


async def test_missing_wrong_and_revoked_keys_are_refused(authz):
    store, stub = authz
    key_id, token = await store.create(f"tenant-{uuid.uuid4().hex[:8]}")
    other_id, other = await store.create(f"tenant-{uuid.uuid4().hex[:8]}")
    forged = token[: -len(other.split("_")[2])] + other.split("_")[2]  # A's id, B's secret
    for headers in (
        {},
        {"authorization": "Bearer not-a-key"},
        {"authorization": f"Bearer {forged}"},
        {"x-tenant-id": "acme"},
    ):
        reply = await stub.Check(check(headers), timeout=5)
        assert reply.status.code == code_pb2.UNAUTHENTICATED, headers
        assert reply.denied_response.status.code == 401
        grpc_status = {h.header.key: h.header.value for h in reply.denied_response.headers}
        assert grpc_status["grpc-status"] == str(code_pb2.UNAUTHENTICATED)
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
    assert token.startswith("sb_")
    key_id = token.split("_")[1]
    listed = subprocess.run(
        [*cli, "list", "--tenant", tenant], env=env, capture_output=True, text=True, timeout=60
    )
    assert key_id in listed.stdout and "active" in listed.stdout
    assert token.split("_")[2] not in listed.stdout  # never the secret
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
