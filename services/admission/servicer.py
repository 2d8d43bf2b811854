"""AdmissionService servicer: proto in, controller or policy store call, proto out."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from switchboard.admission.v1 import admission_pb2 as pb
from switchboard.admission.v1 import admission_service_pb2_grpc

from services.admission.dispatcher import Dispatcher
from services.admission.limits import PolicyLimits
from services.admission.policies import QuotaSnapshot
from services.admission.request import AdmissionRequest
from services.admission.sessions import queue_updates, serve_session
from services.admission.store import EtagMismatch, PolicyStore, StoredPolicy
from services.admission.tickets import Admission, Ticket
from services.runtime import (
    TIERS,
    FieldViolation,
    InvalidArgument,
    PermissionDenied,
    Principal,
    SwitchboardError,
    Unauthenticated,
    current_principal,
    current_tenant,
    invalid,
    page_size,
    page_token,
    read_page_token,
    validate_request,
)

logger = logging.getLogger(__name__)

REPLICA_HEADER = "x-admission-replica"
POLICY_FIELDS = (
    "requests_per_second",
    "request_burst",
    "tokens_per_minute",
    "token_burst",
    "max_in_flight",
    "weight",
    "max_queued",
)
ADMIT_FIELDS = {
    "tenant_id": "context.tenant_id",
    "user_id": "context.user_id",
    "priority": "context.priority",
    "request_id": "context.request_id",
    "tier": "tier",
    "prompt_tokens": "estimated_prompt_tokens",
    "completion_tokens": "max_completion_tokens",
    "no_wait": "no_wait",
    "max_wait": "max_wait",
}
"""The path in AdmitRequest of each AdmissionRequest attribute."""
RELEASE_FIELDS = {"actual_tokens": "actual_usage.total_tokens", "request_id": "request_id"}
"""The path in ReleaseRequest of each `release` argument."""


class Aborted(SwitchboardError):
    code = grpc.StatusCode.ABORTED
    reason = "ETAG_MISMATCH"


def resolve_tenant(requested: str, *, field: str, owned: bool) -> str:
    """The tenant a call acts on: the request's, else `x-tenant-id`'s.

    A tenant acts on its own tenant only: a request naming another one is refused. An
    operator names any tenant.

    Args:
        owned: the call reads or changes state the tenant's replica holds; the header
            chose the replica, so an operator must send it too, naming the same tenant.
    """
    header = current_tenant()
    operator = current_principal() is Principal.OPERATOR
    if requested and header and requested != header and (owned or not operator):
        raise PermissionDenied(
            f"{field} names another tenant than the call's x-tenant-id"
            + ("" if operator else ": a tenant key acts on its own tenant only"),
            reason="TENANT_MISMATCH",
            metadata={"field": field},
        )
    if operator and owned and requested and not header:
        raise invalid(
            [
                FieldViolation(
                    field,
                    "an operator reading a tenant's live state also sends the x-tenant-id "
                    "header naming it: it routes the call to the tenant's replica",
                )
            ]
        )
    tenant = requested or header
    if not tenant:
        raise Unauthenticated(
            f"no tenant: set {field} or the x-tenant-id header", reason="TENANT_MISSING"
        )
    return tenant


def named_fields(
    error: InvalidArgument, paths: dict[str, str], prefix: str = ""
) -> InvalidArgument:
    """The admission core's refusal, with each field violation named by its path in the
    proto request (`paths`, under `prefix`) instead of by the core's attribute name."""
    return invalid(
        FieldViolation(f"{prefix}{paths.get(v.field, v.field)}", v.description)
        for v in error.field_violations
    )


def policy_cursor(parts: list[str]) -> tuple[str, str]:
    """Where a ListPolicies page starts, from its page token: (tenant, user) of the last
    policy before it. A tenant id never holds the separator, so the rest is the user."""
    tenant_id, *user = parts
    if not user:
        raise ValueError("not a policy cursor")
    return tenant_id, "\x1f".join(user)


def _timestamp(at: datetime) -> Any:
    from google.protobuf import timestamp_pb2

    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(at)
    return stamp


def policy_message(
    tenant_id: str, user_id: str, limits: PolicyLimits, stored: StoredPolicy | None = None
) -> pb.Policy:
    policy = pb.Policy(
        tenant_id=tenant_id,
        user_id=user_id,
        **{name: getattr(limits, name) for name in POLICY_FIELDS},
    )
    if stored is not None:
        policy.etag = stored.etag
        policy.update_time.CopyFrom(_timestamp(stored.update_time))
    return policy


def _admission_message(admission: Admission) -> pb.AdmitResponse:
    lease = admission.lease
    expires = datetime.now(UTC) + timedelta(seconds=lease.expires_at - time.monotonic())
    reply = pb.AdmitResponse(
        lease=pb.Lease(
            lease_id=lease.lease_id,
            tenant_id=lease.tenant_id,
            charged_tokens=lease.charged_tokens,
        ),
        initial_queue_position=admission.initial_queue_position,
    )
    reply.lease.expire_time.CopyFrom(_timestamp(expires))
    reply.queue_wait.FromTimedelta(admission.queue_wait)
    return reply


