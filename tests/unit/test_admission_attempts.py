"""Releasing an admission attempt by the caller's request id, when its lease id was lost."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import grpc
import pytest
from switchboard.admission.v1 import admission_pb2

from services.admission.clock import FakeClock
from services.admission.controller import AdmissionController, TicketState
from services.admission.limits import PolicyLimits
from services.inference.admission import AdmissionGate, Ask
from services.runtime import Cancelled, InvalidArgument, SwitchboardError

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
    ticket = controller.submit(tenant_id="acme", prompt_tokens=300, request_id="r1")
    assert ticket.lease is not None and ticket.lease.request_id == "r1"
    assert controller.release_attempt("acme", "r1", actual_tokens=0) == (True, 300)
    quota = controller.quota("acme")
    assert quota.in_flight == 0 and quota.available_tokens == 10_000
    # idempotent, and the lease id no longer releases anything either
    assert controller.release_attempt("acme", "r1", actual_tokens=0) == (False, 0)
    assert controller.release(ticket.lease.lease_id, actual_tokens=0) == (False, 0)
    assert controller.quota("acme").available_tokens == 10_000


def test_release_by_lease_id_forgets_the_request_id(controller):
    ticket = controller.submit(tenant_id="acme", request_id="r1")
    assert controller.release(ticket.lease.lease_id) == (True, 0)
    assert controller.release_attempt("acme", "r1") == (False, 0)
    assert controller.in_flight() == 0


def test_request_ids_are_per_tenant(controller):
    controller.submit(tenant_id="acme", request_id="r1")
    other = controller.submit(tenant_id="globex", request_id="r1")
    assert controller.release_attempt("globex", "r1") == (True, 0)
    assert other.lease is not None
    assert controller.quota("acme").in_flight == 1
    assert controller.quota("globex").in_flight == 0


def test_release_by_request_id_of_a_waiting_attempt_leaves_the_queue(controller):
    running = [controller.submit(tenant_id="acme") for _ in range(2)]
    waiting = controller.submit(tenant_id="acme", request_id="queued")
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
    [controller.submit(tenant_id="acme") for _ in range(2)]
    waiter = asyncio.ensure_future(controller.admit(tenant_id="acme", request_id="w"))
    await asyncio.sleep(0)
    assert controller.release_attempt("acme", "w") == (True, 0)
    with pytest.raises(Cancelled):
        await waiter


def test_a_release_that_races_ahead_of_its_admit_refuses_the_admit(controller, clock):
    assert controller.release_attempt("acme", "late") == (False, 0)
    with pytest.raises(Cancelled):
        controller.submit(tenant_id="acme", request_id="late")
    assert controller.quota("acme").in_flight == 0
    assert controller.submit(tenant_id="acme", request_id="other").lease is not None
    clock.advance(60)  # the tombstone lapses: the id may be used again
    assert controller.submit(tenant_id="acme", request_id="late").lease is not None


def test_tombstones_are_bounded_oldest_first(controller):
    for n in range(5):
        controller.release_attempt("acme", f"gone-{n}")
    assert len(controller._tombstones) == 3
    assert controller.submit(tenant_id="acme", request_id="gone-0").lease is not None
    with pytest.raises(Cancelled):
        controller.submit(tenant_id="acme", request_id="gone-4")


def test_attempts_are_forgotten_when_they_end(controller, clock):
    first = controller.submit(tenant_id="acme", request_id="a")
    controller.submit(tenant_id="acme", request_id="b")
    refused = controller.submit(tenant_id="acme", request_id="c", max_wait=timedelta(seconds=1))
    assert refused.waiting
    clock.advance(1)
    controller.pump()
    assert refused.state is TicketState.REFUSED
    controller.release(first.lease.lease_id)
    clock.advance(600)  # "b" expires
    controller.pump()
    assert controller._attempts == {}
    assert controller.quota("acme").in_flight == 0


def test_a_request_id_in_use_or_too_long_is_invalid(controller):
    controller.submit(tenant_id="acme", request_id="dup")
    with pytest.raises(InvalidArgument) as invalid:
        controller.submit(tenant_id="acme", request_id="dup")
    assert [v.field for v in invalid.value.field_violations] == ["context.request_id"]
    with pytest.raises(InvalidArgument):
        controller.submit(tenant_id="acme", request_id="x" * 129)
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


class _Admit:
    """Stands in for the admission stub's Admit: records the request, then behaves."""

    def __init__(self, outcome) -> None:
        self.outcome = outcome
        self.requests: list[admission_pb2.AdmitRequest] = []

    async def Admit(self, request, **kwargs):  # noqa: N802 - gRPC method name
        self.requests.append(request)
        return await self.outcome()


def _rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="x")


