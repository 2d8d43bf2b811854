"""KeyService servicer: operators' keys and tenants API, proto in, key store call, proto out.

Who may call it (operators only) and the requests' shape are the contract's, checked by
the runtime before any handler here runs.
"""

from __future__ import annotations

import logging
from datetime import datetime

import grpc
from google.protobuf import timestamp_pb2
from switchboard.auth.v1 import auth_pb2 as pb
from switchboard.auth.v1 import auth_service_pb2_grpc

from services.auth.store import KeyInfo, KeyStore
from services.runtime import (
    FieldViolation,
    NotFound,
    Principal,
    invalid,
    page_size,
    page_token,
    read_page_token,
)

logger = logging.getLogger(__name__)


def _timestamp(at: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(at)
    return stamp


def key_message(key: KeyInfo) -> pb.ApiKey:
    message = pb.ApiKey(
        key_id=key.key_id,
        tenant_id=key.tenant_id,
        name=key.name,
        principal=Principal[key.kind.upper()].value,
        create_time=_timestamp(key.create_time),
    )
    if key.revoke_time is not None:
        message.revoke_time.CopyFrom(_timestamp(key.revoke_time))
    return message


def key_cursor(parts: list[str]) -> tuple[str, datetime, str]:
    """Where a ListKeys page starts, from its page token: (tenant, creation, key id) of
    the last key before it (ValueError for a token no response gave out: among them any
    holding a NUL, which no stored value has)."""
    tenant_id, created, key_id = parts
    if "\x00" in tenant_id + key_id:
        raise ValueError("a NUL character")
    return tenant_id, datetime.fromisoformat(created), key_id


def tenant_cursor(parts: list[str]) -> str:
    """Where a ListTenants page starts, from its page token: the last tenant before it."""
    (tenant_id,) = parts
    if "\x00" in tenant_id:
        raise ValueError("a NUL character")
    return tenant_id


class KeyServicer(auth_service_pb2_grpc.KeyServiceServicer):
    def __init__(self, store: KeyStore) -> None:
        self._store = store

    async def CreateKey(  # noqa: N802 - gRPC method name
        self, request: pb.CreateKeyRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateKeyResponse:
        if "\x00" in request.name:  # the one thing the contract's bounds leave to check
            raise invalid(
                [FieldViolation("name", "must not hold a NUL character")],
                what="CreateKeyRequest",
            )
        key_id, token = await self._store.create(request.tenant_id, request.name)
        key = await self._store.get(key_id)
        assert key is not None  # just created
        logger.info("key created", extra={"key_id": key_id, "tenant_id": request.tenant_id})
        return pb.CreateKeyResponse(key=key_message(key), token=token)

    async def ListKeys(  # noqa: N802 - gRPC method name
        self, request: pb.ListKeysRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListKeysResponse:
        size = page_size(request.page_size, what="ListKeysRequest")
        after = read_page_token(request.page_token, key_cursor, what="ListKeysRequest")
        keys = await self._store.list(request.tenant_id, after=after, limit=size + 1)
        reply = pb.ListKeysResponse(keys=[key_message(k) for k in keys[:size]])
        if len(keys) > size:
            last = keys[size - 1]
            reply.next_page_token = page_token(
                last.tenant_id, last.create_time.isoformat(), last.key_id
            )
        return reply

    async def RevokeKey(  # noqa: N802 - gRPC method name
        self, request: pb.RevokeKeyRequest, context: grpc.aio.ServicerContext
    ) -> pb.RevokeKeyResponse:
        revoked = await self._store.revoke(request.key_id)
        if revoked is None:
            raise NotFound(
                "no API key with that id",
                reason="KEY_NOT_FOUND",
                metadata={"key_id": request.key_id},
            )
        logger.info("key revoked", extra={"key_id": request.key_id, "revoked": revoked})
        return pb.RevokeKeyResponse(revoked=revoked)

    async def ListTenants(  # noqa: N802 - gRPC method name
        self, request: pb.ListTenantsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListTenantsResponse:
        size = page_size(request.page_size, what="ListTenantsRequest")
        after = read_page_token(request.page_token, tenant_cursor, what="ListTenantsRequest")
        tenants = await self._store.tenants(after=after or "", limit=size + 1)
        reply = pb.ListTenantsResponse(
            tenants=[
                pb.Tenant(
                    tenant_id=t.tenant_id,
                    active_keys=t.active_keys,
                    create_time=_timestamp(t.create_time),
                )
                for t in tenants[:size]
            ]
        )
        if len(tenants) > size:
            reply.next_page_token = page_token(tenants[size - 1].tenant_id)
        return reply
