"""Releasing an admission attempt by the caller's request id, when its lease id was lost."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import timedelta

import grpc
import pytest
from switchboard.admission.v1 import admission_pb2
from switchboard.common.v1 import common_pb2

from services.admission import (
    AdmissionController,
    AdmissionRequest,
    Dispatcher,
    FakeClock,
    PolicyLimits,
    TicketState,
)
from services.inference.admission import (
    RELEASE_RETRY,
    SESSION_IDLE_S,
    STREAMS_PER_ATTEMPT,
    AdmissionGate,
    Ask,
)
from services.runtime import (
    Cancelled,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    SwitchboardError,
    Unavailable,
)
from tests.polling import eventually

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE

POLICY = PolicyLimits(
    requests_per_second=100,
    request_burst=100,
    tokens_per_minute=60_000,
    token_burst=10_000,
    max_in_flight=2,
    max_queued=5,
)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def controller(clock: FakeClock) -> AdmissionController:
    controller = AdmissionController(
        clock=clock,
        lease_ttl=timedelta(seconds=600),
        tombstone_ttl=timedelta(seconds=60),
        max_tombstones=3,
    )
    controller.set_policy("acme", POLICY)
    return controller


def test_release_by_request_id_frees_the_granted_lease(controller):
    ticket = controller.submit(
        AdmissionRequest(tenant_id="acme", prompt_tokens=300, request_id="r1")
    )
    assert ticket.lease is not None and ticket.lease.request_id == "r1"
    assert controller.release_attempt("acme", "r1", actual_tokens=0) == (True, 300)
    quota = controller.quota("acme")
    assert quota.in_flight == 0 and quota.available_tokens == 10_000
    # idempotent, and the lease id no longer releases anything either
    assert controller.release_attempt("acme", "r1", actual_tokens=0) == (False, 0)
    assert controller.release(ticket.lease.lease_id, actual_tokens=0) == (False, 0)
    assert controller.quota("acme").available_tokens == 10_000


def test_release_by_lease_id_forgets_the_request_id(controller):
    ticket = controller.submit(AdmissionRequest(tenant_id="acme", request_id="r1"))
    assert controller.release(ticket.lease.lease_id) == (True, 0)
    assert controller.release_attempt("acme", "r1") == (False, 0)
    assert controller.in_flight() == 0


def test_request_ids_are_per_tenant(controller):
    controller.submit(AdmissionRequest(tenant_id="acme", request_id="r1"))
    other = controller.submit(AdmissionRequest(tenant_id="globex", request_id="r1"))
    assert controller.release_attempt("globex", "r1") == (True, 0)
    assert other.lease is not None
    assert controller.quota("acme").in_flight == 1
    assert controller.quota("globex").in_flight == 0


def test_release_by_request_id_of_a_waiting_attempt_leaves_the_queue(controller):
    running = [controller.submit(AdmissionRequest(tenant_id="acme")) for _ in range(2)]
    waiting = controller.submit(AdmissionRequest(tenant_id="acme", request_id="queued"))
    assert waiting.waiting
    assert controller.release_attempt("acme", "queued") == (True, 0)
    assert waiting.state is TicketState.CANCELLED
    with pytest.raises(Cancelled):
        waiting.result()
    assert sum(controller.quota("acme").queued.values()) == 0
    controller.release(running[0].lease.lease_id)
    assert waiting.lease is None  # never granted once released
    assert controller.quota("acme").in_flight == 1
    assert controller.release_attempt("acme", "queued") == (False, 0)


async def test_release_by_request_id_ends_the_wait_of_admit(controller):
    [controller.submit(AdmissionRequest(tenant_id="acme")) for _ in range(2)]
    dispatcher = Dispatcher(controller)
    waiter = asyncio.ensure_future(
        dispatcher.admit(AdmissionRequest(tenant_id="acme", request_id="w"))
    )
    await asyncio.sleep(0)
    assert controller.release_attempt("acme", "w") == (True, 0)
    with pytest.raises(Cancelled):
        await waiter


def test_a_release_that_races_ahead_of_its_admit_refuses_the_admit(controller, clock):
    assert controller.release_attempt("acme", "late") == (False, 0)
    with pytest.raises(Cancelled):
        controller.submit(AdmissionRequest(tenant_id="acme", request_id="late"))
    assert controller.quota("acme").in_flight == 0
    assert (
        controller.submit(AdmissionRequest(tenant_id="acme", request_id="other")).lease is not None
    )
    clock.advance(60)  # the tombstone lapses: the id may be used again
    assert (
        controller.submit(AdmissionRequest(tenant_id="acme", request_id="late")).lease is not None
    )


def test_tombstones_are_bounded_oldest_first(controller):
    for n in range(5):
        controller.release_attempt("acme", f"gone-{n}")
    assert controller._ledger.tombstones == 3
    assert (
        controller.submit(AdmissionRequest(tenant_id="acme", request_id="gone-0")).lease is not None
    )
    with pytest.raises(Cancelled):
        controller.submit(AdmissionRequest(tenant_id="acme", request_id="gone-4"))


def test_attempts_are_forgotten_when_they_end(controller, clock):
    first = controller.submit(AdmissionRequest(tenant_id="acme", request_id="a"))
    controller.submit(AdmissionRequest(tenant_id="acme", request_id="b"))
    refused = controller.submit(
        AdmissionRequest(tenant_id="acme", request_id="c", max_wait=timedelta(seconds=1))
    )
    assert refused.waiting
    clock.advance(1)
    controller.pump()
    assert refused.state is TicketState.REFUSED
    controller.release(first.lease.lease_id)
    clock.advance(600)  # "b" expires
    controller.pump()
    assert controller._ledger.attempts == 0
    assert controller.quota("acme").in_flight == 0


def test_a_request_id_in_use_or_too_long_is_invalid(controller):
    controller.submit(AdmissionRequest(tenant_id="acme", request_id="dup"))
    with pytest.raises(InvalidArgument) as invalid:
        controller.submit(AdmissionRequest(tenant_id="acme", request_id="dup"))
    assert [v.field for v in invalid.value.field_violations] == ["request_id"]
    with pytest.raises(InvalidArgument):
        controller.submit(AdmissionRequest(tenant_id="acme", request_id="x" * 129))
    with pytest.raises(InvalidArgument):
        controller.release_attempt("acme", "")
    assert controller.quota("acme").in_flight == 1


# ---- the inference service's gate ---------------------------------------------------


class _Releases:
    """Stands in for the release stub: records what is released."""

    def __init__(self) -> None:
        self.requests: list[admission_pb2.ReleaseRequest] = []

    async def Release(self, request, **kwargs):  # noqa: N802 - gRPC method name
        self.requests.append(request)
        return admission_pb2.ReleaseResponse(released=True)


class _SessionCall:
    """Stands in for an AdmitSession call: records the requests written and answers
    each with `respond(call, request)`; replies can also be pushed with `reply`."""

    def __init__(self, respond) -> None:
        self.respond = respond
        self.requests: list[admission_pb2.AdmitRequest] = []
        self.frames: list[admission_pb2.AdmitSessionRequest] = []
        self.cancelled = False
        self._replies: asyncio.Queue = asyncio.Queue()

    async def write(self, frame: admission_pb2.AdmitSessionRequest) -> None:
        self.frames.append(frame)
        if frame.HasField("request"):
            self.requests.append(frame.request)
            self.respond(self, frame.request)
        elif frame.HasField("reserve"):
            self.respond(self, frame.reserve)

    def reply(self, request_id: str, **event) -> None:
        self._replies.put_nowait(admission_pb2.AdmitSessionResponse(request_id=request_id, **event))

    def end(self, error: BaseException | None = None) -> None:
        self._replies.put_nowait(error or StopAsyncIteration())

    def cancel(self) -> None:
        self.cancelled = True
        self.end(_rpc_error(grpc.StatusCode.CANCELLED))

    def __aiter__(self):
        return self

    async def __anext__(self):
        item = await self._replies.get()
        if isinstance(item, BaseException):
            self._replies.put_nowait(item)  # ended for good
            raise item
        return item


class _Sessions:
    """Stands in for the admission stub: AdmitSession calls answered by `respond`."""

    def __init__(self, respond=lambda call, request: None) -> None:
        self.respond = respond
        self.calls: list[tuple[object, _SessionCall]] = []

    def AdmitSession(self, metadata=None, **kwargs):  # noqa: N802 - gRPC method name
        call = _SessionCall(self.respond)
        self.calls.append((metadata, call))
        return call


def _admit_at_once(call: _SessionCall, request: admission_pb2.AdmitRequest) -> None:
    if isinstance(request, admission_pb2.SliceRequest):
        return  # no slice
    lease = admission_pb2.Lease(lease_id="L-" + request.context.request_id)
    call.reply(request.context.request_id, admitted=admission_pb2.AdmitResponse(lease=lease))


def _with_slices(call: _SessionCall, request) -> None:
    """Admits every request at once and grants every slice asked for in full."""
    if not isinstance(request, admission_pb2.SliceRequest):
        _admit_at_once(call, request)
        return
    shape = request.shape
    leases = [
        admission_pb2.AdmitResponse(
            lease=admission_pb2.Lease(
                lease_id=f"S{i}-{shape.context.request_id}", charged_tokens=10_000
            )
        )
        for i in range(request.count)
    ]
    call.reply(shape.context.request_id, slice=admission_pb2.Slice(admissions=leases))


def _kinds(call: _SessionCall) -> list[str]:
    return [str(frame.WhichOneof("frame")) for frame in call.frames]


def _rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="x")


def _lease_not_found() -> grpc.aio.AioRpcError:
    status = NotFound("no such lease", reason="LEASE_NOT_FOUND").to_rpc_status()
    trailers = grpc.aio.Metadata(("grpc-status-details-bin", status.SerializeToString()))
    return grpc.aio.AioRpcError(grpc.StatusCode.NOT_FOUND, grpc.aio.Metadata(), trailers)


@pytest.fixture
async def gate():
    gate = AdmissionGate("127.0.0.1:9")  # never dialled: the stubs are replaced
    gate._release_stub = _Releases()
    yield gate
    await gate.close()


ASK = Ask(tenant_id="acme", tier="small", prompt_tokens=10, max_tokens=20)


async def test_attempts_of_a_tenant_share_one_session_with_fresh_request_ids(gate):
    gate._stub = stub = _Sessions(_admit_at_once)
    first, second = await gate.admit(ASK), await gate.admit(ASK)
    [(metadata, call)] = stub.calls
    assert metadata == (("x-tenant-id", "acme"),)  # routes the stream to acme's replica
    ids = [r.context.request_id for r in call.requests]
    assert all(ids) and ids[0] != ids[1]
    assert (first, second) == (f"L-{ids[0]}", f"L-{ids[1]}")
    await gate.admit(Ask(tenant_id="other", tier="small", prompt_tokens=1, max_tokens=1))
    assert len(stub.calls) == 2  # a session per tenant
    await gate.close()
    assert gate._release_stub.requests == []  # the caller owns the leases


async def test_slice_frames_wait_for_flush_so_the_admitted_call_starts_first():
    gate = AdmissionGate("127.0.0.1:9", slice_size=4)
    gate._release_stub = _Releases()
    gate._stub = stub = _Sessions(_with_slices)
    try:
        await gate.admit(ASK)  # a round trip; the pool asks for a slice, later
        [(_, call)] = stub.calls
        await asyncio.sleep(0)  # anything already sent is written
        assert _kinds(call) == ["request"]
        gate.flush()
        await eventually(lambda: _kinds(call) == ["request", "reserve"], what="the ask")
        await eventually(lambda: gate.reserved == 4, what="the slice")
        lease = await gate.admit(ASK)
        assert lease.startswith("S") and gate.admitted_locally == 1
        await asyncio.sleep(0)
        assert _kinds(call) == ["request", "reserve"]  # the claim waits for flush
        gate.flush()
        await eventually(lambda: _kinds(call)[-1] == "claim", what="the claim")
        assert call.frames[-1].claim == lease
        # nobody flushes: the claim goes out by itself, soon
        second = await gate.admit(ASK)
        claims = lambda: [f.claim for f in call.frames if f.HasField("claim")]  # noqa: E731
        await eventually(lambda: claims() == [lease, second], timeout=1, what="the claim")
    finally:
        await gate.close()


async def test_an_attempt_waits_no_longer_than_the_calls_deadline_allows(gate):
    gate._stub = stub = _Sessions(_admit_at_once)
    await gate.admit(ASK)  # no deadline: ADMIT_TIMEOUT_S
    assert stub.calls[0][1].requests[0].max_wait.ToTimedelta() == timedelta(seconds=9.95)
    async for _ in gate.admit_stream(ASK):  # no deadline: admission's own max wait
        pass
    assert not stub.calls[0][1].requests[1].HasField("max_wait")


async def test_a_refusal_is_relayed_and_not_released(gate):
    refusal = ResourceExhausted("over quota", reason="QUOTA_EXCEEDED").to_rpc_status()

    def refuse(call, request):
        call.reply(request.context.request_id, refused=refusal)

    gate._stub = _Sessions(refuse)
    with pytest.raises(SwitchboardError) as refused:
        await gate.admit(ASK)
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.value.to_rpc_status() == refusal  # exactly as admission gave it
    await gate.close()
    assert gate._release_stub.requests == []


async def test_a_session_that_ends_undecided_hands_its_attempt_to_a_new_one(gate):
    def end_the_first(call, request):
        if len(stub.calls) == 1:  # the replica died: its stream ends
            call.end(_rpc_error(UNAVAILABLE))
        else:
            _admit_at_once(call, request)

    gate._stub = stub = _Sessions(end_the_first)
    lease = await gate.admit(ASK)
    [(_, first), (_, second)] = stub.calls
    [retried] = second.requests
    assert lease == f"L-{retried.context.request_id}"
    assert retried.context.request_id != first.requests[0].context.request_id
    assert (await gate.admit(ASK)).startswith("L-") and len(stub.calls) == 2
    await gate.close()
    # the undecided attempt may have been granted a lease before the session broke
    [release] = gate._release_stub.requests
    assert release.request_id == first.requests[0].context.request_id


async def test_an_admission_fails_when_every_session_ends_undecided(gate):
    gate._stub = stub = _Sessions(lambda call, request: call.end(_rpc_error(UNAVAILABLE)))
    with pytest.raises(Unavailable) as failed:
        await gate.admit(ASK)
    assert failed.value.reason == "DEPENDENCY_UNAVAILABLE"
    assert len(stub.calls) == STREAMS_PER_ATTEMPT
    stub.respond = _admit_at_once
    assert (await gate.admit(ASK)).startswith("L-")
    assert len(stub.calls) == STREAMS_PER_ATTEMPT + 1
    await gate.close()
    assert len(gate._release_stub.requests) == STREAMS_PER_ATTEMPT


async def test_a_lease_not_found_where_released_moves_new_attempts_to_a_new_session(gate):
    class Moved(_Releases):
        """The tenant's releases reach a replica that granted none of its leases."""

        async def Release(self, request, **kwargs):  # noqa: N802 - gRPC method name
            self.requests.append(request)
            raise _lease_not_found()

    gate._release_stub = Moved()
    gate._stub = stub = _Sessions(_admit_at_once)
    gate.release(await gate.admit(ASK), tenant_id="acme", prompt=1, completion=1)
    await _let_others_run()
    [(_, stray)] = stub.calls
    assert stray.cancelled  # no attempt waits on it (the leases it granted live on)
    assert (await gate.admit(ASK)).startswith("L-")
    assert len(stub.calls) == 2 and len(stub.calls[1][1].requests) == 1