def _quota_message(snapshot: QuotaSnapshot) -> pb.QuotaStatus:
    status = pb.QuotaStatus(
        tenant_id=snapshot.tenant_id,
        user_id=snapshot.user_id,
        available_requests=snapshot.available_requests,
        available_tokens=snapshot.available_tokens,
        in_flight=snapshot.in_flight,
        queued=[pb.QueueDepth(priority=int(p), waiting=n) for p, n in snapshot.queued.items()],
    )
    if snapshot.policy is not None:
        status.policy.CopyFrom(
            policy_message(snapshot.tenant_id, snapshot.user_id, snapshot.policy)
        )
    return status


class AdmissionServicer(admission_service_pb2_grpc.AdmissionServiceServicer):
    def __init__(
        self,
        dispatcher: Dispatcher,
        store: PolicyStore,
        *,
        replica_id: str,
        default_policy: PolicyLimits,
        default_max_wait: timedelta,
        deadline_margin: timedelta,
    ) -> None:
        self._dispatcher = dispatcher
        self._controller = dispatcher.controller
        self._store = store
        self._replica = ((REPLICA_HEADER, replica_id),)
        self._default = default_policy
        self._default_max_wait = default_max_wait
        self._margin = deadline_margin.total_seconds()

    # ---- decisions ---------------------------------------------------------------------

    def _request(
        self, request: pb.AdmitRequest, context: grpc.aio.ServicerContext, *, prefix: str = ""
    ) -> AdmissionRequest:
        """The request to admit. The contract's rules were checked (defined enum values,
        token counts and max_wait in range); the tenant is the call's; the wait is cut to
        the caller's deadline."""
        tenant = resolve_tenant(
            request.context.tenant_id, field=f"{prefix}context.tenant_id", owned=True
        )
        remaining = context.time_remaining()
        budget = None if remaining is None else max(remaining - self._margin, 0.0)
        if request.HasField("max_wait"):
            max_wait = request.max_wait.ToTimedelta()
            if budget is not None and max_wait > timedelta(seconds=budget):
                max_wait = timedelta(seconds=budget)
        else:
            max_wait = self._default_max_wait if budget is None else timedelta(seconds=budget)
        try:
            return AdmissionRequest(
                tenant_id=tenant,
                user_id=request.context.user_id,
                priority=request.context.priority,  # Priority's values are the proto's
                tier=TIERS.get(request.tier, ""),
                prompt_tokens=request.estimated_prompt_tokens,
                completion_tokens=request.max_completion_tokens,
                no_wait=request.no_wait,
                max_wait=max_wait,
                request_id=request.context.request_id,
            )
        except InvalidArgument as error:
            raise named_fields(error, ADMIT_FIELDS, prefix) from None

    def _submit(self, request: AdmissionRequest, *, prefix: str = "") -> Ticket:
        try:
            return self._controller.submit(request)
        except InvalidArgument as error:
            raise named_fields(error, ADMIT_FIELDS, prefix) from None

    async def Admit(  # noqa: N802 - gRPC method name
        self, request: pb.AdmitRequest, context: grpc.aio.ServicerContext
    ) -> pb.AdmitResponse:
        ticket = self._submit(self._request(request, context))
        admission = await self._dispatcher.wait(ticket)
        assert admission is not None
        await context.send_initial_metadata(self._replica)
        return _admission_message(admission)

    async def AdmitStream(  # noqa: N802 - gRPC method name
        self, request: pb.AdmitStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.AdmitStreamResponse]:
        prefix = "request."
        ticket = self._submit(self._request(request.request, context, prefix=prefix), prefix=prefix)
        delivered = False
        try:
            await context.send_initial_metadata(self._replica)
            async for update in queue_updates(self._dispatcher, ticket):
                yield pb.AdmitStreamResponse(queued=update)
            admission = ticket.result()
            yield pb.AdmitStreamResponse(admitted=_admission_message(admission))
            delivered = True
        finally:
            if not delivered:
                self._controller.abandon(ticket)

    async def AdmitSession(  # noqa: N802 - gRPC method name
        self,
        request_iterator: AsyncIterator[pb.AdmitSessionRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.AdmitSessionResponse]:
        await context.send_initial_metadata(self._replica)
        prefix = "request."

        def request_of(frame: pb.AdmitSessionRequest) -> AdmissionRequest:
            if frame.HasField("reserve"):
                return self._request(frame.reserve.shape, context, prefix="reserve.shape.")
            return self._request(frame.request, context, prefix=prefix)

        replies = serve_session(
            self._dispatcher,
            request_iterator,
            tenant_id=current_tenant(),  # whose slice leases the stream may claim
            check=validate_request,  # a streamed frame is checked here, refused on its own
            request_of=request_of,
            submit=lambda request: self._submit(request, prefix=prefix),
            admitted=_admission_message,
        )
        async for reply in replies:
            yield reply

    async def Release(  # noqa: N802 - gRPC method name
        self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReleaseResponse:
        if bool(request.lease_id) == bool(request.request_id):
            what = "set exactly one of lease_id and request_id"
            raise invalid([FieldViolation("lease_id", what), FieldViolation("request_id", what)])
        actual = None
        if request.HasField("actual_usage"):
            usage = request.actual_usage
            parts = (usage.total_tokens, usage.prompt_tokens, usage.completion_tokens)
            actual = usage.total_tokens or usage.prompt_tokens + usage.completion_tokens
            if min(parts) < 0:
                actual = min(parts)  # refused by the controller with a field violation
        # leases and request ids are the tenant's, and the header routed the call to its
        # replica
        tenant = current_tenant()
        if not tenant:
            raise Unauthenticated("a release needs the x-tenant-id header", reason="TENANT_MISSING")
        try:
            if request.lease_id:
                released, adjustment = self._controller.release(
                    request.lease_id, actual_tokens=actual, tenant_id=tenant
                )
            else:
                released, adjustment = self._controller.release_attempt(
                    tenant, request.request_id, actual_tokens=actual
                )
        except InvalidArgument as error:
            raise named_fields(error, RELEASE_FIELDS) from None
        await context.send_initial_metadata(self._replica)
        return pb.ReleaseResponse(released=released, token_adjustment=adjustment)

    async def GetQuota(  # noqa: N802 - gRPC method name
        self, request: pb.GetQuotaRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetQuotaResponse:
        tenant = resolve_tenant(request.tenant_id, field="tenant_id", owned=True)
        snapshot = self._controller.quota(tenant, request.user_id)
        await context.send_initial_metadata(self._replica)
        return pb.GetQuotaResponse(quota=_quota_message(snapshot))

    # ---- policies ----------------------------------------------------------------------

    async def GetPolicy(  # noqa: N802 - gRPC method name
        self, request: pb.GetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetPolicyResponse:
        tenant = resolve_tenant(request.tenant_id, field="tenant_id", owned=False)
        stored = await self._store.get(tenant, request.user_id)
        if stored is not None:
            return pb.GetPolicyResponse(
                policy=policy_message(tenant, request.user_id, stored.limits, stored)
            )
        # No stored policy: the tenant's default, or for a user their tenant's policy.
        limits, _ = self._controller.get_policy(tenant)
        tenant_policy = await self._store.get(tenant, "") if request.user_id else None
        if tenant_policy is not None:
            limits = tenant_policy.limits
        assert limits is not None
        return pb.GetPolicyResponse(
            policy=policy_message(tenant, request.user_id, limits), is_default=True
        )

    async def UpdatePolicy(  # noqa: N802 - gRPC method name
        self, request: pb.UpdatePolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdatePolicyResponse:
        given = request.policy
        tenant = resolve_tenant(given.tenant_id, field="policy.tenant_id", owned=False)
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        bad = [
            FieldViolation(f"update_mask.paths[{i}]", f"{p!r} is not an updatable Policy field")
            for i, p in enumerate(paths)
            if p not in POLICY_FIELDS
        ]
        if bad:
            raise invalid(bad)
        changed = paths or list(POLICY_FIELDS)
        default = self._default

        def merge(current: PolicyLimits | None) -> PolicyLimits:
            values = {name: getattr(current or default, name) for name in POLICY_FIELDS}
            values.update({name: getattr(given, name) for name in changed})
            limits = PolicyLimits(**values)
            if violations := limits.validate(prefix="policy."):
                raise invalid(violations, what="policy")
            return limits

        try:
            stored = await self._store.put(tenant, given.user_id, merge, etag=given.etag)
        except EtagMismatch:
            raise Aborted(
                f"the policy of {tenant!r} changed since etag {given.etag!r} was read; "
                "read it again and retry",
                metadata={"tenant_id": tenant, "user_id": given.user_id},
            ) from None
        return pb.UpdatePolicyResponse(
            policy=policy_message(tenant, given.user_id, stored.limits, stored)
        )

    async def ListPolicies(  # noqa: N802 - gRPC method name
        self, request: pb.ListPoliciesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListPoliciesResponse:
        what = "ListPoliciesRequest"
        size = page_size(request.page_size, what=what)
        after = read_page_token(request.page_token, policy_cursor, what=what)
        rows = await self._store.list(tenant_id=request.tenant_id, after=after, limit=size + 1)
        page = rows[:size]
        reply = pb.ListPoliciesResponse(
            policies=[policy_message(p.tenant_id, p.user_id, p.limits, p) for p in page]
        )
        if len(rows) > size:
            reply.next_page_token = page_token(page[-1].tenant_id, page[-1].user_id)
        return reply

    async def DeletePolicy(  # noqa: N802 - gRPC method name
        self, request: pb.DeletePolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeletePolicyResponse:
        tenant = resolve_tenant(request.tenant_id, field="tenant_id", owned=False)
        deleted = await self._store.delete(tenant, request.user_id)
        return pb.DeletePolicyResponse(deleted=deleted)
