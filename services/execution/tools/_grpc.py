"""gRPC tools: one attempt of a unary call to a Switchboard method, and what its status means.

UNAVAILABLE, and RESOURCE_EXHAUSTED with RetryInfo, are retryable (RetryInfo's delay is
honoured); DEADLINE_EXCEEDED is the attempt's timeout; any other status is final: the
tool refusing the call (`TOOL_REJECTED`, INVALID_ARGUMENT and the like, of the same
kind) or failing (`TOOL_FAILED`). The tool's own ErrorInfo reason is kept as
`tool_reason`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from services.execution.tools._attempts import Attempt, Retryable
from services.execution.tools._methods import grpc_method
from services.execution.tools._registry import GrpcToolSpec, ToolsConfig
from services.runtime import (
    TENANT_HEADER,
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    SwitchboardError,
    Unauthenticated,
    channel,
    error_details,
)

logger = logging.getLogger(__name__)

IDEMPOTENCY_METADATA = "idempotency-key"

_GRPC_REJECTIONS: dict[grpc.StatusCode, type[SwitchboardError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
}


class GrpcTools:
    """Calls gRPC tools, one channel per target, opened on first use.

    Args:
        config: the registered tools.
        target: where gRPC tools are called (the mesh's Envoy); overrides the tools'
            own `target`.

    Raises:
        ValueError: a gRPC tool has no target.
    """

    def __init__(self, config: ToolsConfig, *, target: str | None = None) -> None:
        self._targets = {
            spec.name: _target(spec, target)
            for spec in config.tools
            if isinstance(spec, GrpcToolSpec)
        }
        self._channels: dict[str, grpc.aio.Channel] = {}

    def prepare(
        self, spec: GrpcToolSpec, arguments: Mapping[str, Any], *, tenant_id: str, key: str
    ) -> Attempt:
        """The call's attempts, each sending the tenant and the idempotency `key`.

        Raises:
            InvalidArgument: `TOOL_ARGUMENTS_INVALID`, the arguments do not fit the request.
        """
        request = _request(spec, arguments)
        return functools.partial(self._attempt, spec, request, tenant_id, key)

    async def close(self) -> None:
        """Closes the channels; calling it again does nothing."""
        channels, self._channels = self._channels, {}
        for open_channel in channels.values():
            await open_channel.close()

    async def _attempt(
        self, spec: GrpcToolSpec, request: Message, tenant_id: str, key: str, timeout: float
    ) -> dict[str, Any]:
        method = grpc_method(spec.method)
        call = self._channel(spec).unary_unary(
            method.path,
            request_serializer=method.request.SerializeToString,
            response_deserializer=method.response.FromString,
        )
        metadata = ((TENANT_HEADER, tenant_id), (IDEMPOTENCY_METADATA, key))
        try:
            response = await call(request, timeout=timeout, metadata=metadata)
        except grpc.aio.AioRpcError as error:
            raise _failure(spec, error) from None
        return json_format.MessageToDict(response, preserving_proto_field_name=True)

    def _channel(self, spec: GrpcToolSpec) -> grpc.aio.Channel:
        target = self._targets[spec.name]
        if target not in self._channels:
            self._channels[target] = channel(target)
        return self._channels[target]


def _target(spec: GrpcToolSpec, override: str | None) -> str:
    target = override or spec.target
    if not target:
        raise ValueError(f"tool {spec.name!r} has no gRPC target: set target or grpc_target")
    return target


def _request(spec: GrpcToolSpec, arguments: Mapping[str, Any]) -> Message:
    """The request message built from the arguments (proto JSON).

    Raises:
        InvalidArgument: `TOOL_ARGUMENTS_INVALID`.
    """
    request_class = grpc_method(spec.method).request
    try:
        return json_format.ParseDict(arguments, request_class())
    except json_format.ParseError as error:
        raise InvalidArgument(
            f"arguments of tool {spec.name!r} do not fit "
            f"{request_class.DESCRIPTOR.full_name}: {error}",
            reason="TOOL_ARGUMENTS_INVALID",
            metadata={"tool": spec.name},
        ) from None


def _failure(spec: GrpcToolSpec, error: grpc.aio.AioRpcError) -> Exception:
    """A failed attempt as a timeout, a retryable failure or a final error."""
    code = error.code()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return TimeoutError()
    details = error_details(error)
    retry_after = (
        details.retry_info.retry_delay.ToTimedelta().total_seconds() if details.retry_info else None
    )
    if code == grpc.StatusCode.UNAVAILABLE or (
        code == grpc.StatusCode.RESOURCE_EXHAUSTED and retry_after is not None
    ):
        return Retryable(f"gRPC {code.name}: {details.message}", retry_after=retry_after)
    metadata = {"tool": spec.name, "status": code.name}
    if details.error_info is not None:
        metadata["tool_reason"] = details.error_info.reason
    kind = _GRPC_REJECTIONS.get(code, Internal)
    return kind(
        f"tool {spec.name!r} answered {code.name}: {details.message}",
        reason="TOOL_REJECTED" if code in _GRPC_REJECTIONS else "TOOL_FAILED",
        metadata=metadata,
    )
