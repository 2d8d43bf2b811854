"""A tenant moving between admission replicas, on a fake clock: the over-admission bound
of `services.admission.handover`, leases a dead or former owner held, replica counts."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import pytest
from switchboard.common.v1 import common_pb2
from switchboard.inference.v1 import inference_pb2

from services.admission import (
    AdmissionConfig,
    AdmissionController,
    AdmissionRequest,
    FakeClock,
    PolicyLimits,
)
from services.admission.capacity import CapacityFeed
from services.admission.handover import Handover
from services.runtime import NotFound, ResourceExhausted

RATE, BURST = 5.0, 10  # requests
TOKEN_RATE, TOKEN_BURST = 100.0, 400  # tokens per second, tokens
POLICY = PolicyLimits(
    requests_per_second=RATE,
    request_burst=BURST,
    tokens_per_minute=int(TOKEN_RATE * 60),
    token_burst=TOKEN_BURST,
    max_in_flight=4,
    max_queued=1_000,
)
FILL_S = max(BURST / RATE, TOKEN_BURST / TOKEN_RATE)
"""Time for both buckets to refill from empty."""
TTL = timedelta(seconds=60)


WARMUPS = (None, 1.0, 10.0)
"""Warm-ups the bound is checked under (seconds; None: buckets refill at their rate)."""


def replica(clock: FakeClock, warmup: float | None = None) -> AdmissionController:
    """A replica as the service starts one (every tenant under POLICY): an epoch at its
    first decision."""
    controller = AdmissionController(
        clock=clock,
        lease_ttl=TTL,
        default_policy=POLICY,
        warmup=None if warmup is None else timedelta(seconds=warmup),
    )
    controller.replica_set_changed(on_first_decision=True)
    return controller


def serving(clock: FakeClock, warmup: float | None = None) -> AdmissionController:
    """A replica that has taken its first decision (the caller lets its buckets refill)."""
    controller = replica(clock, warmup)
    offer(controller, tenant_id="probe")
    return controller


def offer(controller: AdmissionController, tokens: int = 1, *, tenant_id: str = "acme") -> bool:
    """An admission that must be granted at once, released at once keeping its charge."""
    try:
        ticket = controller.submit(
            AdmissionRequest(tenant_id=tenant_id, prompt_tokens=tokens, no_wait=True)
        )
    except ResourceExhausted:
        return False
    controller.release(ticket.lease.lease_id)
    return True


# ---- the bound -----------------------------------------------------------------------


@dataclass(frozen=True)
class Grant:
    at: float
    tokens: int
    on_b: bool


def most_over(grants: Sequence[Grant], *, weight, rate: float, burst: float) -> float:
    """The largest excess, over all windows between two grants, of what was granted over
    what one bucket allows there (burst + rate × the window)."""
    worst = -float(burst)
    for i, first in enumerate(grants):
        total = 0.0
        for last in grants[i:]:
            total += weight(last)
            worst = max(worst, total - burst - rate * (last.at - first.at))
    return worst


def allowed_extra(
    grants: Sequence[Grant],
    epoch: float | None,
    *,
    rate: float,
    burst: float,
    warmup: float | None,
) -> float:
    """E of the handover module: (b − r·W)⁺ + r·(m_A − c)⁺ for a tenant new to B since
    its epoch c; b + r·(m_A − f)⁺ unless B's bucket was still warming when it first
    granted the tenant."""
    on_a = [g.at for g in grants if not g.on_b]
    on_b = [g.at for g in grants if g.on_b]
    if not on_a or not on_b:
        return 0.0
    m_a, f = max(on_a), min(on_b)
    general = burst + rate * max(0.0, m_a - f)
    if epoch is None or epoch > f:
        return general
    warm = 0.0 if warmup is None else max(0.0, burst - rate * warmup)
    extra = warm + rate * max(0.0, m_a - epoch)
    return min(extra, general) if warmup is None or f >= epoch + warmup else extra


@dataclass(frozen=True)
class Move:
    """One randomized schedule: arrivals of one tenant, owned by A until `move_at`, then
    by B; for `overlap` seconds after the move each arrival may still reach A (a stream
    open to A, Envoy's workers switching one by one)."""

    arrivals: tuple[tuple[float, int], ...]  # (time, tokens)
    move_at: float
    overlap: float
    join: bool
    """B starts at 0 and begins its epoch at its first decision; else B is a long-running
    replica that reads the changed replica set at `notice_at`."""
    notice_at: float

    @classmethod
    def draw(cls, seed: int) -> Move:
        rng = random.Random(seed)
        rate = rng.choice((1.0, 4.0, 10.0, 40.0))  # arrivals per second, around RATE
        at, arrivals = 0.0, []
        for _ in range(rng.randint(20, 120)):
            at += rng.expovariate(rate)
            arrivals.append((at, rng.randint(1, 150)))
        move_at = rng.uniform(0, at)
        return cls(
            arrivals=tuple(arrivals),
            move_at=move_at,
            overlap=rng.choice((0.0, 0.0, rng.uniform(0, 3))),
            join=rng.random() < 0.5,
            notice_at=move_at + rng.uniform(-2, 2),
        )

    def run(self, seed: int, warmup: float | None = None) -> tuple[list[Grant], float | None]:
        """Plays the schedule; returns the grants and B's epoch, checked to be when the
        design says it begins: B's first decision for a replica that joins, else when B
        reads the changed replica set."""
        rng = random.Random(seed)
        clock = FakeClock(start=-FILL_S)
        a = serving(clock, warmup)
        b = replica(clock, warmup) if self.join else serving(clock, warmup)  # long since
        clock.advance(FILL_S)
        noticed = self.join
        epoch = None if self.join else b.epoch
        grants = []
        for at, tokens in self.arrivals:
            if not noticed and at >= self.notice_at:
                clock.advance(max(self.notice_at - clock.now(), 0.0))
                b.replica_set_changed()
                noticed, epoch = True, clock.now()
            clock.advance(at - clock.now())
            after = at >= self.move_at
            to_b = after and (at >= self.move_at + self.overlap or rng.random() < 0.5)
            if to_b and epoch is None:
                epoch = at
            if offer(b if to_b else a, tokens):
                grants.append(Grant(at, tokens, to_b))
        assert b.epoch == epoch
        return grants, epoch


@pytest.mark.parametrize("warmup", WARMUPS)
@pytest.mark.parametrize("seed", range(100))
def test_a_move_over_admits_at_most_the_stated_bound(seed: int, warmup: float | None) -> None:
    move = Move.draw(seed)
    grants, epoch = move.run(seed, warmup)
    for weight, rate, burst in (
        (lambda g: 1, RATE, BURST),
        (lambda g: g.tokens, TOKEN_RATE, TOKEN_BURST),
    ):
        extra = allowed_extra(grants, epoch, rate=rate, burst=burst, warmup=warmup)
        over = most_over(grants, weight=weight, rate=rate, burst=burst)
        assert over <= extra + 1e-6, (move, epoch, over, extra)


def ordered_handover(b: AdmissionController, clock: FakeClock) -> tuple[int, int]:
    """A spends the tenant's whole burst, and the tenant moves to B at that moment.
    Returns (granted by A, granted by B within the next second)."""
    a = serving(clock)
    clock.advance(FILL_S)
    on_a = sum(offer(a) for _ in range(BURST + 1))
    on_b = sum(offer(b) for _ in range(BURST + 1))
    clock.advance(1.0)
    on_b += sum(offer(b) for _ in range(BURST + 1))
    return on_a, on_b


def test_an_ordered_handover_admits_nothing_beyond_the_policy() -> None:
    clock = FakeClock(start=0.0)
    on_a, on_b = ordered_handover(replica(clock), clock)
    # One burst on A, then only what the rate gives: the policy of a single replica.
    assert (on_a, on_b) == (BURST, RATE * 1.0)


def test_without_an_epoch_the_new_owner_hands_out_a_second_burst() -> None:
    """What the epoch prevents (the bound above is not met without it)."""
    clock = FakeClock(start=0.0)
    full = AdmissionController(clock=clock, lease_ttl=TTL, default_policy=POLICY)  # never told
    on_a, on_b = ordered_handover(full, clock)
    assert on_a + on_b == 2 * BURST + RATE * 1.0  # one burst over, per move


def test_an_epoch_restarts_rested_buckets_and_keeps_those_in_use() -> None:
    clock = FakeClock(start=0.0)
    b = serving(clock)
    clock.advance(FILL_S)
    assert offer(b, tenant_id="rested")
    assert offer(b, tenant_id="recent")
    held = b.submit(AdmissionRequest(tenant_id="busy", prompt_tokens=100))
    clock.advance(FILL_S)
    assert offer(b, tenant_id="recent")
    b.replica_set_changed()
    # not used for a whole refill: as if new here, empty at the epoch
    assert b.quota("rested").available_requests == 0
    assert b.quota("acme").available_tokens == 0  # never seen: the same
    # used here since: what it used here is what it has
    assert b.quota("recent").available_requests == BURST - 1
    assert b.quota("busy").available_tokens == TOKEN_BURST
    clock.advance(1.0)
    assert b.quota("acme").available_requests == RATE
    assert b.quota("acme").available_tokens == TOKEN_RATE
    b.release(held.lease.lease_id)


def test_a_warm_up_fills_new_buckets_within_it_then_refills_at_the_rate() -> None:
    clock = FakeClock(start=0.0)
    b = serving(clock, warmup=2.0)
    clock.advance(1.0)  # half the warm-up: half a burst, whatever the rate
    assert b.quota("acme").available_requests == BURST / 2
    assert b.quota("acme").available_tokens == TOKEN_BURST / 2
    assert sum(offer(b, 40) for _ in range(BURST)) == BURST / 2
    # the tokens lacking come at the warm-up's rate (200/s), then the policy's (100/s)
    with pytest.raises(ResourceExhausted) as refused:
        b.submit(AdmissionRequest(tenant_id="acme", prompt_tokens=TOKEN_BURST, no_wait=True))
    assert refused.value.retry_after == timedelta(seconds=1 + (400 - 200) / TOKEN_RATE)
    clock.advance(1.0)
    assert b.quota("acme").available_tokens == 200
    clock.advance(1.0)
    assert b.quota("acme").available_tokens == 300


def test_a_tenant_new_to_a_replica_long_after_its_epoch_gets_its_full_burst() -> None:
    clock = FakeClock(start=0.0)
    b = replica(clock)
    assert not offer(b, tenant_id="first")  # its first decision: the epoch begins
    clock.advance(FILL_S)
    assert sum(offer(b) for _ in range(BURST + 1)) == BURST
    assert b.collect_idle() == 1  # "first", full again, is forgotten as before


# ---- leases of the former owner --------------------------------------------------------


def test_a_dead_replicas_leases_do_not_reduce_capacity_afterwards() -> None:
    clock = FakeClock(start=0.0)
    dead = serving(clock)
    clock.advance(FILL_S)
    dead.set_tier_capacity("large", max_in_flight=POLICY.max_in_flight)
    leases = [
        dead.submit(AdmissionRequest(tenant_id="acme", tier="large", request_id=f"r{i}"))
        for i in range(POLICY.max_in_flight)
    ]
    assert dead.in_flight() == POLICY.max_in_flight
    del dead  # killed: its ledger goes with it

    replacement = serving(clock)
    replacement.set_tier_capacity("large", max_in_flight=POLICY.max_in_flight)
    clock.advance(FILL_S)
    # the callers' releases reach the new owner: refused, and nothing counted
    for ticket in leases:
        with pytest.raises(NotFound) as refused:
            replacement.release(ticket.lease.lease_id, actual_tokens=0, tenant_id="acme")
        assert refused.value.reason == "LEASE_NOT_FOUND"
        assert replacement.release_attempt("acme", ticket.request_id, actual_tokens=0) == (
            False,
            0,
        )
    before = replacement.quota("acme")
    assert before.in_flight == 0 and before.available_requests == BURST
    granted = [
        replacement.submit(AdmissionRequest(tenant_id="acme", tier="large", no_wait=True))
        for _ in range(POLICY.max_in_flight)
    ]
    assert all(t.lease is not None for t in granted)  # the whole concurrency, at once
    with pytest.raises(ResourceExhausted):
        replacement.submit(AdmissionRequest(tenant_id="acme", tier="large", no_wait=True))


def test_leases_left_on_a_live_former_owner_expire_with_their_ttl() -> None:
    clock = FakeClock(start=0.0)
    a = serving(clock)
    clock.advance(FILL_S)
    a.set_tier_capacity("large", max_in_flight=8)
    for _ in range(POLICY.max_in_flight):
        a.submit(AdmissionRequest(tenant_id="acme", tier="large"))
    # the tenant moved: its releases go to the new owner, none reaches A
    other = a.submit(AdmissionRequest(tenant_id="other", tier="large"))
    clock.advance(TTL.total_seconds() - 0.001)
    a.pump()
    assert a.in_flight() == POLICY.max_in_flight + 1
    clock.advance(0.001)
    a.pump()
    assert a.in_flight() == 0 and a.leases_expired == POLICY.max_in_flight + 1
    assert a.quota("acme").in_flight == 0
    assert a.release(other.lease.lease_id) == (False, 0)  # expired: nothing twice


# ---- the replica set ------------------------------------------------------------------


def test_handover_splits_on_the_first_view_and_begins_epochs_on_changes() -> None:
    clock = FakeClock(start=0.0)
    controller = AdmissionController(clock=clock, lease_ttl=TTL)
    splits: list[int] = []
    handover = Handover(controller=controller, split=splits.append, replicas=2)
    assert handover.replicas == 2 and controller.epoch is None
    assert handover.observe(frozenset({"admission-0/a", "admission-1/b"}))
    assert splits == [2] and controller.epoch is None  # at the first decision
    controller.submit(AdmissionRequest(tenant_id="acme"))
    assert controller.epoch == 0.0
    assert not handover.observe(frozenset({"admission-0/a", "admission-1/b"}))
    clock.advance(3)
    # a rollout: the replacement joins while the old one drains; same count, new epoch
    assert handover.observe(frozenset({"admission-0/a", "admission-1/b", "admission-1/c"}))
    assert splits == [2, 3] and controller.epoch == 3.0
    clock.advance(3)
    assert handover.observe(frozenset({"admission-0/a", "admission-1/c"}))
    assert splits == [2, 3, 2] and controller.epoch == 6.0


async def test_a_new_replica_count_resizes_the_ceilings_at_once() -> None:
    controller = AdmissionController(clock=FakeClock(), lease_ttl=TTL)
    feed = CapacityFeed(
        target="127.0.0.1:1",
        controller=controller,
        streams_per_backend=4,
        replicas=2,
        interval=timedelta(seconds=60),
    )
    healthy = inference_pb2.BackendInfo(state=inference_pb2.BACKEND_STATE_HEALTHY)
    feed.set_replicas(3)  # before any report: remembered
    assert feed.replicas == 3 and feed.ceilings == {}
    feed.apply(
        inference_pb2.ListModelsResponse(
            models=[
                inference_pb2.ModelInfo(
                    tier=common_pb2.MODEL_TIER_SMALL,
                    kind=inference_pb2.MODEL_KIND_GENERATOR,
                    backends=[healthy] * 3,
                )
            ]
        )
    )
    assert feed.ceilings == {"small": 4}
    feed.set_replicas(4)  # a replica joined: the shares shrink without waiting a poll
    admitted = [
        controller.submit(AdmissionRequest(tenant_id=f"t{i}", tier="small", no_wait=True))
        for i in range(3)
    ]
    assert feed.ceilings == {"small": 3} and all(t.lease for t in admitted)
    with pytest.raises(ResourceExhausted):
        controller.submit(AdmissionRequest(tenant_id="t9", tier="small", no_wait=True))
    await feed.close()


def test_membership_timing_must_let_a_live_replica_stamp_its_row_in_time() -> None:
    with pytest.raises(ValueError, match="MEMBERSHIP_POLL"):
        AdmissionConfig(
            database_url="postgresql://x",
            admission_membership_poll=timedelta(seconds=5),
            admission_membership_stale_after=timedelta(seconds=5),
        )


def test_the_schedules_cover_every_kind_of_move() -> None:
    """The schedules above are not all alike: joins and late notices, overlaps or not,
    and handovers in which the bound allows nothing beyond the policy."""
    moves = [Move.draw(seed) for seed in range(100)]
    assert len({(m.join, m.overlap > 0, m.notice_at > m.move_at) for m in moves}) == 8
    assert any(
        allowed_extra(*move.run(seed), rate=RATE, burst=BURST, warmup=None) == 0
        for seed, move in enumerate(moves)
    )
