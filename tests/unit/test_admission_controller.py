"""Admission decisions, refusals, leases, waiters and policies, on a fake clock."""

from __future__ import annotations

import asyncio
import math
from datetime import timedelta

import grpc
import pytest
from google.rpc import error_details_pb2

from services.admission import (
    DEFAULT_POLICY,
    AdmissionController,
    AdmissionRequest,
    Dispatcher,
    FakeClock,
    MonotonicClock,
    PolicyLimits,
    Priority,
    TicketState,
)
from services.runtime import Cancelled, InvalidArgument, NotFound, ResourceExhausted, Unavailable

POLICY = PolicyLimits(
    requests_per_second=2,
    request_burst=4,
    tokens_per_minute=6_000,  # 100 per second
    token_burst=1_000,
    max_in_flight=3,
    max_queued=5,
)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def controller(clock: FakeClock) -> AdmissionController:
    controller = AdmissionController(clock=clock, lease_ttl=timedelta(seconds=60))
    controller.set_policy("acme", POLICY)
    return controller


@pytest.fixture
def dispatcher(controller: AdmissionController) -> Dispatcher:
    return Dispatcher(controller)


def fill_requests(controller: AdmissionController, n: int, **request) -> list:
    return [controller.submit(AdmissionRequest(tenant_id="acme", **request)) for _ in range(n)]


# ---- admitted at once ---------------------------------------------------------------


def test_admits_at_once_with_a_lease_that_charges_the_estimate(controller, clock):
    ticket = controller.submit(
        AdmissionRequest(
            tenant_id="acme", user_id="ann", tier="small", prompt_tokens=120, completion_tokens=80
        )
    )
    lease = ticket.lease
    assert ticket.state is TicketState.ADMITTED and lease is not None
    assert (lease.tenant_id, lease.user_id, lease.tier) == ("acme", "ann", "small")
    assert lease.charged_tokens == 200
    assert lease.expires_at == clock.now() + 60
    admission = ticket.result()
    assert admission.queue_wait == timedelta(0) and admission.initial_queue_position == 0
    quota = controller.quota("acme")
    assert quota.in_flight == 1 and quota.available_tokens == 800
    assert quota.available_requests == pytest.approx(3)


def test_unknown_tenants_get_the_default_policy_explicitly(controller):
    assert controller.get_policy("newcomer") == (DEFAULT_POLICY, True)
    assert controller.get_policy("acme") == (POLICY, False)
    assert controller.get_policy("acme", "ann") == (None, True)  # tenant limits only
    assert controller.submit(AdmissionRequest(tenant_id="newcomer")).lease is not None
    quota = controller.quota("newcomer")
    assert quota.is_default and quota.policy == DEFAULT_POLICY and quota.in_flight == 1


def test_unspecified_priority_is_interactive(controller):
    assert (
        controller.submit(AdmissionRequest(tenant_id="acme", priority=0)).lease.priority
        is Priority.INTERACTIVE
    )


# ---- refusals ---------------------------------------------------------------------


def test_no_wait_refusal_names_the_limit_and_an_honest_retry(controller, clock):
    fill_requests(controller, 3)  # 3 of the burst of 4 requests, 3 of 3 slots
    with pytest.raises(ResourceExhausted) as refused:
        controller.submit(AdmissionRequest(tenant_id="acme", no_wait=True))
    error = refused.value
    assert error.reason == "QUOTA_EXCEEDED"
    assert error.metadata == {"limit": "max_in_flight", "tenant_id": "acme"}
    assert [v.subject for v in error.quota_violations] == ["tenant:acme"]
    assert error.retry_after is not None and error.retry_after > timedelta(0)