async def test_a_release_whose_lease_is_not_held_there_is_logged_as_expected_not_a_fault(
    gate, caplog
):
    gate._release_stub = releases = _Flaky(_lease_not_found())
    gate._stub = _Sessions(_admit_at_once)
    gate._sleep = _no_wait
    with caplog.at_level(logging.INFO, logger="services.inference.admission"):
        gate.release(await gate.admit(ASK), tenant_id="acme", prompt=1, completion=1)
        await _let_others_run()
    assert len(releases.requests) == 1  # not tried again
    records = [r for r in caplog.records if r.name == "services.inference.admission"]
    assert [(r.levelno, r.getMessage()) for r in records] == [
        (logging.INFO, "admission lease not held where released")
    ]


class _Flaky:
    """A release stub whose first answers are `errors`, then released."""

    def __init__(self, *errors: grpc.aio.AioRpcError) -> None:
        self.errors = list(errors)
        self.requests: list[admission_pb2.ReleaseRequest] = []

    async def Release(self, request, **kwargs):  # noqa: N802 - gRPC method name
        self.requests.append(request)
        if self.errors:
            raise self.errors.pop(0)
        return admission_pb2.ReleaseResponse(released=True)


async def _no_wait(seconds: float) -> None:
    """The waits between tries, without a clock (`RELEASE_RETRY` bounds them)."""


