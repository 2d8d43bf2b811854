"""Admission around every generation: admitted before it reaches Triton, released after
the stream. Attempts, and the releases of their leases, go over an AdmitSession stream
per tenant.

A refusal is relayed to the caller unchanged (its ErrorInfo, QuotaFailure and
RetryInfo), so a refused request never reaches Triton; an unreachable admission
service fails the call with UNAVAILABLE `DEPENDENCY_UNAVAILABLE` rather than letting
requests through unchecked.

Every admission attempt carries a fresh request id. When an attempt ends without its
lease id reaching the caller for any reason but a refusal (the deadline, a
cancellation, a lost connection), the lease admission may have granted meanwhile is
released by that id, so that no slot stays held until the lease expires.

Where a release goes
--------------------
A lease id is honoured only by the admission replica that granted it, and a stream stays
on the replica it was opened to, while the edge routes a unary call by the tenant's
*current* owner. After the replica set changes the two differ, and a Release call would
be refused with LEASE_NOT_FOUND while the lease kept its slot on the granting replica
until its TTL (a busy tenant stalls there). So a lease is released over the stream it
was granted on, for as long as that stream is open, and a stream is kept until every
lease it granted is released. Only when it is gone (its replica stopped, or the
connection broke) does a release fall back to a Release call, which may not reach the
granting replica; a stopped replica's leases died with it.

How a stream follows its tenant
-------------------------------
New attempts go to a new stream, which the edge routes to the tenant's owner now, when:

- the stream's replica is draining: it refuses with UNAVAILABLE `SHUTTING_DOWN`, and
  every attempt so refused is tried once more on the new stream (nothing was granted);
- the stream ended (the attempts it left undecided fail as the stream did);
- the stream is `rotate_after` old (`SESSION_ROTATE`). A replica set that grows leaves
  the old owner alive and serving, so nothing tells a stream its tenant moved: the
  `x-admission-replica` header names the replica a call reached, but no unary call is
  left on the hot path to compare it with, and probing would add one. Rotating bounds
  how long the old owner goes on admitting a moved tenant (the overlap that
  `services/admission/handover.py` prices) to `rotate_after` plus its queue wait, for
  one new stream per busy tenant per period.

The stream left behind takes no new attempts: it is half-closed once its last lease is
released and its last attempt has an outcome, and the replica then ends it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta

import grpc
from google.rpc import status_pb2
from switchboard.admission.v1 import admission_pb2, admission_service_pb2_grpc
from switchboard.common.v1 import common_pb2

from services.runtime import (
    TENANT_HEADER,
    TIER_VALUES,
    DeadlineExceeded,
    RelayedError,
    SwitchboardError,
    Unavailable,
    channel,
    error_details,
    outbound_timeout,
    propagated_metadata,
    status_of,
)

__all__ = [
    "AdmissionGate",
    "Ask",
    "RelayedError",
    "relay_error",
    "relay_status",
]

logger = logging.getLogger(__name__)

RETRY_AFTER = timedelta(seconds=1)
RELEASE_TIMEOUT_S = 5.0
ADMIT_TIMEOUT_S = 10.0
"""The longest an admission waits when the Generate call has no deadline (and does not
ask for queue updates)."""
DEADLINE_MARGIN_S = 0.05
"""An admission stops waiting this long before the call's deadline."""
SESSION_IDLE_S = 60.0
"""An AdmitSession stream unused this long is closed (Envoy resets idle streams later)."""
SESSION_ROTATE = timedelta(seconds=10)
"""How long a stream takes new attempts before the next ones go to a new stream (the
handover warm-up's default: a moved tenant leaves its old owner within about as long)."""
TRIES = 2
"""Attempts of one admission: a refusal by a draining replica is tried once more."""
MAX_SESSIONS = 1024
_CODES = {code.value[0]: code for code in grpc.StatusCode}
# Codes that mean "admission could not decide", not "admission said no".
_DEPENDENCY_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNIMPLEMENTED,
}


def relay_error(error: grpc.aio.AioRpcError) -> SwitchboardError:
    return _relay(error.code(), status_of(error))


def relay_status(status: status_pb2.Status) -> SwitchboardError:
    """A refusal that came as a message (AdmitSession), relayed as if it were an error."""
    return _relay(_CODES.get(status.code, grpc.StatusCode.UNKNOWN), status)