def test_retry_after_from_the_request_bucket_is_exact(controller, clock):
    for ticket in fill_requests(controller, 3):
        controller.release(ticket.lease.lease_id)
    controller.submit(AdmissionRequest(tenant_id="acme"))  # bucket: 4 taken, refills at 2/s
    with pytest.raises(ResourceExhausted) as refused:
        controller.submit(AdmissionRequest(tenant_id="acme", no_wait=True))
    error = refused.value
    assert error.metadata["limit"] == "requests_per_second"
    assert error.retry_after == timedelta(milliseconds=500)
    clock.advance(0.499)
    with pytest.raises(ResourceExhausted):
        controller.submit(AdmissionRequest(tenant_id="acme", no_wait=True))
    clock.advance(0.001)
    assert controller.submit(AdmissionRequest(tenant_id="acme", no_wait=True)).lease is not None


def test_retry_after_from_the_token_bucket_is_exact(controller, clock):
    first = controller.submit(AdmissionRequest(tenant_id="acme", prompt_tokens=900))
    controller.release(first.lease.lease_id)  # no correction: 900 stay charged
    with pytest.raises(ResourceExhausted) as refused:
        controller.submit(AdmissionRequest(tenant_id="acme", prompt_tokens=300, no_wait=True))
    assert refused.value.metadata["limit"] == "tokens_per_minute"
    assert refused.value.retry_after == timedelta(seconds=2)  # 200 missing at 100/s
    clock.advance(2)
    assert controller.submit(
        AdmissionRequest(tenant_id="acme", prompt_tokens=300, no_wait=True)
    ).lease


def test_a_request_larger_than_the_burst_is_refused_without_retry(controller):
    with pytest.raises(ResourceExhausted) as refused:
        controller.submit(
            AdmissionRequest(tenant_id="acme", prompt_tokens=600, completion_tokens=401)
        )
    assert refused.value.reason == "QUOTA_EXCEEDED"
    assert refused.value.retry_after is None  # waiting can never help
    assert refused.value.metadata["limit"] == "tokens_per_minute"


def test_a_wait_longer_than_max_wait_is_refused_at_once(controller, clock):
    controller.submit(AdmissionRequest(tenant_id="acme", prompt_tokens=1_000))
    with pytest.raises(ResourceExhausted) as refused:
        controller.submit(
            AdmissionRequest(tenant_id="acme", prompt_tokens=500, max_wait=timedelta(seconds=4))
        )
    assert refused.value.retry_after == timedelta(seconds=5)
    ticket = controller.submit(
        AdmissionRequest(tenant_id="acme", prompt_tokens=500, max_wait=timedelta(seconds=6))
    )
    assert ticket.waiting
    clock.advance(5)
    controller.pump()
    assert ticket.lease is not None and ticket.result().queue_wait == timedelta(seconds=5)


def test_queue_full_beyond_max_queued(controller):
    fill_requests(controller, 3)
    waiting = fill_requests(controller, 5)
    assert all(t.waiting for t in waiting)
    with pytest.raises(ResourceExhausted) as refused:
        controller.submit(AdmissionRequest(tenant_id="acme"))
    assert refused.value.reason == "QUEUE_FULL"
    assert refused.value.retry_after is not None
    assert controller.queue_depth()[Priority.INTERACTIVE] == 5
    assert controller.stats["acme", Priority.INTERACTIVE].refused == {"QUEUE_FULL": 1}


def test_refusals_map_to_rich_grpc_status(controller):
    fill_requests(controller, 4)
    with pytest.raises(ResourceExhausted) as refused:
        controller.submit(AdmissionRequest(tenant_id="acme", no_wait=True))
    status = refused.value.to_rpc_status()
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    kinds = [d.TypeName() for d in status.details]
    assert kinds == ["google.rpc.ErrorInfo", "google.rpc.QuotaFailure", "google.rpc.RetryInfo"]
    info = error_details_pb2.ErrorInfo()
    status.details[0].Unpack(info)
    assert info.reason == "QUOTA_EXCEEDED" and info.domain == "switchboard.dev"


