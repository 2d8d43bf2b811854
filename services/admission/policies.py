"""The policy registry: the limits of each tenant and user with their live buckets, and
each model tier's ceiling.

A tenant without a stored policy is admitted under the default policy (reported as such
by `policy`); a user without a policy of their own is bound by their tenant's limits
only; a user with one is bound by both.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

from services.admission.bucket import TokenBucket
from services.admission.limits import PolicyLimits, Priority, TierCapacity
from services.runtime import FieldViolation, invalid

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Epoch:
    """Since when, and how fast, buckets made on this replica fill (see `handover`).

    A bucket made after the epoch began is as if it had been empty then and refilled
    since at max(rate, burst / warmup): full `warmup` seconds after the epoch began at
    the latest, and at its own rate from then on.
    """

    began: float
    warmup: float
    """Seconds; infinity: at the bucket's own rate only."""

    def bucket(self, rate: float, burst: float, now: float) -> TokenBucket:
        warm = max(rate, burst / self.warmup)
        until = self.began + self.warmup
        level = min(burst, warm * max(min(now, until) - self.began, 0.0))
        if now > until:
            level = min(burst, level + (now - until) * rate)
        return TokenBucket(
            rate_per_s=rate, burst=burst, now=now, level=level, warming=(warm, until)
        )


def _bucket(rate: float, burst: float, now: float, epoch: Epoch | None) -> TokenBucket:
    if epoch is None:
        return TokenBucket(rate_per_s=rate, burst=burst, now=now)
    return epoch.bucket(rate, burst, now)


class Scope:
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
        self,
        tenant_id: str,
        user_id: str,
        policy: PolicyLimits,
        *,
        explicit: bool,
        now: float,
        epoch: Epoch | None = None,
    ) -> None:
        """
        Args:
            epoch: the buckets start as the epoch allows (`Epoch.bucket`); None:
                they start full.
        """
        self.tenant_id = tenant_id
        self.user_id = user_id
        self.subject = f"tenant:{tenant_id}/user:{user_id}" if user_id else f"tenant:{tenant_id}"
        """How QuotaFailure names it: tenant:<id> or tenant:<id>/user:<id>."""
        self.policy: PolicyLimits | None = policy
        """None once a user's policy is deleted: requests still referring to it are bound
        by their tenant's limits alone."""
        self.explicit = explicit
        """A stored policy, not the default."""
        self.requests = _bucket(policy.requests_per_second, policy.request_burst, now, epoch)
        self.tokens = _bucket(policy.tokens_per_second, policy.token_burst, now, epoch)
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

    def rested(self, now: float) -> bool:
        """Nothing of it is held or waits here, and its buckets are full: the same as a
        scope made afresh before any epoch."""
        return (
            not self.in_flight
            and not self.queued
            and self.requests.is_full(now)
            and self.tokens.is_full(now)
        )

    def blocks(self, tokens: int, now: float) -> bool:
        """True if a request charged `tokens` may not run now under this scope's limits."""
        policy = self.policy
        return policy is not None and (
            self.in_flight >= policy.max_in_flight
            or not self.requests.can_take(1, now)
            or not self.tokens.can_take(tokens, now)
        )


class Tier:
    """One model tier's global ceiling and what runs on it."""

    __slots__ = ("name", "capacity", "in_flight", "tokens_in_flight", "hold")

    def __init__(self, name: str, hold: float) -> None:
        self.name = name
        self.capacity = TierCapacity()
        self.in_flight = 0
        self.tokens_in_flight = 0
        self.hold = hold
        """Average seconds a lease on the tier is held (waits behind its ceiling)."""

    def blocks(self, tokens: int) -> bool:
        """True if a request charged `tokens` may not run on the tier now."""
        cap = self.capacity
        return (cap.max_in_flight is not None and self.in_flight >= cap.max_in_flight) or (
            cap.max_tokens_in_flight is not None
            and self.tokens_in_flight + tokens > cap.max_tokens_in_flight
        )


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


