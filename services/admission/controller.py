"""The admission decision core: tenant and user limits, tier ceilings, the queue, leases.

`AdmissionController` decides, for every request, whether it runs now, waits its turn
in the fair queue (`scheduler.FairQueue`), or is refused with the reason and an honest
retry time. The decisions are synchronous and read an injected clock, so tests drive
them on a `FakeClock` and the admit+release path stays cheap; the asyncio layer on top
(`admit`, `wait`, `run`) only parks callers on futures and wakes the dispatcher when a
bucket refills, a waiter's time runs out or a lease expires.

What a request is charged: one request from the request bucket, and its estimated
prompt tokens plus its maximum completion tokens from the token bucket, of its tenant
and (when the user has a policy of their own) of its user; plus one in-flight slot of
each, and of its model tier. `release` returns the slots and corrects the token buckets
with the tokens actually used.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import hashlib
import heapq
import hmac
import logging
import math
import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import NamedTuple

from services.admission.bucket import TokenBucket
from services.admission.clock import Clock, MonotonicClock
from services.admission.limits import (
    DEFAULT_POLICY,
    MAX_REQUEST_TOKENS,
    PolicyLimits,
    Priority,
    TierCapacity,
)
from services.admission.scheduler import FairQueue, Verdict
from services.runtime import (
    Cancelled,
    FieldViolation,
    NotFound,
    QuotaViolation,
    ResourceExhausted,
    SwitchboardError,
    Unavailable,
    invalid,
)

logger = logging.getLogger(__name__)

QUOTA_EXCEEDED = "QUOTA_EXCEEDED"
QUEUE_FULL = "QUEUE_FULL"
CAPACITY_EXHAUSTED = "CAPACITY_EXHAUSTED"

_PRIORITIES = {0: Priority.INTERACTIVE, **{int(p): p for p in Priority}}
MAX_REQUEST_ID = 128  # characters of a caller's admission attempt id
_EWMA = 0.1  # weight of the newest lease in the hold-time average


@dataclass(frozen=True, slots=True)
class Lease:
    """Permission for one request to run, until released or expired.

    Times are readings of the controller's clock (monotonic seconds); the servicer turns
    `expires_at` into a wall-clock `expire_time`.
    """

    lease_id: str
    tenant_id: str
    user_id: str
    tier: str
    priority: Priority
    charged_tokens: int
    granted_at: float
    expires_at: float
    request_id: str = ""
    """The caller's id for the admission attempt, if it gave one (release by it)."""


@dataclass(frozen=True, slots=True)
class Admission:
    """An admitted request: its lease, how long it waited and where it entered the queue."""

    lease: Lease
    queue_wait: timedelta
    initial_queue_position: int


@dataclass(frozen=True, slots=True)
class QueueStatus:
    """Where a waiting request stands (AdmitStream's `QueueStatus`)."""

    position: int
    estimated_wait: timedelta


@dataclass(frozen=True, slots=True)
class QuotaSnapshot:
    """The live state of a tenant's (or user's) limits (GetQuota's `QuotaStatus`)."""

    tenant_id: str
    user_id: str
    policy: PolicyLimits | None
    """The policy in force; None for a user without a policy of their own."""
    is_default: bool
    available_requests: float
    available_tokens: int
    in_flight: int
    queued: dict[Priority, int]


@dataclass(slots=True)
class Counters:
    """What happened to one tenant's requests of one class (for Prometheus)."""

    admitted: int = 0
    admitted_after_wait: int = 0
    queued: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    """Refusals by reason: QUOTA_EXCEEDED, QUEUE_FULL, CAPACITY_EXHAUSTED."""
    cancelled: int = 0
    wait_seconds_total: float = 0.0
    wait_seconds_max: float = 0.0


class TicketState(enum.Enum):
    WAITING = enum.auto()
    ADMITTED = enum.auto()
    REFUSED = enum.auto()
    CANCELLED = enum.auto()


class _Scope:
    """The live state of one tenant's, or one user's, limits."""

    __slots__ = (
        "tenant_id",
        "user_id",
        "subject",
        "policy",
        "explicit",
        "requests",
        "tokens",
        "in_flight",
        "queued",
    )

    def __init__(
        self, tenant_id: str, user_id: str, policy: PolicyLimits, *, explicit: bool, now: float
    ) -> None:
        self.tenant_id = tenant_id
        self.user_id = user_id
        self.subject = f"tenant:{tenant_id}/user:{user_id}" if user_id else f"tenant:{tenant_id}"
        self.policy: PolicyLimits | None = policy
        self.explicit = explicit
        self.requests = TokenBucket(
            rate_per_s=policy.requests_per_second, burst=policy.request_burst, now=now
        )
        self.tokens = TokenBucket(
            rate_per_s=policy.tokens_per_second, burst=policy.token_burst, now=now
        )
        self.in_flight = 0
        self.queued = 0

    def apply(self, policy: PolicyLimits, *, explicit: bool, now: float) -> None:
        """Switches to a new policy, keeping what the buckets hold (capped at the new bursts)."""
        self.policy = policy
        self.explicit = explicit
        self.requests.reconfigure(
            rate_per_s=policy.requests_per_second, burst=policy.request_burst, now=now
        )
        self.tokens.reconfigure(
            rate_per_s=policy.tokens_per_second, burst=policy.token_burst, now=now
        )

    def blocks(self, tokens: int, now: float) -> bool:
        policy = self.policy
        return policy is not None and (
            self.in_flight >= policy.max_in_flight
            or not self.requests.can_take(1, now)
            or not self.tokens.can_take(tokens, now)
        )


class _Tier:
    """One model tier's global ceiling and what runs on it."""

    __slots__ = ("name", "capacity", "in_flight", "tokens_in_flight", "hold")

    def __init__(self, name: str, hold: float) -> None:
        self.name = name
        self.capacity = TierCapacity()
        self.in_flight = 0
        self.tokens_in_flight = 0
        self.hold = hold

    def blocks(self, tokens: int) -> bool:
        cap = self.capacity
        return (cap.max_in_flight is not None and self.in_flight >= cap.max_in_flight) or (
            cap.max_tokens_in_flight is not None
            and self.tokens_in_flight + tokens > cap.max_tokens_in_flight
        )


