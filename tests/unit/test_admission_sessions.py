"""AdmitSession's server side: many attempts over one stream, replies tagged by request id,
and releases over the same stream."""

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
from services.runtime import NotFound, error_details

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


def releaser(controller: AdmissionController, tenant: str = "acme"):
    """The servicer's part of a release frame, on `controller` (without its checks)."""

    def release(frame: pb.AdmitSessionRequest) -> None:
        if frame.release.lease_id:
            controller.release(frame.release.lease_id, actual_tokens=0, tenant_id=tenant)
        else:
            controller.release_attempt(tenant, frame.release.request_id, actual_tokens=0)

    return release


@pytest.fixture
def session(controller, replies) -> AdmitSession:
    return AdmitSession(
        Dispatcher(controller),
        request_of=lambda frame: AdmissionRequest(
            tenant_id="acme",
            request_id=frame.request.context.request_id,
            prompt_tokens=frame.request.estimated_prompt_tokens,
        ),
        submit=controller.submit,
        release=releaser(controller),
        reply=replies.append,
        admitted=lambda admission: pb.AdmitResponse(
            lease=pb.Lease(lease_id=admission.lease.lease_id)
        ),
    )


def _request(request_id: str, prompt_tokens: int = 10) -> pb.AdmitSessionRequest:
    request = pb.AdmitRequest(estimated_prompt_tokens=prompt_tokens)
    request.context.request_id = request_id
    return pb.AdmitSessionRequest(request=request)


def _release(lease_id: str = "", request_id: str = "") -> pb.AdmitSessionRequest:
    return pb.AdmitSessionRequest(
        release=pb.ReleaseRequest(lease_id=lease_id, request_id=request_id)
    )


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
        request_of=lambda frame: AdmissionRequest(
            tenant_id=tenant, request_id=frame.request.context.request_id
        ),
        submit=controller.submit,
        release=releaser(controller, tenant),
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


# ---- releases over the stream --------------------------------------------------------


async def test_a_release_frame_frees_the_slot_and_is_not_answered(session, replies, controller):
    for n in range(3):  # max_in_flight 1: each admission needs the previous one released
        session.handle(_request(f"r{n}"))
        assert _events(replies) == [(f"r{n}", "admitted")]
        session.handle(_release(lease_id=replies.pop().admitted.lease.lease_id))
        assert replies == [] and controller.quota("acme").in_flight == 0


async def test_a_release_by_request_id_ends_a_request_waiting_on_the_stream(
    session, replies, controller
):
    session.handle(_request("a"))
    session.handle(_request("b"))
    await asyncio.sleep(0)
    session.handle(_release(request_id="b"))
    await asyncio.wait_for(session.drain(), 5)
    assert _events(replies) == [("a", "admitted"), ("b", "queued"), ("b", "refused")]
    assert replies[-1].refused.code == grpc.StatusCode.CANCELLED.value[0]
    assert sum(controller.quota("acme").queued.values()) == 0


async def test_a_failed_release_is_answered_with_the_status_release_would_fail_with(
    controller, replies
):
    def release(frame: pb.AdmitSessionRequest) -> None:
        raise NotFound("no such lease", reason="LEASE_NOT_FOUND")

    session = AdmitSession(
        Dispatcher(controller),
        request_of=lambda frame: AdmissionRequest(tenant_id="acme"),
        submit=controller.submit,
        release=release,
        reply=replies.append,
        admitted=lambda admission: pb.AdmitResponse(),
    )
    session.handle(_release(request_id="gone"))
    session.handle(_release(lease_id="made-up"))
    assert _events(replies) == [("gone", "refused"), ("", "refused")]
    assert {r.refused.code for r in replies} == {grpc.StatusCode.NOT_FOUND.value[0]}


@pytest.mark.parametrize(
    "frame",
    [
        pb.AdmitSessionRequest(),
        pb.AdmitSessionRequest(
            request=_request("both").request, release=pb.ReleaseRequest(lease_id="x")
        ),
    ],
    ids=["neither", "both"],
)
async def test_a_frame_needs_exactly_one_of_request_and_release(
    session, replies, controller, frame
):
    session.handle(frame)
    [refused] = replies
    assert refused.refused.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "request and release" in refused.refused.message
    assert controller.quota("acme").in_flight == 0


async def test_releases_sent_before_the_half_close_are_applied_before_the_stream_ends(
    controller,
):
    frames: asyncio.Queue[pb.AdmitSessionRequest | None] = asyncio.Queue()

    async def stream():
        while (frame := await frames.get()) is not None:
            yield frame

    replies = serve_session(
        Dispatcher(controller),
        stream(),
        request_of=lambda frame: AdmissionRequest(
            tenant_id="acme", request_id=frame.request.context.request_id
        ),
        submit=controller.submit,
        release=releaser(controller),
        admitted=lambda admission: pb.AdmitResponse(
            lease=pb.Lease(lease_id=admission.lease.lease_id)
        ),
    )
    frames.put_nowait(_request("a"))
    admitted = await anext(replies)
    frames.put_nowait(_release(lease_id=admitted.admitted.lease.lease_id))
    frames.put_nowait(None)  # the half-close
    assert [reply async for reply in replies] == []
    assert controller.quota("acme").in_flight == 0


async def test_a_draining_replica_refuses_new_requests_and_still_takes_releases(controller):
    """What `AdmissionService.drain` does to the streams open to the replica."""
    dispatcher = Dispatcher(controller)
    replies: list[pb.AdmitSessionResponse] = []
    session = AdmitSession(
        dispatcher,
        request_of=lambda frame: AdmissionRequest(
            tenant_id="acme", request_id=frame.request.context.request_id
        ),
        submit=controller.submit,
        release=releaser(controller),
        reply=replies.append,
        admitted=lambda admission: pb.AdmitResponse(
            lease=pb.Lease(lease_id=admission.lease.lease_id)
        ),
    )
    session.handle(_request("a"))
    await dispatcher.shutdown()
    session.handle(_request("b"))
    assert _events(replies) == [("a", "admitted"), ("b", "refused")]
    assert replies[1].refused.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert error_details(replies[1].refused).error_info.reason == "SHUTTING_DOWN"
    session.handle(_release(lease_id=replies[0].admitted.lease.lease_id))
    assert controller.quota("acme").in_flight == 0 and len(replies) == 2