class PolicyRegistry:
    """Stored policies, the scopes that enforce them, and the model tiers.

    Tenant scopes are made on first use and forgotten when idle (`collect_idle`); a user
    has a scope only while they have a policy of their own.

    Args:
        default: the policy of tenants without a stored one.
        set_weight: called with (tenant, weight) whenever a tenant's fair-queueing
            weight changes.
    """

    def __init__(
        self,
        *,
        default: PolicyLimits,
        set_weight: Callable[[str, int], None],
        warmup: float = math.inf,
    ) -> None:
        self._default = default
        self._warmup = warmup
        self._set_weight = set_weight
        self._policies: dict[tuple[str, str], PolicyLimits] = {}
        self._tenants: dict[str, Scope] = {}
        self._users: dict[tuple[str, str], Scope] = {}
        self._tiers: dict[str, Tier] = {}
        self._epoch: Epoch | None = None

    @property
    def default(self) -> PolicyLimits:
        return self._default

    @property
    def epoch(self) -> float | None:
        """When the current epoch began (see `begin_epoch`); None before the first."""
        return None if self._epoch is None else self._epoch.began

    def begin_epoch(self, now: float) -> int:
        """From `now` on, buckets made on this replica start from empty (`Epoch`).

        Scopes that are idle with full buckets, the state of a tenant (or user) this
        replica has not served for a whole refill, are dropped, to be made again on
        next use. The others keep their state: this replica served them since, so it
        is what they used here. Returns how many scopes were dropped.
        """
        self._epoch = Epoch(began=now, warmup=self._warmup)
        tenants = [key for key, scope in self._tenants.items() if scope.rested(now)]
        users = [key for key, scope in self._users.items() if scope.rested(now)]
        for tenant_id in tenants:
            del self._tenants[tenant_id]
        for key in users:
            del self._users[key]
        return len(tenants) + len(users)

    # ---- scopes, as requests meet them ------------------------------------------------

    def tenant(self, tenant_id: str, now: float) -> Scope:
        """The tenant's scope, made (and kept) on first use."""
        scope = self._tenants.get(tenant_id)
        return scope if scope is not None else self._tenant_scope(tenant_id, now)

    def user(self, tenant_id: str, user_id: str, now: float) -> Scope | None:
        """The user's scope (made again if an epoch dropped it); None if they have no
        policy of their own."""
        key = (tenant_id, user_id)
        scope = self._users.get(key)
        if scope is None and user_id and (policy := self._policies.get(key)) is not None:
            scope = self._users[key] = Scope(
                tenant_id, user_id, policy, explicit=True, now=now, epoch=self._epoch
            )
        return scope

    def tier(self, name: str, hold: float) -> Tier:
        """The tier's state, made on first use with `hold` as its lease hold estimate."""
        tier = self._tiers.get(name)
        if tier is None:
            tier = self._tiers[name] = Tier(name, hold)
        return tier

    def snapshot(
        self, tenant_id: str, user_id: str, queued: dict[Priority, int], now: float
    ) -> QuotaSnapshot:
        """The live state of a tenant's (or user's) limits, with `queued` their requests
        waiting.

        For a user without a policy of their own, what binds them: their tenant's buckets
        and leases (with `policy` None).
        """
        scope = self.user(tenant_id, user_id, now) if user_id else None
        if scope is None:
            scope = self._tenants.get(tenant_id) or self._tenant_scope(tenant_id, now, keep=False)
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

    # ---- policies ---------------------------------------------------------------------

    def policy(self, tenant_id: str, user_id: str = "") -> tuple[PolicyLimits | None, bool]:
        """(policy in force, is_default). A user without a policy of their own gets
        (None, True): only their tenant's limits apply to them."""
        stored = self._policies.get((tenant_id, user_id))
        if stored is not None:
            return stored, False
        return (None, True) if user_id else (self._default, True)

    def set(self, tenant_id: str, limits: PolicyLimits, *, user_id: str, now: float) -> None:
        """Puts a stored policy in force: the buckets keep what they hold (capped at the
        new bursts) and refill at the new rates.

        Raises:
            InvalidArgument: a field violation per bad field (named as in PolicyLimits),
                or `tenant_id` missing.
        """
        if violations := limits.validate():
            raise invalid(violations, what="policy")
        if not tenant_id:
            raise invalid([FieldViolation("tenant_id", "required")], what="policy")
        self._policies[(tenant_id, user_id)] = limits
        if user_id:
            scope = self._users.get((tenant_id, user_id))
            if scope is None:
                self._users[(tenant_id, user_id)] = Scope(
                    tenant_id, user_id, limits, explicit=True, now=now, epoch=self._epoch
                )
            else:
                scope.apply(limits, explicit=True, now=now)
        else:
            if (scope := self._tenants.get(tenant_id)) is not None:
                scope.apply(limits, explicit=True, now=now)
            self._set_weight(tenant_id, limits.weight)
        logger.info(
            "admission policy set",
            extra={"tenant_id": tenant_id, "user_id": user_id, "policy": limits},
        )

    def delete(self, tenant_id: str, *, user_id: str, now: float) -> bool:
        """Removes a stored policy: the tenant falls back to the default policy, the user
        to their tenant's limits alone. False if none was stored."""
        if self._policies.pop((tenant_id, user_id), None) is None:
            return False
        if user_id:
            scope = self._users.pop((tenant_id, user_id), None)
            if scope is not None:
                scope.policy = None  # tickets and leases that still refer to it: no limits
        elif (tenant := self._tenants.get(tenant_id)) is not None:
            tenant.apply(self._default, explicit=False, now=now)
            self._set_weight(tenant_id, self._default.weight)
        return True

    def set_default(self, limits: PolicyLimits, *, now: float) -> None:
        """Replaces the default policy for every tenant without a stored one.

        Raises:
            InvalidArgument: a field violation per bad field (`default_policy.<field>`).
        """
        if violations := limits.validate(prefix="default_policy."):
            raise invalid(violations, what="default policy")
        self._default = limits
        for tenant_id, scope in self._tenants.items():
            if not scope.explicit:
                scope.apply(limits, explicit=False, now=now)
                self._set_weight(tenant_id, limits.weight)

    def set_tier_capacity(self, name: str, capacity: TierCapacity, *, hold: float) -> None:
        """Sets a model tier's ceiling.

        Raises:
            InvalidArgument: a field violation per bad field.
        """
        if violations := capacity.validate():
            raise invalid(violations, what="tier capacity")
        self.tier(name, hold).capacity = capacity

    def collect_idle(self, now: float) -> int:
        """Forgets tenants with nothing in flight or waiting and full buckets.

        Such state is that of a fresh one, so nothing changes but memory (within
        `Epoch.warmup` of an epoch, a fresh one starts lower: only more cautious).
        Returns how many were forgotten.
        """
        idle = [tenant_id for tenant_id, scope in self._tenants.items() if scope.rested(now)]
        for tenant_id in idle:
            del self._tenants[tenant_id]
        return len(idle)

    def _tenant_scope(self, tenant_id: str, now: float, *, keep: bool = True) -> Scope:
        stored = self._policies.get((tenant_id, ""))
        scope = Scope(
            tenant_id,
            "",
            stored or self._default,
            explicit=stored is not None,
            now=now,
            epoch=self._epoch,
        )
        if keep:
            self._tenants[tenant_id] = scope
        return scope