class Ticket:
    """One request's way through admission: admitted at once, waiting, or finished.

    Returned by `AdmissionController.submit`; `lease` is set once admitted, `error` once
    refused while waiting (its deadline passed, or the controller shut down).
    """

    __slots__ = (
        "seq",
        "tenant_id",
        "user_id",
        "request_id",
        "tier",
        "priority",
        "tokens",
        "submitted_at",
        "deadline",
        "state",
        "lease",
        "error",
        "admitted_at",
        "initial_position",
        "_tenant",
        "_user",
        "_tier",
        "_future",
    )

    def __init__(
        self,
        seq: int,
        tenant: _Scope,
        tenant_id: str,
        user: _Scope | None,
        user_id: str,
        tier: _Tier | None,
        priority: Priority,
        tokens: int,
        now: float,
        request_id: str = "",
    ) -> None:
        self.seq = seq
        self.tenant_id = tenant_id
        self.user_id = user_id
        self.request_id = request_id
        self.tier = tier.name if tier is not None else ""
        self.priority = priority
        self.tokens = tokens
        self.submitted_at = now
        self.deadline = math.inf
        self.state = TicketState.WAITING
        self.lease: Lease | None = None
        self.error: SwitchboardError | None = None
        self.admitted_at = now
        self.initial_position = 0
        self._tenant = tenant
        self._user = user
        self._tier = tier
        self._future: asyncio.Future[None] | None = None

    @property
    def waiting(self) -> bool:
        return self.state is TicketState.WAITING

    def result(self) -> Admission:
        """The admission; raises the refusal if there was one."""
        if self.lease is not None:
            return Admission(
                lease=self.lease,
                queue_wait=_duration(self.admitted_at - self.submitted_at),
                initial_queue_position=self.initial_position,
            )
        if self.error is not None:
            raise self.error
        raise RuntimeError("the request is still waiting")

    def _settle(self) -> None:
        if self._future is not None and not self._future.done():
            self._future.set_result(None)

    def __repr__(self) -> str:
        return (
            f"Ticket(#{self.seq} {self.tenant_id}/{self.user_id} {self.priority.label} "
            f"tier={self.tier!r} tokens={self.tokens} {self.state.name})"
        )


class _Held(NamedTuple):
    lease: Lease
    tenant: _Scope
    user: _Scope | None
    tier: _Tier | None


class _Limit(NamedTuple):
    """A limit holding a request back, and how long it will."""

    limit: str  # requests_per_second | tokens_per_minute | max_in_flight | tier
    subject: str  # QuotaFailure subject: tenant:<id>, tenant:<id>/user:<id> or tier:<name>
    description: str
    seconds: float
    scope: _Scope | None = None  # the tenant or user whose limit it is; None for a tier
    certain: bool = False  # a bucket refill time (exact), not an estimate from hold times


