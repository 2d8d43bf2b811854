"""Delegated quota on the real mesh: inference replicas' admission gates keep slices of a
tenant's quota, granted by the tenant's admission replica over AdmitSession.

Two gates stand for two inference replicas (the gate is the inference service's own
client, reaching admission through Envoy's internal listener as a replica does).
"""

from __future__ import annotations

import asyncio
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from switchboard.admission.v1 import admission_pb2 as pb
from switchboard.admission.v1 import admission_service_pb2_grpc
from switchboard.common.v1 import common_pb2
from switchboard.inference.v1 import inference_pb2, inference_service_pb2_grpc

from services.inference.admission import AdmissionGate, Ask
from services.launcher._services import SERVICES
from tests.integration.conftest import as_tenant
from tests.integration.test_admission import admitted, new_tenant, quota, set_policy, waiting
from tests.integration.test_admission_replicas import live_instances
from tests.polling import eventually

MAX_IN_FLIGHT = 4
RATE, BURST = 400.0, 400
CALLS = 40
"""Requests each caller makes, one after the other (over about 2 s: a slice recalled
or refused is asked for again after 1 s)."""


@pytest.fixture
async def admission(envoy_target: str):
    async with grpc.aio.insecure_channel(envoy_target) as channel:
        yield admission_service_pb2_grpc.AdmissionServiceStub(channel)


@pytest.fixture
async def gates(mesh):
    gates = [AdmissionGate(mesh.internal_address, slice_size=4) for _ in range(2)]
    try:
        yield gates
    finally:
        for gate in gates:
            await gate.close()


async def _ready_tenant(admission, mesh, **policy) -> str:
    """A new tenant with `policy` whose buckets are full.

    A replica's first decision begins its epoch, after which new buckets fill over 10 s
    (a tenant may have spent them on another replica): one admission, then wait."""
    expected = mesh.config.admission_replicas

    async def settled() -> bool:  # a replica that just restarted (another test's) is
        # counted once its old row goes stale: every replica then begins an epoch
        return len(await live_instances(mesh.database_url)) == expected

    await eventually(settled, timeout=15, what="the admission replica set settled")
    tenant = new_tenant()
    await set_policy(admission, tenant, **policy)
    first = await admission.Admit(pb.AdmitRequest(), metadata=as_tenant(tenant), timeout=5)
    await admission.Release(
        pb.ReleaseRequest(lease_id=first.lease.lease_id), metadata=as_tenant(tenant), timeout=5
    )

    async def full() -> bool:
        status = await quota(admission, tenant)
        return (
            status.available_requests >= status.policy.request_burst - 1
            and status.available_tokens >= status.policy.token_burst * 0.9
        )

    await eventually(full, timeout=15, what="the tenant's buckets are full")
    return tenant


def _ask(tenant: str) -> Ask:
    """A generation's admission, without a tier: the tier's ceiling is every tenant's,
    and other tests' leases on it must not change what these see."""
    return Ask(tenant_id=tenant, tier="", prompt_tokens=20, max_tokens=32)


@pytest.mark.parametrize(
    ("max_in_flight", "callers", "contended"),
    [(16, 2, False), (4, 3, True)],
    ids=["room", "contended"],
)
async def test_two_replicas_share_one_tenants_budget_within_the_policy(
    admission, gates, mesh, max_in_flight, callers, contended
):
    """With room (fewer callers than slots), requests take leases of their replica's
    slice; contended (more callers than slots), requests wait, slices are
    recalled and not granted again while they do. Either way the policy holds exactly
    (no stream broke): slices are charged when granted."""
    tenant = await _ready_tenant(
        admission,
        mesh,
        max_in_flight=max_in_flight,
        requests_per_second=RATE,
        request_burst=BURST,
    )
    running, most, started = 0, 0, 0
    begun = time.monotonic()

    async def caller(gate: AdmissionGate) -> None:
        nonlocal running, most, started
        for _ in range(CALLS):
            lease_id = await gate.admit(_ask(tenant))
            started += 1
            running += 1
            most = max(most, running)
            await asyncio.sleep(0.03)  # the generation
            running -= 1
            gate.release(lease_id, tenant_id=tenant, prompt=20, completion=10)

    await asyncio.gather(*(caller(gate) for gate in gates for _ in range(callers)))
    elapsed = time.monotonic() - begun
    assert most <= max_in_flight
    assert started <= BURST + RATE * elapsed
    assert started == CALLS * callers * len(gates)
    local = sum(gate.admitted_locally for gate in gates)
    if not contended:
        assert all(gate.admitted_locally > 0 for gate in gates), [g.admitted_locally for g in gates]
        assert local >= started / 10  # a share took no round trip (about 1 in 5 here)

    async def settled() -> bool:  # every slice lease comes back once idle
        status = await quota(admission, tenant)
        return status.in_flight == 0 and waiting(status) == 0

    await eventually(settled, timeout=10, what="the slices came back")


