"""A `google.rpc.Status` as an HTTP error in OpenAI's JSON shape, for the mesh's HTTP API
and for the edge's refusals on its paths: one mapping, so a client sees the same status,
reason and retry delay whichever of them answered."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

logger = logging.getLogger(__name__)

_CODES = {code.value[0]: code for code in grpc.StatusCode}
HTTP_STATUS: Mapping[grpc.StatusCode, int] = {
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}
"""The HTTP status of each gRPC code (499: the client went away, as nginx logs it)."""
_TOO_LARGE = 413
"""RESOURCE_EXHAUSTED for a request over a size limit (a `*_TOO_LARGE` reason, and
`MESSAGE_TOO_LARGE`) is the request's own fault, not a rate limit: retrying it the same
way cannot succeed."""
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
_RETRY_AFTER_STATUSES = frozenset({429, 503})


@dataclass(frozen=True)
class HttpError:
    """An error response: its status, headers (`Retry-After`) and JSON body
    `{"error": {"message", "type", "param", "code"}}`, `code` being the ErrorInfo reason."""

    status: int
    body: Mapping[str, Any]
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def reason(self) -> str:
        return str(self.body["error"]["code"])

    def json_bytes(self) -> bytes:
        return json.dumps(self.body).encode()


def http_error(
    status: status_pb2.Status,
    *,
    param: Callable[[str], str | None] | None = None,
) -> HttpError:
    """The HTTP error a rich status stands for.

    Args:
        status: a failed call's status with its details (one ErrorInfo; BadRequest,
            RetryInfo where they apply).
        param: maps the first field violation's path (a proto field path such as
            `parameters.max_tokens`) to the request parameter to name in `param`;
            without it the path is named as it is.
    """
    code = _CODES.get(status.code, grpc.StatusCode.UNKNOWN)
    reason, field_path, retry = "", "", None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR) and not reason:
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR) and not field_path:
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            field_path = bad.field_violations[0].field if bad.field_violations else ""
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
    http = HTTP_STATUS.get(code, 500)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and reason.endswith("_TOO_LARGE"):
        http = _TOO_LARGE
    headers = {}
    if retry is not None and http in _RETRY_AFTER_STATUSES:
        delay = retry.retry_delay.ToTimedelta().total_seconds()
        headers["Retry-After"] = str(max(1, math.ceil(delay)))
    named = (param(field_path) if param else field_path) if field_path else None
    body = {
        "error": {
            "message": status.message or code.name.lower(),
            "type": _ERROR_TYPES.get(http, "server_error"),
            "param": named,
            "code": reason or code.name,
        }
    }
    return HttpError(status=http, body=body, headers=headers)
