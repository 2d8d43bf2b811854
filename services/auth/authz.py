"""Envoy's external authorization (`envoy.service.auth.v3.Authorization/Check`).

Envoy asks before routing any public call. The credential decides the caller: a tenant
key, or an operator credential. The RPC's contract (`(switchboard.common.v1.authority)`)
decides whether that kind of caller may call it; if not, the call is refused here with
PERMISSION_DENIED `PRINCIPAL_NOT_ALLOWED` and never reaches a service (whose runtime
checks the same again).

A call let through carries `x-switchboard-principal` (`tenant` or `operator`) and, for a
tenant key, `x-tenant-id` set to the key's tenant, both replacing whatever the client
sent, so neither can be spoofed; an operator names the tenant it acts on itself. The
key is removed (services never see it). A call without a valid key is answered by Envoy
itself with UNAUTHENTICATED; every refusal carries the usual `google.rpc.Status`
(`grpc-status-details-bin`) with one `ErrorInfo`, except on the mesh's HTTP API paths
(`/v1/`, OpenAI-compatible), where it is that API's JSON error with the same reason.
"""

from __future__ import annotations

import base64
import logging

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2

from services.auth import keys
from services.auth.store import Caller, KeyStore
from services.runtime import (
    PRINCIPAL_HEADER,
    TENANT_HEADER,
    Principal,
    SwitchboardError,
    Unauthenticated,
    http_error,
    http_prefixes,
    method_contract,
)

logger = logging.getLogger(__name__)

KEY_HEADERS = ("authorization", "x-api-key")


def allowed(caller: Caller) -> external_auth_pb2.CheckResponse:
    headers = {PRINCIPAL_HEADER: caller.principal.header_value}
    if caller.principal is Principal.TENANT:
        headers[TENANT_HEADER] = caller.tenant_id
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code_pb2.OK),
        ok_response=external_auth_pb2.OkHttpResponse(
            headers=[
                base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(key=key, value=value),
                    append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
                )
                for key, value in headers.items()
            ],
            headers_to_remove=list(KEY_HEADERS),
        ),
    )


def denied(error: SwitchboardError, http: int, path: str = "") -> external_auth_pb2.CheckResponse:
    """A refusal Envoy sends as a trailers-only gRPC response: the error's status code,
    message and `google.rpc.Status` (with its `ErrorInfo`), and HTTP status `http` for
    clients that are not gRPC. On an HTTP API path (`path`), the API's JSON error."""
    status = error.to_rpc_status()
    if path.startswith(http_prefixes()):
        answer = http_error(status)
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=status.code, message=status.message),
            denied_response=external_auth_pb2.DeniedHttpResponse(
                status=http_status_pb2.HttpStatus(code=answer.status),
                headers=[
                    base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, value=v))
                    for k, v in {**answer.headers, "content-type": "application/json"}.items()
                ],
                body=answer.json_bytes().decode(),
            ),
        )
    details = base64.b64encode(status.SerializeToString()).decode()
    headers = {
        "grpc-status": str(status.code),
        "grpc-message": status.message,
        "grpc-status-details-bin": details,
    }
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=status.code, message=status.message),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=http),
            headers=[
                base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, value=v))
                for k, v in headers.items()
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
        path = request.attributes.request.http.path
        metadata = {"request_id": rid} if (rid := headers.get("x-request-id")) else {}
        token = keys.presented_key(headers)
        if not token:
            return denied(
                Unauthenticated(
                    "an API key is required: send `authorization: Bearer <key>`",
                    reason="API_KEY_MISSING",
                    metadata=metadata,
                ),
                http_status_pb2.Unauthorized,
                path,
            )
        try:
            caller = await self._store.verify(token)
        except SwitchboardError as error:  # the key store is down: fail closed
            error.metadata = {**metadata, **error.metadata}
            return denied(error, http_status_pb2.ServiceUnavailable, path)
        if caller is None:
            return denied(
                Unauthenticated(
                    "the API key is not valid (unknown, malformed or revoked)",
                    reason="API_KEY_INVALID",
                    metadata=metadata,
                ),
                http_status_pb2.Unauthorized,
                path,
            )
        # A method no contract defines goes on as its caller; the service answers
        # UNIMPLEMENTED, or checks its own newer contract.
        contract = method_contract(path.partition("?")[0])
        if contract is not None:
            try:
                contract.check_caller(caller.principal)
            except SwitchboardError as error:
                error.metadata = {**metadata, **error.metadata}
                return denied(error, http_status_pb2.Forbidden, path)
        return allowed(caller)
