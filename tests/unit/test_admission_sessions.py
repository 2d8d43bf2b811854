"""AdmitSession's server side: many attempts over one stream, replies tagged by request id."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import timedelta

import grpc
import pytest
from switchboard.admission.v1 import admission_pb2 as pb

from services.admission import (
    AdmissionController,
    AdmissionRequest,
    Dispatcher,
    FakeClock,
    PolicyLimits,
)
from services.admission.sessions import KEEP_GRANTED, AdmitSession, serve_session
from services.runtime import Unavailable
from tests.polling import eventually

POLICY = PolicyLimits(
    requests_per_second=100,
    request_burst=100,
    tokens_per_minute=60_000,
    token_burst=10_000,
    max_in_flight=1,
    max_queued=5,
)


@pytest.fixture
def controller() -> AdmissionController:
    controller = AdmissionController(clock=FakeClock(), lease_ttl=timedelta(seconds=600))
    controller.set_policy("acme", POLICY)
    return controller


@pytest.fixture
def replies() -> list[pb.AdmitSessionResponse]:
    return []


@pytest.fixture
def session(controller, replies) -> AdmitSession:
    return AdmitSession(
        Dispatcher(controller),
        tenant_id="acme",
        request_of=_admission_of,
        submit=controller.submit,
        reply=replies.append,
        admitted=lambda admission: pb.AdmitResponse(
            lease=pb.Lease(lease_id=admission.lease.lease_id)
        ),
    )


def _admission_of(frame: pb.AdmitSessionRequest) -> AdmissionRequest:
    request = frame.reserve.shape if frame.HasField("reserve") else frame.request
    return AdmissionRequest(
        tenant_id="acme",
        request_id=request.context.request_id,
        prompt_tokens=request.estimated_prompt_tokens,
    )


def _request(request_id: str, prompt_tokens: int = 10) -> pb.AdmitSessionRequest:
    request = pb.AdmitRequest(estimated_prompt_tokens=prompt_tokens)
    request.context.request_id = request_id
    return pb.AdmitSessionRequest(request=request)


def _events(replies) -> list[tuple[str, str]]:
    return [(r.request_id, r.WhichOneof("event")) for r in replies]


async def test_a_request_admitted_at_once_is_answered_at_once(session, replies):
    session.submit(_request("a"))
    assert _events(replies) == [("a", "admitted")]  # no task, no wait
    assert session.waiting == 0


async def test_a_waiting_request_gets_its_position_then_its_admission(session, replies, controller):
    session.submit(_request("a"))
    session.submit(_request("b"))
    await asyncio.sleep(0)
    assert _events(replies) == [("a", "admitted"), ("b", "queued")]
    assert replies[1].queued.position == 0 and session.waiting == 1
    controller.release(replies[0].admitted.lease.lease_id)
    controller.pump()
    await asyncio.wait_for(session.drain(), 5)
    assert _events(replies)[-1] == ("b", "admitted")
    assert session.waiting == 0


async def test_a_refusal_ends_that_request_only(session, replies, controller):
    session.submit(_request(""))  # no id: nothing to tag its replies with
    session.submit(_request("a"))
    session.submit(_request("a"))  # the id is in use (its lease is held)
    assert _events(replies) == [("", "refused"), ("a", "admitted"), ("a", "refused")]
    for refused in (replies[0], replies[2]):
        assert refused.refused.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    session.submit(_request("b", prompt_tokens=-1))  # refused by the request value itself
    assert _events(replies)[-1] == ("b", "refused")
    assert controller.quota("acme").in_flight == 1


async def test_closing_the_session_takes_its_waiting_requests_out_of_the_queue(
    session, replies, controller
):
    session.submit(_request("a"))
    session.submit(_request("b"))
    session.submit(_request("c"))
    await asyncio.sleep(0)
    assert sum(controller.quota("acme").queued.values()) == 2
    await session.close()
    assert sum(controller.quota("acme").queued.values()) == 0
    assert session.waiting == 0
    controller.release(replies[0].admitted.lease.lease_id)
    controller.pump()
    assert controller.quota("acme").in_flight == 0  # nobody admitted after the close


def _serve(controller, requests, tenant: str = "acme", *, tier: str = "", dispatcher=None):
    """Serves `requests`: a list (the caller half-closes after it), or a queue (the
    stream stays open)."""

    async def frames():
        if isinstance(requests, list):
            for request in requests:
                yield request
            return
        while True:
            yield await requests.get()

    def request_of(frame: pb.AdmitSessionRequest) -> AdmissionRequest:
        request = frame.reserve.shape if frame.HasField("reserve") else frame.request
        return AdmissionRequest(tenant_id=tenant, request_id=request.context.request_id, tier=tier)

    return serve_session(
        dispatcher or Dispatcher(controller),
        frames(),
        tenant_id=tenant,
        request_of=request_of,
        submit=controller.submit,
        admitted=lambda admission: pb.AdmitResponse(
            lease=pb.Lease(lease_id=admission.lease.lease_id)
        ),
    )


async def test_after_the_half_close_the_stream_ends_once_every_request_has_its_outcome(
    controller,
):
    replies = _serve(controller, [_request("a"), _request("b")])
    first = await anext(replies)
    assert (first.request_id, first.WhichOneof("event")) == ("a", "admitted")
    assert (await anext(replies)).WhichOneof("event") == "queued"  # b waits for a's slot
    controller.release(first.admitted.lease.lease_id)
    controller.pump()
    rest = [reply async for reply in replies]  # ends by itself
    assert _events(rest) == [("b", "admitted")]


async def test_a_stream_closed_early_leaves_no_lease_held_nor_request_queued(controller):
    replies = _serve(controller, [_request("a"), _request("b")])
    first = await anext(replies)  # a admitted and sent; b queued, not yet sent
    await asyncio.sleep(0)
    tokens = controller.quota("acme").available_tokens
    await replies.aclose()  # the client went away, and its calls with it
    quota = controller.quota("acme")
    assert quota.in_flight == 0 and sum(quota.queued.values()) == 0
    assert quota.available_tokens == tokens  # a's charge is kept, as at expiry
    assert controller.leases_reclaimed == 1
    assert controller.release(first.admitted.lease.lease_id, actual_tokens=0) == (False, 0)


async def test_the_leases_a_stream_handed_out_are_freed_when_it_is_cancelled(controller):
    """Eleven admissions and a claim of the slice, each released elsewhere (the tenant
    moved to another replica): the stream's end frees them all, as the tier needs."""
    controller.set_policy("roomy", dataclasses.replace(POLICY, max_in_flight=64))
    controller.set_tier_capacity("small", max_in_flight=12)
    frames: asyncio.Queue[pb.AdmitSessionRequest] = asyncio.Queue()
    reserve = pb.AdmitSessionRequest(reserve=pb.SliceRequest(count=1))
    reserve.reserve.shape.context.request_id = "slice"
    frames.put_nowait(reserve)
    for number in range(11):
        frames.put_nowait(_request(f"r{number}"))
    replies = _serve(controller, frames, "roomy", tier="small")
    [granted] = (await anext(replies)).slice.admissions
    admitted = [await anext(replies) for _ in range(11)]
    assert all(r.WhichOneof("event") == "admitted" for r in admitted)
    frames.put_nowait(pb.AdmitSessionRequest(claim=granted.lease.lease_id))
    await eventually(lambda: controller.unclaimed() == 0, what="the claim handled")
    assert controller.in_flight() == 12  # the tier is full
    waiting = controller.submit(AdmissionRequest(tenant_id="roomy", tier="small", request_id="w"))
    assert waiting.waiting
    await replies.aclose()  # the caller let go of the stream: it holds none of them
    assert controller.leases_reclaimed == 12
    assert waiting.lease is not None  # admitted as soon as the tier had room
    assert controller.in_flight() == 1