def _relay(code: grpc.StatusCode, status: status_pb2.Status) -> SwitchboardError:
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(
            "the deadline passed while waiting for admission", reason="DEADLINE_EXCEEDED"
        )
    if code in _DEPENDENCY_CODES:
        logger.warning("admission unavailable: %s %s", code.name, status.message)
        return Unavailable(
            "the admission service is unavailable; retry shortly",
            reason="DEPENDENCY_UNAVAILABLE",
            metadata={"dependency": "admission"},
            retry_after=RETRY_AFTER,
        )
    return RelayedError(code, status)


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
            tier=TIER_VALUES.get(self.tier, common_pb2.MODEL_TIER_UNSPECIFIED),
            estimated_prompt_tokens=self.prompt_tokens,
            max_completion_tokens=self.max_tokens,
        )


class _Session:
    """One AdmitSession stream of one tenant: attempts go out on it, and its replies are
    handed to each attempt by request id; the leases it granted are released over it.

    Retired (`retire`), it takes no new attempts and is half-closed once it holds
    nothing: no attempt without an outcome, no lease granted on it and not yet
    released, no release still being written.
    """

    def __init__(self, stub: admission_service_pb2_grpc.AdmissionServiceStub, tenant: str) -> None:
        self.tenant = tenant
        self.opened = self.idle_since = time.monotonic()
        self.retired = False
        # open for as long as it is used: no deadline
        self._call = stub.AdmitSession(metadata=((TENANT_HEADER, tenant),))
        self._attempts: dict[str, asyncio.Queue[admission_pb2.AdmitSessionResponse | None]] = {}
        self._leases: set[str] = set()
        self._sending = 0
        self._closing: asyncio.Task[None] | None = None
        self._writing = asyncio.Lock()
        self._reader = asyncio.create_task(self._read())

    @property
    def alive(self) -> bool:
        return not self._reader.done()

    @property
    def idle(self) -> bool:
        return not self._attempts and not self._leases and not self._sending

    @property
    def reader(self) -> asyncio.Task[None]:
        """Done once the stream ended."""
        return self._reader

    def accepts(self, now: float, rotate_after: float) -> bool:
        """True if new attempts may go on this stream."""
        return not self.retired and self.alive and now - self.opened < rotate_after

    async def _read(self) -> None:
        try:
            async for reply in self._call:
                if (replies := self._attempts.get(reply.request_id)) is not None:
                    replies.put_nowait(reply)
                elif reply.HasField("refused"):
                    _log_refused_release(reply, self.tenant)
        except grpc.aio.AioRpcError as error:
            if self._attempts or self._leases:
                logger.warning(
                    "admission session ended: %s %s",
                    error.code().name,
                    error.details(),
                    extra={"tenant_id": self.tenant, "leases": len(self._leases)},
                )
        finally:
            for replies in self._attempts.values():
                replies.put_nowait(None)  # the attempt has no outcome

    async def attempt(
        self, request: admission_pb2.AdmitRequest
    ) -> asyncio.Queue[admission_pb2.AdmitSessionResponse | None]:
        """Sends `request`; returns the queue its replies arrive on (None: the session
        ended first). The caller must `forget` the attempt when it is done with it."""
        replies: asyncio.Queue[admission_pb2.AdmitSessionResponse | None] = asyncio.Queue()
        self._attempts[request.context.request_id] = replies
        frame = admission_pb2.AdmitSessionRequest(request=request)
        if not await self._write(frame):
            replies.put_nowait(None)  # the session ended: it is replaced when next looked up
        return replies

    def granted(self, lease_id: str) -> None:
        """A lease granted on this stream was handed to the caller: it holds the stream."""
        self._leases.add(lease_id)

    def releasing(self, lease_id: str) -> None:
        """A release (of `lease_id`, or of an attempt) is about to be sent: call before
        `forget` and `release`, so that the stream stays open for it."""
        self._leases.discard(lease_id)
        self._sending += 1

    async def release(self, request: admission_pb2.ReleaseRequest) -> bool:
        """Sends a release announced by `releasing`; False if the stream is gone."""
        try:
            return await self._write(admission_pb2.AdmitSessionRequest(release=request))
        finally:
            self._sending -= 1
            self._settle()

    async def _write(self, frame: admission_pb2.AdmitSessionRequest) -> bool:
        if not self.alive:
            return False
        try:
            async with self._writing:
                await self._call.write(frame)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            return False
        return True

    def forget(self, request_id: str) -> None:
        self._attempts.pop(request_id, None)
        self._settle()

    def retire(self) -> None:
        """Takes no new attempts from now on; half-closes once it holds nothing."""
        self.retired = True
        self._settle()

    def _settle(self) -> None:
        if not self.idle:
            return
        self.idle_since = time.monotonic()
        if self.retired and self._closing is None and self.alive:
            self._closing = asyncio.create_task(self._half_close())

    async def _half_close(self) -> None:
        """Every frame sent is handled before the replica sees the end of the stream; it
        then ends the stream."""
        try:
            async with self._writing:
                await self._call.done_writing()
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            self.close()

    def close(self) -> None:
        self._call.cancel()