@pytest.mark.parametrize(
    "changes, fields",
    [
        ({"requests_per_second": 0}, ["requests_per_second"]),
        ({"requests_per_second": -3.0}, ["requests_per_second"]),
        ({"requests_per_second": math.nan}, ["requests_per_second"]),
        ({"requests_per_second": 1e9}, ["requests_per_second"]),
        ({"tokens_per_minute": 0, "token_burst": -1}, ["tokens_per_minute", "token_burst"]),
        ({"max_in_flight": 0}, ["max_in_flight"]),
        ({"weight": 0}, ["weight"]),
        ({"weight": 10_000}, ["weight"]),
        ({"max_queued": -1}, ["max_queued"]),
        ({"request_burst": 1.5}, ["request_burst"]),
    ],
)
def test_bad_policies_are_refused_with_field_violations(controller, changes, fields):
    fields_now = {name: getattr(POLICY, name) for name in POLICY.__dataclass_fields__}
    bad = PolicyLimits(**{**fields_now, **changes})
    assert [v.field for v in bad.validate()] == fields
    assert [v.field for v in bad.validate(prefix="policy.")] == [f"policy.{f}" for f in fields]
    with pytest.raises(InvalidArgument) as invalid:
        controller.set_policy("acme", bad)
    assert [v.field for v in invalid.value.field_violations] == fields
    assert controller.get_policy("acme") == (POLICY, False)


def test_default_policy_is_valid():
    assert DEFAULT_POLICY.validate() == []


# ---- leases -----------------------------------------------------------------------


def test_release_is_idempotent_and_never_credits_twice(controller, clock):
    ticket = controller.submit(
        AdmissionRequest(tenant_id="acme", prompt_tokens=500, completion_tokens=300)
    )
    lease_id = ticket.lease.lease_id
    assert controller.release(lease_id, actual_tokens=350) == (True, 450)
    assert controller.quota("acme").available_tokens == 650
    assert controller.release(lease_id, actual_tokens=0) == (False, 0)
    assert controller.release(lease_id) == (False, 0)
    assert controller.release("no-such-lease", actual_tokens=10) == (False, 0)
    assert controller.quota("acme").available_tokens == 650
    assert controller.quota("acme").in_flight == 0


def test_release_without_usage_keeps_the_charge(controller):
    ticket = controller.submit(AdmissionRequest(tenant_id="acme", prompt_tokens=400))
    assert controller.release(ticket.lease.lease_id) == (True, 0)
    assert controller.quota("acme").available_tokens == 600


def test_overuse_is_charged_and_repaid_before_anything_else(controller, clock):
    ticket = controller.submit(AdmissionRequest(tenant_id="acme", prompt_tokens=100))
    assert controller.release(ticket.lease.lease_id, actual_tokens=1_500) == (True, -1_400)
    assert controller.quota("acme").available_tokens == -500
    with pytest.raises(ResourceExhausted) as refused:
        controller.submit(AdmissionRequest(tenant_id="acme", prompt_tokens=100, no_wait=True))
    assert refused.value.retry_after == timedelta(seconds=6)  # 600 missing at 100/s


def test_another_tenant_cannot_release_a_lease(controller):
    ticket = controller.submit(AdmissionRequest(tenant_id="acme"))
    lease_id = ticket.lease.lease_id
    for forged in (lease_id, lease_id.rpartition(".")[0], f"{lease_id}x", "", "." * 3):
        with pytest.raises(NotFound) as refused:
            controller.release(forged, tenant_id="intruder", actual_tokens=0)
        assert refused.value.reason == "LEASE_NOT_FOUND"
    assert controller.in_flight() == 1  # nothing changed
    assert controller.quota("acme").in_flight == 1
    assert controller.release(lease_id, tenant_id="acme") == (True, 0)
    # released: the tenant's own id stays known, and releasing it again changes nothing
    assert controller.release(lease_id, tenant_id="acme") == (False, 0)
    with pytest.raises(NotFound):
        controller.release(lease_id, tenant_id="intruder")


def test_a_lease_id_is_bound_to_its_tenant(controller):
    acme = controller.submit(AdmissionRequest(tenant_id="acme")).lease.lease_id
    other = controller.submit(AdmissionRequest(tenant_id="other")).lease.lease_id
    assert controller.issued_to("acme", acme) and controller.issued_to("other", other)
    assert not controller.issued_to("acme", other) and not controller.issued_to("other", acme)


