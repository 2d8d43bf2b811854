"""The runtime's circuit breaker and retry policy, on a fake clock and a recorded sleep."""

from __future__ import annotations

import random
from datetime import timedelta

import pytest

from services.runtime import (
    CircuitBreaker,
    CircuitOpenError,
    CircuitState,
    RetriesExhausted,
    RetryPolicy,
)
from tests.fakes import Clock, Sleeps


def breaker(clock: Clock, fail_max: int = 2, reset: float = 5.0, **options) -> CircuitBreaker:
    return CircuitBreaker(
        "b", fail_max=fail_max, reset=timedelta(seconds=reset), clock=clock, **options
    )


# --- circuit breaker -----------------------------------------------------------------


def test_opens_after_fail_max_in_a_row_and_recovers_after_a_good_probe():
    clock = Clock()
    circuit = breaker(clock)
    assert circuit.allow() and circuit.state == "closed" and circuit.is_closed
    circuit.record_failure()
    assert circuit.state is CircuitState.CLOSED
    circuit.record_failure()
    assert circuit.state is CircuitState.OPEN and not circuit.allow()
    assert circuit.retry_after() == timedelta(seconds=5)
    clock.advance(4.9)
    assert circuit.state is CircuitState.OPEN and not circuit.allow()
    clock.advance(0.1)
    assert circuit.state is CircuitState.HALF_OPEN
    assert circuit.allow()  # the probe
    assert not circuit.allow()  # only one probe at a time
    circuit.record_success()
    assert circuit.state is CircuitState.CLOSED and circuit.allow()


def test_a_failed_probe_opens_the_circuit_for_another_reset():
    clock = Clock()
    circuit = breaker(clock, fail_max=1)
    circuit.record_failure()
    clock.advance(5)
    assert circuit.allow()
    circuit.record_failure()
    assert circuit.state is CircuitState.OPEN
    clock.advance(4.9)
    assert not circuit.allow()
    clock.advance(0.1)
    assert circuit.allow()


def test_a_success_between_failures_starts_the_count_again():
    circuit = breaker(Clock())
    circuit.record_failure()
    circuit.record_success()
    circuit.record_failure()
    assert circuit.state is CircuitState.CLOSED


def test_a_lost_probe_frees_its_place_after_the_probe_timeout():
    clock = Clock()
    circuit = breaker(clock, fail_max=1, probe_timeout=timedelta(seconds=2))
    circuit.record_failure()
    clock.advance(5)
    assert circuit.allow()
    assert circuit.retry_after() == timedelta(seconds=2)  # a probe's longest run
    clock.advance(1.9)
    assert not circuit.allow()
    clock.advance(0.1)
    assert circuit.allow()  # the first probe never reported: another goes


def test_outcomes_reported_while_open_change_nothing():
    """A call that began before the circuit opened proves nothing once it has."""
    clock = Clock()
    circuit = breaker(clock, fail_max=1)
    circuit.record_failure()
    clock.advance(1)
    circuit.record_success()
    assert circuit.state is CircuitState.OPEN
    circuit.record_failure()  # does not push the reset back
    clock.advance(4)
    assert circuit.state is CircuitState.HALF_OPEN


class Refused(Exception):
    pass


class Broken(Exception):
    pass


def test_guard_reports_failures_answers_and_nothing_else():
    clock = Clock()
    circuit = breaker(clock, fail_max=2)
    for _ in range(3):  # refusals are answers: the dependency works
        with pytest.raises(Refused), circuit.guard(failures=Broken, answers=Refused):
            raise Refused
    with pytest.raises(Broken), circuit.guard(failures=Broken, answers=Refused):
        raise Broken
    with pytest.raises(TimeoutError), circuit.guard(failures=Broken):
        raise TimeoutError  # the caller's own deadline: not the dependency's fault
    assert circuit.state is CircuitState.CLOSED
    with pytest.raises(Broken), circuit.guard(failures=Broken):
        raise Broken
    with pytest.raises(CircuitOpenError) as refused, circuit.guard(failures=Broken):
        raise AssertionError("an open circuit runs nothing")
    assert refused.value.retry_after == timedelta(seconds=5)