@pytest.fixture
async def gate():
    gate = AdmissionGate("127.0.0.1:9")  # never dialled: the stubs are replaced
    gate._release_stub = _Releases()
    yield gate
    await gate.close()


ASK = Ask(tenant_id="acme", tier="small", prompt_tokens=10, max_tokens=20)


async def test_the_gate_gives_every_attempt_a_fresh_request_id(gate):
    async def admitted():
        return admission_pb2.AdmitResponse(lease=admission_pb2.Lease(lease_id="L"))

    gate._stub = stub = _Admit(admitted)
    assert await gate.admit(ASK) == "L"
    assert await gate.admit(ASK) == "L"
    ids = [r.context.request_id for r in stub.requests]
    assert all(ids) and ids[0] != ids[1]
    await gate.close()
    assert gate._release_stub.requests == []  # the caller owns the leases


@pytest.mark.parametrize("code", [grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE])
async def test_the_gate_releases_an_attempt_that_failed(gate, code):
    async def failed():
        raise _rpc_error(code)

    gate._stub = stub = _Admit(failed)
    with pytest.raises(SwitchboardError):
        await gate.admit(ASK)
    await gate.close()
    [release] = gate._release_stub.requests
    assert release.request_id == stub.requests[0].context.request_id
    assert not release.lease_id and release.actual_usage.total_tokens == 0


async def test_the_gate_releases_an_attempt_whose_caller_was_cancelled(gate):
    async def forever():
        await asyncio.Event().wait()

    gate._stub = stub = _Admit(forever)
    task = asyncio.ensure_future(gate.admit(ASK))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await gate.close()
    [release] = gate._release_stub.requests
    assert release.request_id == stub.requests[0].context.request_id


async def test_the_gate_does_not_release_a_refused_attempt(gate):
    async def refused():
        raise _rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED)

    gate._stub = _Admit(refused)
    with pytest.raises(SwitchboardError):
        await gate.admit(ASK)
    await gate.close()
    assert gate._release_stub.requests == []


class _Stream:
    """Stands in for an AdmitStream call: replies, then a status that may never come."""

    def __init__(self, replies, *, status_hangs: bool = False, hang: bool = False) -> None:
        self.replies = replies
        self.status_hangs = status_hangs
        self.hang = hang
        self.cancelled = False
        self.callbacks = []

    async def __aiter__(self):
        for reply in self.replies:
            yield reply
        if self.hang:
            await asyncio.Event().wait()

    async def code(self):
        if self.status_hangs:
            await asyncio.Event().wait()
        return grpc.StatusCode.OK

    def done(self) -> bool:
        return False

    def cancel(self) -> None:
        self.cancelled = True

    def add_done_callback(self, callback) -> None:
        self.callbacks.append(callback)

    def finish(self) -> None:
        """The status arrived."""
        for callback in self.callbacks:
            callback(self)


class _AdmitStream:
    def __init__(self, call: _Stream) -> None:
        self.call = call
        self.requests: list[admission_pb2.AdmitStreamRequest] = []

    def AdmitStream(self, request, **kwargs):  # noqa: N802 - gRPC method name
        self.requests.append(request)
        return self.call


QUEUED = admission_pb2.AdmitStreamResponse(queued=admission_pb2.QueueStatus(position=0))
ADMITTED = admission_pb2.AdmitStreamResponse(
    admitted=admission_pb2.AdmitResponse(lease=admission_pb2.Lease(lease_id="L"))
)


async def test_a_stream_hands_the_lease_over_before_its_status_and_does_not_reset(gate):
    gate._stub = stub = _AdmitStream(_Stream([QUEUED, ADMITTED], status_hangs=True))
    updates = gate.admit_stream(ASK)
    assert (await anext(updates)).position == 0
    assert await anext(updates) == "L"  # at once, though the status has not come
    with pytest.raises(StopAsyncIteration):
        await anext(updates)
    # the stream is left to end by itself, kept referenced until it does
    assert not stub.call.cancelled
    assert stub.call in gate._ending
    stub.call.finish()
    assert stub.call not in gate._ending
    await gate.close()
    assert gate._release_stub.requests == []  # the caller owns the lease


async def test_a_stream_closed_while_queued_is_released(gate):
    gate._stub = stub = _AdmitStream(_Stream([QUEUED], hang=True))
    updates = gate.admit_stream(ASK)
    assert (await anext(updates)).position == 0
    await updates.aclose()
    await gate.close()
    [release] = gate._release_stub.requests
    assert release.request_id == stub.requests[0].request.context.request_id


async def test_a_stream_that_hands_over_the_lease_releases_nothing(gate):
    gate._stub = _AdmitStream(_Stream([QUEUED, ADMITTED]))
    updates = [u async for u in gate.admit_stream(ASK)]
    assert updates[-1] == "L"
    await gate.close()
    assert gate._release_stub.requests == []
