"""The admission decisions: which requests run now, which wait their turn, which are refused.

`AdmissionController` decides, for every `AdmissionRequest`, whether it runs now, waits
its turn in the fair queue (`scheduler.FairQueue`), or is refused with the reason and
an honest retry time (`refusals`). The decisions are synchronous and read an injected
clock, so tests drive them on a `FakeClock` and the admit+release path stays cheap; the
asyncio layer (`dispatcher.Dispatcher`) only parks callers until their tickets are
decided, and calls `pump` when a bucket refills, a waiter's time runs out or a lease
expires.

What a request is charged: one request from the request bucket, and its estimated
prompt tokens plus its maximum completion tokens from the token bucket, of its tenant
and (when the user has a policy of their own) of its user; plus one in-flight slot of
each, and of its model tier. `release` returns the slots and corrects the token buckets
with the tokens actually used.

Slices (delegated quota): `reserve` grants admissions ahead of need for a caller that
hands them out itself; each is charged and holds its slots like any lease, but counts as
admitted only once `claim`ed (or released as used). `give_back` returns an unclaimed one
whole. A slice is only granted while nothing waits, and `on_wait` callbacks are told when
something starts waiting, so that holders give their unclaimed leases back.

The limits and their live buckets are kept by `policies.PolicyRegistry`, leases and
named attempts by `ledger.Ledger`. When the admission replicas change, tenants move
between them: `replica_set_changed` begins an epoch, so that a tenant new here gets no
burst it may have spent elsewhere (`handover` states what a move costs at most).
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import timedelta

from services.admission.clock import Clock, MonotonicClock, duration
from services.admission.ledger import Held, Ledger
from services.admission.limits import (
    DEFAULT_POLICY,
    MAX_REQUEST_TOKENS,
    PolicyLimits,
    Priority,
    TierCapacity,
)
from services.admission.policies import PolicyRegistry, QuotaSnapshot
from services.admission.refusals import Limit, blocked, holding_limits, never, queue_full
from services.admission.request import MAX_REQUEST_ID, AdmissionRequest
from services.admission.scheduler import FairQueue, Verdict
from services.admission.tickets import QueuePosition, Ticket, TicketState
from services.runtime import (
    Cancelled,
    FieldViolation,
    NotFound,
    ResourceExhausted,
    Unavailable,
    invalid,
)

logger = logging.getLogger(__name__)

_EWMA = 0.1  # weight of the newest lease in the hold-time average
SLICE_MAX = 16
"""Most leases one slice may hold (the contract's bound on a SliceRequest's count)."""


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


def _unchanged() -> None:
    pass


class AdmissionController:
    """Per-tenant limits, tier ceilings, fair queueing and leases for one replica.

    Policies: a tenant without a stored policy is admitted under `default_policy`
    (reported as such by `get_policy`); a user without a policy of their own is bound by
    their tenant's limits only; a user with one is bound by both.

    Nothing here awaits: a `Dispatcher` runs the controller on one asyncio thread, and
    tests call `pump()` after moving a `FakeClock` instead.
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
        warmup: timedelta | None = timedelta(seconds=10),
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
            warmup: after an epoch (`replica_set_changed`), buckets made anew are full
                by this long after it at the latest; None: only as fast as they refill
                (no over-admission from a move, but a tenant of a slow policy may wait
                up to burst / rate for its first request). See `handover`.
        """
        for violation in default_policy.validate(prefix="default_policy."):
            raise ValueError(f"{violation.field}: {violation.description}")
        if lease_ttl <= timedelta(0):
            raise ValueError("lease_ttl must be positive")
        self._clock: Clock = clock or MonotonicClock()
        self._max_queued_total = max_queued_total
        self._hold = typical_hold.total_seconds()
        self._wait_observer = wait_observer

        self._queue: FairQueue[Ticket] = FairQueue(starvation_guard=starvation_guard)
        if warmup is not None and warmup <= timedelta(0):
            raise ValueError("warmup must be positive (or None)")
        self._policies = PolicyRegistry(
            default=default_policy,
            set_weight=self._queue.set_weight,
            warmup=math.inf if warmup is None else warmup.total_seconds(),
        )
        self._ledger = Ledger(
            lease_ttl=lease_ttl.total_seconds(),
            tombstone_ttl=tombstone_ttl.total_seconds(),
            max_tombstones=max_tombstones,
        )
        self._deadlines: list[tuple[float, int, Ticket]] = []
        self._next_due = math.inf  # no lease or waiter deadline falls due before this
        self._seq = 0
        self._closed = False
        self._epoch_pending = False
        self._changed: Callable[[], None] = _unchanged

        self.stats: dict[tuple[str, Priority], Counters] = {}
        self.leases_expired = 0
        self.leases_reclaimed = 0
        """Leases freed when the stream that handed them out ended (`reclaim`)."""
        self._unclaimed: set[str] = set()
        """Leases of slices not yet handed to a request."""
        self._wait_listeners: set[Callable[[str, str], None]] = set()

    # ---- decisions ---------------------------------------------------------------

    def submit(self, request: AdmissionRequest) -> Ticket:
        """Decides a request: admitted at once, or waiting in the queue; refusals raise.

        Returns:
            A ticket that is either admitted (`lease` set) or waiting: a `Dispatcher`
            waits for it.

        Raises:
            InvalidArgument: `request_id` in use by an attempt of the tenant in progress.
            ResourceExhausted: QUOTA_EXCEEDED, QUEUE_FULL or CAPACITY_EXHAUSTED, with
                QuotaFailure and, when a retry can succeed, RetryInfo.
            Cancelled: the attempt was released by its request id before it arrived.
            Unavailable: SHUTTING_DOWN.
        """
        if self._closed:
            raise Unavailable("admission is shutting down", reason="SHUTTING_DOWN")
        now = self._clock.now()
        if now >= self._next_due:
            self._expire(now)
        if self._epoch_pending:
            self._epoch_pending = False
            self._begin_epoch(now)
        tenant_id, request_id = request.tenant_id, request.request_id
        if request_id:
            self._ledger.check_attempt(tenant_id, request_id, now)
        ticket = self._ticket(request, now)
        if (refusal := never(ticket)) is not None:
            raise self._refuse(ticket, refusal)
        if not self._queue and self._verdict(ticket, now) is Verdict.GRANT:
            self._grant(ticket, now)  # nothing waits, so nobody is overtaken
            if request_id:
                self._ledger.begin_attempt(ticket)
            return ticket

        self._enqueue(ticket)
        self._dispatch(now)
        if ticket.lease is not None:
            if request_id:
                self._ledger.begin_attempt(ticket)
            return ticket
        # The request would have to wait: slices that compete with it come back.
        if self._unclaimed:
            for listener in list(self._wait_listeners):
                listener(tenant_id, request.tier)
        max_wait = request.max_wait
        if request.no_wait or max_wait == timedelta(0):
            raise self._refuse(ticket, blocked(ticket, self._limits(ticket, now), hold=self._hold))
        full = queue_full(
            ticket, self._queue, max_queued_total=self._max_queued_total, hold=self._hold, now=now
        )
        if full is not None:
            raise self._refuse(ticket, full)
        limits = self._limits(ticket, now)
        certain = max((x.seconds for x in limits if x.certain), default=0.0)
        if max_wait is not None and certain > max_wait.total_seconds():
            raise self._refuse(ticket, blocked(ticket, limits, hold=self._hold))
        if max_wait is not None:
            ticket.deadline = now + max_wait.total_seconds()
            heapq.heappush(self._deadlines, (ticket.deadline, ticket.seq, ticket))
            self._next_due = min(self._next_due, ticket.deadline)
        ticket.initial_position = self._queue.position(ticket)
        self._counters(ticket).queued += 1
        if request_id:
            self._ledger.begin_attempt(ticket)
        self._changed()
        return ticket

    # ---- slices ----------------------------------------------------------------------

    def reserve(self, request: AdmissionRequest, count: int) -> list[Ticket]:
        """Grants up to `count` admissions shaped as `request` ahead of need (a slice).

        At most half of the slots still free (the tenant's, its user's, the tier's) go
        into one slice, so that other replicas' requests are admitted at once too and
        may get slices of their own. Each is granted only as `submit` would grant it at
        once, and none while a
        request it would compete with waits here: one of the same tenant, or of the
        same model tier (whose ceiling all tenants share). They are charged and hold
        their slots like any lease, and count as admitted once claimed. Never raises a
        refusal: what cannot be granted now is simply not in the list.
        """
        if self._closed or any(_competes(t, request) for t in self._queue):
            return []
        now = self._clock.now()
        if now >= self._next_due:
            self._expire(now)
        granted: list[Ticket] = []
        first = self._ticket(request, now)
        for _ in range(min(count, _slice_room(first))):
            ticket = self._ticket(request, now)
            if never(ticket) is not None or self._verdict(ticket, now) is not Verdict.GRANT:
                break
            self._grant(ticket, now, counted=False)
            self._unclaimed.add(ticket.lease.lease_id)  # type: ignore[union-attr]
            granted.append(ticket)
        return granted

    def claim(self, tenant_id: str, lease_id: str) -> bool:
        """A lease of a slice is handed to a request: it counts as admitted from now on.
        False if `lease_id` is no unclaimed lease of `tenant_id`'s."""
        if lease_id not in self._unclaimed or not self._ledger.issued_to(tenant_id, lease_id):
            return False
        self._unclaimed.discard(lease_id)
        held = self._ledger.held(lease_id)
        if held is not None:
            self._count_admitted(held.lease.tenant_id, held.lease.priority, 0.0)
        return True

    def give_back(self, tenant_id: str, lease_id: str) -> bool:
        """Returns an unclaimed lease of a slice whole (its slots, and its tokens to the
        buckets). False if `lease_id` is no unclaimed lease of `tenant_id`'s."""
        if lease_id not in self._unclaimed or not self._ledger.issued_to(tenant_id, lease_id):
            return False
        self._unclaimed.discard(lease_id)
        held = self._ledger.held(lease_id)
        released, _ = self.release(lease_id, actual_tokens=0)
        if released and held is not None:  # never used: its request comes back too
            now = self._clock.now()
            held.tenant.requests.credit(1, now)
            if held.user is not None and held.user.policy is not None:
                held.user.requests.credit(1, now)
        return released

    def unclaimed(self) -> int:
        """Leases of slices granted and not yet claimed, given back or expired."""
        return len(self._unclaimed)

    def on_wait(self, listener: Callable[[str, str], None]) -> Callable[[], None]:
        """Has `listener` called with (tenant, tier) whenever a request cannot be
        admitted at once (it waits, or is refused for want of a slot or tokens) while
        any slice lease is unclaimed; returns the function that stops it."""
        self._wait_listeners.add(listener)
        return lambda: self._wait_listeners.discard(listener)

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
            InvalidArgument: on `actual_tokens`, outside 0..20,000,000.
            NotFound: `LEASE_NOT_FOUND`, `tenant_id` was given and this controller never
                issued `lease_id` to it (another tenant's lease, live or not, is the same
                to the caller as an id that never existed).
        """
        _check_actual(actual_tokens)
        if tenant_id is not None and not self._ledger.issued_to(tenant_id, lease_id):
            raise NotFound(
                "no such lease of this tenant (leases are released on the replica that "
                "granted them, by the tenant they were granted to)",
                reason="LEASE_NOT_FOUND",
                metadata={"lease_id": lease_id},
            )
        held = self._ledger.take(lease_id)
        if held is None:
            return False, 0
        now = self._clock.now()
        if lease_id in self._unclaimed:  # its claim has not arrived: it ran all the same
            self._unclaimed.discard(lease_id)
            if actual_tokens != 0:
                self._count_admitted(held.lease.tenant_id, held.lease.priority, 0.0)
        self._free(held)
        lease = held.lease
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

        Raises:
            InvalidArgument: on `request_id` (empty or too long) or `actual_tokens`.
        """
        if not tenant_id or not request_id or len(request_id) > MAX_REQUEST_ID:
            raise invalid([FieldViolation("request_id", f"must be 1..{MAX_REQUEST_ID} characters")])
        _check_actual(actual_tokens)
        ticket = self._ledger.attempt(tenant_id, request_id)
        if ticket is None:
            self._ledger.bury(tenant_id, request_id, self._clock.now())
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
        self._ledger.end_attempt(ticket)
        ticket.state = TicketState.CANCELLED
        ticket.error = Cancelled("the request left the admission queue", reason="CANCELLED")
        self._counters(ticket).cancelled += 1
        ticket.settle()
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

    def close(self) -> None:
        """Refuses everyone waiting, and every later request, with UNAVAILABLE
        `SHUTTING_DOWN`. Idempotent. Leases stay valid until released or expired."""
        if self._closed:
            return
        self._closed = True
        for ticket in list(self._queue):
            self._withdraw(ticket)
            self._ledger.end_attempt(ticket)
            ticket.state = TicketState.REFUSED
            ticket.error = Unavailable("admission is shutting down", reason="SHUTTING_DOWN")
            ticket.settle()
        self._changed()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def clock(self) -> Clock:
        """The clock every decision reads."""
        return self._clock

    def on_change(self, callback: Callable[[], None]) -> None:
        """Has `callback` called whenever waiting requests may be granted, or refused,
        earlier than `next_wakeup` said: a request queued, a policy or ceiling changed,
        or the controller closed. One callback at a time (the dispatcher's)."""
        self._changed = callback

    # ---- what callers may see ------------------------------------------------------

    def queue_position(self, ticket: Ticket) -> QueuePosition:
        """A waiting request's estimated position and wait (zero once it is not waiting)."""
        if ticket.state is not TicketState.WAITING:
            return QueuePosition(position=0, estimated_wait=timedelta(0))
        now = self._clock.now()
        wait = max((x.seconds for x in self._limits(ticket, now)), default=0.0)
        return QueuePosition(
            position=max(self._queue.position(ticket), 0), estimated_wait=duration(wait)
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
            tenant = ticket.tenant_scope
            wait = max(
                tenant.requests.time_until(1, now), tenant.tokens.time_until(ticket.tokens, now)
            )
            user = ticket.user_scope
            if user is not None and user.policy is not None:
                wait = max(wait, user.requests.time_until(1, now))
                wait = max(wait, user.tokens.time_until(ticket.tokens, now))
            if 0 < wait < math.inf:
                due = min(due, now + wait)
        return None if due == math.inf else due

    def waiting(self) -> int:
        """Requests waiting in the queue now, all classes together."""
        return len(self._queue)

    def queue_depth(self) -> dict[Priority, int]:
        return {p: self._queue.depth(p) for p in Priority}

    def in_flight(self) -> int:
        """Leases held by running requests (a slice's unclaimed leases are not)."""
        return len(self._ledger) - len(self._unclaimed)

    def reclaim(self, lease_id: str) -> bool:
        """Frees a live lease that nobody will release here (the stream that handed it
        out ended), keeping its charge, as at its expiry; False if it is not held."""
        held = self._ledger.take(lease_id)
        if held is None:
            return False
        self._unclaimed.discard(lease_id)
        self._free(held)
        self.leases_reclaimed += 1
        if self._queue:
            self.pump()
        return True

    def holds(self, lease_id: str) -> bool:
        """True while `lease_id` is a live lease here (not released nor expired)."""
        return self._ledger.held(lease_id) is not None

    def issued_to(self, tenant_id: str, lease_id: str) -> bool:
        """True if this controller issued `lease_id` to `tenant_id` (live or not)."""
        return self._ledger.issued_to(tenant_id, lease_id)

    def quota(self, tenant_id: str, user_id: str = "") -> QuotaSnapshot:
        """The live state of a tenant's (or user's) limits, for GetQuota.

        For a user without a policy of their own, what binds them: their tenant's
        buckets and leases (with `policy` None), and their own requests waiting.
        """
        queued = {p: 0 for p in Priority}
        for ticket in self._queue:
            if ticket.tenant_id == tenant_id and (not user_id or ticket.user_id == user_id):
                queued[ticket.priority] += 1
        snapshot = self._policies.snapshot(tenant_id, user_id, queued, self._clock.now())
        reserved = sum(
            1
            for lease_id in self._unclaimed
            if (held := self._ledger.held(lease_id)) is not None
            and held.lease.tenant_id == tenant_id
            and (not user_id or held.lease.user_id == user_id)
        )
        # a slice's unclaimed leases hold slots, but nothing runs on them
        return replace(snapshot, in_flight=snapshot.in_flight - reserved) if reserved else snapshot

    # ---- policies and ceilings -------------------------------------------------------

    def get_policy(self, tenant_id: str, user_id: str = "") -> tuple[PolicyLimits | None, bool]:
        """(policy in force, is_default). A user without a policy of their own gets
        (None, True): only their tenant's limits apply to them."""
        return self._policies.policy(tenant_id, user_id)

    def set_policy(self, tenant_id: str, limits: PolicyLimits, *, user_id: str = "") -> None:
        """Puts a tenant's (or user's) policy in force now, without a restart.

        The buckets keep what they hold (capped at the new bursts) and refill at the new
        rates; requests already in flight or waiting stay where they are.

        Raises:
            InvalidArgument: a field violation per bad field (named as in PolicyLimits).
        """
        self._policies.set(tenant_id, limits, user_id=user_id, now=self._clock.now())
        self._after_change()

    def delete_policy(self, tenant_id: str, *, user_id: str = "") -> bool:
        """Removes a stored policy: the tenant falls back to the default policy, the user
        to their tenant's limits alone. False if none was stored."""
        if not self._policies.delete(tenant_id, user_id=user_id, now=self._clock.now()):
            return False
        self._after_change()
        return True

    def set_default_policy(self, limits: PolicyLimits) -> None:
        """Replaces the default policy for every tenant without a stored one."""
        self._policies.set_default(limits, now=self._clock.now())
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
        self._policies.set_tier_capacity(tier, capacity, hold=self._hold)
        self._after_change()

    def replica_set_changed(self, *, on_first_decision: bool = False) -> None:
        """The admission replicas changed, or this one just started: tenants may move
        here with their buckets spent on the replica that served them before.

        Begins an epoch (see `handover`): buckets made from then on (for tenants and
        users new here, or not served here for a whole refill) start empty and fill
        within the warm-up, so a tenant that moved gets no burst it may already have
        used elsewhere.

        Args:
            on_first_decision: begin it at this controller's next `submit` instead (a
                replica that just started: its tenants arrive once Envoy routes to it).
        """
        if on_first_decision:
            self._epoch_pending = True
        else:
            self._begin_epoch(self._clock.now())

    @property
    def epoch(self) -> float | None:
        """When the current epoch began (clock reading); None before the first."""
        return self._policies.epoch

    def collect_idle(self) -> int:
        """Forgets tenants with nothing in flight or waiting and full buckets (their
        state is the same as a fresh one's). Returns how many were forgotten."""
        return self._policies.collect_idle(self._clock.now())

    # ---- internals -------------------------------------------------------------------

    def _ticket(self, request: AdmissionRequest, now: float) -> Ticket:
        policies, tenant_id = self._policies, request.tenant_id
        self._seq += 1
        return Ticket(
            self._seq,
            request,
            policies.tenant(tenant_id, now),
            policies.user(tenant_id, request.user_id, now) if request.user_id else None,
            policies.tier(request.tier, self._hold) if request.tier else None,
            now,
        )

    def _counters(self, ticket: Ticket) -> Counters:
        return self._stats_of(ticket.tenant_id, ticket.priority)

    def _stats_of(self, tenant_id: str, priority: Priority) -> Counters:
        counters = self.stats.get((tenant_id, priority))
        if counters is None:
            counters = self.stats[(tenant_id, priority)] = Counters()
        return counters

    @staticmethod
    def _verdict(ticket: Ticket, now: float) -> Verdict:
        if ticket.tenant_scope.blocks(ticket.tokens, now):
            return Verdict.BLOCKED_TENANT
        if ticket.user_scope is not None and ticket.user_scope.blocks(ticket.tokens, now):
            return Verdict.BLOCKED_USER
        if ticket.tier_state is not None and ticket.tier_state.blocks(ticket.tokens):
            return Verdict.BLOCKED_TIER
        return Verdict.GRANT

    def _limits(self, ticket: Ticket, now: float) -> list[Limit]:
        return holding_limits(ticket, self._queue, hold=self._hold, now=now)

    def _grant(self, ticket: Ticket, now: float, *, counted: bool = True) -> None:
        tokens = ticket.tokens
        tenant, user, tier = ticket.tenant_scope, ticket.user_scope, ticket.tier_state
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
        lease = self._ledger.issue(ticket, now)
        if lease.expires_at < self._next_due:
            self._next_due = lease.expires_at
        ticket.lease = lease
        ticket.state = TicketState.ADMITTED
        ticket.admitted_at = now
        if counted:
            self._count_admitted(ticket.tenant_id, ticket.priority, now - ticket.submitted_at)
        ticket.settle()

    def _count_admitted(self, tenant_id: str, priority: Priority, waited: float) -> None:
        counters = self._stats_of(tenant_id, priority)
        counters.admitted += 1
        if waited > 0:
            counters.admitted_after_wait += 1
            counters.wait_seconds_total += waited
            counters.wait_seconds_max = max(counters.wait_seconds_max, waited)
        if self._wait_observer is not None:
            self._wait_observer(tenant_id, priority, waited)

    def _free(self, held: Held) -> None:
        held.tenant.in_flight -= 1
        if held.user is not None and held.user.policy is not None:
            held.user.in_flight -= 1
        if held.tier is not None:
            held.tier.in_flight -= 1
            held.tier.tokens_in_flight -= held.lease.charged_tokens

    def _enqueue(self, ticket: Ticket) -> None:
        self._queue.push(ticket, weight=ticket.tenant_scope.policy.weight)  # type: ignore[union-attr]
        ticket.tenant_scope.queued += 1
        if ticket.user_scope is not None:
            ticket.user_scope.queued += 1

    def _withdraw(self, ticket: Ticket) -> None:
        if self._queue.remove(ticket):
            ticket.tenant_scope.queued -= 1
            if ticket.user_scope is not None:
                ticket.user_scope.queued -= 1

    def _dispatch(self, now: float) -> int:
        granted = 0
        verdict = self._verdict
        while self._queue:
            ticket = self._queue.pop_next(lambda t: verdict(t, now))
            if ticket is None:
                break
            ticket.tenant_scope.queued -= 1
            if ticket.user_scope is not None:
                ticket.user_scope.queued -= 1
            self._grant(ticket, now)
            granted += 1
        return granted

    def _expire(self, now: float) -> None:
        """Frees expired leases (keeping their charge) and refuses waiters out of time."""
        for held in self._ledger.expired(now):
            self._unclaimed.discard(held.lease.lease_id)
            self._free(held)
            self.leases_expired += 1
            logger.warning(
                "lease expired without release",
                extra={"lease_id": held.lease.lease_id, "tenant_id": held.lease.tenant_id},
            )
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, ticket = heapq.heappop(self._deadlines)
            if ticket.state is TicketState.WAITING:
                waited = now - ticket.submitted_at
                limits = self._limits(ticket, now)
                self._refuse(ticket, blocked(ticket, limits, hold=self._hold, waited=waited))
                ticket.settle()
        self._next_due = min(
            self._ledger.next_expiry(), self._deadlines[0][0] if self._deadlines else math.inf
        )

    def _begin_epoch(self, now: float) -> None:
        drained = self._policies.begin_epoch(now)
        logger.info("admission epoch begun", extra={"drained_scopes": drained})

    def _after_change(self) -> None:
        self.pump()
        self._changed()

    def _refuse(self, ticket: Ticket, error: ResourceExhausted) -> ResourceExhausted:
        self._withdraw(ticket)
        self._ledger.end_attempt(ticket)
        ticket.state = TicketState.REFUSED
        ticket.error = error
        counters = self._counters(ticket)
        counters.refused[error.reason] = counters.refused.get(error.reason, 0) + 1
        return error


def _slice_room(ticket: Ticket) -> int:
    """Half the in-flight slots free for requests like `ticket` (rounded down)."""
    free = math.inf
    for scope in (ticket.tenant_scope, ticket.user_scope):
        if scope is not None and scope.policy is not None:
            free = min(free, scope.policy.max_in_flight - scope.in_flight)
    tier = ticket.tier_state
    if tier is not None and tier.capacity.max_in_flight is not None:
        free = min(free, tier.capacity.max_in_flight - tier.in_flight)
    return int(min(free, 2 * SLICE_MAX) // 2)


def _competes(waiting: Ticket, request: AdmissionRequest) -> bool:
    """Whether a slice shaped as `request` would hold what `waiting` waits for."""
    return waiting.tenant_id == request.tenant_id or bool(
        request.tier and waiting.tier == request.tier
    )


def _check_actual(actual_tokens: int | None) -> None:
    if actual_tokens is not None and not (
        isinstance(actual_tokens, int) and 0 <= actual_tokens <= 2 * MAX_REQUEST_TOKENS
    ):
        raise invalid(
            [
                FieldViolation(
                    "actual_tokens",
                    f"must be 0..{2 * MAX_REQUEST_TOKENS:,}, not {actual_tokens}",
                )
            ]
        )
