"""Delegated quota: slices granted by the controller, carried by AdmitSession, kept by
the inference replicas' pools; and the bound on what they can over-admit."""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace
from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from switchboard.admission.v1 import admission_pb2 as pb

from services.admission import (
    AdmissionController,
    AdmissionRequest,
    Dispatcher,
    FakeClock,
    PolicyLimits,
)
from services.admission.sessions import AdmitSession
from services.inference.slices import Slices
from services.runtime import ResourceExhausted
from tests.unit.test_admission_sessions import _admission_of

POLICY = PolicyLimits(
    requests_per_second=10,
    request_burst=20,
    tokens_per_minute=600_000,
    token_burst=100_000,
    max_in_flight=6,
    max_queued=50,
)
SHAPE = AdmissionRequest(tenant_id="acme", prompt_tokens=64, completion_tokens=64)


def _controller(clock: FakeClock | None = None) -> AdmissionController:
    controller = AdmissionController(
        clock=clock or FakeClock(), lease_ttl=timedelta(seconds=600), warmup=None
    )
    controller.set_policy("acme", POLICY)
    return controller


# ---- the controller --------------------------------------------------------------------


def test_a_slice_is_charged_and_holds_slots_but_counts_as_admitted_only_when_claimed():
    controller = _controller()
    tickets = controller.reserve(SHAPE, 4)
    assert len(tickets) == 3 and controller.unclaimed() == 3  # half the free slots
    assert controller.quota("acme").in_flight == 0  # nothing runs on them yet
    assert len(controller.reserve(SHAPE, 16)) == 1  # half the 3 left: their slots are held
    assert controller.stats == {} or all(c.admitted == 0 for c in controller.stats.values())
    assert controller.claim("acme", tickets[0].lease.lease_id)
    assert controller.quota("acme").in_flight == 1 and controller.in_flight() == 1
    assert not controller.claim("acme", tickets[0].lease.lease_id)  # once
    assert not controller.claim("other", tickets[1].lease.lease_id)  # another tenant's
    (counters,) = controller.stats.values()
    assert counters.admitted == 1 and controller.unclaimed() == 3


def test_a_slice_takes_at_most_half_the_free_slots_and_leaves_the_last_one():
    controller = _controller()
    sizes = [len(controller.reserve(SHAPE, 16)) for _ in range(4)]
    assert sizes == [3, 1, 1, 0]  # of 6 free, then 3, 2, 1
    assert controller.submit(replace(SHAPE, no_wait=True)).lease is not None  # the last
    assert controller.reserve(SHAPE, 1) == []


def test_no_slice_while_anything_waits_and_waiting_recalls():
    controller = _controller()
    reserved = controller.reserve(SHAPE, 16)
    held = [controller.submit(SHAPE) for _ in range(POLICY.max_in_flight - len(reserved))]
    assert all(ticket.lease is not None for ticket in held)  # every slot is taken
    recalls = []
    stop = controller.on_wait(lambda tenant, tier: recalls.append((tenant, tier)))
    waiting = controller.submit(AdmissionRequest(tenant_id="acme", max_wait=timedelta(seconds=9)))
    assert waiting.waiting and recalls == [("acme", "")]
    assert controller.reserve(SHAPE, 1) == []  # something waits
    assert controller.give_back("acme", reserved[0].lease.lease_id)
    controller.pump()
    assert not waiting.waiting and waiting.lease is not None  # its slot came back
    stop()
    assert held


def test_a_request_refused_at_once_for_want_of_a_slot_recalls_too():
    controller = _controller()
    reserved = controller.reserve(SHAPE, POLICY.max_in_flight)
    for _ in range(POLICY.max_in_flight - len(reserved)):
        controller.submit(SHAPE)
    recalls = []
    controller.on_wait(lambda tenant, tier: recalls.append((tenant, tier)))
    with pytest.raises(ResourceExhausted):
        controller.submit(replace(SHAPE, no_wait=True))
    assert recalls == [("acme", "")]


def test_giving_back_returns_the_tokens_and_releasing_unclaimed_as_used_counts_it():
    controller = _controller()
    before = controller.quota("acme")
    first, second = controller.reserve(SHAPE, 2)
    assert controller.quota("acme").available_tokens == before.available_tokens - 2 * 128
    assert controller.give_back("acme", first.lease.lease_id)
    assert not controller.give_back("acme", first.lease.lease_id)
    after = controller.quota("acme")
    assert after.available_tokens == before.available_tokens - 128
    assert after.available_requests == before.available_requests - 1  # the one still held
    # a claim that had not arrived when its request was released: it ran all the same
    assert controller.release(second.lease.lease_id, actual_tokens=50)[0]
    (counters,) = controller.stats.values()
    assert counters.admitted == 1 and controller.unclaimed() == 0
    assert controller.quota("acme").in_flight == 0


