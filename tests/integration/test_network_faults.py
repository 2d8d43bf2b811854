"""Network faults between the services and their dependencies, injected by a real TCP
fault proxy (`tests.faultproxy`) in front of PostgreSQL (for rag), NATS (for
execution), Triton (for inference and for chat, which embeds the router) and Envoy's
internal listener (for chat's admission), under light load through the public port.

With each toxic on: every operation ends within its deadline (plus a small margin)
with OK, UNAVAILABLE carrying an ErrorInfo, DEADLINE_EXCEEDED or RESOURCE_EXHAUSTED,
never INTERNAL or UNKNOWN, and no stream outlives its deadline; a blackholed or reset
Triton opens the inference breaker, which closes again once the fault is cleared; then
every service serves normally again. Rotating faults for a bounded time leave no
service process with more descriptors, memory or connections than after a warm-up.

The mesh is this module's own (its services are re-pointed at the proxies).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta

import grpc
import pytest
from switchboard.admission.v1 import admission_service_pb2_grpc
from switchboard.chat.v1 import chat_pb2, chat_service_pb2_grpc
from switchboard.inference.v1 import inference_pb2, inference_service_pb2_grpc

from bench._common import give_tenant_room, unlimited_policy
from bench.network_faults import (
    CONNECTION_BOUND,
    FD_BOUND,
    ROTATION,
    RSS_BOUND_MB,
    FaultLoad,
    Growth,
    backend_states,
    dependency_proxies,
    proxied_env,
    rotate,
    serves_normally,
    service_usage,
    set_all,
    settled,
)
from services.launcher import Mesh, isolated_config
from services.runtime import error_details
from tests.faultproxy import Blackhole, Reset
from tests.integration.conftest import Credentials
from tests.polling import eventually

CALLS_PER_TOXIC = 12
"""Operations that must end while each toxic is on (three rounds of four workers)."""
ROTATE_S = float(os.environ.get("NETWORK_FAULTS_TEST_S", "30"))
"""How long the toxics rotate in the leak test."""
SILENCE_S = 3.0
"""The generation idle bound (`SWITCHBOARD_GENERATION_IDLE_TIMEOUT`) of the silent-model
test, far below what keepalive takes to give up a connection (35 s)."""
OPEN = inference_pb2.BACKEND_STATE_OPEN
HEALTHY = inference_pb2.BACKEND_STATE_HEALTHY


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    config = isolated_config(
        tmp_path_factory.mktemp("network-faults"), triton_replicas=1, admission_replicas=1
    )
    config = dataclasses.replace(config, auth_cache_ttl=timedelta(seconds=2))
    mesh = Mesh(config, progress=print)
    try:
        mesh.up()
        yield mesh
    finally:
        mesh.down()


@pytest.fixture(scope="module")
def credentials(mesh: Mesh) -> Iterator[Credentials]:
    """This module's mesh's keys (in place of the session mesh's)."""
    keys = Credentials(mesh)
    try:
        yield keys
    finally:
        keys.close()


@pytest.fixture(scope="module")
async def proxies(mesh: Mesh):
    async with dependency_proxies(mesh) as proxies:
        try:
            yield proxies
        finally:
            set_all(proxies, None)


@pytest.fixture(scope="module")
async def load(mesh: Mesh, credentials: Credentials, proxies) -> FaultLoad:
    tenant = f"faults-{uuid.uuid4().hex[:8]}"
    async with grpc.aio.insecure_channel(mesh.envoy_address) as channel:
        await give_tenant_room(
            admission_service_pb2_grpc.AdmissionServiceStub(channel),
            credentials.operator(),
            unlimited_policy(tenant, in_flight=64),
        )
    load = FaultLoad(mesh.envoy_address, credentials.metadata(tenant), workers=4)
    await load.prepare()
    return load


def problems(outcomes) -> list[str]:
    return [p for o in outcomes if (p := o.problem())]


@pytest.mark.timeout(900)  # the mesh's start, four restarts, five toxics and their heals
async def test_each_toxic_fails_calls_cleanly_and_every_service_heals(mesh, proxies, load):
    metadata = load.metadata
    seen: dict[str, Counter[str]] = {}
    for toxic in ROTATION:
        async with load:
            phase = time.monotonic()
            set_all(proxies, toxic)
            await eventually(
                lambda phase=phase: len(load.since(phase)) >= CALLS_PER_TOXIC,
                timeout=120,
                interval=0.2,
                what=f"{CALLS_PER_TOXIC} operations ended under {toxic}",
            )
            if isinstance(toxic, Blackhole | Reset):
                await eventually(
                    lambda: _states_are(mesh, metadata, {OPEN}),
                    timeout=60,
                    interval=0.5,
                    what=f"the inference breaker opened under {toxic}",
                )
            set_all(proxies, None)
            healed = await eventually(
                lambda: serves_normally(load),
                timeout=90,
                interval=0.5,
                what=f"every service serves normally after {toxic} was cleared",
            )
            await eventually(
                lambda: _states_are(mesh, metadata, {HEALTHY}),
                timeout=30,
                interval=0.5,
                what=f"the inference breaker closed after {toxic} was cleared",
            )
        outcomes = load.since(phase)
        seen[toxic.name] = Counter(o.label() for o in outcomes)
        print(
            f"{toxic}: {dict(sorted(seen[toxic.name].items()))}; healed {healed:.1f} s after clear"
        )
    for proxy_name, proxy in proxies.items():
        print(f"proxy {proxy_name}: {dict(proxy.injected)}")
    assert not problems(load.outcomes), problems(load.outcomes)
    assert all(p.faults_injected for p in proxies.values())


@pytest.mark.timeout(600)
async def test_rotating_faults_leave_no_leak(mesh, proxies, load):
    async with load:
        # warm-up: every toxic once, then healed
        await rotate(proxies, seconds=len(ROTATION) * 6.0, step_s=3.0)
        await settled(mesh, load, service_usage(mesh), timeout=60)
        baseline = service_usage(mesh)
        began = time.monotonic()
        steps = await rotate(proxies, seconds=ROTATE_S, step_s=3.0)
    growth: Growth = await settled(mesh, load, baseline, timeout=90)
    print(f"{steps} toxic steps in {ROTATE_S:g} s; growth after: {growth.describe()}")
    assert not problems(load.since(began)), problems(load.since(began))
    assert not growth.failing, f"not serving normally after the faults: {growth.failing}"
    assert not growth.restarted, f"processes restarted during the faults: {growth.restarted}"
    assert max(growth.fds.values()) <= FD_BOUND, growth.describe()
    assert max(growth.rss_mb.values()) <= RSS_BOUND_MB, growth.describe()
    assert max(growth.connections.values()) <= CONNECTION_BOUND, growth.describe()


async def _states_are(mesh: Mesh, metadata, states: set[int]) -> bool:
    try:
        return await backend_states(mesh.envoy_address, metadata) == states
    except grpc.aio.AioRpcError:
        return False


@pytest.mark.timeout(300)
async def test_a_silent_model_server_ends_generations_and_chat_turns_within_the_idle_bound(
    mesh, proxies, load
):
    """Triton's link goes silent (blackholed: nothing answered, nothing closed). A
    Generate without a deadline and a chat turn (whose answer has no deadline of its
    own) both end UNAVAILABLE once the router has heard nothing for the idle bound from
    each model it tried, long before keepalive would give the connection up; the session
    answers the next turn once the link is back."""
    env = proxied_env(mesh, proxies)
    silence = {"SWITCHBOARD_GENERATION_IDLE_TIMEOUT": f"{SILENCE_S:g}s"}
    for name in ("inference", "chat"):
        await asyncio.to_thread(mesh.start_service, name, env={**env[name], **silence})
    try:
        async with grpc.aio.insecure_channel(mesh.envoy_address) as channel:
            chat = chat_service_pb2_grpc.ChatServiceStub(channel)
            created = await chat.CreateSession(
                chat_pb2.CreateSessionRequest(), metadata=load.metadata, timeout=10
            )
            converse = chat.Converse(metadata=load.metadata, timeout=120)
            session = chat_pb2.OpenSession(session_id=created.session.session_id)
            await converse.write(chat_pb2.ConverseRequest(open=session))
            proxies["triton"].set(Blackhole())
            try:
                started = time.monotonic()
                request = inference_pb2.GenerateRequest(
                    prompt="What does a circuit breaker do?",
                    parameters=inference_pb2.GenerationParameters(max_tokens=8),
                )
                stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    async for _ in stub.Generate(request, metadata=load.metadata, timeout=60):
                        pass
                took = time.monotonic() - started
                info = error_details(failed.value).error_info
                assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value
                assert info is not None and info.reason == "BACKENDS_UNAVAILABLE", failed.value
                assert SILENCE_S <= took < 25, took

                started = time.monotonic()
                failure = await _turn(converse, "turn-1", "What opens the breaker?")
                took = time.monotonic() - started
                assert failure is not None, "the turn completed through a silent model"
                assert failure.code == grpc.StatusCode.UNAVAILABLE, failure
                assert SILENCE_S <= took < 25, took
            finally:
                proxies["triton"].clear()
            # the link is back: the same session answers (the breaker lets a probe through)
            await eventually(
                lambda: _answers(converse),
                timeout=60,
                interval=1.0,
                what="the session answers again once the model server is reachable",
            )
            await converse.done_writing()
    finally:
        for name in ("inference", "chat"):
            await asyncio.to_thread(mesh.start_service, name, env=env[name])


async def _turn(converse, client_message_id: str, text: str):
    """Sends one message; the turn's failure details, or None once it completed."""
    message = chat_pb2.UserMessage(client_message_id=client_message_id, text=text)
    await converse.write(chat_pb2.ConverseRequest(message=message))
    async for frame in converse:
        if frame.HasField("error"):
            return error_details(frame.error.status)
        if frame.HasField("turn_completed"):
            return None
    raise AssertionError("the stream ended within a turn")


async def _answers(converse) -> bool:
    return await _turn(converse, f"again-{uuid.uuid4().hex[:8]}", "What opens?") is None
