"""The control plane on a real mesh: supervision (kill -9 → restarted, crash loop →
FAILED), scale and rollout under steady load through Envoy, the control plane's own
death, and its API's authority and bad input."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from switchboard.admission.v1 import admission_service_pb2_grpc
from switchboard.control.v1 import control_pb2 as pb
from switchboard.control.v1 import control_service_pb2_grpc
from switchboard.inference.v1 import inference_pb2, inference_service_pb2_grpc

from bench._common import (
    api_key_metadata,
    give_tenant_room,
    operator_metadata,
    unlimited_policy,
)
from bench._mixed_load import OPERATIONS, MixedLoad
from services.launcher import Mesh
from services.launcher._envoy_process import admin_stats
from services.runtime import error_details
from tests.polling import eventually

pytestmark = pytest.mark.timeout(600)

SERVING = pb.REPLICA_STATE_SERVING
TENANT = "control-tests"


@pytest.fixture(scope="module")
async def control(mesh: Mesh) -> AsyncIterator[control_service_pb2_grpc.ControlServiceStub]:
    """ControlService through Envoy's internal listener (loopback), as the CLI calls it."""
    async with grpc.aio.insecure_channel(mesh.internal_address) as channel:
        yield control_service_pb2_grpc.ControlServiceStub(channel)


@pytest.fixture(scope="module")
async def loaded(mesh: Mesh) -> MixedLoad:
    """The steady load, as a tenant whose admission policy it stays well within (the
    default allows 10 requests/s): a refusal under load would be the quota's, not a
    fault's."""
    async with grpc.aio.insecure_channel(mesh.envoy_address) as channel:
        await give_tenant_room(
            admission_service_pb2_grpc.AdmissionServiceStub(channel),
            operator_metadata(mesh),
            unlimited_policy(TENANT, in_flight=64),
        )
    load = MixedLoad(
        mesh.envoy_address, api_key_metadata(mesh, TENANT), workers=4, operations=OPERATIONS
    )
    await load.prepare()
    return load


async def replicas(control, service: str = "") -> list[pb.Replica]:
    reply = await control.ListReplicas(pb.ListReplicasRequest(service=service), timeout=5)
    return list(reply.replicas)


async def all_serving(control, service: str, count: int) -> bool:
    found = await replicas(control, service)
    return len(found) == count and all(r.state == SERVING for r in found)


async def test_every_replica_is_listed_serving_and_envoy_acked_the_config(control) -> None:
    found = {r.name: r for r in await replicas(control)}
    assert {"inference", "inference-1", "admission-0", "admission-1", "rag", "rag-1"} <= set(found)
    assert {"worker-0", "worker-1", "auth", "auth-1", "chat", "triton-0"} <= set(found)
    assert all(r.state == SERVING and r.pid > 0 for r in found.values()), found
    assert found["triton-0"].service == "triton"

    async def acked() -> bool:
        reply = await control.ListReplicas(pb.ListReplicasRequest(), timeout=5)
        (node,) = reply.envoy_nodes
        return node.connected and node.acked_version == reply.config_version > 0

    await eventually(acked, timeout=10, what="Envoy acknowledges the latest config")