def test_an_unclaimed_lease_that_expires_leaves_the_slice():
    clock = FakeClock()
    controller = AdmissionController(clock=clock, lease_ttl=timedelta(seconds=5), warmup=None)
    controller.set_policy("acme", POLICY)
    controller.reserve(SHAPE, 3)
    clock.advance(6)
    controller.pump()
    assert controller.unclaimed() == 0 and controller.quota("acme").in_flight == 0


# ---- the over-admission bound ------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_slices_never_admit_more_than_the_policy_plus_claims_lost_with_their_stream(seed):
    """Three replicas keep slices of one tenant's quota while requests arrive, finish,
    and streams break at random moments (a claim in flight when its stream breaks is
    lost: the owner gives that lease back while its request runs).

    Bound: at every moment, requests running <= max_in_flight + lost claims still
    running; requests started by time t <= burst + rate * t + lost claims. Without a
    broken stream, the policy holds exactly.
    """
    rng = random.Random(seed)
    clock = FakeClock()
    controller = _controller(clock)
    streams: dict[int, AdmitSessionModel] = {r: AdmitSessionModel(controller) for r in range(3)}
    running: list[tuple[str, bool]] = []  # (lease id, its claim was lost)
    started = lost = 0
    for _ in range(200):
        clock.advance(rng.choice((0.0, 0.01, 0.05, 0.2)))
        controller.pump()
        replica = rng.randrange(3)
        stream = streams[replica]
        action = rng.random()
        if action < 0.45:  # a request arrives at `replica`
            lease_id = stream.take()
            if lease_id is None:
                try:  # admitted by a round trip (a refusal: the request is turned away)
                    ticket = controller.submit(replace(SHAPE, no_wait=True))
                except ResourceExhausted:
                    continue
                running.append((ticket.lease.lease_id, False))
            else:
                claimed_in_time = rng.random() > 0.1
                if claimed_in_time:
                    controller.claim("acme", lease_id)
                    stream.unclaimed.discard(lease_id)
                running.append((lease_id, False))
                if not claimed_in_time:
                    stream.pending_claim.add(lease_id)
            started += 1
            stream.top_up(rng.randint(1, 4))
        elif action < 0.8 and running:  # a request finishes
            lease_id, _ = running.pop(rng.randrange(len(running)))
            controller.release(lease_id, actual_tokens=rng.randint(1, 128))
        elif action < 0.9:  # the stream breaks: unclaimed leases go back, pending claims too
            for lease_id in stream.unclaimed:
                controller.give_back("acme", lease_id)
            for i, (lease_id, _) in enumerate(running):
                if lease_id in stream.pending_claim:
                    running[i] = (lease_id, True)
                    lost += 1
            streams[replica] = AdmitSessionModel(controller)
        else:  # the claims in flight arrive
            for lease_id in stream.pending_claim:
                controller.claim("acme", lease_id)
                stream.unclaimed.discard(lease_id)
            stream.pending_claim.clear()
        lost_running = sum(1 for _, was_lost in running if was_lost)
        assert len(running) <= POLICY.max_in_flight + lost_running
        allowance = POLICY.request_burst + POLICY.requests_per_second * clock.now()
        assert started <= allowance + lost


class AdmitSessionModel:
    """A replica's pool over one stream, reduced to what the bound depends on."""

    def __init__(self, controller: AdmissionController) -> None:
        self.controller = controller
        self.unclaimed: set[str] = set()
        self.pool: list[str] = []
        self.pending_claim: set[str] = set()

    def take(self) -> str | None:
        return self.pool.pop() if self.pool else None

    def top_up(self, count: int) -> None:
        tickets = self.controller.reserve(SHAPE, count)
        ids = [t.lease.lease_id for t in tickets]
        self.unclaimed.update(ids)
        self.pool += ids


# ---- the stream ---------------------------------------------------------------------------


def _session(controller: AdmissionController, replies: list) -> AdmitSession:
    return AdmitSession(
        Dispatcher(controller),
        tenant_id="acme",
        request_of=lambda frame: replace(_admission_of(frame), max_wait=timedelta(seconds=9)),
        submit=controller.submit,
        reply=replies.append,
        admitted=lambda admission: pb.AdmitResponse(
            lease=pb.Lease(
                lease_id=admission.lease.lease_id, charged_tokens=admission.lease.charged_tokens
            )
        ),
    )


def _reserve(request_id: str, count: int) -> pb.AdmitSessionRequest:
    shape = pb.AdmitRequest(estimated_prompt_tokens=64)
    shape.context.request_id = request_id
    return pb.AdmitSessionRequest(reserve=pb.SliceRequest(shape=shape, count=count))


