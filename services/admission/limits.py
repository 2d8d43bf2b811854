"""Admission policies, priority classes and tier ceilings, with their validation."""

from __future__ import annotations

import enum
import logging
import math
from dataclasses import dataclass

from services.runtime import FieldViolation

logger = logging.getLogger(__name__)

# Most tokens a request may declare per field (`estimated_prompt_tokens`,
# `max_completion_tokens`), as the contract says.
MAX_REQUEST_TOKENS = 10_000_000


class Priority(enum.IntEnum):
    """Scheduling classes, best first; values are `switchboard.common.v1.Priority`'s."""

    INTERACTIVE = 1
    BATCH = 2

    @property
    def label(self) -> str:
        """Lower-case name, for metrics labels and logs."""
        return self.name.lower()


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyLimits:
    """The limits on a tenant, or on one user within a tenant (mirrors the proto `Policy`).

    A request is bound by its tenant's limits and, when its user has a policy of their
    own, by the user's too. Every rate and cap must be positive (`validate`).
    """

    requests_per_second: float
    """Request bucket refill rate."""
    request_burst: int
    """Request bucket capacity: most requests admitted in a burst."""
    tokens_per_minute: int
    """Token bucket refill rate, in model tokens per minute."""
    token_burst: int
    """Token bucket capacity. Also the largest charge one request can ever have."""
    max_in_flight: int
    """Most leases held at once."""
    weight: int = 1
    """Share in fair queueing across tenants (2 = twice the share of 1); tenants only."""
    max_queued: int = 256
    """Most requests of this tenant (or user) waiting at once; beyond it, QUEUE_FULL."""

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_per_minute / 60.0

    def validate(self, *, prefix: str = "") -> list[FieldViolation]:
        """Every field that is out of range, named by its attribute after `prefix` (the
        servicer passes `policy.`, its path in `UpdatePolicyRequest`)."""
        violations: list[FieldViolation] = []
        rps = self.requests_per_second
        if not isinstance(rps, int | float) or not math.isfinite(rps) or rps <= 0:
            violations.append(
                FieldViolation(f"{prefix}requests_per_second", f"must be positive, not {rps}")
            )
        elif rps > _MAX_REQUESTS_PER_SECOND:
            violations.append(
                FieldViolation(
                    f"{prefix}requests_per_second",
                    f"must be at most {_MAX_REQUESTS_PER_SECOND:,}, not {rps}",
                )
            )
        for name, upper in _INT_BOUNDS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                violations.append(FieldViolation(f"{prefix}{name}", "must be an integer"))
            elif value <= 0:
                violations.append(
                    FieldViolation(f"{prefix}{name}", f"must be positive, not {value}")
                )
            elif value > upper:
                violations.append(
                    FieldViolation(f"{prefix}{name}", f"must be at most {upper:,}, not {value}")
                )
        return violations


_MAX_REQUESTS_PER_SECOND = 1_000_000
_INT_BOUNDS = {
    "request_burst": 1_000_000,
    "tokens_per_minute": 1_000_000_000_000,
    "token_burst": 1_000_000_000_000,
    "max_in_flight": 1_000_000,
    "weight": 1_000,
    "max_queued": 1_000_000,
}

DEFAULT_POLICY = PolicyLimits(
    requests_per_second=10.0,
    request_burst=20,
    tokens_per_minute=200_000,
    token_burst=100_000,
    max_in_flight=32,
    weight=1,
    max_queued=256,
)
"""What a tenant without a stored policy gets (the service may configure another).

Unknown tenants are not refused: the edge has already authenticated them, so they are
admitted under the default policy, which GetPolicy reports with `is_default`. Users
without a policy of their own are bound by their tenant's limits only.
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class TierCapacity:
    """The global ceiling of one model tier, sized from its healthy backends.

    None = no ceiling on that dimension.
    """

    max_in_flight: int | None = None
    """Most requests running on the tier at once, across all tenants."""
    max_tokens_in_flight: int | None = None
    """Most tokens charged to requests running on the tier at once (a KV-cache budget)."""

    def validate(self, *, prefix: str = "") -> list[FieldViolation]:
        violations = []
        for name in ("max_in_flight", "max_tokens_in_flight"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                violations.append(
                    FieldViolation(
                        f"{prefix}{name}", f"must be a non-negative integer or unset, not {value}"
                    )
                )
        return violations