async def test_a_release_that_gets_no_answer_is_tried_again(gate):
    gate._sleep = _no_wait
    gate._release_stub = releases = _Flaky(
        _rpc_error(UNAVAILABLE), _rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED)
    )
    gate.release("L-1", tenant_id="acme", prompt=1, completion=2)
    await eventually(lambda: len(releases.requests) == 3, what="three tries")
    await _let_others_run()
    assert {r.lease_id for r in releases.requests} == {"L-1"}
    assert not gate._releases  # the third got through: no more tries


async def test_a_release_stops_trying_after_its_attempts(gate):
    gate._sleep = _no_wait
    gate._release_stub = releases = _Flaky(*[_rpc_error(UNAVAILABLE)] * 20)
    gate.release("L-1", tenant_id="acme", prompt=1, completion=2)
    await eventually(lambda: not gate._releases, what="the release given up")
    assert len(releases.requests) == RELEASE_RETRY.max_attempts  # the lease expires alone


async def test_a_release_refused_as_not_found_after_a_lost_answer_is_done(gate):
    gate._sleep = _no_wait
    gate._stub = stub = _Sessions(_admit_at_once)
    lease = await gate.admit(ASK)
    # the first try's answer was lost (it did release); the second finds no such lease:
    # that is the first try's doing, not a sign that the tenant moved
    gate._release_stub = releases = _Flaky(_rpc_error(UNAVAILABLE), _lease_not_found())
    gate.release(lease, tenant_id="acme", prompt=1, completion=1)
    await eventually(lambda: not gate._releases, what="the release done")
    assert len(releases.requests) == 2
    [(_, call)] = stub.calls
    assert not call.cancelled  # the session stays: nothing moved
    assert (await gate.admit(ASK)).startswith("L-") and len(stub.calls) == 1