async def test_a_stream_reserves_claims_and_gives_back():
    controller, replies = _controller(), []
    session = _session(controller, replies)
    session.submit(_reserve("r1", 3))
    (reply,) = replies
    assert reply.request_id == "r1" and len(reply.slice.admissions) == 3
    ids = [a.lease.lease_id for a in reply.slice.admissions]
    session.submit(pb.AdmitSessionRequest(claim=ids[0]))
    session.submit(pb.AdmitSessionRequest(give_back=pb.SliceReturn(lease_ids=[ids[1]])))
    assert session.unclaimed == 1 and controller.unclaimed() == 1
    assert controller.quota("acme").in_flight == 1  # the claimed one runs
    await session.close()  # the unclaimed one goes back; the claimed one stays held
    assert controller.unclaimed() == 0 and controller.quota("acme").in_flight == 1
    assert len(controller.reserve(SHAPE, 16)) == (POLICY.max_in_flight - 1) // 2


async def test_a_request_starting_to_wait_recalls_the_slice_once():
    controller, replies = _controller(), []
    session = _session(controller, replies)
    session.submit(_reserve("r1", POLICY.max_in_flight))  # half the slots
    for request_id in "abcd":  # three take the rest; the fourth has to wait
        request = pb.AdmitRequest()
        request.context.request_id = request_id
        session.submit(pb.AdmitSessionRequest(request=request))
    await asyncio.sleep(0)
    events = [r.WhichOneof("event") for r in replies]
    assert events == ["slice", "admitted", "admitted", "admitted", "recall", "queued"]
    session.submit(_reserve("r2", 1))  # nothing is granted while it waits
    assert len(replies[-1].slice.admissions) == 0
    ids = [a.lease.lease_id for a in replies[0].slice.admissions]
    session.submit(pb.AdmitSessionRequest(give_back=pb.SliceReturn(lease_ids=ids[:16])))
    await asyncio.wait_for(session.drain(), 5)
    assert replies[-1].WhichOneof("event") == "admitted"
    assert [r.WhichOneof("event") for r in replies].count("recall") == 1
    await session.close()


# ---- the replica's pools ------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_pool_asks_when_half_empty_and_hands_out_leases_that_fit():
    clock, alive = _Clock(), {"s": True}
    slices = Slices(size=4, alive=lambda s: alive[s], clock=clock)
    key = ("acme", "small", 1)
    assert slices.take(key, 10) is None
    assert slices.wanted(key) == 4 and slices.wanted(key) == 0  # one ask at a time
    slices.granted(key, [("a", 128), ("b", 128), ("c", 512)], "s")
    assert slices.take(key, 300).lease_id == "c"  # the one whose charge covers it
    assert slices.take(key, 100).lease_id == "a"
    assert slices.wanted(key) == 3  # half empty (1 of 4)
    slices.granted(key, [], "s")  # none granted: quiet for a while
    assert slices.wanted(key) == 0
    clock.now += 1.5
    assert slices.wanted(key) == 3
    alive["s"] = False
    assert slices.take(key, 10) is None  # its stream ended: its leases are gone


def test_a_recall_or_idleness_returns_the_leases():
    clock = _Clock()
    slices = Slices(size=4, idle_s=2.0, alive=lambda s: True, clock=clock)
    small, large = ("acme", "small", 1), ("acme", "large", 1)
    for key in (small, large):
        slices.wanted(key)
    slices.granted(small, [("a", 128), ("b", 128)], "s1")
    slices.granted(large, [("c", 128)], "s2")
    assert sorted(slices.recall("s1")) == ["a", "b"] and len(slices) == 1
    assert slices.wanted(small) == 0  # recalled: quiet for a while
    clock.now += 2.5
    assert [lease.lease_id for lease in slices.idle()] == ["c"] and len(slices) == 0


def test_only_competing_waiters_stop_and_recall_slices():
    controller = _controller()
    controller.set_policy("slow", replace(POLICY, requests_per_second=0.1, request_burst=1))
    controller.set_tier_capacity("small", max_in_flight=2)
    controller.submit(AdmissionRequest(tenant_id="slow"))
    later = controller.submit(AdmissionRequest(tenant_id="slow", max_wait=timedelta(seconds=60)))
    assert later.waiting  # another tenant, waiting on its own rate
    recalls = []
    session_replies: list = []
    session = _session(controller, session_replies)
    session.submit(_reserve("r1", 2))  # acme, no tier: not held back by "slow"
    assert len(session_replies[-1].slice.admissions) == 2
    controller.on_wait(lambda tenant, tier: recalls.append((tenant, tier)))
    controller.submit(AdmissionRequest(tenant_id="slow", max_wait=timedelta(seconds=60)))
    assert [r.WhichOneof("event") for r in session_replies] == ["slice"]  # no recall
    small = replace(SHAPE, tier="small")
    assert len(controller.reserve(small, 3)) == 1  # half the tier's ceiling
    assert controller.submit(small).lease is not None  # the tier is full
    blocked = controller.submit(
        AdmissionRequest(tenant_id="slow", tier="small", max_wait=timedelta(seconds=60))
    )
    assert blocked.waiting and recalls[-1] == ("slow", "small")
    assert controller.reserve(small, 1) == []  # a waiter on the tier: no slice of it
