"""Admission around every generation: Admit before routing, Release after the stream.

A refusal is relayed to the caller unchanged (its ErrorInfo, QuotaFailure and
RetryInfo), so a refused request never reaches Triton; an unreachable admission
service fails the call with UNAVAILABLE `DEPENDENCY_UNAVAILABLE` rather than letting
requests through unchecked.

Every admission attempt carries a fresh request id. When an attempt ends without its
lease id reaching the caller for any reason but a refusal (the deadline, a
cancellation, a lost connection), the lease admission may have granted meanwhile is
released by that id, so that no slot stays held until the lease expires.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta

import grpc
from switchboard.admission.v1 import admission_pb2, admission_service_pb2_grpc
from switchboard.common.v1 import common_pb2

from services.runtime import (
    TENANT_HEADER,
    DeadlineExceeded,
    RelayedError,
    SwitchboardError,
    Unavailable,
    channel,
    outbound_timeout,
    propagated_metadata,
    status_of,
)

__all__ = ["ANONYMOUS_TENANT", "AdmissionGate", "Ask", "RelayedError", "relay_error"]

logger = logging.getLogger(__name__)

ANONYMOUS_TENANT = "anonymous"
"""The tenant a Generate call without `x-tenant-id` is admitted as."""
RETRY_AFTER = timedelta(seconds=1)
RELEASE_TIMEOUT_S = 5.0
ADMIT_TIMEOUT_S = 10.0
"""The longest an Admit waits when the Generate call has no deadline."""
_TIERS = {"small": common_pb2.MODEL_TIER_SMALL, "large": common_pb2.MODEL_TIER_LARGE}
# Codes that mean "admission could not decide", not "admission said no".
_DEPENDENCY_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNIMPLEMENTED,
}
# Codes with which admission decided against the attempt: no lease was granted.
_REFUSAL_CODES = {
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
}


def relay_error(error: grpc.aio.AioRpcError) -> SwitchboardError:
    code = error.code()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(
            "the deadline passed while waiting for admission", reason="DEADLINE_EXCEEDED"
        )
    if code in _DEPENDENCY_CODES:
        logger.warning("admission unavailable: %s %s", code.name, error.details())
        return Unavailable(
            "the admission service is unavailable; retry shortly",
            reason="DEPENDENCY_UNAVAILABLE",
            metadata={"dependency": "admission"},
            retry_after=RETRY_AFTER,
        )
    return RelayedError(code, status_of(error))


@dataclass(frozen=True)
class Ask:
    """What a generation asks admission for."""

    tenant_id: str
    tier: str
    prompt_tokens: int
    max_tokens: int
    priority: int = common_pb2.PRIORITY_INTERACTIVE

    def request(self, request_id: str = "") -> admission_pb2.AdmitRequest:
        return admission_pb2.AdmitRequest(
            context=common_pb2.RequestContext(
                tenant_id=self.tenant_id, request_id=request_id, priority=self.priority
            ),
            tier=_TIERS.get(self.tier, common_pb2.MODEL_TIER_UNSPECIFIED),
            estimated_prompt_tokens=self.prompt_tokens,
            max_completion_tokens=self.max_tokens,
        )

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((TENANT_HEADER, self.tenant_id),)


class AdmissionGate:
    """The inference service's client of AdmissionService."""

    def __init__(self, target: str) -> None:
        # calls name their deadline and metadata themselves (no interceptor task per call)
        self._channel = channel(target, propagate=False)
        self._stub = admission_service_pb2_grpc.AdmissionServiceStub(self._channel)
        # Release must happen even after the caller's deadline or cancellation: it uses
        # a channel without deadline propagation and runs as its own task.
        self._release_channel = grpc.aio.insecure_channel(target)
        self._release_stub = admission_service_pb2_grpc.AdmissionServiceStub(self._release_channel)
        self._releases: set[asyncio.Task[None]] = set()
        self._ending: set[grpc.aio.UnaryStreamCall] = set()

    async def admit(self, ask: Ask) -> str:
        """Waits for admission (fair queue, up to the call's deadline); returns the lease id.

        The caller owns the lease once this returns and must `release` it. If this
        raises, or is cancelled, a lease granted meanwhile is released in the background.

        Raises:
            SwitchboardError: the refusal as admission gave it (RESOURCE_EXHAUSTED with
                QuotaFailure and RetryInfo), or UNAVAILABLE `DEPENDENCY_UNAVAILABLE`.
        """
        request_id = _attempt_id()
        try:
            reply = await self._stub.Admit(
                ask.request(request_id),
                metadata=propagated_metadata(ask.metadata),
                timeout=outbound_timeout(ADMIT_TIMEOUT_S),
            )
        except grpc.aio.AioRpcError as error:
            if error.code() not in _REFUSAL_CODES:
                self._release_attempt(ask.tenant_id, request_id)
            raise relay_error(error) from None
        except BaseException:  # cancelled, perhaps with the reply already on its way
            self._release_attempt(ask.tenant_id, request_id)
            raise
        return reply.lease.lease_id  # type: ignore[no-any-return]

    async def admit_stream(self, ask: Ask) -> AsyncIterator[admission_pb2.QueueStatus | str]:
        """Like `admit`, but yields the queue status while waiting, then the lease id.

        The caller owns the lease once it is yielded. If the iteration ends any other
        way (an error, a cancellation, the caller closing it), a lease granted meanwhile
        is released in the background.
        """
        request_id = _attempt_id()
        request = admission_pb2.AdmitStreamRequest(request=ask.request(request_id))
        # no deadline of its own: the caller watches the queue position, and admission
        # bounds the wait (its default max wait, or the caller's deadline)
        call = self._stub.AdmitStream(
            request, metadata=propagated_metadata(ask.metadata), timeout=outbound_timeout(None)
        )
        handed_over = refused = False
        try:
            async for reply in call:
                if reply.HasField("admitted"):
                    # handed over at once; the stream's status follows by itself
                    self._let_end(call)
                    handed_over = True
                    yield reply.admitted.lease.lease_id
                    return
                yield reply.queued
        except grpc.aio.AioRpcError as error:
            refused = error.code() in _REFUSAL_CODES
            raise relay_error(error) from None
        finally:
            if not handed_over and not call.done():
                call.cancel()  # leaves the queue at once when the caller gives up
            if not handed_over and not refused:
                self._release_attempt(ask.tenant_id, request_id)
        raise Unavailable(  # the stream ended without a decision
            "the admission service ended the stream without a decision",
            reason="DEPENDENCY_UNAVAILABLE",
            metadata={"dependency": "admission"},
            retry_after=RETRY_AFTER,
        )

    def _let_end(self, call: grpc.aio.UnaryStreamCall) -> None:
        """Keeps an admitted stream referenced until its status arrives.

        It is not reset: Envoy counts resets of young streams as premature and closes
        connections where most resets are, and grpc cancels a call that is collected
        unfinished.
        """
        if not call.done():
            self._ending.add(call)
            call.add_done_callback(self._ending.discard)

    def release(self, lease_id: str, *, tenant_id: str, prompt: int, completion: int) -> None:
        """Releases the lease with the tokens actually used, in the background."""
        request = admission_pb2.ReleaseRequest(
            lease_id=lease_id,
            actual_usage=common_pb2.TokenUsage(
                prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
            ),
        )
        self._send_release(request, tenant_id)

    def _release_attempt(self, tenant_id: str, request_id: str) -> None:
        """Releases, in the background, whatever the abandoned attempt was granted.

        Nothing ran on it, so its whole charge is given back.
        """
        request = admission_pb2.ReleaseRequest(
            request_id=request_id, actual_usage=common_pb2.TokenUsage(total_tokens=0)
        )
        self._send_release(request, tenant_id)

    def _send_release(self, request: admission_pb2.ReleaseRequest, tenant_id: str) -> None:
        task = asyncio.create_task(self._release(request, tenant_id))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _release(self, request: admission_pb2.ReleaseRequest, tenant_id: str) -> None:
        metadata = propagated_metadata([(TENANT_HEADER, tenant_id)])
        try:
            await self._release_stub.Release(request, metadata=metadata, timeout=RELEASE_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:  # the lease expires on its own
            logger.warning(
                "admission release failed: %s",
                error.code().name,
                extra={
                    "lease_id": request.lease_id,
                    "admission_request_id": request.request_id,
                    "tenant_id": tenant_id,
                },
            )

    async def close(self) -> None:
        # a release may be started while the others are awaited
        while self._releases:
            await asyncio.gather(*self._releases, return_exceptions=True)
        await self._channel.close()
        await self._release_channel.close()


def _attempt_id() -> str:
    """A fresh id for one admission attempt, to release it by if its reply is lost."""
    return uuid.uuid4().hex
