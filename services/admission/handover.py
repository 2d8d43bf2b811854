"""What a tenant's admission state does when the replica set changes, and what it costs.

Envoy ring-hashes `x-tenant-id` over the admission replicas, and a replica keeps its
tenants' buckets, queue and leases in memory only. When replicas join (scale-up, a
rollout's new replica), leave (scale-down, a drained replica) or die, some tenants
move: Envoy sends their next calls to a new owner B instead of the old owner A.

On a move
---------
- **Buckets.** B does not know what T used on A, so it assumes the worst, that T
  emptied its buckets there: from B's *epoch* on, a bucket B makes starts as if it
  had been empty when the epoch began and refilled since at max(rate, burst / W),
  W = `admission_handover_warmup`; full W after the epoch at the latest, at the
  policy's rate from then on (`policies.Epoch`). An epoch begins at a replica's first
  decision after it starts (Envoy routes to it: tenants are arriving) and whenever
  the live replica set it reads (`membership`) changes (any change: Envoy's ring may
  move tenants between the replicas that stay, too). At an epoch, scopes that are
  idle with full buckets (not used here for a whole refill) are dropped and made
  again on next use; the others keep their state, which is what they used here.
- **Leases granted by A** stay in A's ledger. Release is routed by the tenant, so it
  now reaches B, which never issued the id: a lease id is HMAC-bound to its replica's
  secret, so B answers NOT_FOUND `LEASE_NOT_FOUND` and changes nothing (a release by
  request id leaves a tombstone on B, as for any attempt B does not know). On A the
  lease is freed when the AdmitSession stream that handed it out ends (its caller
  closes a stream once it holds no lease granted on it, see `sessions`), its charge
  kept; else by its TTL (`admission_lease_ttl`), or with A when A stops. Nothing is
  counted twice: B never counted it. B does not see those leases either, so while they
  run T may hold up to its `max_in_flight` on A besides its `max_in_flight` on B, and
  A's share of the tier ceilings stays taken by them until their stream closes.
- **Queue.** Requests waiting on A stay in A's queue and are decided there. A stream
  open to A (AdmitSession, AdmitStream) stays on A while it lasts: Envoy picks a
  replica per stream, not per message. When A starts draining, its AdmitSession streams
  end with UNAVAILABLE `SHUTTING_DOWN` (their waiters leave its queue and are tried
  again on a new stream, which goes to B); when it stops, its other waiters get the
  same (callers retry).
- **Tier ceilings** are split over the live replicas, draining ones included
  (`membership`, `capacity`): a replica that joins shrinks its peers' shares before it
  serves (it reports SERVING only after a poll interval, once they have seen it).

The bound
---------
Take one bucket of T's policy (requests: rate r = requests_per_second, burst b =
request_burst; tokens: r = tokens_per_minute / 60, b = token_burst). A replica that
keeps T's state through a window [s, t] grants T at most b + r·(t − s) there (tokens
given back at release count as never granted). Let A grant T for the last time at
m_A and B for the first time at f, T having no state on B that was used since B's
epoch began at c ≤ f. Over any window, A and B together grant T at most

    b + r·(t − s) + E,   E = max(0, b − r·W) + r·max(0, m_A − c)

because A grants at most b + r·(m_A − s), and B, empty at c and refilled at
max(r, b / W) for W, then at r, at most r·(t − c) + max(0, b − r·W) from c on (the
warm-up's extra rate, b / W − r, for W). So:

- a handover in which A stops before B's epoch costs at most max(0, b − r·W): nothing
  for a policy whose burst refills within W, less than one burst for any other;
- a replica that joins begins its epoch at its first decision, so c is when Envoy
  starts routing to it, and r·(m_A − c) is r times how long A went on granting T
  after that (Envoy's workers switching one by one, streams already open to A);
- with no warm-up (W infinite) a move costs only that overlap; with W = 0 (buckets
  made full, as before epochs) one whole burst plus it;
- a survivor that learns of a change late (after T already reached it) has T's state
  in use and keeps it: b + r·max(0, m_A − f), one burst plus the overlap.

Moves add up: k moves in a window cost at most the sum of their E. The randomized
schedules of `tests/unit/test_admission_handover.py` check this for every window.

What it costs: a tenant new to a replica within W of an epoch waits for what its
buckets lack, never more than W (nor longer than with no epoch past it). Nothing on
the decision path but one comparison per refill while buckets warm: an epoch is
applied when a scope is made, and to rested scopes (dropped) when it begins.

A replica that dies takes its leases with it: the replacement starts with none, so no
concurrency stays held; the callers' releases reach the new owner, are refused with
LEASE_NOT_FOUND, and are not retried (`services/inference/admission.py` logs each at
INFO: expected, and handled).
No lease state lives in PostgreSQL (only policies and the replica rows). The
generations those leases admitted may still run on the backends while the dead
replica's share of the tier ceilings goes back to the others (after `stale_after`):
a transient overcommit of the tier by at most what the dead replica had in flight,
for as long as those generations last.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from services.admission.controller import AdmissionController

logger = logging.getLogger(__name__)


class Handover:
    """Keeps one replica in step with the live replica set: an epoch on every change,
    and the tier ceilings split over the replicas.

    Args:
        controller: this replica's decisions.
        split: called with the number of live replicas whenever it changes.
        replicas: the count to assume until the first view arrives (the launcher's
            `SWITCHBOARD_ADMISSION_REPLICAS`).
    """

    def __init__(
        self, *, controller: AdmissionController, split: Callable[[int], None], replicas: int
    ) -> None:
        self._controller = controller
        self._split = split
        self._live: frozenset[str] | None = None
        self.replicas = max(replicas, 1)
        controller.replica_set_changed(on_first_decision=True)

    def observe(self, live: frozenset[str]) -> bool:
        """The replicas alive now (this one included); True if that changed anything."""
        if live == self._live:
            return False
        first, self._live = self._live is None, live
        if not first:  # a changed set moves tenants: here, or away from here
            self._controller.replica_set_changed()
        replicas = max(len(live), 1)
        if replicas != self.replicas or first:
            self.replicas = replicas
            self._split(replicas)
        logger.info(
            "admission replicas changed", extra={"replicas": replicas, "live": sorted(live)}
        )
        return True