async def test_the_public_port_has_no_route_to_the_control_plane(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(mesh.envoy_address) as channel:
        stub = control_service_pb2_grpc.ControlServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ListReplicas(
                pb.ListReplicasRequest(), metadata=operator_metadata(mesh), timeout=5
            )
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_bad_requests_are_refused_with_their_reason(control) -> None:
    cases = [
        (pb.ScaleServiceRequest(service="rag", replicas=0), "replicas"),
        (pb.ScaleServiceRequest(service="rag", replicas=5), "replicas"),
        (pb.ScaleServiceRequest(service="nope", replicas=1), "service"),
        (pb.ScaleServiceRequest(service="triton", replicas=2), "service"),
    ]
    for request, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await control.ScaleService(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
        details = error_details(err.value)
        assert details.error_info.reason == "INVALID_REQUEST"
        assert [v.field for v in details.field_violations] == [field]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await control.RolloutService(pb.RolloutServiceRequest(service="nope"), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await control.StopReplica(pb.StopReplicaRequest(replica="rag-9"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_details(err.value).error_info.reason == "REPLICA_NOT_FOUND"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await control.StartReplica(
            pb.StartReplicaRequest(replica="rag", environment={"PATH": "/tmp"}), timeout=10
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_second_operation_on_a_service_waits_its_turn(control) -> None:
    events = control.WatchEvents(pb.WatchEventsRequest())
    rollout = asyncio.ensure_future(
        control.RolloutService(pb.RolloutServiceRequest(service="rag"), timeout=120)
    )
    try:
        async for item in events:
            if item.event.kind == "rollout_started" and item.event.service == "rag":
                break
        for call, request in [
            (control.RolloutService, pb.RolloutServiceRequest(service="rag")),
            (control.ScaleService, pb.ScaleServiceRequest(service="rag", replicas=3)),
            (control.RolloutService, pb.RolloutServiceRequest()),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(request, timeout=10)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert error_details(err.value).error_info.reason == "OPERATION_IN_PROGRESS"
    finally:
        events.cancel()
        reply = await rollout
    assert {r.generation for r in reply.replicas} == {max(r.generation for r in reply.replicas)}
    assert len(reply.replicas) == 2


async def test_a_session_keeps_its_triton_whichever_inference_replica_serves_it(
    control,
) -> None:
    inference = [r.address for r in await replicas(control, "inference")]
    assert len(inference) == 2
    homes: dict[str, set[str]] = {}
    for session in (f"affine-{i}" for i in range(16)):
        for turn in range(4):
            # each turn straight to one replica or the other (a service's own port trusts
            # x-tenant-id), as Envoy's balancing may send them
            async with grpc.aio.insecure_channel(inference[turn % 2]) as channel:
                stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
                request = inference_pb2.GenerateRequest(
                    prompt="Which replica?",
                    session_id=session,
                    parameters=inference_pb2.GenerationParameters(max_tokens=4),
                )
                call = stub.Generate(request, metadata=(("x-tenant-id", TENANT),), timeout=30)
                async for reply in call:
                    if reply.HasField("complete"):
                        homes.setdefault(session, set()).add(reply.complete.backend)
    assert all(len(backends) == 1 for backends in homes.values()), homes
    # spread over both (all 16 on one: a chance of 2 in 65,536)
    assert len({b for backends in homes.values() for b in backends}) == 2


IN_FLIGHT_FAILURES = {grpc.StatusCode.UNAVAILABLE}
KINDS = ["inference", "admission", "rag", "execution", "worker", "auth", "gateway", "chat"]


async def test_a_killed_replica_of_each_kind_is_restarted_and_new_calls_succeed(
    mesh: Mesh, control, loaded: MixedLoad
) -> None:
    recoveries: dict[str, float] = {}
    new_call_failures: dict[str, list[str]] = {}
    in_flight_after_kill: dict[str, int] = {}
    async with loaded as load:
        await load.wait_calls(20, since=time.monotonic())
        previous_kill = 0.0
        for kind in KINDS:
            (victim, *_) = await replicas(control, kind)
            killed_at = time.monotonic()
            os.kill(victim.pid, signal.SIGKILL)

            async def back(name: str = victim.name, pid: int = victim.pid) -> bool:
                found = {r.name: r for r in await replicas(control)}
                return found[name].state == SERVING and found[name].pid != pid

            recoveries[kind] = await eventually(back, timeout=60, what=f"{victim.name} back")
            await load.wait_calls(12, since=time.monotonic())
            after = {r.name: r for r in await replicas(control)}[victim.name]
            assert after.restarts == victim.restarts + 1
            # (a call started after the previous kill is that kill's new call)
            failed = load.failed(since=max(killed_at - 30, previous_kill))
            # only a call in flight through the killed replica may fail: UNAVAILABLE, or
            # INTERNAL for a stream cut mid-answer (its server's death resets it). That
            # includes a call started just after the kill that Envoy had already written
            # onto its connection to the killed process (it had not yet seen it close):
            # Envoy says the connection was terminated under it, and does not retry a
            # call that is not read-only (it may have reached the process)
            cut = [r for r in failed if r.started < killed_at or _sent_to_the_dead(r)]
            assert all(r.code in {*IN_FLIGHT_FAILURES, grpc.StatusCode.INTERNAL} for r in cut), cut
            # any other call started after the kill has another replica: it never fails
            new_call_failures[kind] = [
                f"{r.operation} {r.code.name} +{r.started - killed_at:.2f}s {r.detail}"
                for r in failed
                if r.started >= killed_at and not _sent_to_the_dead(r)
            ]
            in_flight_after_kill[kind] = sum(
                1 for r in failed if r.started >= killed_at and _sent_to_the_dead(r)
            )
            previous_kill = killed_at
    print(f"recovery from kill -9 to SERVING again: {recoveries}")
    print(
        "calls started after the kill that failed (bench-rollout counts them): "
        f"{ {kind: len(f) for kind, f in new_call_failures.items()} }"
    )
    print(
        "calls started after the kill already on the killed process's connection: "
        f"{in_flight_after_kill}"
    )
    for kind, failures in new_call_failures.items():
        for failure in failures:
            print(f"  after killing {kind}: {failure}")
    assert not any(new_call_failures.values()), new_call_failures
    assert len(load.completed()) > 100
    await no_task_lost(load)


def _sent_to_the_dead(record) -> bool:
    """Envoy had written the call onto its connection to the killed process, which was
    terminated under it (not a refused connection: that Envoy retries elsewhere)."""
    return (
        record.code == grpc.StatusCode.UNAVAILABLE
        and "reset reason: connection termination" in record.detail
    )


async def no_task_lost(load: MixedLoad) -> None:
    """Every task accepted under load completes, whatever was killed or rolled out."""
    assert load.task_ids

    async def all_completed() -> bool:
        return await load.unfinished_tasks() == {}

    await eventually(all_completed, timeout=60, interval=1, what="every accepted task completes")


@pytest.mark.parametrize("service", ["inference", "chat"])
async def test_scale_up_and_down_under_load(control, loaded: MixedLoad, service: str) -> None:
    async with loaded as load:
        started = time.monotonic()
        for count in (3, 1, 2):
            reply = await control.ScaleService(
                pb.ScaleServiceRequest(service=service, replicas=count), timeout=120
            )
            assert len(reply.replicas) == count
            assert await all_serving(control, service, count)
            await load.wait_calls(12, since=time.monotonic())
    assert load.failed(since=started) == []
    assert len(load.completed(since=started)) >= 36
    if service == "chat":  # streams of the replicas scaled away resumed elsewhere
        assert load.chat_gaps == 0


async def test_a_rollout_of_every_service_under_load_fails_no_call(
    control, loaded: MixedLoad
) -> None:
    before = {r.name: r for r in await replicas(control)}
    async with loaded as load:
        started = time.monotonic()
        reply = await control.RolloutService(pb.RolloutServiceRequest(), timeout=900)
        await load.wait_calls(12, since=time.monotonic())
    rolled = [r for r in reply.replicas]
    assert {r.service for r in rolled} >= {"inference", "rag", "admission", "worker"}
    assert all(r.state == SERVING for r in rolled)
    for replica in rolled:
        old = [b for b in before.values() if b.service == replica.service]
        assert replica.generation > max(b.generation for b in old)
        assert replica.pid not in {b.pid for b in old}
    assert load.failed(since=started) == []
    await no_task_lost(load)


async def test_a_crash_looping_replica_is_failed_and_the_rest_serves(
    mesh: Mesh, control, loaded: MixedLoad
) -> None:
    (victim, *_) = [r for r in await replicas(control, "rag") if r.state == SERVING]
    started = time.monotonic()
    async with loaded as load:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await control.StartReplica(
                pb.StartReplicaRequest(
                    replica=victim.name, environment={"SWITCHBOARD_RAG_MAX_MESSAGE_BYTES": "1"}
                ),
                timeout=120,
            )
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE

        async def given_up() -> pb.Replica | None:
            found = {r.name: r for r in await replicas(control, "rag")}[victim.name]
            return found if found.state == pb.REPLICA_STATE_FAILED else None

        # five exits within a minute, each after a start-up (slow on a loaded machine)
        await eventually(given_up, timeout=120, interval=0.5, what="the crash loop is FAILED")
        failed = await given_up()
        assert failed is not None
        assert failed.restarts >= 4
        assert "max_message_bytes" in failed.last_log
        await load.wait_calls(12, since=time.monotonic())
        reply = await control.StartReplica(pb.StartReplicaRequest(replica=victim.name), timeout=120)
        assert reply.replica.state == SERVING
    assert [r for r in load.failed(since=started) if r.operation == "retrieve"] == []


async def test_envoy_keeps_routing_while_the_control_plane_is_down_and_resyncs(
    mesh: Mesh, control, loaded: MixedLoad
) -> None:
    before = await control.ListReplicas(pb.ListReplicasRequest(), timeout=5)
    pids = {r.name: r.pid for r in before.replicas}
    listeners = _listener_changes(mesh)
    (record,) = [r for r in mesh.state.load() if r.name == "control"]
    async with loaded as load:
        os.kill(record.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        await load.wait_calls(20, since=killed_at)
        await asyncio.to_thread(mesh.start_control)
        await load.wait_calls(12, since=time.monotonic())

    seen: list[pb.ListReplicasResponse] = []

    async def resynced() -> bool:
        reply = await control.ListReplicas(pb.ListReplicasRequest(), timeout=5)
        nodes = [n for n in reply.envoy_nodes if n.connected]
        seen[:] = [reply]
        # Envoy reconnects within its ADS retry back-off (at most 2 s)
        return bool(nodes) and nodes[0].acked_version == reply.config_version

    await eventually(resynced, timeout=15, what="Envoy back on ADS, the new config acked")
    (after,) = seen  # the answer that showed it (a later push may be in flight by now)
    assert {r.name: r.pid for r in after.replicas} == pids  # adopted, not restarted
    assert after.config_version > before.config_version
    assert _listener_changes(mesh) == listeners  # resynced without a listener drain
    assert load.failed(since=killed_at) == []


def _listener_changes(mesh: Mesh) -> dict[str, int]:
    stats = admin_stats(mesh.config.envoy_admin_port)
    names = ("listener_added", "listener_modified", "listener_removed", "listener_in_place_updated")
    return {name: stats.get(f"listener_manager.{name}", 0) for name in names}