class AdmissionController:
    """Per-tenant limits, tier ceilings, fair queueing and leases for one replica.

    Policies: a tenant without a stored policy is admitted under `default_policy`
    (reported as such by `get_policy`); a user without a policy of their own is bound by
    their tenant's limits only; a user with one is bound by both.

    Everything runs on one asyncio thread (or none: the synchronous methods never
    await). `run()` is the dispatcher that grants waiting requests as buckets refill
    and expires waiters and leases; tests call `pump()` after moving a `FakeClock`
    instead.
    """

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        default_policy: PolicyLimits = DEFAULT_POLICY,
        lease_ttl: timedelta = timedelta(minutes=10),
        starvation_guard: int = 8,
        max_queued_total: int = 100_000,
        typical_hold: timedelta = timedelta(seconds=1),
        wait_observer: Callable[[str, Priority, float], None] | None = None,
        tombstone_ttl: timedelta = timedelta(seconds=60),
        max_tombstones: int = 100_000,
    ) -> None:
        """
        Args:
            clock: the monotonic clock every decision reads.
            default_policy: the limits of tenants without a stored policy.
            lease_ttl: how long a lease lives unless released; it then expires, freeing
                its slots and keeping its charge. Fixed, so leases expire in grant order.
            starvation_guard: a lower priority class gets a grant after at most this many
                grants to better classes while it waits (see `scheduler`).
            max_queued_total: most requests waiting at once, all tenants together.
            typical_hold: how long a lease is assumed to be held before any was released;
                waits behind in-flight ceilings are estimated from observed hold times.
            wait_observer: called with (tenant, class, seconds waited) on every
                admission, e.g. to feed a Prometheus histogram.
            tombstone_ttl: how long a release by request id that found nothing refuses
                an admission attempt with that id arriving after it.
            max_tombstones: most such releases remembered at once; the oldest are
                forgotten first.
        """
        for violation in default_policy.validate(prefix="default_policy."):
            raise ValueError(f"{violation.field}: {violation.description}")
        if lease_ttl <= timedelta(0):
            raise ValueError("lease_ttl must be positive")
        self._clock: Clock = clock or MonotonicClock()
        self._default = default_policy
        self._lease_ttl = lease_ttl.total_seconds()
        self._max_queued_total = max_queued_total
        self._hold = typical_hold.total_seconds()
        self._wait_observer = wait_observer

        self._policies: dict[tuple[str, str], PolicyLimits] = {}
        self._tenants: dict[str, _Scope] = {}
        self._users: dict[tuple[str, str], _Scope] = {}
        self._tiers: dict[str, _Tier] = {}
        self._queue: FairQueue[Ticket] = FairQueue(starvation_guard=starvation_guard)
        self._deadlines: list[tuple[float, int, Ticket]] = []
        # Insertion order is expiry order, since every lease lives lease_ttl.
        self._leases: OrderedDict[str, _Held] = OrderedDict()
        self._next_due = math.inf  # no lease or waiter deadline falls due before this
        # Admission attempts that named themselves, by (tenant, request id): waiting or
        # holding a lease. Dropped when the lease is released or expires, or the attempt
        # is refused or cancelled.
        self._attempts: dict[tuple[str, str], Ticket] = {}
        # Releases by request id that found no attempt, with when they lapse; insertion
        # order is expiry order. An attempt arriving with such an id is refused.
        self._tombstones: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._tombstone_ttl = tombstone_ttl.total_seconds()
        self._max_tombstones = max_tombstones
        self._seq = 0
        self._lease_prefix = secrets.token_hex(3)
        # Signs each lease id with its tenant, so that an id names a lease of one tenant
        # only: another tenant's id (or a forged one) is unknown to the caller, whether
        # or not that lease is live, and reveals nothing.
        self._lease_key = secrets.token_bytes(32)
        self._closed = False
        self._wake = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None

        self.stats: dict[tuple[str, Priority], Counters] = {}
        self.leases_expired = 0

    # ---- decisions ---------------------------------------------------------------

    def submit(
        self,
        *,
        tenant_id: str,
        user_id: str = "",
        priority: int = Priority.INTERACTIVE,
        tier: str = "",
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        no_wait: bool = False,
        max_wait: timedelta | None = None,
        request_id: str = "",
    ) -> Ticket:
        """Decides a request: admitted at once, or waiting in the queue; refusals raise.

        Args:
            priority: a `Priority` value, or 0 (unspecified) for interactive.
            tier: the model tier, whose ceiling then applies; "" = no tier ceiling.
            prompt_tokens, completion_tokens: the estimate charged now and corrected on
                release; each 0..10,000,000.
            no_wait: admit at once or refuse at once (as does a zero max_wait).
            max_wait: longest time to wait in the queue; None = until cancelled (the
                servicer passes the time left before the caller's deadline).
            request_id: the caller's id for this attempt, unique within the tenant
                while it waits or holds its lease, so that a caller that never got
                the lease can `release_attempt` it; "" = none.

        Returns:
            A ticket that is either admitted (`lease` set) or waiting: `wait` for it.

        Raises:
            InvalidArgument: bad tenant, priority, token counts, max_wait or request id
                (too long, or in use by an attempt in progress).
            ResourceExhausted: QUOTA_EXCEEDED, QUEUE_FULL or CAPACITY_EXHAUSTED, with
                QuotaFailure and, when a retry can succeed, RetryInfo.
            Cancelled: the attempt was released by its request id before it arrived.
            Unavailable: SHUTTING_DOWN.
        """
        cls = _validate(tenant_id, priority, prompt_tokens, completion_tokens, max_wait)
        if self._closed:
            raise Unavailable("admission is shutting down", reason="SHUTTING_DOWN")
        now = self._clock.now()
        if now >= self._next_due:
            self._expire(now)
        key = (tenant_id, request_id)
        if request_id:
            self._check_attempt(key, now)
        tenant = self._tenants.get(tenant_id) or self._tenant_scope(tenant_id, now)
        user = self._users.get((tenant_id, user_id)) if user_id and self._users else None
        tier_state = (self._tiers.get(tier) or self._tier(tier)) if tier else None
        tokens = prompt_tokens + completion_tokens
        self._seq += 1
        ticket = Ticket(
            self._seq, tenant, tenant_id, user, user_id, tier_state, cls, tokens, now, request_id
        )
        if (never := self._never(ticket)) is not None:
            raise self._refuse(ticket, never)
        if not self._queue and self._verdict(ticket, now) is Verdict.GRANT:
            self._grant(ticket, now)  # nothing waits, so nobody is overtaken
            if request_id:
                self._attempts[key] = ticket
            return ticket

        self._enqueue(ticket)
        self._dispatch(now)
        if ticket.lease is not None:
            if request_id:
                self._attempts[key] = ticket
            return ticket
        # The request would have to wait.
        if no_wait or max_wait == timedelta(0):
            raise self._refuse(ticket, self._blocked_error(ticket, now))
        if (full := self._queue_full(ticket, now)) is not None:
            raise self._refuse(ticket, full)
        limits = self._limits(ticket, now)
        certain = max((x.seconds for x in limits if x.certain), default=0.0)
        if max_wait is not None and certain > max_wait.total_seconds():
            raise self._refuse(ticket, self._blocked_error(ticket, now, limits))
        if max_wait is not None:
            ticket.deadline = now + max_wait.total_seconds()
            heapq.heappush(self._deadlines, (ticket.deadline, ticket.seq, ticket))
            self._next_due = min(self._next_due, ticket.deadline)
        ticket.initial_position = self._queue.position(ticket)
        self._counters(ticket).queued += 1
        if request_id:
            self._attempts[key] = ticket
        self._wake.set()
        return ticket

    def release(
        self, lease_id: str, *, actual_tokens: int | None = None, tenant_id: str | None = None
    ) -> tuple[bool, int]:
        """Ends a lease: frees its slots and corrects the token buckets.

        Args:
            actual_tokens: tokens the request really used; None keeps the charge as it was.
            tenant_id: the caller's tenant, when the caller is a tenant: the lease must
                have been issued to it.

        Returns:
            (released, adjustment): released is False, and nothing is credited, for an
            already released or expired lease (release is idempotent);
            adjustment = charged - actual tokens, credited back to (positive) or further
            charged to (negative) the tenant's and user's token buckets.

        Raises:
            NotFound: `LEASE_NOT_FOUND`, `tenant_id` was given and this controller never
                issued `lease_id` to it (another tenant's lease, live or not, is the same
                to the caller as an id that never existed).
        """
        _check_actual(actual_tokens)
        if tenant_id is not None and not self.issued_to(tenant_id, lease_id):
            raise NotFound(
                "no such lease of this tenant (leases are released on the replica that "
                "granted them, by the tenant they were granted to)",
                reason="LEASE_NOT_FOUND",
                metadata={"lease_id": lease_id},
            )
        held = self._leases.get(lease_id)
        if held is None:
            return False, 0
        del self._leases[lease_id]
        now = self._clock.now()
        self._free(held)
        lease = held.lease
        if lease.request_id:
            self._attempts.pop((lease.tenant_id, lease.request_id), None)
        adjustment = 0 if actual_tokens is None else lease.charged_tokens - actual_tokens
        if adjustment:
            held.tenant.tokens.credit(adjustment, now)
            if held.user is not None:
                held.user.tokens.credit(adjustment, now)
        hold = now - lease.granted_at
        self._hold += _EWMA * (hold - self._hold)
        if held.tier is not None:
            held.tier.hold += _EWMA * (hold - held.tier.hold)
        if self._queue:
            self.pump()
        return True, adjustment

    def release_attempt(
        self, tenant_id: str, request_id: str, *, actual_tokens: int | None = None
    ) -> tuple[bool, int]:
        """Ends the admission attempt of `tenant_id` that the caller named `request_id`.

        For a caller that gave up before it learned the lease id: releases the lease
        granted to the attempt (as `release`), or takes the attempt out of the queue.
        If no such attempt is known (its submit has not arrived yet, or it already
        ended), one arriving with that id within `tombstone_ttl` is refused.

        Returns:
            (released, adjustment) as for `release`; released is also True when the
            attempt was still waiting and left the queue.
        """
        if not tenant_id or not request_id or len(request_id) > MAX_REQUEST_ID:
            raise invalid([FieldViolation("request_id", f"must be 1..{MAX_REQUEST_ID} characters")])
        _check_actual(actual_tokens)
        ticket = self._attempts.get((tenant_id, request_id))
        if ticket is None:
            self._bury((tenant_id, request_id), self._clock.now())
            return False, 0
        if ticket.state is TicketState.WAITING:
            return self.cancel(ticket), 0
        assert ticket.lease is not None
        return self.release(ticket.lease.lease_id, actual_tokens=actual_tokens)

    def cancel(self, ticket: Ticket) -> bool:
        """Takes a waiting request out of the queue at once; False if it was not waiting."""
        if ticket.state is not TicketState.WAITING:
            return False
        self._withdraw(ticket)
        self._forget(ticket)
        ticket.state = TicketState.CANCELLED
        ticket.error = Cancelled("the request left the admission queue", reason="CANCELLED")
        self._counters(ticket).cancelled += 1
        ticket._settle()
        return True

    def abandon(self, ticket: Ticket) -> None:
        """The caller went away: leave the queue, or give back a lease it never used."""
        if ticket.state is TicketState.WAITING:
            self.cancel(ticket)
        elif ticket.lease is not None:
            self.release(ticket.lease.lease_id, actual_tokens=0)

    def pump(self) -> int:
        """One dispatcher tick: expire leases (freeing their slots, keeping their charge)
        and refuse waiters whose max_wait ran out, then grant whoever may run now.

        Returns:
            The number of waiting requests admitted.
        """
        now = self._clock.now()
        self._expire(now)
        return self._dispatch(now) if self._queue else 0

    # ---- what callers may see ------------------------------------------------------

    def queue_status(self, ticket: Ticket) -> QueueStatus:
        """A waiting request's estimated position and wait (zero once it is not waiting)."""
        if ticket.state is not TicketState.WAITING:
            return QueueStatus(position=0, estimated_wait=timedelta(0))
        now = self._clock.now()
        wait = max((x.seconds for x in self._limits(ticket, now)), default=0.0)
        return QueueStatus(
            position=max(self._queue.position(ticket), 0), estimated_wait=_duration(wait)
        )

    def next_wakeup(self) -> float | None:
        """When the dispatcher next has something to do without being told (clock time).

        The earliest of: a lease or waiter deadline falling due, and a flow's oldest
        request having the tokens it lacks. Requests held back by in-flight ceilings
        wake on release instead. None if there is nothing to wait for.
        """
        now = self._clock.now()
        due = self._next_due
        for ticket in self._queue.heads():
            wait = ticket._tenant.requests.time_until(1, now)
            wait = max(wait, ticket._tenant.tokens.time_until(ticket.tokens, now))
            user = ticket._user
            if user is not None and user.policy is not None:
                wait = max(wait, user.requests.time_until(1, now))
                wait = max(wait, user.tokens.time_until(ticket.tokens, now))
            if 0 < wait < math.inf:
                due = min(due, now + wait)
        return None if due == math.inf else due

    def queue_depth(self) -> dict[Priority, int]:
        return {p: self._queue.depth(p) for p in Priority}

    def in_flight(self) -> int:
        return len(self._leases)

    def quota(self, tenant_id: str, user_id: str = "") -> QuotaSnapshot:
        """The live state of a tenant's (or user's) limits, for GetQuota.

        For a user without a policy of their own, what binds them: their tenant's
        buckets and leases (with `policy` None), and their own requests waiting.
        """
        now = self._clock.now()
        scope = self._users.get((tenant_id, user_id)) if user_id else None
        if scope is None:
            scope = self._tenants.get(tenant_id) or self._tenant_scope(tenant_id, now, keep=False)
        queued = {p: 0 for p in Priority}
        for ticket in self._queue:
            if ticket.tenant_id == tenant_id and (not user_id or ticket.user_id == user_id):
                queued[ticket.priority] += 1
        return QuotaSnapshot(
            tenant_id=tenant_id,
            user_id=user_id,
            policy=scope.policy if scope.user_id == user_id else None,
            is_default=not scope.explicit or scope.user_id != user_id,
            available_requests=scope.requests.available(now),
            available_tokens=math.floor(scope.tokens.available(now)),
            in_flight=scope.in_flight,
            queued=queued,
        )

    # ---- policies and ceilings -------------------------------------------------------

    def get_policy(self, tenant_id: str, user_id: str = "") -> tuple[PolicyLimits | None, bool]:
        """(policy in force, is_default). A user without a policy of their own gets
        (None, True): only their tenant's limits apply to them."""
        stored = self._policies.get((tenant_id, user_id))
        if stored is not None:
            return stored, False
        return (None, True) if user_id else (self._default, True)

    def set_policy(self, tenant_id: str, limits: PolicyLimits, *, user_id: str = "") -> None:
        """Puts a tenant's (or user's) policy in force now, without a restart.

        The buckets keep what they hold (capped at the new bursts) and refill at the new
        rates; requests already in flight or waiting stay where they are.

        Raises:
            InvalidArgument: with a field violation per bad field (`policy.<field>`).
        """
        if violations := limits.validate():
            raise invalid(violations, what="policy")
        if not tenant_id:
            raise invalid([FieldViolation("policy.tenant_id", "required")], what="policy")
        now = self._clock.now()
        self._policies[(tenant_id, user_id)] = limits
        if user_id:
            scope = self._users.get((tenant_id, user_id))
            if scope is None:
                self._users[(tenant_id, user_id)] = _Scope(
                    tenant_id, user_id, limits, explicit=True, now=now
                )
            else:
                scope.apply(limits, explicit=True, now=now)
        else:
            if (scope := self._tenants.get(tenant_id)) is not None:
                scope.apply(limits, explicit=True, now=now)
            self._queue.set_weight(tenant_id, limits.weight)
        logger.info(
            "admission policy set",
            extra={"tenant_id": tenant_id, "user_id": user_id, "policy": limits},
        )
        self._after_change()

    def delete_policy(self, tenant_id: str, *, user_id: str = "") -> bool:
        """Removes a stored policy: the tenant falls back to the default policy, the user
        to their tenant's limits alone. False if none was stored."""
        if self._policies.pop((tenant_id, user_id), None) is None:
            return False
        now = self._clock.now()
        if user_id:
            scope = self._users.pop((tenant_id, user_id), None)
            if scope is not None:
                scope.policy = None  # tickets and leases that still refer to it: no limits
        elif (tenant := self._tenants.get(tenant_id)) is not None:
            tenant.apply(self._default, explicit=False, now=now)
            self._queue.set_weight(tenant_id, self._default.weight)
        self._after_change()
        return True

    def set_default_policy(self, limits: PolicyLimits) -> None:
        """Replaces the default policy for every tenant without a stored one."""
        if violations := limits.validate(prefix="default_policy."):
            raise invalid(violations, what="default policy")
        now = self._clock.now()
        self._default = limits
        for tenant_id, scope in self._tenants.items():
            if not scope.explicit:
                scope.apply(limits, explicit=False, now=now)
                self._queue.set_weight(tenant_id, limits.weight)
        self._after_change()

    def set_tier_capacity(
        self, tier: str, *, max_in_flight: int | None, max_tokens_in_flight: int | None = None
    ) -> None:
        """Sets a model tier's global ceiling (None = none), e.g. from its healthy backends.

        Lowering it below what runs now admits nothing more on the tier until enough
        leases end; raising it admits waiting requests at once.
        """
        capacity = TierCapacity(
            max_in_flight=max_in_flight, max_tokens_in_flight=max_tokens_in_flight
        )
        if violations := capacity.validate():
            raise invalid(violations, what="tier capacity")
        self._tier(tier).capacity = capacity
        self._after_change()

    def collect_idle(self) -> int:
        """Forgets tenants with nothing in flight or waiting and full buckets.

        Such state is indistinguishable from a fresh one, so nothing changes but memory.
        Returns how many were forgotten.
        """
        now = self._clock.now()
        idle = [
            tenant_id
            for tenant_id, scope in self._tenants.items()
            if not scope.in_flight
            and not scope.queued
            and scope.requests.is_full(now)
            and scope.tokens.is_full(now)
        ]
        for tenant_id in idle:
            del self._tenants[tenant_id]
        return len(idle)

    # ---- asyncio -------------------------------------------------------------------

    async def admit(
        self,
        *,
        tenant_id: str,
        user_id: str = "",
        priority: int = Priority.INTERACTIVE,
        tier: str = "",
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        no_wait: bool = False,
        max_wait: timedelta | None = None,
        request_id: str = "",
    ) -> Admission:
        """`submit`, then wait until admitted (same arguments and errors).

        Cancelling the caller leaves the queue at once (or gives back a lease granted in
        the meantime).
        """
        ticket = self.submit(
            tenant_id=tenant_id,
            user_id=user_id,
            priority=priority,
            tier=tier,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            no_wait=no_wait,
            max_wait=max_wait,
            request_id=request_id,
        )
        admission = await self.wait(ticket)
        assert admission is not None
        return admission

    async def wait(self, ticket: Ticket, *, timeout: float | None = None) -> Admission | None:
        """Waits for a ticket's outcome; None if `timeout` (seconds) passes first.

        A timeout leaves the ticket waiting (AdmitStream sends a position update and
        waits again); cancellation abandons it.

        Raises:
            ResourceExhausted: its max_wait ran out (RetryInfo says when to retry).
            Cancelled: it was cancelled.
            Unavailable: the controller shut down.
        """
        if ticket.state is TicketState.WAITING:
            if ticket._future is None:
                ticket._future = asyncio.get_running_loop().create_future()
            try:
                done, _ = await asyncio.wait((ticket._future,), timeout=timeout)
            except asyncio.CancelledError:
                self.abandon(ticket)
                raise
            if not done:
                return None
        return ticket.result()

    async def run(self, *, max_tick: timedelta = timedelta(milliseconds=250)) -> None:
        """The dispatcher: grants waiting requests as soon as they may run.

        Sleeps until `next_wakeup` (at most `max_tick` while requests wait) or until a
        request arrives; returns after `shutdown`.
        """
        tick = max_tick.total_seconds()
        collected_at = self._clock.now()
        while not self._closed:
            self._wake.clear()
            try:
                self.pump()
            except Exception:  # a bug; keep serving rather than strand every waiter
                logger.exception("admission dispatcher tick failed")
            now = self._clock.now()
            due = self.next_wakeup()
            delay = None if due is None else max(due - now, 0.001)
            if self._queue:
                delay = tick if delay is None else min(delay, tick)
            if now - collected_at > 60.0:
                self.collect_idle()
                collected_at = now
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def shutdown(self) -> None:
        """Refuses everyone waiting (UNAVAILABLE `SHUTTING_DOWN`) and stops `run`.

        Idempotent. Leases stay valid until released or expired.
        """
        if self._closed:
            return
        self._closed = True
        for ticket in list(self._queue):
            self._withdraw(ticket)
            self._forget(ticket)
            ticket.state = TicketState.REFUSED
            ticket.error = Unavailable("admission is shutting down", reason="SHUTTING_DOWN")
            ticket._settle()
        self._wake.set()

    async def __aenter__(self) -> AdmissionController:
        self._runner = asyncio.create_task(self.run(), name="admission-dispatcher")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()
        if self._runner is not None:
            await self._runner

    # ---- internals -------------------------------------------------------------------

    def _tenant_scope(self, tenant_id: str, now: float, *, keep: bool = True) -> _Scope:
        stored = self._policies.get((tenant_id, ""))
        scope = _Scope(tenant_id, "", stored or self._default, explicit=stored is not None, now=now)
        if keep:
            self._tenants[tenant_id] = scope
        return scope

    def _tier(self, name: str) -> _Tier:
        tier = self._tiers.get(name)
        if tier is None:
            tier = self._tiers[name] = _Tier(name, self._hold)
        return tier

    def _counters(self, ticket: Ticket) -> Counters:
        key = (ticket.tenant_id, ticket.priority)
        counters = self.stats.get(key)
        if counters is None:
            counters = self.stats[key] = Counters()
        return counters

    @staticmethod
    def _verdict(ticket: Ticket, now: float) -> Verdict:
        if ticket._tenant.blocks(ticket.tokens, now):
            return Verdict.BLOCKED_TENANT
        if ticket._user is not None and ticket._user.blocks(ticket.tokens, now):
            return Verdict.BLOCKED_USER
        if ticket._tier is not None and ticket._tier.blocks(ticket.tokens):
            return Verdict.BLOCKED_TIER
        return Verdict.GRANT

    def _grant(self, ticket: Ticket, now: float) -> None:
        tokens = ticket.tokens
        tenant, user, tier = ticket._tenant, ticket._user, ticket._tier
        tenant.requests.take(1, now)
        tenant.tokens.take(tokens, now)
        tenant.in_flight += 1
        if user is not None and user.policy is not None:
            user.requests.take(1, now)
            user.tokens.take(tokens, now)
            user.in_flight += 1
        if tier is not None:
            tier.in_flight += 1
            tier.tokens_in_flight += tokens
        lease = Lease(
            lease_id=self._lease_id(ticket.tenant_id),
            tenant_id=ticket.tenant_id,
            user_id=ticket.user_id,
            tier=ticket.tier,
            priority=ticket.priority,
            charged_tokens=tokens,
            granted_at=now,
            expires_at=now + self._lease_ttl,
            request_id=ticket.request_id,
        )
        self._leases[lease.lease_id] = _Held(lease, tenant, user, tier)
        if lease.expires_at < self._next_due:
            self._next_due = lease.expires_at
        ticket.lease = lease
        ticket.state = TicketState.ADMITTED
        ticket.admitted_at = now
        waited = now - ticket.submitted_at
        counters = self._counters(ticket)
        counters.admitted += 1
        if waited > 0:
            counters.admitted_after_wait += 1
            counters.wait_seconds_total += waited
            counters.wait_seconds_max = max(counters.wait_seconds_max, waited)
        if self._wait_observer is not None:
            self._wait_observer(ticket.tenant_id, ticket.priority, waited)
        ticket._settle()

    def _lease_id(self, tenant_id: str) -> str:
        nonce = f"{self._lease_prefix}{secrets.token_urlsafe(12)}"
        return f"{nonce}.{self._lease_tag(tenant_id, nonce)}"

    def _lease_tag(self, tenant_id: str, nonce: str) -> str:
        digest = hmac.digest(self._lease_key, f"{tenant_id}\0{nonce}".encode(), hashlib.sha256)
        return base64.urlsafe_b64encode(digest[:12]).decode()

    def issued_to(self, tenant_id: str, lease_id: str) -> bool:
        """True if this controller issued `lease_id` to `tenant_id` (live or not)."""
        nonce, dot, tag = lease_id.rpartition(".")
        return bool(dot) and hmac.compare_digest(tag, self._lease_tag(tenant_id, nonce))

    def _free(self, held: _Held) -> None:
        held.tenant.in_flight -= 1
        if held.user is not None and held.user.policy is not None:
            held.user.in_flight -= 1
        if held.tier is not None:
            held.tier.in_flight -= 1
            held.tier.tokens_in_flight -= held.lease.charged_tokens

    def _enqueue(self, ticket: Ticket) -> None:
        self._queue.push(ticket, weight=ticket._tenant.policy.weight)  # type: ignore[union-attr]
        ticket._tenant.queued += 1
        if ticket._user is not None:
            ticket._user.queued += 1

    def _withdraw(self, ticket: Ticket) -> None:
        if self._queue.remove(ticket):
            ticket._tenant.queued -= 1
            if ticket._user is not None:
                ticket._user.queued -= 1

    def _forget(self, ticket: Ticket) -> None:
        """Drops a waiting attempt that ends without a lease from the request id index."""
        if ticket.request_id:
            key = (ticket.tenant_id, ticket.request_id)
            if self._attempts.get(key) is ticket:
                del self._attempts[key]

    def _check_attempt(self, key: tuple[str, str], now: float) -> None:
        """Refuses a request id that is too long, in use, or released before it came."""
        if len(key[1]) > MAX_REQUEST_ID:
            raise invalid(
                [FieldViolation("context.request_id", f"at most {MAX_REQUEST_ID} characters")]
            )
        if key in self._attempts:
            raise invalid(
                [
                    FieldViolation(
                        "context.request_id",
                        "in use by an admission attempt of the tenant still in progress",
                    )
                ]
            )
        self._prune_tombstones(now)
        if key in self._tombstones:
            raise Cancelled(
                "the admission attempt was released by its request id before it arrived",
                reason="CANCELLED",
            )

    def _bury(self, key: tuple[str, str], now: float) -> None:
        """Remembers, for tombstone_ttl, a release by request id that found nothing."""
        self._prune_tombstones(now)
        self._tombstones.pop(key, None)
        self._tombstones[key] = now + self._tombstone_ttl
        while len(self._tombstones) > self._max_tombstones:
            self._tombstones.popitem(last=False)

    def _prune_tombstones(self, now: float) -> None:
        tombstones = self._tombstones
        while tombstones:
            key, lapses = next(iter(tombstones.items()))
            if lapses > now:
                break
            del tombstones[key]

    def _dispatch(self, now: float) -> int:
        granted = 0
        verdict = self._verdict
        while self._queue:
            ticket = self._queue.pop_next(lambda t: verdict(t, now))
            if ticket is None:
                break
            ticket._tenant.queued -= 1
            if ticket._user is not None:
                ticket._user.queued -= 1
            self._grant(ticket, now)
            granted += 1
        return granted

    def _expire(self, now: float) -> None:
        """Frees expired leases (keeping their charge) and refuses waiters out of time."""
        while self._leases:
            held = next(iter(self._leases.values()))
            if held.lease.expires_at > now:
                break
            self._leases.popitem(last=False)
            self._free(held)
            if held.lease.request_id:
                self._attempts.pop((held.lease.tenant_id, held.lease.request_id), None)
            self.leases_expired += 1
            logger.warning(
                "lease expired without release",
                extra={"lease_id": held.lease.lease_id, "tenant_id": held.lease.tenant_id},
            )
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, ticket = heapq.heappop(self._deadlines)
            if ticket.state is TicketState.WAITING:
                waited = now - ticket.submitted_at
                error = self._blocked_error(ticket, now, waited=waited)
                self._withdraw(ticket)
                self._forget(ticket)
                ticket.state = TicketState.REFUSED
                ticket.error = error
                counters = self._counters(ticket)
                counters.refused[error.reason] = counters.refused.get(error.reason, 0) + 1
                ticket._settle()
        next_lease = (
            next(iter(self._leases.values())).lease.expires_at if self._leases else math.inf
        )
        self._next_due = min(next_lease, self._deadlines[0][0] if self._deadlines else math.inf)

    def _after_change(self) -> None:
        self.pump()
        self._wake.set()

    def _never(self, ticket: Ticket) -> ResourceExhausted | None:
        """A refusal for a request no wait can admit under the limits in force."""
        for scope in (ticket._tenant, ticket._user):
            if scope is not None and scope.policy is not None:
                if ticket.tokens > scope.policy.token_burst:
                    return ResourceExhausted(
                        f"the request is charged {ticket.tokens} tokens, more than "
                        f"{scope.subject} may ever be charged at once "
                        f"({scope.policy.token_burst})",
                        reason=QUOTA_EXCEEDED,
                        metadata=_quota_metadata(scope, "tokens_per_minute"),
                        quota_violations=[
                            QuotaViolation(
                                scope.subject,
                                f"tokens_per_minute: burst {scope.policy.token_burst} tokens, "
                                f"request needs {ticket.tokens}",
                            )
                        ],
                    )
        tier = ticket._tier
        if tier is not None:
            ceiling = tier.capacity.max_tokens_in_flight
            if ceiling is not None and ticket.tokens > ceiling:
                return ResourceExhausted(
                    f"the request needs {ticket.tokens} tokens; tier {tier.name!r} holds "
                    f"at most {ceiling} in flight",
                    reason=CAPACITY_EXHAUSTED,
                    metadata={"tier": tier.name},
                    quota_violations=[
                        QuotaViolation(
                            f"tier:{tier.name}",
                            f"max_tokens_in_flight: {ceiling}, request needs {ticket.tokens}",
                        )
                    ],
                )
        return None

    def _queue_full(self, ticket: Ticket, now: float) -> ResourceExhausted | None:
        """QUEUE_FULL if the request, already queued, takes its tenant or user over a cap."""
        over: list[tuple[str, int]] = []
        for scope in (ticket._tenant, ticket._user):
            if scope is not None and scope.policy is not None:
                if scope.queued > scope.policy.max_queued:
                    over.append((scope.subject, scope.policy.max_queued))
        if len(self._queue) > self._max_queued_total:
            over.append(("admission", self._max_queued_total))
        if not over:
            return None
        # A place frees when the oldest request of the tenant in this class leaves.
        first = self._queue.head(ticket.tenant_id, ticket.priority) or ticket
        retry = max((x.seconds for x in self._limits(first, now)), default=self._hold)
        return ResourceExhausted(
            f"the admission queue of {over[0][0]} is full ({over[0][1]} waiting)",
            reason=QUEUE_FULL,
            metadata={"max_queued": str(over[0][1])},
            quota_violations=[QuotaViolation(s, f"max_queued: {n} waiting") for s, n in over],
            retry_after=_duration(retry),
        )

    def _limits(self, ticket: Ticket, now: float) -> list[_Limit]:
        """Every limit holding a waiting request back, with the time until it will not.

        Counts the requests of its tenant (and user) that are served before it, and for
        a tier ceiling its estimated queue position. Bucket waits are exact; waits
        behind in-flight ceilings are estimated from observed lease hold times.
        """
        found: list[_Limit] = []
        ahead = self._queue.ahead_in_tenant(ticket)
        for scope in (ticket._tenant, ticket._user):
            if scope is None or (policy := scope.policy) is None:
                continue
            mine = ahead if scope is ticket._tenant else [a for a in ahead if a._user is scope]
            requests = len(mine) + 1
            tokens = sum(a.tokens for a in mine) + ticket.tokens
            subject = scope.subject
            if (wait := scope.requests.time_to_accrue(requests, now)) > 0:
                what = f"{policy.requests_per_second:g} per second, burst {policy.request_burst}"
                found.append(
                    _Limit(
                        "requests_per_second",
                        subject,
                        f"requests_per_second: {what}",
                        wait,
                        scope,
                        certain=True,
                    )
                )
            if (wait := scope.tokens.time_to_accrue(tokens, now)) > 0:
                what = f"{policy.tokens_per_minute} per minute, burst {policy.token_burst}"
                found.append(
                    _Limit(
                        "tokens_per_minute",
                        subject,
                        f"tokens_per_minute: {what}",
                        wait,
                        scope,
                        certain=True,
                    )
                )
            if (over := scope.in_flight + requests - policy.max_in_flight) > 0:
                wait = over * self._hold / policy.max_in_flight
                what = f"max_in_flight: {policy.max_in_flight} requests"
                found.append(_Limit("max_in_flight", subject, what, wait, scope))
        if (tier := ticket._tier) is not None:
            cap, subject = tier.capacity, f"tier:{tier.name}"
            if cap.max_in_flight is not None:
                position = max(self._queue.position(ticket), 0)
                if (over := tier.in_flight + position + 1 - cap.max_in_flight) > 0:
                    wait = over * tier.hold / max(cap.max_in_flight, 1)
                    what = f"max_in_flight: {cap.max_in_flight} requests on the tier"
                    found.append(_Limit("tier", subject, what, wait))
            ceiling = cap.max_tokens_in_flight
            if ceiling is not None and tier.tokens_in_flight + ticket.tokens > ceiling:
                what = f"max_tokens_in_flight: {ceiling} tokens on the tier"
                found.append(_Limit("tier", subject, what, tier.hold))
        return found

    def _blocked_error(
        self,
        ticket: Ticket,
        now: float,
        limits: list[_Limit] | None = None,
        *,
        waited: float | None = None,
    ) -> ResourceExhausted:
        """The refusal for a request that cannot run now (or could not within its wait)."""
        if limits is None:
            limits = self._limits(ticket, now)
        retry = max((x.seconds for x in limits), default=self._hold)
        quota = [x for x in limits if x.scope is not None]
        if quota:
            main = max(quota, key=lambda x: x.seconds)
            reason = QUOTA_EXCEEDED
            metadata = _quota_metadata(main.scope or ticket._tenant, main.limit)
            what = f"{main.subject} is over its {main.limit} limit"
        elif limits or ticket.tier:
            reason = CAPACITY_EXHAUSTED
            metadata = {"tier": ticket.tier}
            what = f"model tier {ticket.tier!r} is at capacity"
        else:  # held back only by requests queued ahead of it
            reason = QUOTA_EXCEEDED
            metadata = _quota_metadata(ticket._tenant, "")
            what = f"{ticket._tenant.subject} has requests waiting ahead"
        waited_note = f" after waiting {waited:.3f} s" if waited is not None else ""
        return ResourceExhausted(
            f"{what}{waited_note}; retry in {retry:.3f} s",
            reason=reason,
            metadata=metadata,
            quota_violations=[QuotaViolation(x.subject, x.description) for x in limits]
            or [QuotaViolation(ticket._tenant.subject, "requests waiting ahead")],
            retry_after=_duration(retry),
        )

    def _refuse(self, ticket: Ticket, error: ResourceExhausted) -> ResourceExhausted:
        self._withdraw(ticket)
        self._forget(ticket)
        ticket.state = TicketState.REFUSED
        ticket.error = error
        counters = self._counters(ticket)
        counters.refused[error.reason] = counters.refused.get(error.reason, 0) + 1
        return error


