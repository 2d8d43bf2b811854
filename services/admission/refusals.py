"""Why a request cannot run now, for how long, and the refusal that tells its caller.

Every refusal is RESOURCE_EXHAUSTED with one of three reasons: `QUOTA_EXCEEDED` (a
tenant or user limit), `CAPACITY_EXHAUSTED` (a model tier's ceiling) or `QUEUE_FULL`;
a QuotaFailure naming each limit that holds the request back, and RetryInfo with an
honest time to retry (none when no wait can ever admit the request). Bucket waits are
exact; waits behind in-flight ceilings are estimated from observed lease hold times.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

from services.admission.clock import duration
from services.admission.policies import Scope
from services.admission.scheduler import FairQueue
from services.admission.tickets import Ticket
from services.runtime import QuotaViolation, ResourceExhausted

logger = logging.getLogger(__name__)

QUOTA_EXCEEDED = "QUOTA_EXCEEDED"
QUEUE_FULL = "QUEUE_FULL"
CAPACITY_EXHAUSTED = "CAPACITY_EXHAUSTED"


class Limit(NamedTuple):
    """A limit holding a request back, and how long it will."""

    limit: str  # requests_per_second | tokens_per_minute | max_in_flight | tier
    subject: str  # QuotaFailure subject: tenant:<id>, tenant:<id>/user:<id> or tier:<name>
    description: str
    seconds: float
    scope: Scope | None = None  # the tenant or user whose limit it is; None for a tier
    certain: bool = False  # a bucket refill time (exact), not an estimate from hold times


def holding_limits(
    ticket: Ticket, queue: FairQueue[Ticket], *, hold: float, now: float
) -> list[Limit]:
    """Every limit holding a waiting request back, with the time until it will not.

    Counts the requests of its tenant (and user) that are served before it, and for a
    tier ceiling its estimated queue position. `hold` is the average seconds a lease is
    held, for waits behind the tenant's and user's in-flight ceilings.
    """
    found: list[Limit] = []
    ahead = queue.ahead_in_tenant(ticket)
    for scope in (ticket.tenant_scope, ticket.user_scope):
        if scope is None or (policy := scope.policy) is None:
            continue
        mine = (
            ahead if scope is ticket.tenant_scope else [a for a in ahead if a.user_scope is scope]
        )
        requests = len(mine) + 1
        tokens = sum(a.tokens for a in mine) + ticket.tokens
        subject = scope.subject
        if (wait := scope.requests.time_to_accrue(requests, now)) > 0:
            what = f"{policy.requests_per_second:g} per second, burst {policy.request_burst}"
            found.append(
                Limit(
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
                Limit(
                    "tokens_per_minute",
                    subject,
                    f"tokens_per_minute: {what}",
                    wait,
                    scope,
                    certain=True,
                )
            )
        if (over := scope.in_flight + requests - policy.max_in_flight) > 0:
            wait = over * hold / policy.max_in_flight
            what = f"max_in_flight: {policy.max_in_flight} requests"
            found.append(Limit("max_in_flight", subject, what, wait, scope))
    if (tier := ticket.tier_state) is not None:
        cap, subject = tier.capacity, f"tier:{tier.name}"
        if cap.max_in_flight is not None:
            position = max(queue.position(ticket), 0)
            if (over := tier.in_flight + position + 1 - cap.max_in_flight) > 0:
                wait = over * tier.hold / max(cap.max_in_flight, 1)
                what = f"max_in_flight: {cap.max_in_flight} requests on the tier"
                found.append(Limit("tier", subject, what, wait))
        ceiling = cap.max_tokens_in_flight
        if ceiling is not None and tier.tokens_in_flight + ticket.tokens > ceiling:
            what = f"max_tokens_in_flight: {ceiling} tokens on the tier"
            found.append(Limit("tier", subject, what, tier.hold))
    return found


def never(ticket: Ticket) -> ResourceExhausted | None:
    """The refusal for a request no wait can admit under the limits in force, if it is one."""
    for scope in (ticket.tenant_scope, ticket.user_scope):
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
    tier = ticket.tier_state
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


def queue_full(
    ticket: Ticket, queue: FairQueue[Ticket], *, max_queued_total: int, hold: float, now: float
) -> ResourceExhausted | None:
    """QUEUE_FULL if the request, already queued, takes its tenant or user, or the whole
    queue, over its cap."""
    over: list[tuple[str, int]] = []
    for scope in (ticket.tenant_scope, ticket.user_scope):
        if scope is not None and scope.policy is not None:
            if scope.queued > scope.policy.max_queued:
                over.append((scope.subject, scope.policy.max_queued))
    if len(queue) > max_queued_total:
        over.append(("admission", max_queued_total))
    if not over:
        return None
    # A place frees when the oldest request of the tenant in this class leaves.
    first = queue.head(ticket.tenant_id, ticket.priority) or ticket
    retry = max((x.seconds for x in holding_limits(first, queue, hold=hold, now=now)), default=hold)
    return ResourceExhausted(
        f"the admission queue of {over[0][0]} is full ({over[0][1]} waiting)",
        reason=QUEUE_FULL,
        metadata={"max_queued": str(over[0][1])},
        quota_violations=[QuotaViolation(s, f"max_queued: {n} waiting") for s, n in over],
        retry_after=duration(retry),
    )


def blocked(
    ticket: Ticket, limits: list[Limit], *, hold: float, waited: float | None = None
) -> ResourceExhausted:
    """The refusal for a request that cannot run now (or could not within its wait),
    held back by `limits` (`holding_limits`)."""
    retry = max((x.seconds for x in limits), default=hold)
    quota = [x for x in limits if x.scope is not None]
    if quota:
        main = max(quota, key=lambda x: x.seconds)
        reason = QUOTA_EXCEEDED
        metadata = _quota_metadata(main.scope or ticket.tenant_scope, main.limit)
        what = f"{main.subject} is over its {main.limit} limit"
    elif limits or ticket.tier:
        reason = CAPACITY_EXHAUSTED
        metadata = {"tier": ticket.tier}
        what = f"model tier {ticket.tier!r} is at capacity"
    else:  # held back only by requests queued ahead of it
        reason = QUOTA_EXCEEDED
        metadata = _quota_metadata(ticket.tenant_scope, "")
        what = f"{ticket.tenant_scope.subject} has requests waiting ahead"
    waited_note = f" after waiting {waited:.3f} s" if waited is not None else ""
    return ResourceExhausted(
        f"{what}{waited_note}; retry in {retry:.3f} s",
        reason=reason,
        metadata=metadata,
        quota_violations=[QuotaViolation(x.subject, x.description) for x in limits]
        or [QuotaViolation(ticket.tenant_scope.subject, "requests waiting ahead")],
        retry_after=duration(retry),
    )


def _quota_metadata(scope: Scope, limit: str) -> dict[str, str]:
    metadata = {"limit": limit} if limit else {}
    metadata["tenant_id"] = scope.tenant_id
    if scope.user_id:
        metadata["user_id"] = scope.user_id
    return metadata
