"""The project's exception tree and its mapping to `google.rpc.Status` (AIP-193)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from switchboard.common.v1 import common_pb2

from services.runtime import _context, _tracing

logger = logging.getLogger(__name__)

ERROR_DOMAIN = "switchboard.dev"
_REASON_PREFIX = "ERROR_REASON_"
REASONS = frozenset(
    name.removeprefix(_REASON_PREFIX)
    for name in common_pb2.ErrorReason.keys()
    if name != f"{_REASON_PREFIX}UNSPECIFIED"
)
"""Every `ErrorInfo.reason` a service may send: the catalogue in `common.proto`."""
_STATUS_DETAILS_KEY = "grpc-status-details-bin"
MAX_MESSAGE_BYTES = 384
"""An error message (which may quote what the client sent) is cut to this many bytes of
UTF-8."""
MAX_DETAIL_BYTES = 128
"""Each ErrorInfo metadata value and field-violation path and text is cut to this many
bytes of UTF-8."""
MAX_FIELD_VIOLATIONS = 8
"""At most this many field violations are sent (the message counts the rest).

The bounds keep a whole error, which travels in trailing metadata, well inside gRPC
clients' default 8 KiB metadata limit: a request breaking a thousand rules, or quoting a
megabyte id, still gets its INVALID_ARGUMENT and not a transport error."""


def bounded(text: str, limit: int = MAX_DETAIL_BYTES) -> str:
    """`text`, cut to at most `limit` bytes of UTF-8 (the cut marked with `…`)."""
    encoded = text.encode()
    if len(encoded) <= limit:
        return text
    return encoded[: limit - 3].decode(errors="ignore") + "…"


@dataclass(frozen=True)
class FieldViolation:
    """One invalid request field: its path (e.g. `parameters.max_tokens`) and why."""

    field: str
    description: str


@dataclass(frozen=True)
class QuotaViolation:
    """One exhausted quota: what it limits (`subject`) and a description."""

    subject: str
    description: str


class SwitchboardError(Exception):
    """Root of the tree: each class knows its gRPC code and, where one fits every case,
    its default `ErrorInfo` reason; the others need one given (a reason from
    `REASONS`)."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        field_violations: Sequence[FieldViolation] = (),
        quota_violations: Sequence[QuotaViolation] = (),
        retry_after: timedelta | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        if not self.reason:
            raise TypeError(f"{type(self).__name__} needs a reason from the catalogue")
        self.metadata = dict(metadata or {})
        self.field_violations = tuple(field_violations)
        self.quota_violations = tuple(quota_violations)
        self.retry_after = retry_after

    def to_rpc_status(self) -> status_pb2.Status:
        """A `google.rpc.Status` with exactly one `ErrorInfo` and the details that apply."""
        details: list[any_pb2.Any] = []
        metadata = {bounded(k, 64): bounded(str(v)) for k, v in self.metadata.items()}
        if rid := _context.request_id.get():
            metadata.setdefault("request_id", rid)
        if trace_id := _tracing.current_trace_id():
            metadata.setdefault("trace_id", trace_id)
        info = error_details_pb2.ErrorInfo(
            reason=self.reason, domain=ERROR_DOMAIN, metadata=metadata
        )
        details.append(_pack(info))
        if self.field_violations:
            details.append(
                _pack(
                    error_details_pb2.BadRequest(
                        field_violations=[
                            error_details_pb2.BadRequest.FieldViolation(
                                field=bounded(v.field), description=bounded(v.description)
                            )
                            for v in self.field_violations[:MAX_FIELD_VIOLATIONS]
                        ]
                    )
                )
            )
        if self.quota_violations:
            details.append(
                _pack(
                    error_details_pb2.QuotaFailure(
                        violations=[
                            error_details_pb2.QuotaFailure.Violation(
                                subject=v.subject, description=v.description
                            )
                            for v in self.quota_violations
                        ]
                    )
                )
            )
        if self.retry_after is not None:
            delay = duration_pb2.Duration()
            delay.FromTimedelta(self.retry_after)
            details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
        return status_pb2.Status(
            code=self.code.value[0],
            message=self._bounded_message(),
            details=details,
        )

    def _bounded_message(self) -> str:
        left_out = len(self.field_violations) - MAX_FIELD_VIOLATIONS
        suffix = f" ({left_out} more field violations not listed)" if left_out > 0 else ""
        return bounded(self.message, MAX_MESSAGE_BYTES - len(suffix)) + suffix

    def to_grpc_status(self) -> grpc.Status:
        return rpc_status.to_status(self.to_rpc_status())