def test_bad_actual_usage_is_an_invalid_argument(controller):
    ticket = controller.submit(AdmissionRequest(tenant_id="acme"))
    with pytest.raises(InvalidArgument) as invalid:
        controller.release(ticket.lease.lease_id, actual_tokens=-1)
    assert [v.field for v in invalid.value.field_violations] == ["actual_tokens"]
    assert controller.in_flight() == 1


def test_leases_expire_freeing_their_slot_and_keeping_their_charge(controller, clock):
    held = [t.lease for t in fill_requests(controller, 3, prompt_tokens=100)]
    waiting = controller.submit(AdmissionRequest(tenant_id="acme"))
    assert waiting.waiting
    clock.advance(59.9)
    controller.pump()
    assert waiting.waiting
    clock.advance(0.1)
    controller.pump()
    assert waiting.lease is not None  # a slot freed by expiry
    assert controller.leases_expired == 3
    assert controller.release(held[0].lease_id, actual_tokens=0) == (False, 0)
    assert controller.quota("acme").in_flight == 1


def test_abandoning_an_admitted_ticket_gives_its_charge_back(controller):
    ticket = controller.submit(AdmissionRequest(tenant_id="acme", prompt_tokens=300))
    controller.abandon(ticket)
    quota = controller.quota("acme")
    assert quota.in_flight == 0 and quota.available_tokens == 1_000


# ---- waiting ------------------------------------------------------------------------


def test_waiters_are_granted_fifo_as_slots_free(controller):
    running = fill_requests(controller, 3)
    waiting = fill_requests(controller, 3)
    assert [controller.queue_position(t).position for t in waiting] == [0, 1, 2]
    controller.release(running[0].lease.lease_id)
    assert [t.state for t in waiting] == [
        TicketState.ADMITTED,
        TicketState.WAITING,
        TicketState.WAITING,
    ]
    assert [controller.queue_position(t).position for t in waiting[1:]] == [0, 1]
    assert waiting[1].initial_position == 1


def test_estimated_wait_follows_the_buckets_and_the_queue_ahead(controller, clock):
    controller.submit(AdmissionRequest(tenant_id="acme", prompt_tokens=1_000))
    first = controller.submit(AdmissionRequest(tenant_id="acme", prompt_tokens=200))
    second = controller.submit(AdmissionRequest(tenant_id="acme", prompt_tokens=300))
    assert controller.queue_position(first).estimated_wait == timedelta(seconds=2)
    assert controller.queue_position(second).estimated_wait == timedelta(seconds=5)
    assert controller.next_wakeup() == pytest.approx(clock.now() + 2)


def test_a_cancelled_waiter_leaves_at_once_and_is_never_granted(controller, clock):
    running = fill_requests(controller, 3)
    gone, kept = fill_requests(controller, 2)
    assert controller.cancel(gone)
    assert not controller.cancel(gone)
    assert controller.queue_position(kept).position == 0
    controller.release(running[0].lease.lease_id)
    assert kept.lease is not None and gone.lease is None
    for ticket in running[1:]:
        controller.release(ticket.lease.lease_id)
    clock.advance(10)
    controller.pump()
    assert gone.state is TicketState.CANCELLED and gone.lease is None
    with pytest.raises(Cancelled):
        gone.result()
    assert controller.stats["acme", Priority.INTERACTIVE].cancelled == 1


def test_a_waiter_out_of_time_is_refused_within_one_tick_and_never_granted(controller, clock):
    running = fill_requests(controller, 3)
    late = controller.submit(AdmissionRequest(tenant_id="acme", max_wait=timedelta(seconds=1)))
    patient = controller.submit(AdmissionRequest(tenant_id="acme"))
    clock.advance(1)
    controller.pump()
    assert late.state is TicketState.REFUSED
    with pytest.raises(ResourceExhausted) as refused:
        late.result()
    assert refused.value.reason == "QUOTA_EXCEEDED"
    assert refused.value.metadata["limit"] == "max_in_flight"
    assert controller.queue_position(patient).position == 0
    controller.release(running[0].lease.lease_id)
    assert patient.lease is not None and late.lease is None


