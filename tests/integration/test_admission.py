"""AdmissionService end to end: through Envoy to two replicas, policies in PostgreSQL."""

from __future__ import annotations

import asyncio
import urllib.request
import uuid

import grpc
import pytest
from google.protobuf import field_mask_pb2
from prometheus_client.parser import text_string_to_metric_families
from switchboard.admission.v1 import admission_pb2 as pb
from switchboard.admission.v1 import admission_service_pb2_grpc
from switchboard.common.v1 import common_pb2
from switchboard.inference.v1 import inference_pb2

from services.launcher._services import SERVICES
from services.runtime import error_details
from tests.integration.conftest import as_operator, as_tenant
from tests.polling import eventually

(ADMISSION,) = [spec for spec in SERVICES if spec.name == "admission"]

REPLICA_HEADER = "x-admission-replica"
CONTEXT = [
    inference_pb2.Passage(
        source_id="doc", text="Envoy is an edge proxy. It routes gRPC calls by service name."
    )
]


@pytest.fixture
async def admission(envoy_target: str):
    async with grpc.aio.insecure_channel(envoy_target) as channel:
        yield admission_service_pb2_grpc.AdmissionServiceStub(channel)


def new_tenant() -> str:
    return f"tenant-{uuid.uuid4().hex[:12]}"


def on_replica(tenant: str) -> tuple[tuple[str, str], ...]:
    """Metadata of a call to a replica's own port (no Envoy, no key): the tenant header."""
    return (("x-tenant-id", tenant),)


async def set_policy(stub, tenant: str, **fields) -> pb.Policy:
    reply = await stub.UpdatePolicy(
        pb.UpdatePolicyRequest(
            policy=pb.Policy(tenant_id=tenant, **fields),
            update_mask=field_mask_pb2.FieldMask(paths=list(fields)),
        ),
        metadata=as_operator(tenant),
        timeout=5,
    )
    return reply.policy


async def quota(stub, tenant: str, metadata=None) -> pb.QuotaStatus:
    metadata = metadata or as_tenant(tenant)
    reply = await stub.GetQuota(pb.GetQuotaRequest(), metadata=metadata, timeout=5)
    return reply.quota


def waiting(status: pb.QuotaStatus) -> int:
    return sum(q.waiting for q in status.queued)


async def test_admit_and_release_round_trip(admission):
    tenant = new_tenant()
    reply = await admission.Admit(
        pb.AdmitRequest(estimated_prompt_tokens=40, max_completion_tokens=60),
        metadata=as_tenant(tenant),
        timeout=5,
    )
    assert reply.lease.lease_id and reply.lease.tenant_id == tenant
    assert reply.lease.charged_tokens == 100
    assert reply.lease.expire_time.seconds > 0
    assert (await quota(admission, tenant)).in_flight == 1

    usage = common_pb2.TokenUsage(prompt_tokens=40, completion_tokens=10, total_tokens=50)
    release = pb.ReleaseRequest(lease_id=reply.lease.lease_id, actual_usage=usage)
    first = await admission.Release(release, metadata=as_tenant(tenant), timeout=5)
    assert first.released and first.token_adjustment == 50
    assert (await quota(admission, tenant)).in_flight == 0

    again = await admission.Release(release, metadata=as_tenant(tenant), timeout=5)
    assert not again.released and again.token_adjustment == 0
    unknown = pb.ReleaseRequest(lease_id="no-such-lease")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admission.Release(unknown, metadata=as_tenant(tenant), timeout=5)
    assert error_details(err.value).error_info.reason == "LEASE_NOT_FOUND"


def attempt(request_id: str, **fields) -> pb.AdmitRequest:
    return pb.AdmitRequest(context=common_pb2.RequestContext(request_id=request_id), **fields)