async def test_a_tenant_at_its_limit_still_queues_and_sees_its_position(
    admission, gates, inference, mesh
):
    tenant = await _ready_tenant(admission, mesh, max_in_flight=2)
    gate = gates[0]
    first = await gate.admit(_ask(tenant))  # then the slice takes the other slot
    held = await admission.Admit(pb.AdmitRequest(), metadata=as_tenant(tenant), timeout=5)
    # the Admit above waited for the slice to be recalled: nothing holds a slot idle
    assert held.lease.lease_id
    request = inference_pb2.GenerateRequest(
        prompt="What does Envoy do?", parameters={"max_tokens": 4}, report_queue_position=True
    )
    call = inference.Generate(request, metadata=as_tenant(tenant), timeout=20)
    reply = await call.read()
    assert reply.HasField("queued"), reply
    assert reply.queued.position == 0
    assert waiting(await quota(admission, tenant)) == 1
    gate.release(first, tenant_id=tenant, prompt=20, completion=4)
    replies = []
    while (reply := await call.read()) is not grpc.aio.EOF:
        replies.append(reply)
    assert replies[-1].HasField("complete")
    await admission.Release(
        pb.ReleaseRequest(lease_id=held.lease.lease_id), metadata=as_tenant(tenant), timeout=5
    )


async def test_a_dead_replicas_slice_comes_back(admission, gates, mesh):
    tenant = await _ready_tenant(admission, mesh, max_in_flight=MAX_IN_FLIGHT)
    dying, other = gates
    lease_id = await dying.admit(_ask(tenant))
    dying.release(lease_id, tenant_id=tenant, prompt=20, completion=4)

    await eventually(lambda: dying.reserved > 0, timeout=5, what="a slice was granted")
    await dying.close()  # its streams end, as a killed process's do

    async def all_slots_free() -> bool:
        leases = []
        try:
            for _ in range(MAX_IN_FLIGHT):
                reply = await admission.Admit(
                    pb.AdmitRequest(no_wait=True), metadata=as_tenant(tenant), timeout=5
                )
                leases.append(reply.lease.lease_id)
        except grpc.aio.AioRpcError:
            return False
        finally:
            for held in leases:
                await admission.Release(
                    pb.ReleaseRequest(lease_id=held), metadata=as_tenant(tenant), timeout=5
                )
        return True

    await eventually(all_slots_free, timeout=5, what="the dead replica's slice came back")


@pytest.fixture
async def inference(envoy_target: str):
    async with grpc.aio.insecure_channel(envoy_target) as channel:
        yield inference_service_pb2_grpc.InferenceServiceStub(channel)


async def test_generate_takes_its_admission_from_the_slice(admission, inference, mesh):
    # buckets full: a slice is only granted what could be admitted at once, and a fresh
    # replica's epoch (another test's restart) starts them low
    tenant = await _ready_tenant(
        admission, mesh, max_in_flight=16, requests_per_second=RATE, request_burst=BURST
    )
    before, counted = _admissions(mesh), admitted(mesh, tenant).get("interactive", 0)
    request = inference_pb2.GenerateRequest(prompt="What routes gRPC calls?")
    request.parameters.max_tokens = 4
    request.priority = common_pb2.PRIORITY_INTERACTIVE
    for _ in range(5):
        replies = [
            r async for r in inference.Generate(request, metadata=as_tenant(tenant), timeout=20)
        ]
        assert replies[-1].HasField("complete")

    async def released() -> bool:
        return (await quota(admission, tenant)).in_flight == 0

    # the slice's unused leases run nothing; the last answer's lease is released in the
    # background once its stream has ended, so the quota may still count it for a moment
    await eventually(released, timeout=5, what="nothing in flight once the answers ended")
    after = _admissions(mesh)
    assert after["round_trip"] - before["round_trip"] >= 1  # the first asks, and gets a slice
    assert after["slice"] - before["slice"] >= 3  # the next ones take its leases
    # counted as admitted, once each
    assert admitted(mesh, tenant).get("interactive", 0) - counted == 5


def _admissions(mesh) -> dict[str, float]:
    """The inference replica's admissions by how they were made."""
    inference = next(spec for spec in SERVICES if spec.name == "inference")
    port = inference.metrics_port(mesh.config, 0)
    counts = {"slice": 0.0, "round_trip": 0.0}
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        for family in text_string_to_metric_families(reply.read().decode()):
            for sample in family.samples:
                if sample.name == "switchboard_inference_admissions_total":
                    counts[sample.labels["how"]] += sample.value
    return counts