def test_guard_frees_the_probe_when_it_ends_without_an_outcome():
    clock = Clock()
    circuit = breaker(clock, fail_max=1)
    circuit.record_failure()
    clock.advance(5)
    with pytest.raises(TimeoutError), circuit.guard(failures=Broken):
        raise TimeoutError
    assert circuit.state is CircuitState.HALF_OPEN
    with circuit.guard(failures=Broken):  # the next call is the probe
        pass
    assert circuit.state is CircuitState.CLOSED


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="fail_max"):
        CircuitBreaker("b", fail_max=0, reset=timedelta(seconds=1))
    with pytest.raises(ValueError, match="reset"):
        CircuitBreaker("b", fail_max=1, reset=timedelta(0))


# --- retry policy --------------------------------------------------------------------


def test_full_jitter_backoff_is_drawn_under_a_doubling_ceiling():
    policy = RetryPolicy(backoff=timedelta(seconds=0.5), max_backoff=timedelta(seconds=3))
    assert [policy.ceiling(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    rng, expected = random.Random(7), random.Random(7)
    delays = [policy.delay(n, rng=rng) for n in range(1, 6)]
    assert delays == [expected.uniform(0, cap) for cap in [0.5, 1.0, 2.0, 3.0, 3.0]]


def test_a_hint_replaces_the_draw_up_to_max_backoff():
    policy = RetryPolicy(max_backoff=timedelta(seconds=5))
    assert policy.delay(1, rng=random.Random(), retry_after=2.0) == 2.0
    assert policy.delay(1, rng=random.Random(), retry_after=120.0) == 5.0


def test_bad_policies_are_refused():
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="backoff"):
        RetryPolicy(backoff=timedelta(seconds=2), max_backoff=timedelta(seconds=1))


class Flaky:
    """Fails with the scripted errors, then answers with the attempt's number."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.attempts: list[int] = []

    async def __call__(self, attempt: int) -> int:
        self.attempts.append(attempt)
        if self.errors:
            raise self.errors.pop(0)
        return attempt


async def test_call_retries_until_an_attempt_succeeds():
    flaky, sleeps = Flaky(Broken(), Broken()), Sleeps()
    policy = RetryPolicy(max_attempts=3)
    result = await policy.call(flaky, retry_on=Broken, rng=random.Random(7), sleep=sleeps)
    assert result == 3 and flaky.attempts == [1, 2, 3]
    expected = random.Random(7)
    assert sleeps.delays == [expected.uniform(0, 0.2), expected.uniform(0, 0.4)]


async def test_call_gives_the_last_failure_once_attempts_are_spent():
    flaky, sleeps = Flaky(Broken("1"), Broken("2")), Sleeps()
    policy = RetryPolicy(max_attempts=2)
    with pytest.raises(RetriesExhausted) as exhausted:
        await policy.call(flaky, retry_on=Broken, rng=random.Random(), sleep=sleeps)
    assert exhausted.value.attempts == 2 and str(exhausted.value.last) == "2"
    assert len(sleeps.delays) == 1


async def test_other_errors_are_not_retried():
    flaky, sleeps = Flaky(Refused()), Sleeps()
    with pytest.raises(Refused):
        await RetryPolicy().call(flaky, retry_on=Broken, rng=random.Random(), sleep=sleeps)
    assert flaky.attempts == [1] and sleeps.delays == []


async def test_hints_give_up_and_the_deadline_end_or_shape_the_waits():
    clock = Clock()
    sleeps = Sleeps(clock)
    policy = RetryPolicy(max_attempts=5, max_backoff=timedelta(seconds=10))

    async def run(flaky: Flaky, **options) -> int:
        return await policy.call(
            flaky,
            retry_on=Broken,
            rng=random.Random(),
            sleep=sleeps,
            clock=clock,
            retry_after=lambda error: float(error.args[0]) if error.args else None,
            **options,
        )

    assert await run(Flaky(Broken("3"), Broken("30"))) == 3
    assert sleeps.delays == [3.0, 10.0]  # the hint, capped at max_backoff

    sleeps.delays.clear()
    with pytest.raises(RetriesExhausted) as exhausted:  # a wait would pass the deadline
        await run(Flaky(Broken("3"), Broken("3")), deadline=clock() + 5)
    assert exhausted.value.attempts == 2 and sleeps.delays == [3.0]

    sleeps.delays.clear()
    with pytest.raises(RetriesExhausted) as exhausted:  # e.g. the circuit opened
        await run(Flaky(Broken("1"), Broken("1")), give_up=lambda error: True)
    assert exhausted.value.attempts == 1 and sleeps.delays == []
