"""Releases reach the admission replica that granted the lease, wherever the edge routes
the tenant now: the inference service releases a lease over the AdmitSession stream that
granted it (`services/inference/admission.py`), never by a call the edge would route to
the tenant's new owner, which cannot honour it."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import grpc
import pytest
from switchboard.admission.v1 import admission_pb2 as pb
from switchboard.admission.v1 import admission_service_pb2_grpc
from switchboard.inference.v1 import inference_pb2

from services.inference.admission import SESSION_ROTATE, AdmissionGate, Ask
from services.runtime import error_details
from tests.integration.conftest import as_tenant
from tests.integration.test_admission import CONTEXT, new_tenant, on_replica, quota, set_policy
from tests.polling import eventually

pytestmark = pytest.mark.timeout(600)  # a replica stopped and restarted, and the mesh if first

ROUNDS = 8
STALL_S = 5.0
"""Far longer than an admission with its slot free takes, far shorter than the 10 min a
lease left held would keep the slot."""


@pytest.fixture
async def admission(envoy_target: str):
    async with grpc.aio.insecure_channel(envoy_target) as channel:
        yield admission_service_pb2_grpc.AdmissionServiceStub(channel)


class _CountedReleases:
    """A replica's stub whose Release calls are counted."""

    def __init__(self, stub: admission_service_pb2_grpc.AdmissionServiceStub) -> None:
        self._stub = stub
        self.calls = 0

    async def Release(self, request, **kwargs):  # noqa: N802 - gRPC method name
        self.calls += 1
        return await self._stub.Release(request, **kwargs)


async def test_a_tenant_at_one_in_flight_runs_generation_after_generation(admission, inference):
    tenant = new_tenant()
    await set_policy(admission, tenant, max_in_flight=1)
    request = inference_pb2.GenerateRequest(
        prompt="What routes gRPC calls?", context=CONTEXT, parameters={"max_tokens": 4}
    )
    for _ in range(ROUNDS):  # each waits for the slot the one before released
        call = inference.Generate(request, metadata=as_tenant(tenant), timeout=20)
        assert [reply async for reply in call][-1].HasField("complete")

    async def released() -> bool:
        return (await quota(admission, tenant)).in_flight == 0

    await eventually(released, timeout=5.0, what="the last lease released")


@pytest.mark.parametrize(
    "rotate_after", [SESSION_ROTATE, timedelta(0)], ids=["one-stream", "a-stream-per-admission"]
)
async def test_leases_go_back_to_the_replica_that_granted_them_after_the_tenant_moved(
    admission, mesh, rotate_after
):
    tenant = new_tenant()
    await set_policy(admission, tenant, max_in_flight=1)
    config = mesh.config
    old, new = (f"{config.host}:{config.admission_port + 10 * i}" for i in range(2))
    async with (
        grpc.aio.insecure_channel(old) as old_channel,
        grpc.aio.insecure_channel(new) as new_channel,
    ):
        on_old = admission_service_pb2_grpc.AdmissionServiceStub(old_channel)
        on_new = admission_service_pb2_grpc.AdmissionServiceStub(new_channel)

        async def policy_everywhere() -> bool:
            for stub in (on_old, on_new):
                status = await quota(stub, tenant, on_replica(tenant))
                if status.policy.max_in_flight != 1:
                    return False
            return True

        await eventually(policy_everywhere, timeout=5.0, what="the policy on both replicas")

        # The stall this is about: the new owner cannot release the old one's lease.
        held = await on_old.Admit(pb.AdmitRequest(), metadata=on_replica(tenant), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await on_new.Release(
                pb.ReleaseRequest(lease_id=held.lease.lease_id),
                metadata=on_replica(tenant),
                timeout=5,
            )
        assert error_details(refused.value).error_info.reason == "LEASE_NOT_FOUND"
        await on_old.Release(
            pb.ReleaseRequest(lease_id=held.lease.lease_id), metadata=on_replica(tenant), timeout=5
        )

        # The gate's streams go to the old owner; a Release call would reach the new one.
        gate = AdmissionGate(old, rotate_after=rotate_after)
        gate._release_stub = calls = _CountedReleases(on_new)
        ask = Ask(tenant_id=tenant, tier="", prompt_tokens=10, max_tokens=10)
        try:
            for n in range(ROUNDS):  # each needs the slot the one before released
                lease_id = await asyncio.wait_for(gate.admit(ask), STALL_S)
                gate.release(lease_id, tenant_id=tenant, prompt=10, completion=n)
        finally:
            await gate.close()
        assert calls.calls == 0
        assert (await quota(on_old, tenant, on_replica(tenant))).in_flight == 0
        assert (await quota(on_new, tenant, on_replica(tenant))).in_flight == 0


async def test_a_draining_replica_sends_new_admissions_elsewhere_and_ends_its_stream_cleanly(
    admission, mesh
):
    tenant = new_tenant()
    await set_policy(admission, tenant, max_in_flight=1)
    owner = await _replica_of(admission, tenant)
    slot = int(owner.rpartition("-")[2])
    config = mesh.config
    gate = AdmissionGate(f"{config.host}:{config.envoy_internal_port}")  # as inference does
    gate._release_stub = calls = _CountedReleases(gate._release_stub)
    ask = Ask(tenant_id=tenant, tier="", prompt_tokens=10, max_tokens=10)
    stopping = None
    try:
        first = await asyncio.wait_for(gate.admit(ask), STALL_S)  # held on the owner
        old = gate._sessions[tenant]
        stopping = asyncio.ensure_future(asyncio.to_thread(mesh.stop_component, owner))
        target = f"{config.host}:{config.admission_port + 10 * slot}"
        async with grpc.aio.insecure_channel(target) as channel:
            direct = admission_service_pb2_grpc.AdmissionServiceStub(channel)

            async def draining() -> bool:
                try:
                    await direct.Admit(
                        pb.AdmitRequest(no_wait=True), metadata=on_replica(tenant), timeout=2
                    )
                except grpc.aio.AioRpcError as error:  # at max_in_flight until it drains
                    return error.code() == grpc.StatusCode.UNAVAILABLE
                raise AssertionError("admitted past max_in_flight")

            await eventually(draining, timeout=30.0, interval=0.05, what=f"{owner} draining")
        # refused SHUTTING_DOWN on the owner's stream, admitted over a new one elsewhere
        second = await asyncio.wait_for(gate.admit(ask), STALL_S)
        assert gate._sessions[tenant] is not old
        gate.release(first, tenant_id=tenant, prompt=10, completion=1)  # over `old`
        gate.release(second, tenant_id=tenant, prompt=10, completion=1)
        # the old stream, half-closed once its lease was released, ended by its replica
        # after it handled every frame: not cut off at the end of the grace period
        await asyncio.wait_for(asyncio.shield(old.reader), 8.0)
        assert await old._call.code() == grpc.StatusCode.OK
        await stopping
    finally:
        await gate.close()
        if stopping is not None:
            await stopping
            await asyncio.to_thread(mesh.start_service, owner)
    assert calls.calls == 0  # no release went by a call the edge routes by tenant

    async def released() -> bool:
        return (await quota(admission, tenant)).in_flight == 0

    await eventually(released, timeout=5.0, what="the lease on the new owner released")


async def _replica_of(stub, tenant: str) -> str:
    call = stub.GetQuota(pb.GetQuotaRequest(), metadata=as_tenant(tenant), timeout=5)
    await call
    return dict(await call.initial_metadata())["x-admission-replica"]
