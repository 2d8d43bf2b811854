"""Envoy's external authorization (`envoy.service.auth.v3.Authorization/Check`).

Envoy asks before routing any public call. A call with a valid key is let through with
`x-tenant-id` set to the key's tenant (replacing whatever the client sent, so a tenant
cannot be spoofed) and the key removed (services never see it). A call without one is
answered by Envoy itself with UNAUTHENTICATED and never reaches a service.
"""

from __future__ import annotations

import logging

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2

from services.auth import keys
from services.auth.store import KeyStore
from services.runtime import TENANT_HEADER, SwitchboardError

logger = logging.getLogger(__name__)

KEY_HEADERS = ("authorization", "x-api-key")


def allowed(tenant_id: str) -> external_auth_pb2.CheckResponse:
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code_pb2.OK),
        ok_response=external_auth_pb2.OkHttpResponse(
            headers=[
                base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(key=TENANT_HEADER, value=tenant_id),
                    append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
                )
            ],
            headers_to_remove=list(KEY_HEADERS),
        ),
    )


def denied(code: int, message: str, http: int) -> external_auth_pb2.CheckResponse:
    """A refusal Envoy sends as a trailers-only gRPC response with this status."""
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code, message=message),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=http),
            headers=[
                base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(key="grpc-status", value=str(code))
                ),
                base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(key="grpc-message", value=message)
                ),
            ],
        ),
    )


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):
    def __init__(self, store: KeyStore) -> None:
        self._store = store

    async def Check(  # noqa: N802 - gRPC method name
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        headers = dict(request.attributes.request.http.headers)
        token = keys.presented_key(headers)
        if not token:
            return denied(
                code_pb2.UNAUTHENTICATED,
                "an API key is required: send `authorization: Bearer <key>`",
                http_status_pb2.Unauthorized,
            )
        try:
            tenant = await self._store.verify(token)
        except SwitchboardError as error:  # the key store is down: fail closed
            return denied(code_pb2.UNAVAILABLE, error.message, http_status_pb2.ServiceUnavailable)
        if tenant is None:
            return denied(
                code_pb2.UNAUTHENTICATED,
                "the API key is not valid (unknown, malformed or revoked)",
                http_status_pb2.Unauthorized,
            )
        return allowed(tenant)