async def test_a_session_that_moved_closes_once_its_attempts_are_decided_and_leases_released(
    gate,
):
    gate._stub = stub = _Sessions(_admit_at_once)
    first = await gate.admit(ASK)
    [(_, stray)] = stub.calls
    stray.respond = lambda call, request: None  # the next attempt waits
    waiting = asyncio.ensure_future(gate.admit(ASK))
    await _let_others_run()
    next(iter(gate._granted_on.values())).retire()
    assert not stray.cancelled
    _admit_at_once(stray, stray.requests[-1])
    second = await waiting
    assert second.startswith("L-")
    assert not stray.cancelled  # its replica would free both leases the caller holds
    for lease in (first, second):
        gate.release(lease, tenant_id="acme", prompt=1, completion=1)
        await _let_others_run()
        assert stray.cancelled is (lease == second)  # closed with the last one


async def test_a_session_stays_open_while_a_lease_granted_on_it_is_held_however_released(gate):
    class Moved(_Releases):
        async def Release(self, request, **kwargs):  # noqa: N802 - gRPC method name
            self.requests.append(request)
            raise _lease_not_found()  # the tenant's releases reach another replica

    gate._release_stub = Moved()
    gate._stub = stub = _Sessions(_admit_at_once)
    first, second = await gate.admit(ASK), await gate.admit(ASK)
    [(_, stray)] = stub.calls
    gate.release(first, tenant_id="acme", prompt=1, completion=1)
    await _let_others_run()
    assert not stray.cancelled  # retired, but `second` is held: its replica keeps it
    assert (await gate.admit(ASK)).startswith("L-") and len(stub.calls) == 2  # a new one
    gate.release(second, tenant_id="acme", prompt=1, completion=1)
    await _let_others_run()
    assert stray.cancelled  # its replica frees what the releases did not reach


