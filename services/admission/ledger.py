"""The ledger of one replica: leases under tenant-bound ids, the admission attempts that
named themselves, and tombstones of releases that arrived before their attempt.

What it keeps true:

- every lease lives `lease_ttl`, so the order leases were issued in is the order they
  expire in (`expired` reads them from the front);
- a lease id is `<nonce>.<tag>` with tag = HMAC(replica key, tenant NUL nonce): an id
  names a lease of one tenant only, so another tenant's id (or a forged one) is unknown
  to the caller whether or not that lease is live, and reveals nothing;
- an attempt with a request id is known by (tenant, request id) from its submit until
  it is refused or cancelled, or its lease is released or expires; no second attempt
  may use the id meanwhile;
- a release by request id that found no attempt leaves a tombstone for
  `tombstone_ttl`: an attempt arriving with that id after it is refused.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import logging
import math
import os
import secrets
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from services.admission.limits import Priority
from services.admission.policies import Scope, Tier
from services.runtime import Cancelled, FieldViolation, invalid

if TYPE_CHECKING:
    from services.admission.tickets import Ticket

logger = logging.getLogger(__name__)

_URLSAFE = bytes.maketrans(b"+/", b"-_")


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


class Held(NamedTuple):
    """A live lease and the scopes and tier whose slots it holds."""

    lease: Lease
    tenant: Scope
    user: Scope | None
    tier: Tier | None


class Ledger:
    """Leases, named attempts and tombstones (see the module docstring).

    Args:
        lease_ttl: seconds a lease lives unless released.
        tombstone_ttl: seconds a release by request id that found nothing refuses an
            attempt with that id arriving after it.
        max_tombstones: most such releases remembered at once; the oldest are forgotten
            first.
    """

    def __init__(self, *, lease_ttl: float, tombstone_ttl: float, max_tombstones: int) -> None:
        self._lease_ttl = lease_ttl
        self._tombstone_ttl = tombstone_ttl
        self._max_tombstones = max_tombstones
        self._leases: OrderedDict[str, Held] = OrderedDict()
        self._attempts: dict[tuple[str, str], Ticket] = {}
        self._tombstones: OrderedDict[tuple[str, str], float] = OrderedDict()  # -> lapses at
        self._lease_prefix = secrets.token_hex(3)
        self._lease_key = secrets.token_bytes(32)

    # ---- leases -----------------------------------------------------------------------

    def __len__(self) -> int:
        """Leases held."""
        return len(self._leases)

    def issue(self, ticket: Ticket, now: float) -> Lease:
        """A lease for the ticket, charging its tokens, held until taken or expired."""
        lease = Lease(
            lease_id=self._lease_id(ticket.tenant_id),
            tenant_id=ticket.tenant_id,
            user_id=ticket.user_id,
            tier=ticket.tier,
            priority=ticket.priority,
            charged_tokens=ticket.tokens,
            granted_at=now,
            expires_at=now + self._lease_ttl,
            request_id=ticket.request_id,
        )
        self._leases[lease.lease_id] = Held(
            lease, ticket.tenant_scope, ticket.user_scope, ticket.tier_state
        )
        return lease

    def held(self, lease_id: str) -> Held | None:
        """A live lease, left held; None if it is not held."""
        return self._leases.get(lease_id)

    def take(self, lease_id: str) -> Held | None:
        """Ends a live lease (and its attempt); None if it is not held."""
        held = self._leases.pop(lease_id, None)
        if held is not None and held.lease.request_id:
            self._attempts.pop((held.lease.tenant_id, held.lease.request_id), None)
        return held

    def expired(self, now: float) -> Iterator[Held]:
        """Ends, and yields, every lease whose time ran out by `now` (and its attempt)."""
        leases = self._leases
        while leases:
            held = next(iter(leases.values()))
            if held.lease.expires_at > now:
                return
            leases.popitem(last=False)
            if held.lease.request_id:
                self._attempts.pop((held.lease.tenant_id, held.lease.request_id), None)
            yield held

    def next_expiry(self) -> float:
        """When the oldest lease expires; infinity if none is held."""
        return next(iter(self._leases.values())).lease.expires_at if self._leases else math.inf

    def issued_to(self, tenant_id: str, lease_id: str) -> bool:
        """True if this ledger issued `lease_id` to `tenant_id` (live or not)."""
        nonce, dot, tag = lease_id.rpartition(".")
        return bool(dot) and hmac.compare_digest(tag, self._lease_tag(tenant_id, nonce))

    def _lease_id(self, tenant_id: str) -> str:
        nonce = f"{self._lease_prefix}{_urlsafe(os.urandom(12))}"
        return f"{nonce}.{self._lease_tag(tenant_id, nonce)}"

    def _lease_tag(self, tenant_id: str, nonce: str) -> str:
        digest = hmac.digest(self._lease_key, f"{tenant_id}\0{nonce}".encode(), hashlib.sha256)
        return _urlsafe(digest[:12])

    # ---- attempts and tombstones --------------------------------------------------------

    @property
    def attempts(self) -> int:
        """Named attempts in progress (waiting or holding a lease)."""
        return len(self._attempts)

    @property
    def tombstones(self) -> int:
        """Releases by request id remembered now (some may have lapsed)."""
        return len(self._tombstones)

    def check_attempt(self, tenant_id: str, request_id: str, now: float) -> None:
        """Refuses a request id in use by an attempt in progress, or released before it came.

        Raises:
            InvalidArgument: on `request_id`, in use by an attempt of the tenant.
            Cancelled: `CANCELLED`, released by its request id before it arrived.
        """
        key = (tenant_id, request_id)
        if key in self._attempts:
            raise invalid(
                [
                    FieldViolation(
                        "request_id",
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

    def begin_attempt(self, ticket: Ticket) -> None:
        """Knows a named ticket by its request id until it ends."""
        self._attempts[(ticket.tenant_id, ticket.request_id)] = ticket

    def attempt(self, tenant_id: str, request_id: str) -> Ticket | None:
        return self._attempts.get((tenant_id, request_id))

    def end_attempt(self, ticket: Ticket) -> None:
        """Forgets a named ticket that ended without a lease (refused or cancelled)."""
        if ticket.request_id:
            key = (ticket.tenant_id, ticket.request_id)
            if self._attempts.get(key) is ticket:
                del self._attempts[key]

    def bury(self, tenant_id: str, request_id: str, now: float) -> None:
        """Remembers, for tombstone_ttl, a release by request id that found nothing."""
        key = (tenant_id, request_id)
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


def _urlsafe(data: bytes) -> str:
    """URL-safe base64 of `data` (a multiple of 3 bytes, so unpadded), as
    `base64.urlsafe_b64encode` gives it, without its wrappers: every grant makes two."""
    return binascii.b2a_base64(data, newline=False).translate(_URLSAFE).decode()