def test_a_small_request_does_not_overtake_a_big_one_of_its_tenant(controller, clock):
    controller.submit(AdmissionRequest(tenant_id="acme", prompt_tokens=1_000))
    big = controller.submit(AdmissionRequest(tenant_id="acme", prompt_tokens=500))
    small = controller.submit(AdmissionRequest(tenant_id="acme", prompt_tokens=10))
    clock.advance(1)
    controller.pump()
    assert big.waiting and small.waiting  # FIFO: the small one waits behind the big one
    clock.advance(4)
    controller.pump()
    assert big.lease is not None and small.waiting
    clock.advance(0.1)
    controller.pump()
    assert small.lease is not None


# ---- users and tiers --------------------------------------------------------------


def test_a_user_is_bound_by_their_own_policy_and_their_tenant(controller):
    strict = PolicyLimits(
        requests_per_second=1, request_burst=2, tokens_per_minute=600, token_burst=100,
        max_in_flight=1,
    )  # fmt: skip
    controller.set_policy("acme", strict, user_id="bob")
    bob = controller.submit(AdmissionRequest(tenant_id="acme", user_id="bob"))
    with pytest.raises(ResourceExhausted) as refused:
        controller.submit(AdmissionRequest(tenant_id="acme", user_id="bob", no_wait=True))
    assert refused.value.metadata == {
        "limit": "max_in_flight",
        "tenant_id": "acme",
        "user_id": "bob",
    }
    assert [v.subject for v in refused.value.quota_violations][0] == "tenant:acme/user:bob"
    with pytest.raises(ResourceExhausted):
        controller.submit(AdmissionRequest(tenant_id="acme", user_id="bob", prompt_tokens=101))
    assert controller.quota("acme", "bob").in_flight == 1
    assert controller.quota("acme").in_flight == 1
    # The user's queued request does not hold up the rest of the tenant.
    waiting_bob = controller.submit(AdmissionRequest(tenant_id="acme", user_id="bob"))
    ann = controller.submit(AdmissionRequest(tenant_id="acme", user_id="ann"))
    assert waiting_bob.waiting and ann.lease is not None
    controller.release(bob.lease.lease_id)
    assert waiting_bob.lease is not None
    blocked_bob = controller.submit(AdmissionRequest(tenant_id="acme", user_id="bob"))
    assert blocked_bob.waiting  # bob's in-flight slot is taken again
    controller.delete_policy("acme", user_id="bob")
    assert blocked_bob.lease is not None  # tenant limits only, from now on


def test_tier_capacity_is_global_across_tenants(controller, clock):
    controller.set_tier_capacity("large", max_in_flight=2)
    a = controller.submit(AdmissionRequest(tenant_id="acme", tier="large"))
    b = controller.submit(AdmissionRequest(tenant_id="other", tier="large"))
    with pytest.raises(ResourceExhausted) as refused:
        controller.submit(AdmissionRequest(tenant_id="third", tier="large", no_wait=True))
    assert refused.value.reason == "CAPACITY_EXHAUSTED"
    assert refused.value.metadata == {"tier": "large"}
    # One slot must free; two slots held ~1 s (the typical hold) free one every 0.5 s.
    assert refused.value.retry_after == timedelta(seconds=0.5)
    small = controller.submit(AdmissionRequest(tenant_id="third", tier="small", no_wait=True))
    assert small.lease is not None  # other tiers are not affected
    waiting = controller.submit(AdmissionRequest(tenant_id="third", tier="large"))
    assert waiting.waiting
    controller.release(a.lease.lease_id)
    assert waiting.lease is not None
    queued = controller.submit(AdmissionRequest(tenant_id="fourth", tier="large"))
    controller.set_tier_capacity("large", max_in_flight=3)
    assert queued.lease is not None
    controller.release(b.lease.lease_id)


def test_a_full_tier_does_not_hold_up_the_tenants_other_tiers(controller):
    controller.set_tier_capacity("large", max_in_flight=1)
    controller.submit(AdmissionRequest(tenant_id="acme", tier="large"))
    stuck = controller.submit(AdmissionRequest(tenant_id="acme", tier="large"))
    free = controller.submit(AdmissionRequest(tenant_id="acme", tier="small"))
    assert stuck.waiting and free.lease is not None