async def test_a_caller_that_lost_the_lease_id_releases_by_its_request_id(admission):
    tenant = new_tenant()
    request_id = uuid.uuid4().hex
    reply = await admission.Admit(
        attempt(request_id, estimated_prompt_tokens=40), metadata=as_tenant(tenant), timeout=5
    )
    assert reply.lease.lease_id and (await quota(admission, tenant)).in_flight == 1

    release = pb.ReleaseRequest(
        request_id=request_id, actual_usage=common_pb2.TokenUsage(total_tokens=0)
    )
    first = await admission.Release(release, metadata=as_tenant(tenant), timeout=5)
    assert first.released and first.token_adjustment == 40
    assert (await quota(admission, tenant)).in_flight == 0
    again = await admission.Release(release, metadata=as_tenant(tenant), timeout=5)
    assert not again.released and again.token_adjustment == 0
    by_lease = pb.ReleaseRequest(lease_id=reply.lease.lease_id)
    assert not (await admission.Release(by_lease, metadata=as_tenant(tenant), timeout=5)).released


async def test_a_release_by_request_id_takes_a_waiter_out_of_the_queue(admission):
    tenant = new_tenant()
    await set_policy(admission, tenant, max_in_flight=1)
    first = await admission.Admit(pb.AdmitRequest(), metadata=as_tenant(tenant), timeout=5)
    request_id = uuid.uuid4().hex
    waiter = asyncio.ensure_future(
        admission.Admit(attempt(request_id), metadata=as_tenant(tenant), timeout=10)
    )

    async def queued() -> bool:
        return waiting(await quota(admission, tenant)) == 1

    await eventually(queued)
    release = pb.ReleaseRequest(request_id=request_id)
    assert (await admission.Release(release, metadata=as_tenant(tenant), timeout=5)).released
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await waiter
    assert err.value.code() == grpc.StatusCode.CANCELLED
    await admission.Release(
        pb.ReleaseRequest(lease_id=first.lease.lease_id), metadata=as_tenant(tenant), timeout=5
    )
    status = await quota(admission, tenant)
    assert status.in_flight == 0 and waiting(status) == 0


async def test_a_release_that_overtakes_its_admit_refuses_the_admit(admission):
    tenant = new_tenant()
    request_id = uuid.uuid4().hex
    release = pb.ReleaseRequest(request_id=request_id)
    assert not (await admission.Release(release, metadata=as_tenant(tenant), timeout=5)).released
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admission.Admit(attempt(request_id), metadata=as_tenant(tenant), timeout=5)
    assert err.value.code() == grpc.StatusCode.CANCELLED
    assert (await quota(admission, tenant)).in_flight == 0