class InvalidArgument(SwitchboardError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_REQUEST"


class NotFound(SwitchboardError):
    code = grpc.StatusCode.NOT_FOUND
    reason = ""


class AlreadyExists(SwitchboardError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = ""


class FailedPrecondition(SwitchboardError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = ""


class ResourceExhausted(SwitchboardError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = ""


class Unavailable(SwitchboardError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = ""


class DeadlineExceeded(SwitchboardError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"


class Cancelled(SwitchboardError):
    code = grpc.StatusCode.CANCELLED
    reason = "CANCELLED"


class Unauthenticated(SwitchboardError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = ""


class PermissionDenied(SwitchboardError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = ""


class Internal(SwitchboardError):
    code = grpc.StatusCode.INTERNAL
    reason = "INTERNAL"


def require_tenant() -> str:
    """The calling tenant (`x-tenant-id`) for calls that touch a tenant's own data.

    Raises:
        Unauthenticated: `TENANT_MISSING`, the call names no tenant.
    """
    tenant = _context.current_tenant()
    if not tenant:
        raise Unauthenticated(
            f"this call needs a tenant: set the {_context.TENANT_HEADER} header",
            reason="TENANT_MISSING",
        )
    return tenant


def invalid(violations: Iterable[FieldViolation], *, what: str = "request") -> InvalidArgument:
    """An INVALID_ARGUMENT listing every violation at once."""
    items = list(violations)
    summary = "; ".join(f"{v.field}: {v.description}" for v in items)
    return InvalidArgument(f"invalid {what}: {summary}", field_violations=items)


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


@dataclass(frozen=True)
class ErrorDetails:
    """What a client finds in a failed call's `google.rpc.Status`."""

    code: grpc.StatusCode
    message: str
    error_info: error_details_pb2.ErrorInfo | None
    field_violations: tuple[error_details_pb2.BadRequest.FieldViolation, ...]
    quota_failure: error_details_pb2.QuotaFailure | None
    retry_info: error_details_pb2.RetryInfo | None
    error_info_count: int


def status_of(error: grpc.RpcError) -> status_pb2.Status:
    """The `google.rpc.Status` a failed call carried (a bare one when it had none)."""
    trailing = error.trailing_metadata() or ()  # type: ignore[attr-defined]
    blob = next((v for k, v in trailing if k == _STATUS_DETAILS_KEY), None)
    if blob:
        return status_pb2.Status.FromString(blob)
    return status_pb2.Status(
        code=error.code().value[0],  # type: ignore[attr-defined]
        message=error.details() or "",  # type: ignore[attr-defined]
    )


_BARE_STATUS_REASONS = {
    grpc.StatusCode.DEADLINE_EXCEEDED: "DEADLINE_EXCEEDED",
    grpc.StatusCode.CANCELLED: "CANCELLED",
    grpc.StatusCode.UNAVAILABLE: "DEPENDENCY_UNAVAILABLE",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "MESSAGE_TOO_LARGE",
}
"""The reason of a status gRPC raised itself, without details (a deadline, a cancel, a
peer gone, a message over the transport's limit); any other is a bug: INTERNAL."""


class RelayedError(SwitchboardError):
    """A downstream service's error, passed on to the caller as it came; one that gRPC
    raised without details gets the single `ErrorInfo` every error carries."""

    def __init__(self, code: grpc.StatusCode, status: status_pb2.Status) -> None:
        info = next(_unpacked(status, error_details_pb2.ErrorInfo), None)
        reason = info.reason if info else _BARE_STATUS_REASONS.get(code, "INTERNAL")
        super().__init__(status.message, reason=reason)
        self.code = code
        self._status = status if info else None

    def to_rpc_status(self) -> status_pb2.Status:
        return self._status if self._status is not None else super().to_rpc_status()


def _unpacked(status: status_pb2.Status, kind: type[Any]) -> Iterator[Any]:
    for detail in status.details:
        if detail.Is(kind.DESCRIPTOR):
            message = kind()
            detail.Unpack(message)
            yield message


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def error_details(error: grpc.RpcError | status_pb2.Status) -> ErrorDetails:
    """Decodes a rich status: a failed call's (sync or asyncio), or one carried in a
    message (a SubmitTasks result, an AdmitSession refusal)."""
    if isinstance(error, status_pb2.Status):
        status, code, message = error, _CODES[error.code], error.message
    else:
        status = status_of(error)
        code = error.code()  # type: ignore[attr-defined]
        message = error.details() or ""  # type: ignore[attr-defined]
    infos, violations = [], []
    quota = retry = None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend(bad.field_violations)
        elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            quota = error_details_pb2.QuotaFailure()
            detail.Unpack(quota)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
    return ErrorDetails(
        code=code,
        message=message,
        error_info=infos[0] if infos else None,
        field_violations=tuple(violations),
        quota_failure=quota,
        retry_info=retry,
        error_info_count=len(infos),
    )