def test_tier_token_ceiling(controller):
    controller.set_tier_capacity("large", max_in_flight=None, max_tokens_in_flight=800)
    with pytest.raises(ResourceExhausted) as never:
        controller.submit(AdmissionRequest(tenant_id="acme", tier="large", prompt_tokens=801))
    assert never.value.reason == "CAPACITY_EXHAUSTED" and never.value.retry_after is None
    first = controller.submit(AdmissionRequest(tenant_id="acme", tier="large", prompt_tokens=500))
    second = controller.submit(AdmissionRequest(tenant_id="other", tier="large", prompt_tokens=500))
    assert first.lease is not None and second.waiting
    controller.release(first.lease.lease_id, actual_tokens=500)
    assert second.lease is not None


def test_tier_capacity_validation(controller):
    with pytest.raises(InvalidArgument) as invalid:
        controller.set_tier_capacity("large", max_in_flight=-1)
    assert [v.field for v in invalid.value.field_violations] == ["max_in_flight"]


# ---- policies at run time -------------------------------------------------------------


def test_policy_changes_apply_at_once_and_keep_the_bucket_level(controller, clock):
    for _ in range(3):
        controller.release(controller.submit(AdmissionRequest(tenant_id="acme")).lease.lease_id)
    assert controller.quota("acme").available_requests == pytest.approx(1)
    waiting = [controller.submit(AdmissionRequest(tenant_id="acme")) for _ in range(2)]
    assert waiting[0].lease is not None and waiting[1].waiting
    faster = PolicyLimits(**{**_fields(POLICY), "requests_per_second": 20, "request_burst": 50})
    controller.set_policy("acme", faster)
    assert waiting[1].waiting  # no free burst on a policy change
    assert controller.quota("acme").available_requests == pytest.approx(0)
    clock.advance(0.05)
    controller.pump()
    assert waiting[1].lease is not None
    assert controller.delete_policy("acme")
    assert not controller.delete_policy("acme")
    assert controller.get_policy("acme") == (DEFAULT_POLICY, True)
    assert controller.quota("acme").policy == DEFAULT_POLICY


def test_set_default_policy_applies_to_tenants_without_their_own(controller, clock):
    controller.submit(AdmissionRequest(tenant_id="newcomer"))
    tight = PolicyLimits(**{**_fields(DEFAULT_POLICY), "max_in_flight": 1})
    controller.set_default_policy(tight)
    with pytest.raises(ResourceExhausted):
        controller.submit(AdmissionRequest(tenant_id="newcomer", no_wait=True))
    assert controller.get_policy("acme") == (POLICY, False)


def test_idle_tenants_are_forgotten_without_changing_anything(controller, clock):
    for tenant_id in ("passing", "acme"):
        controller.release(controller.submit(AdmissionRequest(tenant_id=tenant_id)).lease.lease_id)
    assert controller.collect_idle() == 0  # its buckets are not full yet
    clock.advance(60)
    assert controller.collect_idle() == 2
    assert controller.get_policy("acme") == (POLICY, False)
    assert controller.quota("acme").available_requests == POLICY.request_burst


def _fields(policy: PolicyLimits) -> dict[str, object]:
    return {name: getattr(policy, name) for name in policy.__dataclass_fields__}


# ---- asyncio --------------------------------------------------------------------------


def test_the_controller_tells_of_changes_that_may_grant_or_refuse_early(controller):
    changes = []
    controller.on_change(lambda: changes.append(controller.waiting()))
    fill_requests(controller, 3)
    assert changes == []  # admitted at once: nothing for the dispatcher to do
    waiting = controller.submit(AdmissionRequest(tenant_id="acme"))
    assert changes == [1]
    controller.set_tier_capacity("small", max_in_flight=1)
    assert changes == [1, 1]
    controller.close()
    controller.close()
    assert changes == [1, 1, 0] and controller.closed
    assert waiting.state is TicketState.REFUSED and waiting.error.reason == "SHUTTING_DOWN"


