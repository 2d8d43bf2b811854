"""How the tasks benchmark splits the machine's CPU over a round's tasks."""

from __future__ import annotations

import os

import pytest

from bench import tasks_throughput as tt


def test_cpu_per_task_names_each_kind_and_leaves_the_rest_as_other() -> None:
    hz, cores = os.sysconf("SC_CLK_TCK"), os.cpu_count() or 1
    # a 10 s window in which the machine was busy for 6 s of CPU
    ticks_before, ticks_after = (0, 0), (10 * hz * cores, (10 * cores - 6) * hz)
    before = {"worker": 1.0, "nats": 2.0}
    after = {"worker": 4.0, "nats": 3.0, "execution": 0.5, "triton": 9.0}
    cpu = tt._cpu_per_task(before, after, ticks_before, ticks_after)
    per_task_ms = 1000 / tt.TASKS
    assert cpu["worker"] == pytest.approx(3.0 * per_task_ms)
    assert cpu["nats"] == pytest.approx(1.0 * per_task_ms)
    assert cpu["execution"] == pytest.approx(0.5 * per_task_ms)
    assert cpu["postgres"] == 0.0  # a kind that did not run
    assert cpu["total"] == pytest.approx(6.0 * per_task_ms)
    assert cpu["other"] == pytest.approx((6.0 - 4.5) * per_task_ms)  # triton not named
    assert cpu["busy_cores"] == pytest.approx(0.6)


def test_the_one_per_call_ceiling_adds_the_bare_call_to_a_batched_task() -> None:
    cores = os.cpu_count() or 1
    batched = {"total": 2.0, "bench client": 0.05}
    single = {"total": 3.3, "bench client": 0.15}
    floor = {"envoy": 0.05, "execution": 0.15, "bench client": 0.2, "total": 0.4}
    # a batched task's 2.0 ms, 0.1 ms more in the client, 0.2 ms in Envoy and the hop
    assert tt._ceiling(single, batched, floor) == pytest.approx(60_000 * cores / 2.3)
    # a client that cost less alone than batched adds nothing
    cheaper = {**single, "bench client": 0.01}
    assert tt._ceiling(cheaper, batched, floor) == pytest.approx(60_000 * cores / 2.2)


def test_the_floor_sends_a_bearer_token_as_long_as_a_tenant_key() -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    from services.auth.keys import new_key
    from services.auth.signing import SigningKey

    signer = SigningKey(ec.generate_private_key(ec.SECP256R1()))
    key = new_key("tenant", "bench-1a2b3c4d", signer)  # the benchmark's tenants' form
    assert len(key.token) == tt.API_KEY_CHARS