def _validate(
    tenant_id: str,
    priority: int,
    prompt_tokens: int,
    completion_tokens: int,
    max_wait: timedelta | None,
) -> Priority:
    cls = _PRIORITIES.get(priority)
    if (
        cls is not None
        and tenant_id
        and type(prompt_tokens) is int
        and type(completion_tokens) is int
        and 0 <= prompt_tokens <= MAX_REQUEST_TOKENS
        and 0 <= completion_tokens <= MAX_REQUEST_TOKENS
        and (max_wait is None or max_wait >= timedelta(0))
    ):
        return cls
    violations = []
    if not tenant_id:
        violations.append(FieldViolation("context.tenant_id", "required"))
    if cls is None:
        violations.append(
            FieldViolation(
                "context.priority",
                f"unknown priority class {priority!r}; use PRIORITY_INTERACTIVE or PRIORITY_BATCH",
            )
        )
    for name, value in (
        ("estimated_prompt_tokens", prompt_tokens),
        ("max_completion_tokens", completion_tokens),
    ):
        if type(value) is not int or not 0 <= value <= MAX_REQUEST_TOKENS:
            violations.append(
                FieldViolation(name, f"must be 0..{MAX_REQUEST_TOKENS:,}, not {value!r}")
            )
    if max_wait is not None and max_wait < timedelta(0):
        violations.append(FieldViolation("max_wait", "must not be negative"))
    raise invalid(violations)


def _check_actual(actual_tokens: int | None) -> None:
    if actual_tokens is not None and not (
        isinstance(actual_tokens, int) and 0 <= actual_tokens <= 2 * MAX_REQUEST_TOKENS
    ):
        raise invalid(
            [
                FieldViolation(
                    "actual_usage.total_tokens",
                    f"must be 0..{2 * MAX_REQUEST_TOKENS:,}, not {actual_tokens}",
                )
            ]
        )


def _quota_metadata(scope: _Scope, limit: str) -> dict[str, str]:
    metadata = {"limit": limit} if limit else {}
    metadata["tenant_id"] = scope.tenant_id
    if scope.user_id:
        metadata["user_id"] = scope.user_id
    return metadata


def _duration(seconds: float) -> timedelta:
    """A timedelta never shorter than `seconds` (rounded up to the microsecond)."""
    if seconds <= 0:
        return timedelta(0)
    if not math.isfinite(seconds):
        return timedelta.max
    return timedelta(microseconds=math.ceil(seconds * 1_000_000))
