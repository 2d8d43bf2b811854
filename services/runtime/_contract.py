"""What the contracts in `proto/` say about each RPC: who may call it, and which requests
it accepts.

Both come from the descriptors themselves, so a client in any language reads the same
rules the mesh enforces: the `(switchboard.common.v1.authority)` method option names
the principals allowed to call an RPC (an RPC without it is refused to everyone), and
`buf.validate` field annotations state the request constraints, checked here with
`protovalidate`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import protovalidate
from google.protobuf import descriptor, descriptor_pool, message
from switchboard.common.v1 import authority_pb2

from services.runtime._context import Principal
from services.runtime._errors import FieldViolation, PermissionDenied, invalid

logger = logging.getLogger(__name__)

_validator = protovalidate.Validator()


@dataclass(frozen=True)
class MethodContract:
    """One RPC as its contract states it."""

    full_name: str
    """`package.Service.Method`."""
    principals: frozenset[Principal]
    """Who may call it; empty when the contract names nobody (then nobody may)."""
    request: descriptor.Descriptor
    client_streaming: bool

    def check_caller(self, principal: Principal) -> None:
        """Raises:
        PermissionDenied: `PRINCIPAL_NOT_ALLOWED`, the principal may not call this RPC.
        """
        if principal not in self.principals:
            allowed = " or ".join(sorted(p.header_value for p in self.principals)) or "nobody"
            raise PermissionDenied(
                f"{self.full_name} may be called by {allowed} credentials, "
                f"not by a {principal.header_value} credential",
                reason="PRINCIPAL_NOT_ALLOWED",
                metadata={"method": self.full_name, "principal": principal.header_value},
            )

    def admit(self, principal: Principal, request: message.Message) -> None:
        """The checks before a handler runs: the caller's principal, then (for a single
        request message) its constraints. A streamed request's messages are checked by
        the handler, which answers each on its own.

        Raises:
            PermissionDenied: `PRINCIPAL_NOT_ALLOWED`.
            InvalidArgument: `INVALID_REQUEST`, with the violated fields.
        """
        self.check_caller(principal)
        if not self.client_streaming:
            validate_request(request)


def request_violations(request: message.Message) -> list[FieldViolation]:
    """Every `buf.validate` constraint `request` breaks, as field violations whose paths
    use proto field names (`parameters.max_tokens`, `context[2].text`)."""
    return [
        FieldViolation(_field_path(v.proto.field.elements), v.proto.message)
        for v in _validator.collect_violations(request)
    ]


def validate_request(request: message.Message, *, prefix: str = "") -> None:
    """Raises:
    InvalidArgument: `INVALID_REQUEST`, with one field violation per broken constraint.
    """
    if violations := request_violations(request):
        if prefix:
            violations = [FieldViolation(f"{prefix}{v.field}", v.description) for v in violations]
        raise invalid(violations)


@lru_cache(maxsize=1024)  # bounded: the edge asks about whatever path a client sends
def method_contract(path: str) -> MethodContract | None:
    """The contract of `/package.Service/Method` (or `package.Service.Method`), or None
    when no loaded contract defines that method."""
    service, _, method = path.lstrip("/").replace("/", ".").rpartition(".")
    try:
        found = descriptor_pool.Default().FindMethodByName(f"{service}.{method}")
    except KeyError:
        return None
    options = found.GetOptions()
    principals = (
        frozenset(Principal(p) for p in options.Extensions[authority_pb2.authority].principals)
        if options.HasExtension(authority_pb2.authority)
        else frozenset()
    )
    return MethodContract(
        full_name=found.full_name,
        principals=principals,
        request=found.input_type,
        client_streaming=found.client_streaming,
    )


def _field_path(elements: Sequence[object]) -> str:
    path = ""
    for element in elements:
        name = element.field_name  # type: ignore[attr-defined]
        path = f"{path}.{name}" if path else name
        subscript = element.subscript  # type: ignore[attr-defined]
        if subscript is not None:  # a list index or a map key
            key = subscript.value
            path += f"[{key!r}]" if isinstance(key, str) else f"[{int(key)}]"
    return path