async def test_a_caller_cancelled_while_queued_releases_its_attempt(gate):
    def queue(call, request):
        call.reply(request.context.request_id, queued=common_pb2.QueuePosition(position=3))

    gate._stub = stub = _Sessions(queue)
    updates = gate.admit_stream(ASK)
    assert (await anext(updates)).position == 3
    waiter = asyncio.ensure_future(anext(updates))
    await _let_others_run()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await gate.close()
    [(_, call)] = stub.calls
    [release] = gate._release_stub.requests
    assert release.request_id == call.requests[0].context.request_id
    assert not gate._sessions  # closed with the gate


async def test_a_stream_that_hands_over_the_lease_releases_nothing(gate):
    def queue_then_admit(call, request):
        rid = request.context.request_id
        call.reply(rid, queued=common_pb2.QueuePosition(position=0))
        _admit_at_once(call, request)

    gate._stub = _Sessions(queue_then_admit)
    updates = [u async for u in gate.admit_stream(ASK)]
    assert updates[0].position == 0 and updates[-1].startswith("L-")
    await gate.close()
    assert gate._release_stub.requests == []


async def test_idle_sessions_are_closed_busy_ones_kept(gate, monkeypatch):
    gate._stub = stub = _Sessions(_admit_at_once)
    gate.release(await gate.admit(ASK), tenant_id="acme", prompt=1, completion=1)
    holder = Ask(tenant_id="holder", tier="small", prompt_tokens=1, max_tokens=1)
    held = await gate.admit(holder)  # its call still runs
    stub.respond = lambda call, request: None  # the next attempt waits
    busy = asyncio.ensure_future(
        gate.admit(Ask(tenant_id="busy", tier="small", prompt_tokens=1, max_tokens=1))
    )
    await _let_others_run()
    gate._sweep(time.monotonic() + SESSION_IDLE_S + 1)
    assert sorted(gate._sessions) == ["busy", "holder"]
    assert [call.cancelled for _, call in stub.calls] == [True, False, False]
    busy.cancel()
    with pytest.raises(asyncio.CancelledError):
        await busy
    gate.release(held, tenant_id="holder", prompt=1, completion=1)


async def _let_others_run() -> None:
    """Yields to every task ready to run (the waiter reaches its wait), without a clock."""
    for _ in range(100):
        await asyncio.sleep(0)
