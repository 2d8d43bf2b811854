"""Token buckets and the rate bound: never more than burst + rate·T in any window."""

from __future__ import annotations

import math
import random
from datetime import timedelta

import pytest

from services.admission import (
    AdmissionController,
    AdmissionRequest,
    FakeClock,
    PolicyLimits,
    Priority,
)
from services.admission.bucket import TokenBucket
from services.runtime import ResourceExhausted

SEEDS = range(200)


def max_window_excess(times: list[float], amounts: list[float], rate: float) -> float:
    """max over i <= j of sum(amounts[i..j]) - rate * (times[j] - times[i]).

    A bucket of burst B at rate r is respected iff this is <= B. O(n): with prefix sums
    S, the excess is (S[j+1] - r t_j) - (S[i] - r t_i), maximised by the running minimum
    of the second term.
    """
    excess, prefix, lowest = -math.inf, 0.0, math.inf
    for t, amount in zip(times, amounts, strict=True):
        lowest = min(lowest, prefix - rate * t)
        prefix += amount
        excess = max(excess, prefix - rate * t - lowest)
    return excess


def test_window_excess_helper():
    assert max_window_excess([0, 0, 0], [1, 1, 1], rate=1) == 3
    assert max_window_excess([0, 1, 2, 3], [1, 1, 1, 1], rate=1) == pytest.approx(1)
    assert max_window_excess([0, 10, 10.5], [1, 1, 1], rate=1) == pytest.approx(1.5)


def test_bucket_starts_full_and_refills_lazily():
    bucket = TokenBucket(rate_per_s=2, burst=4, now=0)
    assert bucket.available(0) == 4
    assert bucket.try_take(4, 0)
    assert not bucket.try_take(1, 0)
    assert bucket.available(0.25) == pytest.approx(0.5)
    assert bucket.available(100) == 4


def test_try_take_takes_all_or_nothing():
    bucket = TokenBucket(rate_per_s=1, burst=10, now=0, level=3)
    assert not bucket.try_take(4, 0)
    assert bucket.available(0) == 3
    assert bucket.try_take(3, 0)
    assert bucket.available(0) == 0


def test_time_until_is_honest_and_infinite_beyond_the_burst():
    bucket = TokenBucket(rate_per_s=4, burst=10, now=0, level=1)
    wait = bucket.time_until(3, 0)
    assert wait == pytest.approx(0.5)
    assert not bucket.can_take(3, wait * 0.99)
    assert bucket.try_take(3, wait)
    assert bucket.time_until(11, 0) == math.inf
    assert bucket.time_until(0, 0) == 0


def test_time_to_accrue_counts_tokens_taken_as_they_come():
    bucket = TokenBucket(rate_per_s=2, burst=5, now=0, level=5)
    assert bucket.time_to_accrue(5, 0) == 0
    assert bucket.time_to_accrue(25, 0) == pytest.approx(10)  # beyond the burst: finite


def test_credit_is_capped_at_the_burst_and_debits_below_zero():
    bucket = TokenBucket(rate_per_s=1, burst=10, now=0, level=2)
    bucket.credit(100, 0)
    assert bucket.available(0) == 10
    bucket.credit(-25, 0)
    assert bucket.available(0) == -15
    assert bucket.time_until(1, 0) == pytest.approx(16)  # the debt is repaid first


def test_reconfigure_keeps_the_level_and_never_hands_out_a_free_burst():
    bucket = TokenBucket(rate_per_s=1, burst=10, now=0, level=3)
    bucket.reconfigure(rate_per_s=10, burst=100, now=0)
    assert bucket.available(0) == 3
    assert bucket.available(1) == pytest.approx(13)
    bucket.reconfigure(rate_per_s=1, burst=5, now=1)
    assert bucket.available(1) == 5


@pytest.mark.parametrize("rate, burst", [(0, 1), (-1, 1), (1, 0), (math.nan, 1), (1, math.inf)])
def test_bucket_refuses_non_positive_or_non_finite_settings(rate, burst):
    with pytest.raises(ValueError):
        TokenBucket(rate_per_s=rate, burst=burst, now=0)