async def test_a_long_lived_stream_keeps_about_as_many_lease_ids_as_are_held(
    session, replies, controller
):
    roomy = dataclasses.replace(POLICY, max_in_flight=4, request_burst=10_000, token_burst=100_000)
    controller.set_policy("acme", roomy)
    held: list[str] = []
    for number in range(3 * KEEP_GRANTED):
        session.submit(_request(f"r{number}"))
        assert _events(replies[-1:]) == [(f"r{number}", "admitted")]
        held.append(replies[-1].admitted.lease.lease_id)
        if len(held) > 3:
            controller.release(held.pop(0))  # released by the caller, by lease id
    assert session.handed_out <= KEEP_GRANTED
    assert session.reclaim() == 3  # the three still held
    assert controller.in_flight() == 0


async def test_after_a_half_close_the_leases_sent_stay_the_callers(controller):
    replies = _serve(controller, [_request("a")])
    [first] = [reply async for reply in replies]  # the caller half-closed; it ended
    assert controller.quota("acme").in_flight == 1 and controller.leases_reclaimed == 0
    assert controller.release(first.admitted.lease.lease_id) == (True, 0)


async def test_admissions_decided_but_never_sent_are_released(controller):
    controller.set_policy("roomy", dataclasses.replace(POLICY, max_in_flight=5))
    replies = _serve(controller, [_request("a"), _request("b"), _request("c")], "roomy")
    first = await anext(replies)  # all three admitted at once; only a was sent
    await asyncio.sleep(0)
    assert controller.quota("roomy").in_flight == 3
    await replies.aclose()  # the client went away before b and c were written
    quota = controller.quota("roomy")
    assert quota.in_flight == 0  # b and c released, a reclaimed
    assert controller.leases_reclaimed == 1
    assert controller.release(first.admitted.lease.lease_id) == (False, 0)


async def test_a_replica_that_starts_draining_ends_its_streams(controller):
    dispatcher = Dispatcher(controller)
    frames: asyncio.Queue[pb.AdmitSessionRequest] = asyncio.Queue()
    frames.put_nowait(_request("a"))
    frames.put_nowait(_request("b"))  # waits for a's slot
    replies = _serve(controller, frames, dispatcher=dispatcher)
    assert _events([await anext(replies), await anext(replies)]) == [
        ("a", "admitted"),
        ("b", "queued"),
    ]
    dispatcher.drain()
    with pytest.raises(Unavailable) as ended:
        await anext(replies)
    assert ended.value.reason == "SHUTTING_DOWN"
    quota = controller.quota("acme")
    assert quota.in_flight == 0 and sum(quota.queued.values()) == 0  # b left, a freed
    later = _serve(controller, asyncio.Queue(), dispatcher=dispatcher)
    with pytest.raises(Unavailable):  # a stream opened while draining ends at once
        await anext(later)
