"""Admission around every generation: admitted before it reaches Triton, released after
the stream. Attempts go over a long-lived AdmitSession stream per tenant.

A refusal is relayed to the caller unchanged (its ErrorInfo, QuotaFailure and
RetryInfo), so a refused request never reaches Triton; an unreachable admission
service fails the call with UNAVAILABLE `DEPENDENCY_UNAVAILABLE` rather than letting
requests through unchecked.

Every admission attempt carries a fresh request id. When an attempt ends without its
lease id reaching the caller for any reason but a refusal (the deadline, a
cancellation, a lost connection), the lease admission may have granted meanwhile is
released by that id, so that no slot stays held until the lease expires.

Most admissions take no round trip at all: the gate keeps a slice of each busy tenant's
quota (`slices`), leases the tenant's admission replica granted ahead of need over the
same stream, and hands one to a request whose tokens it covers, telling the owner with
a one-way `claim`. The slice is refilled in the background once half used; the owner
recalls it when requests start waiting there, and an unused lease goes back within
`SLICE_IDLE_S`. A request the slice cannot serve is admitted by a round trip as below,
with its queueing, position and fairness.

A stream that ends without deciding an attempt (its replica died) does not fail the
call: the attempt is made once more, under a new id, on a new stream, which Envoy sends
to a live replica; the first is released as above. A stream outlives a change of the
tenant's replica (one that died, then came back): once a release by lease id is answered
`LEASE_NOT_FOUND` (releases are routed by tenant, to the replica that owns the tenant
now) the stream that granted that lease takes no new attempts, and the next go to a new
stream, on that replica; otherwise every lease it granted would be held there until it
expires, until the tier is full.

A stream stays open while a lease granted on it is held: its replica frees the leases a
stream handed out when the stream is cancelled or breaks. So once the last one is
released (wherever the release went: one answered `LEASE_NOT_FOUND` was never freed
where it was granted), a stream the tenant left is closed, and its replica frees what
is still counted there.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta

import grpc
from google.rpc import status_pb2
from switchboard.admission.v1 import admission_pb2, admission_service_pb2_grpc
from switchboard.common.v1 import common_pb2

from services.inference.metrics import ADMISSIONS
from services.inference.slices import Key, Slices
from services.runtime import (
    TENANT_HEADER,
    TIER_VALUES,
    DeadlineExceeded,
    RelayedError,
    RetriesExhausted,
    RetryPolicy,
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
RELEASE_RETRY = RetryPolicy(
    max_attempts=10, backoff=timedelta(milliseconds=250), max_backoff=timedelta(seconds=10)
)
"""How a release that got no answer is tried again (for about a minute): a lease never
released holds a place of its tenant's concurrency until its TTL (10 minutes), so a few
lost releases would leave a tenant at its limit with nothing running."""
_UNANSWERED = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
    }
)
"""A release failed so may not have reached the admission service (another try is
harmless: a lease released twice is NOT_FOUND the second time)."""
CLOSE_RELEASES_S = 5.0
"""How long `close` lets the releases still being tried finish."""
ADMIT_TIMEOUT_S = 10.0
"""The longest an admission waits when the Generate call has no deadline (and does not
ask for queue updates)."""
DEADLINE_MARGIN_S = 0.05
"""An admission stops waiting this long before the call's deadline."""
SESSION_IDLE_S = 60.0
"""An AdmitSession stream unused this long is closed (Envoy resets idle streams later)."""
MAX_SESSIONS = 1024
STREAMS_PER_ATTEMPT = 2
"""Streams an admission is tried on: the tenant's, and a new one if that one ends first."""
SLICE_IDLE_S = 2.0
"""A lease of a slice unused this long is given back."""
GIVE_BACK_MAX = 16
"""Most lease ids one give-back frame carries (the contract's bound)."""
SLICE_PROMPT_MIN = 64
"""A slice's leases are charged for a prompt of at least this many tokens (rounded up to
a power of two), so that one lease serves requests of similar size."""
FLUSH_AFTER_S = 0.01
"""A claim or an ask for more waits for `AdmissionGate.flush` at most this long."""
_FROM_SLICE = ADMISSIONS.labels("slice")
_BY_ROUND_TRIP = ADMISSIONS.labels("round_trip")
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
    handed to each attempt by request id."""

    def __init__(
        self,
        stub: admission_service_pb2_grpc.AdmissionServiceStub,
        tenant: str,
        news: Callable[[_Session, admission_pb2.AdmitSessionResponse | None], None],
    ) -> None:
        self.tenant = tenant
        self.idle_since = time.monotonic()
        # open for as long as it is used: no deadline
        self._call = stub.AdmitSession(metadata=((TENANT_HEADER, tenant),))
        self._attempts: dict[str, asyncio.Queue[admission_pb2.AdmitSessionResponse | None]] = {}
        self._news = news
        """Told of the slice's replies, and (None) of the stream's end."""
        self._writing = asyncio.Lock()
        self._sends: set[asyncio.Task[None]] = set()
        self._reader = asyncio.create_task(self._read())
        self.retired = False
        """Takes no new attempts: it ended, or its replica is no longer the tenant's."""
        self.holding = 0
        """Leases granted on it that the gate holds (not yet released): it stays open
        while there are any, since its replica frees them when it ends."""

    @property
    def alive(self) -> bool:
        return not self._reader.done() and not self.retired

    @property
    def idle(self) -> bool:
        """No attempt waits on it and no lease granted on it is held: closing it loses
        nothing."""
        return not self._attempts and not self.holding

    async def _read(self) -> None:
        try:
            async for reply in self._call:
                if reply.HasField("slice") or reply.HasField("recall"):
                    self._news(self, reply)
                elif (replies := self._attempts.get(reply.request_id)) is not None:
                    replies.put_nowait(reply)
        except grpc.aio.AioRpcError as error:
            if self._attempts:
                logger.warning(
                    "admission session ended: %s %s",
                    error.code().name,
                    error.details(),
                    extra={"tenant_id": self.tenant},
                )
        finally:
            for replies in self._attempts.values():
                replies.put_nowait(None)  # the attempt has no outcome
            self._news(self, None)

    async def attempt(
        self, request: admission_pb2.AdmitRequest
    ) -> asyncio.Queue[admission_pb2.AdmitSessionResponse | None]:
        """Sends `request`; returns the queue its replies arrive on (None: the session
        ended first). The caller must `forget` the attempt when it is done with it."""
        replies: asyncio.Queue[admission_pb2.AdmitSessionResponse | None] = asyncio.Queue()
        self._attempts[request.context.request_id] = replies
        if not self.alive:
            replies.put_nowait(None)
            return replies
        try:
            async with self._writing:
                await self._call.write(admission_pb2.AdmitSessionRequest(request=request))
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            replies.put_nowait(None)  # the session ended: it is replaced when next looked up
        return replies

    def send(self, frame: admission_pb2.AdmitSessionRequest) -> None:
        """Writes a frame nobody waits on (a slice's ask, claim or give-back), in the
        background; lost if the stream ends first."""
        task = asyncio.create_task(self._send(frame))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _send(self, frame: admission_pb2.AdmitSessionRequest) -> None:
        try:
            async with self._writing:
                await self._call.write(frame)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            pass  # the stream ended: the owner gives back what it holds unclaimed

    def forget(self, request_id: str) -> None:
        self._attempts.pop(request_id, None)
        self._settled()

    def returned(self) -> None:
        """A lease granted on it was released (or given up on)."""
        self.holding -= 1
        self._settled()

    def _settled(self) -> None:
        if self.idle:
            self.idle_since = time.monotonic()
            if self.retired:
                self.close()

    def retire(self) -> None:
        """Takes no new attempts; closes once those on it have their outcome and the
        leases granted on it are released."""
        self.retired = True
        if self.idle:
            self.close()

    def close(self) -> None:
        self._call.cancel()