def _log_refused_release(reply: admission_pb2.AdmitSessionResponse, tenant: str) -> None:
    """A release sent over a stream was refused (the lease expires on its own); a waiting
    attempt released by its id after the caller gave up is refused CANCELLED, as meant."""
    if reply.refused.code != grpc.StatusCode.CANCELLED.value[0]:
        logger.warning(
            "admission release failed: %s",
            _CODES.get(reply.refused.code, grpc.StatusCode.UNKNOWN).name,
            extra={"admission_request_id": reply.request_id, "tenant_id": tenant},
        )


def _shutting_down(status: status_pb2.Status) -> bool:
    """The replica refused because it is draining: the attempt may go to another one."""
    info = error_details(status).error_info
    return status.code == grpc.StatusCode.UNAVAILABLE.value[0] and (
        info is not None and info.reason == "SHUTTING_DOWN"
    )


class AdmissionGate:
    """The inference service's client of AdmissionService.

    Admission attempts go over one AdmitSession stream per tenant (the stream's
    `x-tenant-id` routes it to the tenant's replica), so that an admission costs a
    message each way rather than a new call, and so does its release, on the stream that
    granted it (see the module's docstring). A stream takes new attempts for at most
    `rotate_after`; one idle for `SESSION_IDLE_S` is closed; at most `MAX_SESSIONS`
    taking new attempts are kept.
    """

    def __init__(self, target: str, *, rotate_after: timedelta = SESSION_ROTATE) -> None:
        self._channel = channel(target, propagate=False)
        self._stub = admission_service_pb2_grpc.AdmissionServiceStub(self._channel)
        # A release must happen even after the caller's deadline or cancellation: it runs
        # as its own task, and its fallback call uses a channel without deadline
        # propagation.
        self._release_channel = grpc.aio.insecure_channel(target)
        self._release_stub = admission_service_pb2_grpc.AdmissionServiceStub(self._release_channel)
        self._releases: set[asyncio.Task[None]] = set()
        self._rotate_after = rotate_after.total_seconds()
        self._sessions: dict[str, _Session] = {}
        """The stream of each tenant that takes its new attempts."""
        self._retired: set[_Session] = set()
        """Streams that take no new attempts, kept until they hold nothing."""
        self._holders: dict[str, _Session] = {}
        """The stream that granted each lease the callers hold."""
        self._swept = time.monotonic()

    async def admit(self, ask: Ask) -> str:
        """Waits for admission (fair queue, up to the call's deadline, else
        `ADMIT_TIMEOUT_S`); returns the lease id.

        The caller owns the lease once this returns and must `release` it. If this
        raises, or is cancelled, a lease granted meanwhile is released in the background.

        Raises:
            SwitchboardError: the refusal as admission gave it (RESOURCE_EXHAUSTED with
                QuotaFailure and RetryInfo), or UNAVAILABLE `DEPENDENCY_UNAVAILABLE`.
        """
        updates = self._attempts(ask, outbound_timeout(ADMIT_TIMEOUT_S))
        async for update in updates:
            if isinstance(update, str):
                await updates.aclose()
                return update
        raise AssertionError("an attempt ends with a lease or an error")  # pragma: no cover

    def admit_stream(self, ask: Ask) -> AsyncIterator[common_pb2.QueuePosition | str]:
        """Like `admit`, but yields the queue status while waiting, then the lease id.

        It waits as long as admission allows (its default max wait) within the call's
        deadline. The caller owns the lease once it is yielded. If the iteration ends
        any other way (an error, a cancellation, the caller closing it), a lease granted
        meanwhile is released in the background.
        """
        return self._attempts(ask, outbound_timeout(None))

    async def _attempts(
        self, ask: Ask, timeout: float | None
    ) -> AsyncIterator[common_pb2.QueuePosition | str]:
        """One admission: an attempt, and another on a new stream if the first one's
        replica refused it because it is draining (nothing was granted)."""
        for tries_left in reversed(range(TRIES)):
            tried_at = time.monotonic()
            request = ask.request(_attempt_id())
            request_id = request.context.request_id
            if timeout is not None:
                wait = max(timeout - DEADLINE_MARGIN_S, 0.0)
                request.max_wait.FromTimedelta(timedelta(seconds=wait))
            session = self._session(ask.tenant_id)
            handed_over = refused = False
            try:
                replies = await session.attempt(request)
                while (reply := await replies.get()) is not None:
                    kind = reply.WhichOneof("event")
                    if kind == "admitted":
                        lease_id = reply.admitted.lease.lease_id
                        self._holders[lease_id] = session
                        session.granted(lease_id)
                        handed_over = True
                        yield lease_id
                        return
                    if kind == "refused":
                        refused = True
                        if not _shutting_down(reply.refused):
                            raise relay_status(reply.refused)
                        self._retire(session)
                        if not tries_left:
                            raise relay_status(reply.refused)
                        break
                    yield reply.queued
                else:
                    raise _undecided()
            finally:
                if not handed_over and not refused:
                    self._release_attempt(session, request_id)
                session.forget(request_id)
            if timeout is not None:
                timeout -= time.monotonic() - tried_at

    def _session(self, tenant: str) -> _Session:
        """The tenant's stream for a new attempt: a new one if it has none that takes
        new attempts."""
        now = time.monotonic()
        if now - self._swept > SESSION_IDLE_S / 4 or len(self._sessions) >= MAX_SESSIONS:
            self._sweep(now)
        session = self._sessions.get(tenant)
        if session is None or not session.accepts(now, self._rotate_after):
            if session is not None:
                self._retire(session)
            session = self._sessions[tenant] = _Session(self._stub, tenant)
        return session

    def _retire(self, session: _Session) -> None:
        """No new attempts go to `session`; it stays until it holds nothing."""
        if self._sessions.get(session.tenant) is session:
            del self._sessions[session.tenant]
        if not session.retired:
            session.retire()
            self._retired.add(session)

    def _sweep(self, now: float) -> None:
        """Closes the sessions idle too long or ended, and the longest idle ones above
        MAX_SESSIONS; forgets retired ones that ended, and closes those that did not end
        long after they were half-closed."""
        self._swept = now
        for session in list(self._retired):
            if not session.alive or session.idle and now - session.idle_since > SESSION_IDLE_S:
                session.close()
                self._retired.discard(session)
        idle = sorted(
            (s for s in self._sessions.values() if s.idle or not s.alive),
            key=lambda s: s.idle_since,
        )
        excess = len(self._sessions) - MAX_SESSIONS + 1
        for rank, session in enumerate(idle):
            if rank < excess or not session.alive or now - session.idle_since > SESSION_IDLE_S:
                session.close()
                del self._sessions[session.tenant]

    def release(self, lease_id: str, *, tenant_id: str, prompt: int, completion: int) -> None:
        """Releases the lease with the tokens actually used, in the background, over the
        stream that granted it."""
        request = admission_pb2.ReleaseRequest(
            lease_id=lease_id,
            actual_usage=common_pb2.TokenUsage(
                prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
            ),
        )
        self._send_release(request, tenant_id, self._holders.pop(lease_id, None))

    def _release_attempt(self, session: _Session, request_id: str) -> None:
        """Releases, in the background, whatever the abandoned attempt was granted.

        Nothing ran on it, so its whole charge is given back.
        """
        request = admission_pb2.ReleaseRequest(
            request_id=request_id, actual_usage=common_pb2.TokenUsage(total_tokens=0)
        )
        self._send_release(request, session.tenant, session)

    def _send_release(
        self, request: admission_pb2.ReleaseRequest, tenant_id: str, session: _Session | None
    ) -> None:
        if session is not None:
            session.releasing(request.lease_id)
        task = asyncio.create_task(self._release(request, tenant_id, session))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _release(
        self, request: admission_pb2.ReleaseRequest, tenant_id: str, session: _Session | None
    ) -> None:
        if session is not None and await session.release(request):
            return
        # the stream is gone, and its replica with it or unreachable: this call goes to
        # the tenant's replica now, which may not be the one that granted the lease
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
        # the releases started go out first, over their streams (a release may be
        # started while the others are awaited)
        while self._releases:
            await asyncio.gather(*self._releases, return_exceptions=True)
        sessions = [*self._sessions.values(), *self._retired]
        for session in sessions:
            session.retire()
        # a cancelled stream may lose the frames last written on it; a half-closed one
        # ends once the replica has handled them all
        if ending := [s.reader for s in sessions if s.idle and s.alive]:
            await asyncio.wait(ending, timeout=RELEASE_TIMEOUT_S)
        for session in sessions:
            if session.alive:
                session.close()
        self._sessions.clear()
        self._retired.clear()
        self._holders.clear()
        await self._channel.close()
        await self._release_channel.close()


def _undecided() -> Unavailable:
    return Unavailable(
        "the admission service ended the stream without a decision",
        reason="DEPENDENCY_UNAVAILABLE",
        metadata={"dependency": "admission"},
        retry_after=RETRY_AFTER,
    )


def _attempt_id() -> str:
    """A fresh id for one admission attempt, to release it by if its reply is lost."""
    return uuid.uuid4().hex