@pytest.mark.parametrize(
    "release",
    [pb.ReleaseRequest(), pb.ReleaseRequest(lease_id="a-lease", request_id="an-attempt")],
    ids=["neither", "both"],
)
async def test_release_needs_exactly_one_of_lease_and_request_id(admission, release):
    tenant = new_tenant()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admission.Release(release, metadata=as_tenant(tenant), timeout=5)
    details = error_details(err.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    fields = {v.field for v in details.field_violations}
    assert fields == {"lease_id", "request_id"}


async def test_no_wait_refusal_carries_quota_failure_and_an_honest_retry(admission):
    tenant = new_tenant()
    await set_policy(admission, tenant, requests_per_second=0.5, request_burst=1)
    await admission.Admit(pb.AdmitRequest(), metadata=as_tenant(tenant), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admission.Admit(pb.AdmitRequest(no_wait=True), metadata=as_tenant(tenant), timeout=5)
    details = error_details(err.value)
    assert details.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details.error_info.reason == "QUOTA_EXCEEDED"
    assert details.error_info.metadata["limit"] == "requests_per_second"
    assert [v.subject for v in details.quota_failure.violations] == [f"tenant:{tenant}"]
    delay = details.retry_info.retry_delay.ToTimedelta().total_seconds()
    assert 1.0 < delay <= 2.0  # one request at 0.5/s, just taken


async def test_a_queued_admit_is_admitted_when_a_lease_is_released(admission):
    tenant = new_tenant()
    await set_policy(admission, tenant, max_in_flight=1)
    first = await admission.Admit(pb.AdmitRequest(), metadata=as_tenant(tenant), timeout=5)
    second = asyncio.ensure_future(
        admission.Admit(pb.AdmitRequest(), metadata=as_tenant(tenant), timeout=10)
    )

    async def queued() -> bool:
        return waiting(await quota(admission, tenant)) == 1

    await eventually(queued)
    assert not second.done()
    await admission.Release(
        pb.ReleaseRequest(lease_id=first.lease.lease_id), metadata=as_tenant(tenant), timeout=5
    )
    reply = await asyncio.wait_for(second, 5)
    assert reply.queue_wait.ToTimedelta().total_seconds() > 0
    assert reply.initial_queue_position == 0


async def test_a_cancelled_waiter_frees_its_place_at_once(admission):
    tenant = new_tenant()
    await set_policy(admission, tenant, max_in_flight=1, max_queued=1)
    first = await admission.Admit(pb.AdmitRequest(), metadata=as_tenant(tenant), timeout=5)
    waiter = admission.Admit(pb.AdmitRequest(), metadata=as_tenant(tenant), timeout=10)
    pending = asyncio.ensure_future(waiter)

    async def queued(n: int):
        async def check() -> bool:
            return waiting(await quota(admission, tenant)) == n

        return check

    await eventually(await queued(1))
    waiter.cancel()
    await eventually(await queued(0), timeout=1.0)
    with pytest.raises(asyncio.CancelledError):
        await pending
    # the freed place takes a new waiter (max_queued is 1), admitted on release
    third = asyncio.ensure_future(
        admission.Admit(pb.AdmitRequest(), metadata=as_tenant(tenant), timeout=10)
    )
    await eventually(await queued(1))
    await admission.Release(
        pb.ReleaseRequest(lease_id=first.lease.lease_id), metadata=as_tenant(tenant), timeout=5
    )
    assert (await asyncio.wait_for(third, 5)).lease.lease_id


async def test_admit_stream_reports_the_queue_then_admits(admission):
    tenant = new_tenant()
    await set_policy(admission, tenant, max_in_flight=1)
    first = await admission.Admit(pb.AdmitRequest(), metadata=as_tenant(tenant), timeout=5)
    stream = admission.AdmitStream(
        pb.AdmitStreamRequest(request=pb.AdmitRequest()), metadata=as_tenant(tenant), timeout=10
    )
    update = await stream.read()
    assert update.HasField("queued") and update.queued.position == 0
    await admission.Release(
        pb.ReleaseRequest(lease_id=first.lease.lease_id), metadata=as_tenant(tenant), timeout=5
    )
    while (message := await stream.read()).HasField("queued"):
        pass
    assert message.admitted.lease.lease_id


async def test_admit_session_decides_many_requests_over_one_stream(admission):
    tenant = new_tenant()
    await set_policy(admission, tenant, max_in_flight=1)
    session = admission.AdmitSession(metadata=as_tenant(tenant), timeout=20)

    async def send(request_id: str, **fields) -> None:
        request = pb.AdmitRequest(**fields)
        request.context.request_id = request_id
        await session.write(pb.AdmitSessionRequest(request=request))

    await send("first", estimated_prompt_tokens=10)
    first = await session.read()
    assert first.request_id == "first" and first.admitted.lease.lease_id
    await send("second")  # waits for the first's slot
    queued = await session.read()
    assert (queued.request_id, queued.queued.position) == ("second", 0)
    # a refusal ends that request only, with the details Admit would fail with
    await send("bad", estimated_prompt_tokens=-5)
    bad = await session.read()
    assert bad.request_id == "bad"
    assert bad.refused.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    await send("foreign", context={"tenant_id": "someone-else", "request_id": "foreign"})
    foreign = await session.read()
    assert foreign.refused.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert error_details(foreign.refused).error_info.reason == "TENANT_MISMATCH"
    await admission.Release(
        pb.ReleaseRequest(lease_id=first.admitted.lease.lease_id),
        metadata=as_tenant(tenant),
        timeout=5,
    )
    while (message := await session.read()).HasField("queued"):
        pass
    assert message.request_id == "second" and message.admitted.lease.lease_id
    # half-closed with nothing waiting: the stream ends cleanly
    await session.done_writing()
    assert await session.read() is grpc.aio.EOF
    assert await session.code() == grpc.StatusCode.OK
    await admission.Release(
        pb.ReleaseRequest(lease_id=message.admitted.lease.lease_id),
        metadata=as_tenant(tenant),
        timeout=5,
    )
    assert (await quota(admission, tenant)).in_flight == 0


async def test_an_admit_session_that_ends_takes_its_waiters_out_of_the_queue(admission):
    tenant = new_tenant()
    await set_policy(admission, tenant, max_in_flight=1)
    held = await admission.Admit(pb.AdmitRequest(), metadata=as_tenant(tenant), timeout=5)
    session = admission.AdmitSession(metadata=as_tenant(tenant), timeout=20)
    for request_id in ("w1", "w2"):
        request = pb.AdmitRequest()
        request.context.request_id = request_id
        await session.write(pb.AdmitSessionRequest(request=request))
    assert {(await session.read()).request_id for _ in range(2)} == {"w1", "w2"}
    assert waiting(await quota(admission, tenant)) == 2
    session.cancel()

    async def left() -> bool:
        return waiting(await quota(admission, tenant)) == 0

    await eventually(left, timeout=1.0)
    await admission.Release(
        pb.ReleaseRequest(lease_id=held.lease.lease_id), metadata=as_tenant(tenant), timeout=5
    )
    assert (await quota(admission, tenant)).in_flight == 0


async def test_bad_policies_and_requests_get_field_violations(admission):
    tenant = new_tenant()
    with pytest.raises(grpc.aio.AioRpcError) as err:  # the contract's rules
        await set_policy(admission, tenant, requests_per_second=-1.0, max_in_flight=-3)
    details = error_details(err.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert {v.field for v in details.field_violations} == {
        "policy.requests_per_second",
        "policy.max_in_flight",
    }
    with pytest.raises(grpc.aio.AioRpcError) as err:  # 0 stands for "unset", not in the mask
        await set_policy(admission, tenant, weight=0)
    assert [v.field for v in error_details(err.value).field_violations] == ["policy.weight"]

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admission.UpdatePolicy(
            pb.UpdatePolicyRequest(
                policy=pb.Policy(tenant_id=tenant),
                update_mask=field_mask_pb2.FieldMask(paths=["color"]),
            ),
            metadata=as_operator(tenant),
            timeout=5,
        )
    assert [v.field for v in error_details(err.value).field_violations] == ["update_mask.paths[0]"]

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admission.Admit(
            pb.AdmitRequest(
                context=common_pb2.RequestContext(priority=7), estimated_prompt_tokens=-5
            ),
            metadata=as_tenant(tenant),
            timeout=5,
        )
    details = error_details(err.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert {v.field for v in details.field_violations} == {
        "context.priority",
        "estimated_prompt_tokens",
    }


async def test_tenant_is_required_and_must_match_the_header(admission, mesh):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admission.Admit(pb.AdmitRequest(), timeout=5)
    details = error_details(err.value)
    assert details.code == grpc.StatusCode.UNAUTHENTICATED
    assert details.error_info.reason == "API_KEY_MISSING"  # refused by Envoy
    # a replica's own port (as the internal listener) needs the tenant header
    replica = _replica_targets(mesh)["admission-0"]
    async with grpc.aio.insecure_channel(replica) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await admission_service_pb2_grpc.AdmissionServiceStub(channel).Admit(
                pb.AdmitRequest(), timeout=5
            )
    details = error_details(err.value)
    assert details.code == grpc.StatusCode.UNAUTHENTICATED
    assert details.error_info.reason == "TENANT_MISSING"

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admission.GetQuota(
            pb.GetQuotaRequest(tenant_id="someone-else"), metadata=as_tenant("me"), timeout=5
        )
    details = error_details(err.value)
    assert details.code == grpc.StatusCode.PERMISSION_DENIED
    assert details.error_info.reason == "TENANT_MISMATCH"


async def test_policy_etag_guards_concurrent_updates(admission):
    tenant = new_tenant()
    policy = await set_policy(admission, tenant, max_in_flight=5)
    assert policy.etag and policy.update_time.seconds > 0
    read = await admission.GetPolicy(pb.GetPolicyRequest(), metadata=as_tenant(tenant), timeout=5)
    assert not read.is_default and read.policy.etag == policy.etag
    assert read.policy.max_in_flight == 5 and read.policy.request_burst > 0  # default kept

    stale = pb.UpdatePolicyRequest(
        policy=pb.Policy(tenant_id=tenant, max_in_flight=6, etag="stale"),
        update_mask=field_mask_pb2.FieldMask(paths=["max_in_flight"]),
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admission.UpdatePolicy(stale, metadata=as_operator(tenant), timeout=5)
    details = error_details(err.value)
    assert details.code == grpc.StatusCode.ABORTED
    assert details.error_info.reason == "ETAG_MISMATCH"

    stale.policy.etag = policy.etag
    updated = await admission.UpdatePolicy(stale, metadata=as_operator(tenant), timeout=5)
    assert updated.policy.max_in_flight == 6 and updated.policy.etag != policy.etag

    deleted = await admission.DeletePolicy(
        pb.DeletePolicyRequest(tenant_id=tenant), metadata=as_operator(tenant), timeout=5
    )
    assert deleted.deleted
    after = await admission.GetPolicy(pb.GetPolicyRequest(), metadata=as_tenant(tenant), timeout=5)
    assert after.is_default


async def test_list_policies_pages_through_a_tenant(admission):
    tenant = new_tenant()
    for user in ("u1", "u2", "u3"):
        await admission.UpdatePolicy(
            pb.UpdatePolicyRequest(
                policy=pb.Policy(tenant_id=tenant, user_id=user, max_in_flight=2),
                update_mask=field_mask_pb2.FieldMask(paths=["max_in_flight"]),
            ),
            metadata=as_operator(tenant),
            timeout=5,
        )
    first = await admission.ListPolicies(
        pb.ListPoliciesRequest(tenant_id=tenant, page_size=2),
        metadata=as_operator(),
        timeout=5,
    )
    assert [p.user_id for p in first.policies] == ["u1", "u2"] and first.next_page_token
    rest = await admission.ListPolicies(
        pb.ListPoliciesRequest(tenant_id=tenant, page_size=2, page_token=first.next_page_token),
        metadata=as_operator(),
        timeout=5,
    )
    assert [p.user_id for p in rest.policies] == ["u3"] and not rest.next_page_token


def _replica_targets(mesh) -> dict[str, str]:
    config = mesh.config
    return {
        f"admission-{i}": f"{config.host}:{config.admission_port + 10 * i}"
        for i in range(config.admission_replicas)
    }


async def _replica_of(stub, tenant: str) -> str:
    call = stub.GetQuota(pb.GetQuotaRequest(), metadata=as_tenant(tenant), timeout=5)
    await call
    return dict(await call.initial_metadata())[REPLICA_HEADER]


async def test_envoy_keeps_each_tenant_on_one_replica_and_spreads_tenants(admission, mesh):
    replicas = _replica_targets(mesh)
    assert len(replicas) == 2
    tenants = [new_tenant() for _ in range(16)]
    seen = {t: {await _replica_of(admission, t) for _ in range(4)} for t in tenants}
    assert all(len(names) == 1 for names in seen.values()), seen
    assert set().union(*seen.values()) == set(replicas)

    # A lease taken through Envoy lives only on the tenant's replica.
    tenant = tenants[0]
    (owner,) = seen[tenant]
    lease = await admission.Admit(pb.AdmitRequest(), metadata=as_tenant(tenant), timeout=5)
    in_flight = {}
    for name, target in replicas.items():
        async with grpc.aio.insecure_channel(target) as channel:
            direct = admission_service_pb2_grpc.AdmissionServiceStub(channel)
            in_flight[name] = (await quota(direct, tenant, on_replica(tenant))).in_flight
    assert in_flight == {name: int(name == owner) for name in replicas}
    await admission.Release(
        pb.ReleaseRequest(lease_id=lease.lease.lease_id), metadata=as_tenant(tenant), timeout=5
    )


async def test_a_policy_update_reaches_every_replica_without_restart(admission, mesh):
    tenant = new_tenant()
    await set_policy(admission, tenant, max_in_flight=3)
    for target in _replica_targets(mesh).values():
        async with grpc.aio.insecure_channel(target) as channel:
            direct = admission_service_pb2_grpc.AdmissionServiceStub(channel)

            async def applied(stub=direct) -> bool:
                return (await quota(stub, tenant, on_replica(tenant))).policy.max_in_flight == 3

            await eventually(applied, timeout=5.0)


async def test_tier_ceiling_follows_the_healthy_backends(admission, inference, mesh):
    models = await inference.ListModels(inference_pb2.ListModelsRequest(), timeout=5)
    (small,) = [m for m in models.models if m.tier == common_pb2.MODEL_TIER_SMALL]
    healthy = sum(b.state == inference_pb2.BACKEND_STATE_HEALTHY for b in small.backends)
    ceiling = -(-healthy * 16 // mesh.config.admission_replicas)  # per replica
    tenant = new_tenant()
    await set_policy(
        admission, tenant, max_in_flight=1000, request_burst=1000, requests_per_second=1000.0
    )
    request = pb.AdmitRequest(tier=common_pb2.MODEL_TIER_SMALL, no_wait=True)

    async def fill() -> tuple[list[str], object]:
        """Admits until refused (at most ceiling + 1), then releases what it got."""
        leases, details = [], None
        try:
            for _ in range(ceiling + 1):
                try:
                    reply = await admission.Admit(request, metadata=as_tenant(tenant), timeout=5)
                except grpc.aio.AioRpcError as err:
                    details = error_details(err)
                    break
                leases.append(reply.lease.lease_id)
        finally:
            for lease_id in leases:
                await admission.Release(
                    pb.ReleaseRequest(lease_id=lease_id), metadata=as_tenant(tenant), timeout=5
                )
        return leases, details

    async def ceiling_applied() -> bool:  # the feed polls ListModels every 2 s
        return (await fill())[1] is not None

    await eventually(ceiling_applied, timeout=10.0)
    leases, details = await fill()
    assert len(leases) == ceiling
    assert details.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details.error_info.reason == "CAPACITY_EXHAUSTED"
    assert details.quota_failure.violations[0].subject == "tier:small"
    assert details.retry_info is not None


async def test_generate_refused_by_admission_streams_nothing(admission, inference):
    tenant = new_tenant()
    await set_policy(admission, tenant, requests_per_second=0.05, request_burst=1)
    request = inference_pb2.GenerateRequest(prompt="What does Envoy do?", context=CONTEXT)
    tokens = [r async for r in inference.Generate(request, metadata=as_tenant(tenant), timeout=20)]
    assert tokens[-1].HasField("complete")

    async def released() -> bool:
        return (await quota(admission, tenant)).in_flight == 0

    await eventually(released)

    received = []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for reply in inference.Generate(request, metadata=as_tenant(tenant), timeout=5):
            received.append(reply)
    assert received == []
    details = error_details(err.value)
    assert details.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details.error_info.reason == "QUOTA_EXCEEDED"
    assert details.error_info_count == 1
    assert details.quota_failure.violations[0].subject == f"tenant:{tenant}"
    assert details.retry_info.retry_delay.ToTimedelta().total_seconds() > 5


async def test_a_generation_the_client_cancels_releases_its_lease(admission, inference):
    tenant = new_tenant()
    await set_policy(admission, tenant, requests_per_second=0.01, request_burst=5)
    request = inference_pb2.GenerateRequest(
        prompt="What does Envoy do?", context=CONTEXT, parameters={"max_tokens": 64}
    )
    call = inference.Generate(request, metadata=as_tenant(tenant), timeout=20)
    assert (await call.read()).HasField("token")
    call.cancel()

    async def released() -> bool:
        status = await quota(admission, tenant)
        return status.in_flight == 0

    await eventually(released)
    assert (await quota(admission, tenant)).available_requests < 4.5  # it was admitted


@pytest.mark.parametrize("report_queue_position", [False, True], ids=["admit", "stream"])
async def test_generations_given_up_as_they_are_admitted_leak_no_lease(
    admission, inference, report_queue_position
):
    tenant = new_tenant()
    await set_policy(admission, tenant, max_in_flight=1)
    request = inference_pb2.GenerateRequest(
        prompt="What does Envoy do?",
        context=CONTEXT,
        parameters={"max_tokens": 8},
        report_queue_position=report_queue_position,
    )
    for round_ in range(24):
        held = await admission.Admit(pb.AdmitRequest(), metadata=as_tenant(tenant), timeout=5)
        call = inference.Generate(request, metadata=as_tenant(tenant), timeout=20)

        async def queued() -> bool:
            return waiting(await quota(admission, tenant)) == 1

        await eventually(queued)
        # free the slot and give up on the generation at about the same time, a little
        # later each round, so that some give up just as the lease is granted
        release = asyncio.ensure_future(
            admission.Release(
                pb.ReleaseRequest(lease_id=held.lease.lease_id),
                metadata=as_tenant(tenant),
                timeout=5,
            )
        )
        await asyncio.sleep(0.00025 * round_)
        call.cancel()
        await release

        async def released() -> bool:
            status = await quota(admission, tenant)
            return status.in_flight == 0 and waiting(status) == 0

        await eventually(released)


def admitted(mesh, tenant: str) -> dict[str, float]:
    """Admissions of `tenant` by priority class, summed over the replicas' metrics."""
    counts: dict[str, float] = {}
    for slot in range(mesh.config.admission_replicas):
        port = ADMISSION.metrics_port(mesh.config, slot)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            for family in text_string_to_metric_families(reply.read().decode()):
                for sample in family.samples:
                    if (
                        sample.name == "switchboard_admission_admitted_total"
                        and sample.labels.get("tenant") == tenant
                    ):
                        priority = sample.labels["priority"]
                        counts[priority] = counts.get(priority, 0) + sample.value
    return counts


async def test_generate_is_admitted_in_the_priority_class_it_asks_for(inference, mesh):
    tenant = new_tenant()
    for priority in (common_pb2.PRIORITY_BATCH, common_pb2.PRIORITY_UNSPECIFIED):
        request = inference_pb2.GenerateRequest(prompt="What routes gRPC calls?", context=CONTEXT)
        request.priority = priority
        async for _ in inference.Generate(request, metadata=as_tenant(tenant), timeout=30):
            pass
    assert admitted(mesh, tenant) == {"batch": 1, "interactive": 1}


async def test_generate_fails_closed_while_admission_is_down_and_recovers_after(
    admission, inference, mesh
):
    tenant = new_tenant()
    request = inference_pb2.GenerateRequest(
        prompt="What routes gRPC calls?", context=CONTEXT, parameters={"max_tokens": 4}
    )

    async def generate() -> list[inference_pb2.GenerateResponse]:
        call = inference.Generate(request, metadata=as_tenant(tenant), timeout=20)
        return [reply async for reply in call]

    assert (await generate())[-1].HasField("complete")  # the tenant's session is open
    # (with one replica down, Envoy's ring hash moves its tenants to the other)
    replicas = sorted(_replica_targets(mesh))
    for replica in replicas:
        mesh.stop_component(replica)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as down:
            await generate()
        assert down.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_details(down.value).error_info.reason == "DEPENDENCY_UNAVAILABLE"
    finally:
        for replica in replicas:
            await asyncio.to_thread(mesh.start_service, replica)
    replies: list = []

    async def recovered() -> bool:  # a new session reaches a restarted replica
        try:
            replies[:] = await generate()
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            return False
        return True

    await eventually(recovered, timeout=20, interval=0.3, what="Generate recovers")
    assert replies[-1].HasField("complete") and any(r.HasField("token") for r in replies)