def test_bucket_never_exceeds_burst_plus_rate_times_window_randomized():
    for seed in SEEDS:
        rng = random.Random(seed)
        rate, burst = rng.uniform(0.2, 50), rng.randint(1, 40)
        bucket = TokenBucket(rate_per_s=rate, burst=burst, now=0)
        now, times, amounts = 0.0, [], []
        for _ in range(400):
            now += rng.expovariate(rate * rng.uniform(0.5, 4))
            n = rng.choice([1, 1, 1, 2, min(3, burst)])
            if bucket.try_take(n, now):
                times.append(now)
                amounts.append(n)
            if rng.random() < 0.05:
                bucket.credit(rng.uniform(-2, 0), now)  # over-use reported afterwards
        assert max_window_excess(times, amounts, rate) <= burst + 1e-6, seed


def _controller(rng: random.Random) -> tuple[AdmissionController, FakeClock, PolicyLimits]:
    clock = FakeClock()
    policy = PolicyLimits(
        requests_per_second=round(rng.uniform(0.5, 40), 3),
        request_burst=rng.randint(1, 30),
        tokens_per_minute=rng.randint(600, 120_000),
        token_burst=rng.randint(200, 5_000),
        max_in_flight=1_000_000,
        max_queued=1_000_000,
    )
    controller = AdmissionController(clock=clock, default_policy=policy)
    return controller, clock, policy


def test_controller_never_admits_more_than_burst_plus_rate_times_window():
    """Random arrivals, sizes, no_wait and waiting requests, random dispatcher ticks."""
    for seed in SEEDS:
        rng = random.Random(seed)
        controller, clock, policy = _controller(rng)
        grants: list[tuple[float, int]] = []
        tickets = []
        demand = policy.requests_per_second * rng.uniform(0.5, 5)
        for _ in range(300):
            clock.advance(rng.expovariate(demand))
            if rng.random() < 0.3:
                controller.pump()
            tokens = rng.randint(0, policy.token_burst // 3)
            try:
                tickets.append(
                    controller.submit(
                        AdmissionRequest(
                            tenant_id="t",
                            prompt_tokens=tokens,
                            no_wait=rng.random() < 0.5,
                            max_wait=timedelta(seconds=rng.uniform(0, 3)),
                        )
                    )
                )
            except ResourceExhausted:
                pass
        for _ in range(50):
            clock.advance(rng.uniform(0, 0.2))
            controller.pump()
        for ticket in tickets:
            if ticket.lease is not None:
                grants.append((ticket.lease.granted_at, ticket.tokens))
        grants.sort()
        times = [t for t, _ in grants]
        assert grants, seed
        assert (
            max_window_excess(times, [1] * len(times), policy.requests_per_second)
            <= policy.request_burst + 1e-6
        ), seed
        assert (
            max_window_excess(times, [n for _, n in grants], policy.tokens_per_second)
            <= policy.token_burst + 1e-6
        ), seed


def test_controller_never_under_admits_when_demand_exceeds_the_rate():
    """Always backlogged: by time T, floor(burst + rate·T) requests are admitted.

    The dispatcher is driven the way `run()` drives it: woken at `next_wakeup()` (the
    next token's arrival) or earlier, so no refill is lost to a full bucket.
    """
    for seed in SEEDS:
        rng = random.Random(seed)
        clock = FakeClock()
        policy = PolicyLimits(
            requests_per_second=round(rng.uniform(0.5, 40), 3),
            request_burst=rng.randint(1, 30),
            tokens_per_minute=10**9,
            token_burst=10**9,
            max_in_flight=1_000_000,
            max_queued=1_000_000,
        )
        controller = AdmissionController(clock=clock, default_policy=policy)
        start = clock.now()
        waiting = []
        for _ in range(200):
            waiting = [t for t in waiting if t.waiting]
            while len(waiting) < policy.request_burst + 5:  # keep a backlog
                ticket = controller.submit(AdmissionRequest(tenant_id="t"))
                if ticket.waiting:
                    waiting.append(ticket)
            # The dispatcher wakes when the next token arrives, or earlier.
            step = rng.uniform(0.001, 0.1)
            if (due := controller.next_wakeup()) is not None:
                step = min(step, due - clock.now())
            clock.advance(step)
            controller.pump()
        elapsed = clock.now() - start
        admitted = controller.stats["t", Priority.INTERACTIVE].admitted
        expected = math.floor(policy.request_burst + policy.requests_per_second * elapsed + 1e-6)
        assert expected - 1 <= admitted <= expected, (seed, admitted, expected)
