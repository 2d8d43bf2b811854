"""Admission around every generation: Admit before routing, Release after the stream.

A refusal is relayed to the caller unchanged (its ErrorInfo, QuotaFailure and
RetryInfo), so a refused request never reaches Triton; an unreachable admission
service fails the call with UNAVAILABLE `DEPENDENCY_UNAVAILABLE` rather than letting
requests through unchecked.
"""

from __future__ import annotations

import asyncio
import logging
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
    propagated_metadata,
    status_of,
)

__all__ = ["ANONYMOUS_TENANT", "AdmissionGate", "Ask", "RelayedError", "relay_error"]

logger = logging.getLogger(__name__)

ANONYMOUS_TENANT = "anonymous"
"""The tenant a Generate call without `x-tenant-id` is admitted as."""
RETRY_AFTER = timedelta(seconds=1)
RELEASE_TIMEOUT_S = 5.0
_TIERS = {"small": common_pb2.MODEL_TIER_SMALL, "large": common_pb2.MODEL_TIER_LARGE}
# Codes that mean "admission could not decide", not "admission said no".
_DEPENDENCY_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNIMPLEMENTED,
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

    def request(self) -> admission_pb2.AdmitRequest:
        return admission_pb2.AdmitRequest(
            context=common_pb2.RequestContext(tenant_id=self.tenant_id, priority=self.priority),
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
        self._channel = channel(target, default_timeout=timedelta(seconds=10))
        self._stub = admission_service_pb2_grpc.AdmissionServiceStub(self._channel)
        # Release must happen even after the caller's deadline or cancellation: it uses
        # a channel without deadline propagation and runs as its own task.
        self._release_channel = grpc.aio.insecure_channel(target)
        self._release_stub = admission_service_pb2_grpc.AdmissionServiceStub(self._release_channel)
        self._releases: set[asyncio.Task[None]] = set()

    async def admit(self, ask: Ask) -> str:
        """Waits for admission (fair queue, up to the call's deadline); returns the lease id.

        Raises:
            SwitchboardError: the refusal as admission gave it (RESOURCE_EXHAUSTED with
                QuotaFailure and RetryInfo), or UNAVAILABLE `DEPENDENCY_UNAVAILABLE`.
        """
        try:
            reply = await self._stub.Admit(ask.request(), metadata=ask.metadata)
        except grpc.aio.AioRpcError as error:
            raise relay_error(error) from None
        return reply.lease.lease_id  # type: ignore[no-any-return]

    async def admit_stream(self, ask: Ask) -> AsyncIterator[admission_pb2.QueueStatus | str]:
        """Like `admit`, but yields the queue status while waiting, then the lease id."""
        request = admission_pb2.AdmitStreamRequest(request=ask.request())
        call = self._stub.AdmitStream(request, metadata=ask.metadata)
        try:
            async for reply in call:
                if reply.HasField("admitted"):
                    yield reply.admitted.lease.lease_id
                    return
                yield reply.queued
        except grpc.aio.AioRpcError as error:
            raise relay_error(error) from None
        finally:
            call.cancel()  # leaves the queue at once when the caller gives up
        raise Unavailable(  # the stream ended without a decision
            "the admission service ended the stream without a decision",
            reason="DEPENDENCY_UNAVAILABLE",
            metadata={"dependency": "admission"},
            retry_after=RETRY_AFTER,
        )

    def release(self, lease_id: str, *, tenant_id: str, prompt: int, completion: int) -> None:
        """Releases the lease with the tokens actually used, in the background."""
        task = asyncio.create_task(self._release(lease_id, tenant_id, prompt, completion))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _release(self, lease_id: str, tenant_id: str, prompt: int, completion: int) -> None:
        request = admission_pb2.ReleaseRequest(
            lease_id=lease_id,
            actual_usage=common_pb2.TokenUsage(
                prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
            ),
        )
        metadata = propagated_metadata([(TENANT_HEADER, tenant_id)])
        try:
            await self._release_stub.Release(request, metadata=metadata, timeout=RELEASE_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:  # the lease expires on its own
            logger.warning(
                "admission release failed: %s",
                error.code().name,
                extra={"lease_id": lease_id, "tenant_id": tenant_id},
            )

    async def close(self) -> None:
        if self._releases:
            await asyncio.gather(*self._releases, return_exceptions=True)
        await self._channel.close()
        await self._release_channel.close()
