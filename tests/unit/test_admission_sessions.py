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
from services.admission.sessions import AdmitSession, serve_session

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


def _serve(controller, requests, tenant: str = "acme"):
    async def frames():
        for request in requests:
            yield request

    return serve_session(
        Dispatcher(controller),
        frames(),
        tenant_id=tenant,
        request_of=lambda frame: AdmissionRequest(
            tenant_id=tenant, request_id=frame.request.context.request_id
        ),
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
    await replies.aclose()  # the client went away
    quota = controller.quota("acme")
    assert quota.in_flight == 1 and sum(quota.queued.values()) == 0  # only a's lease
    controller.release(first.admitted.lease.lease_id)
    assert controller.quota("acme").in_flight == 0


async def test_admissions_decided_but_never_sent_are_released(controller):
    controller.set_policy("roomy", dataclasses.replace(POLICY, max_in_flight=5))
    replies = _serve(controller, [_request("a"), _request("b"), _request("c")], "roomy")
    first = await anext(replies)  # all three admitted at once; only a was sent
    await asyncio.sleep(0)
    assert controller.quota("roomy").in_flight == 3
    await replies.aclose()  # the client went away before b and c were written
    assert controller.quota("roomy").in_flight == 1  # a's lease is the client's
    controller.release(first.admitted.lease.lease_id)
    assert controller.quota("roomy").in_flight == 0