class AdmissionGate:
    """The inference service's client of AdmissionService.

    Admission attempts go over one AdmitSession stream per tenant (the stream's
    `x-tenant-id` routes it to the tenant's replica), so that an admission costs a
    message each way rather than a new call. A session idle for `SESSION_IDLE_S` is
    closed; at most `MAX_SESSIONS` are kept.
    """

    def __init__(self, target: str, *, slice_size: int = 0) -> None:
        """
        Args:
            target: where AdmissionService is reached (Envoy, which routes by tenant).
            slice_size: leases of a tenant's quota kept ahead of need per (tenant, tier,
                priority); 0 admits every request by a round trip.
        """
        self._slices: Slices[_Session] = Slices(
            size=slice_size, idle_s=SLICE_IDLE_S, alive=lambda stream: stream.alive
        )
        self._reserves: dict[str, tuple[Key, _Session]] = {}
        """An ask for a slice in flight → its pool and stream."""
        self._returning: asyncio.Task[None] | None = None
        self.admitted_locally = 0
        """Requests admitted from a slice, with no round trip."""
        self._channel = channel(target, propagate=False)
        self._stub = admission_service_pb2_grpc.AdmissionServiceStub(self._channel)
        # Release must happen even after the caller's deadline or cancellation: it uses
        # a channel without deadline propagation and runs as its own task.
        self._release_channel = grpc.aio.insecure_channel(target)
        self._release_stub = admission_service_pb2_grpc.AdmissionServiceStub(self._release_channel)
        self._releases: set[asyncio.Task[None]] = set()
        self._sleep = asyncio.sleep
        """Waits between a release's tries."""
        self._sessions: dict[str, _Session] = {}
        self._granted_on: dict[str, _Session] = {}
        """Lease id → the session that granted it, until the lease is released."""
        self._swept = time.monotonic()
        self._deferred: list[tuple[_Session, admission_pb2.AdmitSessionRequest]] = []
        self._flush_timer: asyncio.TimerHandle | None = None

    @property
    def reserved(self) -> int:
        """Leases of this gate's slices held ahead of need now."""
        return len(self._slices)

    async def admit(self, ask: Ask) -> str:
        """Waits for admission (fair queue, up to the call's deadline, else
        `ADMIT_TIMEOUT_S`); returns the lease id.

        The caller owns the lease once this returns and must `release` it. If this
        raises, or is cancelled, a lease granted meanwhile is released in the background.

        Raises:
            SwitchboardError: the refusal as admission gave it (RESOURCE_EXHAUSTED with
                QuotaFailure and RetryInfo), or UNAVAILABLE `DEPENDENCY_UNAVAILABLE`.
        """
        updates = self._attempt(ask, outbound_timeout(ADMIT_TIMEOUT_S))
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
        return self._attempt(ask, outbound_timeout(None))

    async def _attempt(
        self, ask: Ask, timeout: float | None
    ) -> AsyncIterator[common_pb2.QueuePosition | str]:
        key = (ask.tenant_id, ask.tier, ask.priority)
        reserved = self._slices.take(key, ask.prompt_tokens + ask.max_tokens)
        if reserved is not None:
            self._defer(reserved.stream, admission_pb2.AdmitSessionRequest(claim=reserved.lease_id))
            self._hold(reserved.lease_id, reserved.stream)
            self.admitted_locally += 1
            _FROM_SLICE.inc()
            self._top_up(ask, key)
            yield reserved.lease_id
            return
        for _ in range(STREAMS_PER_ATTEMPT):
            started = time.monotonic()
            request_id = _attempt_id()
            request = ask.request(request_id)
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
                        handed_over = True
                        lease_id = reply.admitted.lease.lease_id
                        self._hold(lease_id, session)
                        _BY_ROUND_TRIP.inc()
                        self._top_up(ask, key)
                        yield lease_id
                        return
                    if kind == "refused":
                        refused = True
                        raise relay_status(reply.refused)
                    yield reply.queued
                session.retire()  # it ended: the next attempt opens a new one
                if timeout is not None:
                    timeout -= time.monotonic() - started
            finally:
                session.forget(request_id)
                if not handed_over and not refused:
                    self._release_attempt(ask.tenant_id, request_id)
        raise Unavailable(  # every session ended without a decision
            "the admission service ended the stream without a decision",
            reason="DEPENDENCY_UNAVAILABLE",
            metadata={"dependency": "admission"},
            retry_after=RETRY_AFTER,
        )

    def _hold(self, lease_id: str, session: _Session) -> None:
        """The caller holds `lease_id`, granted on `session`, until it releases it."""
        self._granted_on[lease_id] = session
        session.holding += 1

    def _session(self, tenant: str) -> _Session:
        now = time.monotonic()
        if now - self._swept > SESSION_IDLE_S / 4 or len(self._sessions) >= MAX_SESSIONS:
            self._sweep(now)
        session = self._sessions.get(tenant)
        if session is None or not session.alive:
            session = self._sessions[tenant] = _Session(self._stub, tenant, self._news)
        return session

    # ---- slices ------------------------------------------------------------------------

    def _top_up(self, ask: Ask, key: Key) -> None:
        """Asks the tenant's owner for more of its slice, if the pool wants some."""
        count = self._slices.wanted(key)
        if not count:
            return
        session = self._session(ask.tenant_id)
        reserve_id = _attempt_id()
        shape = ask.request(reserve_id)
        shape.estimated_prompt_tokens = _rounded_prompt(ask.prompt_tokens)
        self._reserves[reserve_id] = (key, session)
        self._defer(
            session,
            admission_pb2.AdmitSessionRequest(
                reserve=admission_pb2.SliceRequest(shape=shape, count=count)
            ),
        )

    def _defer(self, session: _Session, frame: admission_pb2.AdmitSessionRequest) -> None:
        """Queues a frame nobody waits on (a claim, an ask for more) until `flush`: on
        its way out it would hold the event loop while the admitted call is starting.
        Sent within FLUSH_AFTER_S if nobody flushes."""
        self._deferred.append((session, frame))
        if self._flush_timer is None:
            self._flush_timer = asyncio.get_running_loop().call_later(FLUSH_AFTER_S, self.flush)

    def flush(self) -> None:
        """Sends the frames deferred so far: the caller's call has started (e.g. its
        first token is out), so their writes no longer delay it."""
        if not self._deferred:
            return
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        deferred, self._deferred = self._deferred, []
        for session, frame in deferred:
            session.send(frame)

    def _news(self, session: _Session, reply: admission_pb2.AdmitSessionResponse | None) -> None:
        """A slice granted or recalled over `session`, or (None) the stream ended."""
        if reply is None:
            for reserve_id, (key, stream) in list(self._reserves.items()):
                if stream is session:
                    del self._reserves[reserve_id]
                    self._slices.ended(key)
            return
        if reply.HasField("recall"):
            _give_back(session, self._slices.recall(session))
            return
        leases = [(a.lease.lease_id, a.lease.charged_tokens) for a in reply.slice.admissions]
        asked = self._reserves.pop(reply.request_id, None)
        if asked is None:  # not asked for by this gate: not kept
            _give_back(session, [lease_id for lease_id, _ in leases])
            return
        self._slices.granted(asked[0], leases, session)
        if leases and self._returning is None:
            self._returning = asyncio.create_task(self._return_idle())

    async def _return_idle(self) -> None:
        """Gives back the leases unused for SLICE_IDLE_S, until none is held."""
        try:
            while len(self._slices) or self._reserves:
                await asyncio.sleep(SLICE_IDLE_S / 2)
                by_stream: dict[_Session, list[str]] = {}
                for lease in self._slices.idle():
                    by_stream.setdefault(lease.stream, []).append(lease.lease_id)
                for stream, lease_ids in by_stream.items():
                    _give_back(stream, lease_ids)
        finally:
            self._returning = None

    def _sweep(self, now: float) -> None:
        """Closes the sessions idle too long or ended, and the longest idle ones above
        MAX_SESSIONS."""
        self._swept = now
        idle = sorted(
            (s for s in self._sessions.values() if s.idle or not s.alive),
            key=lambda s: s.idle_since,
        )
        excess = len(self._sessions) - MAX_SESSIONS + 1
        for rank, session in enumerate(idle):
            if rank < excess or not session.alive or now - session.idle_since > SESSION_IDLE_S:
                if session.idle:  # else it closes once the leases granted on it are released
                    session.close()
                del self._sessions[session.tenant]

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
        """Releases, trying again while the admission service does not answer
        (`RELEASE_RETRY`); a lease whose release never gets through expires on its own."""
        metadata = propagated_metadata([(TENANT_HEADER, tenant_id)])
        granted_on = self._granted_on.pop(request.lease_id, None)
        where = {
            "lease_id": request.lease_id,
            "admission_request_id": request.request_id,
            "tenant_id": tenant_id,
        }

        async def attempt(number: int) -> None:
            try:
                await self._release_stub.Release(
                    request, metadata=metadata, timeout=RELEASE_TIMEOUT_S
                )
            except grpc.aio.AioRpcError as error:
                if error.code() in _UNANSWERED:
                    raise
                if number > 1 and error.code() == grpc.StatusCode.NOT_FOUND:
                    return  # an earlier try released it; its answer was lost
                if _moved(error):
                    # expected once the tenant moved (or the stream that granted it
                    # ended, which freed it): handled, not a fault
                    if granted_on is not None:
                        granted_on.retire()  # the tenant's calls reach another replica now
                    logger.info("admission lease not held where released", extra=where)
                    return
                logger.warning("admission release failed: %s", error.code().name, extra=where)

        try:
            await RELEASE_RETRY.call(attempt, retry_on=grpc.aio.AioRpcError, sleep=self._sleep)
        except RetriesExhausted as exhausted:
            logger.warning(
                "admission release failed %d times; the lease expires on its own: %s",
                exhausted.attempts,
                exhausted.last,
                extra=where,
            )
        finally:
            if granted_on is not None:
                granted_on.returned()  # the last one closes a stream the tenant left

    async def close(self) -> None:
        self.flush()
        if self._returning is not None:
            self._returning.cancel()
        # the releases first: a stream's replica frees the leases it handed out when it
        # closes, keeping their charge, so a release arriving after would correct nothing.
        # A release may be started while the others are awaited; those still being tried
        # again after CLOSE_RELEASES_S are given up (their streams' close frees them)
        closing = time.monotonic() + CLOSE_RELEASES_S
        while self._releases:
            left = closing - time.monotonic()
            if left > 0:
                await asyncio.wait(set(self._releases), timeout=left)
                continue
            for task in self._releases:
                task.cancel()
            await asyncio.gather(*self._releases, return_exceptions=True)
        for session in {*self._sessions.values(), *self._granted_on.values()}:
            session.close()
        self._sessions.clear()
        self._granted_on.clear()
        await self._channel.close()
        await self._release_channel.close()


def _moved(error: grpc.aio.AioRpcError) -> bool:
    """Whether a release by lease id reached a replica that never granted the lease."""
    if error.code() != grpc.StatusCode.NOT_FOUND:
        return False
    info = error_details(error).error_info
    return info is not None and info.reason == "LEASE_NOT_FOUND"


def _give_back(session: _Session, lease_ids: list[str]) -> None:
    for start in range(0, len(lease_ids), GIVE_BACK_MAX):
        chunk = lease_ids[start : start + GIVE_BACK_MAX]
        give_back = admission_pb2.SliceReturn(lease_ids=chunk)
        session.send(admission_pb2.AdmitSessionRequest(give_back=give_back))


def _rounded_prompt(tokens: int) -> int:
    """The prompt a slice's leases are charged for: the next power of two."""
    return 1 << (max(tokens, SLICE_PROMPT_MIN) - 1).bit_length()


def _attempt_id() -> str:
    """A fresh id for one admission attempt, to release it by if its reply is lost."""
    return uuid.uuid4().hex