async def test_admit_waits_and_is_admitted_when_a_slot_frees(controller, dispatcher, clock):
    running = fill_requests(controller, 3)
    task = asyncio.create_task(dispatcher.admit(AdmissionRequest(tenant_id="acme")))
    await asyncio.sleep(0)
    assert not task.done()
    clock.advance(0.25)
    controller.release(running[0].lease.lease_id)
    admission = await asyncio.wait_for(task, 1)
    assert admission.queue_wait == timedelta(seconds=0.25)
    assert admission.initial_queue_position == 0


async def test_cancelling_admit_leaves_the_queue_at_once(controller, dispatcher):
    running = fill_requests(controller, 3)
    task = asyncio.create_task(dispatcher.admit(AdmissionRequest(tenant_id="acme")))
    await asyncio.sleep(0)
    assert controller.queue_depth()[Priority.INTERACTIVE] == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert controller.queue_depth()[Priority.INTERACTIVE] == 0
    controller.release(running[0].lease.lease_id)
    assert controller.quota("acme").in_flight == 2


async def test_wait_with_a_timeout_keeps_the_place(controller, dispatcher):
    running = fill_requests(controller, 3)
    ticket = controller.submit(AdmissionRequest(tenant_id="acme"))
    assert await dispatcher.wait(ticket, timeout=0.01) is None
    assert ticket.waiting and controller.queue_position(ticket).position == 0
    controller.release(running[0].lease.lease_id)
    admission = await dispatcher.wait(ticket, timeout=1)
    assert admission is not None and admission.lease is ticket.lease


async def test_a_waiter_out_of_time_raises_from_admit(controller, dispatcher, clock):
    fill_requests(controller, 3)
    task = asyncio.create_task(
        dispatcher.admit(AdmissionRequest(tenant_id="acme", max_wait=timedelta(seconds=2)))
    )
    await asyncio.sleep(0)
    clock.advance(2)
    controller.pump()
    with pytest.raises(ResourceExhausted) as refused:
        await asyncio.wait_for(task, 1)
    assert "after waiting 2.000 s" in refused.value.message


async def test_the_dispatcher_admits_waiters_as_tokens_arrive():
    fast = PolicyLimits(
        requests_per_second=100, request_burst=1, tokens_per_minute=60_000, token_burst=1_000,
        max_in_flight=10,
    )  # fmt: skip
    controller = AdmissionController(clock=MonotonicClock(), default_policy=fast)
    async with Dispatcher(controller) as dispatcher:
        admissions = await asyncio.wait_for(
            asyncio.gather(*(dispatcher.admit(AdmissionRequest(tenant_id="t")) for _ in range(5))),
            5,
        )
    assert len({a.lease.lease_id for a in admissions}) == 5
    assert admissions[-1].queue_wait >= timedelta(milliseconds=30)


async def test_shutdown_refuses_waiters_and_new_requests(controller, dispatcher):
    fill_requests(controller, 3)
    task = asyncio.create_task(dispatcher.admit(AdmissionRequest(tenant_id="acme")))
    await asyncio.sleep(0)
    await dispatcher.shutdown()
    await dispatcher.shutdown()
    with pytest.raises(Unavailable) as refused:
        await task
    assert refused.value.reason == "SHUTTING_DOWN"
    with pytest.raises(Unavailable):
        controller.submit(AdmissionRequest(tenant_id="acme"))


def test_quota_of_a_user_without_a_policy_shows_what_binds_them(controller):
    controller.submit(AdmissionRequest(tenant_id="acme", user_id="ann"))
    quota = controller.quota("acme", "ann")
    assert quota.policy is None and quota.is_default
    assert quota.in_flight == 1 and quota.available_requests == pytest.approx(3)


def test_a_zero_max_wait_never_queues(controller):
    fill_requests(controller, 3)
    with pytest.raises(ResourceExhausted):
        controller.submit(AdmissionRequest(tenant_id="acme", max_wait=timedelta(0)))
    assert controller.queue_depth()[Priority.INTERACTIVE] == 0
