"""A real Envoy on the control plane's ADS: it ACKs, routes, survives a config it
rejects on the last good one, and resyncs after a control plane restart without
re-creating its listener.

No mesh: one Envoy started with `bootstrap`, an `XdsServer` in this process, and a tiny
gRPC server (the standard health service) as the only upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
import pytest
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.control import Endpoint, Resources, XdsServer, bootstrap, resources_from_static
from services.control.resources import CLUSTER_TYPE, load_assignment
from services.launcher import ProcessRecord, free_port_base, spawn, stop
from services.launcher._envoy import Upstream, render_envoy_config
from services.launcher._envoy_process import envoy_command, healthy_hosts
from tests.polling import eventually

HOST = "127.0.0.1"
PROBE = "switchboard.probe.v1.Probe"
SPARE = "switchboard.probe.v1.Spare"
NODE = "xds-test-edge"
LISTENER_STATS = (
    "listener_manager.listener_added",
    "listener_manager.listener_modified",
    "listener_manager.listener_removed",
    "listener_manager.total_listeners_draining",
    "cluster_manager.cluster_modified",
    "cluster_manager.cluster_removed",
    "http.public.downstream_cx_total",
)


@pytest.fixture(scope="module", autouse=True)
def credentials() -> None:
    """Overrides the package's autouse fixture of this name, which starts the whole mesh
    (and creates API keys in it): these tests need neither."""


ACCEPTED_VERSIONS = (
    "cluster_manager.cds.version_text",
    "cluster.probe.version_text",  # its endpoints (EDS)
    "listener_manager.lds.version_text",
    "http.public.rds.public.version_text",
)


@dataclass
class Ports:
    listener: int
    admin: int
    xds: int


@pytest.fixture(scope="module")
def ports() -> Ports:
    base = free_port_base(host=HOST, span=3)
    return Ports(listener=base, admin=base + 1, xds=base + 2)


@pytest.fixture(scope="module")
async def upstream() -> AsyncIterator[int]:
    """A gRPC server with the standard health service, SERVING for PROBE and ""."""
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    await servicer.set(PROBE, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"{HOST}:0")
    await server.start()
    try:
        yield port
    finally:
        await server.stop(grace=None)


def edge_resources(ports: Ports, upstream: int, *, spare: bool = False) -> Resources:
    """The launcher's renderer for the upstream (no ext_authz), as xDS resources; with
    `spare`, a second service (SPARE) on the same process, with a cluster of its own."""
    names = {"probe": PROBE, **({"spare": SPARE} if spare else {})}
    config = render_envoy_config(
        listen_host=HOST,
        listen_port=ports.listener,
        admin_port=ports.admin,
        upstreams=[
            Upstream(name=name, services=(service,), endpoints=((HOST, upstream),))
            for name, service in names.items()
        ],
    )
    endpoint = [Endpoint(HOST, upstream)]
    return resources_from_static(config, dict.fromkeys([*names, "reflection"], endpoint))


@dataclass
class ControlPlane:
    """An XdsServer on a fixed port, restartable on the same state file."""

    port: int
    state_path: Path
    xds: XdsServer = field(init=False)
    _server: grpc.aio.Server | None = None

    async def start(self) -> XdsServer:
        self.xds = XdsServer(state_path=self.state_path)
        self._server = grpc.aio.server()
        self.xds.add_to_server(self._server)
        self._server.add_insecure_port(f"{HOST}:{self.port}")
        await self._server.start()
        return self.xds

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=None)
            self._server = None


@pytest.fixture(scope="module")
async def control(
    ports: Ports, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ControlPlane]:
    plane = ControlPlane(ports.xds, tmp_path_factory.mktemp("control") / "xds-version.json")
    await plane.start()
    try:
        yield plane
    finally:
        await plane.stop()


@pytest.fixture(scope="module")
def envoy(
    ports: Ports, control: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProcessRecord]:
    run = tmp_path_factory.mktemp("envoy")
    config_path = run / "envoy.json"
    config = bootstrap(
        node_id=NODE,
        cluster="switchboard",
        admin_port=ports.admin,
        ads_host=HOST,
        ads_port=ports.xds,
    )
    config_path.write_text(json.dumps(config))
    argv = envoy_command(
        config_path=config_path, base_id=ports.listener, log_path=run / "envoy.log"
    )
    record = spawn("envoy", argv, log=run / "envoy.out")
    try:
        yield record
    finally:
        stop(record, timeout=5)


@pytest.fixture(scope="module")
async def channel(ports: Ports) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"{HOST}:{ports.listener}") as channel:
        yield channel


async def check(channel: grpc.aio.Channel, service: str = "") -> bool:
    """One health check through Envoy's listener; False on any failure."""
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=1
        )
    except grpc.aio.AioRpcError:
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


async def admin_get(admin: int, path: str) -> str:
    def fetch() -> str:
        with urllib.request.urlopen(f"http://{HOST}:{admin}{path}", timeout=2) as reply:  # noqa: S310
            return reply.read().decode()

    return await asyncio.to_thread(fetch)


async def _stat_lines(admin: int) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in (await admin_get(admin, "/stats")).splitlines())


async def stats(admin: int, names: tuple[str, ...]) -> dict[str, int]:
    values = await _stat_lines(admin)
    return {name: int(values[name]) for name in names}


async def accepted_versions(admin: int) -> dict[str, str]:
    """The version of the last update Envoy accepted, per subscription."""
    values = await _stat_lines(admin)
    return {name: values[name].strip('"') for name in ACCEPTED_VERSIONS}


async def listener_built_at(admin: int, name: str) -> str:
    """The version the active listener `name` was built from: Envoy keeps a listener
    whose config did not change, so this stays put unless it is re-created."""
    dump = json.loads(await admin_get(admin, "/config_dump?resource=dynamic_listeners"))
    (listener,) = [x for x in dump["configs"] if x["name"] == name]
    return str(listener["active_state"]["version_info"])


@pytest.fixture(scope="module")
async def serving(
    control: ControlPlane,
    envoy: ProcessRecord,
    upstream: int,
    ports: Ports,
    channel: grpc.aio.Channel,
) -> Resources:
    """The edge published and routing: the good resources."""
    resources = edge_resources(ports, upstream)
    version = control.xds.publish(resources)
    assert await control.xds.wait_acked(version, timeout=1) or True  # Envoy may connect later
    await eventually(
        lambda: any(n.connected for n in control.xds.status()),
        timeout=30,
        what=f"Envoy connects (its log: {Path(envoy.log).parent / 'envoy.log'})",
    )
    assert await control.xds.wait_acked(version, timeout=30), control.xds.status()
    await eventually(lambda: check(channel, PROBE), timeout=30, what="a call through Envoy")
    return resources


async def test_envoy_acks_every_type_and_routes(
    control: ControlPlane, serving: Resources, ports: Ports
) -> None:
    version = str(control.xds.version)
    assert await accepted_versions(ports.admin) == dict.fromkeys(ACCEPTED_VERSIONS, version)
    (node,) = control.xds.status()
    assert node.node_id == NODE and node.connected
    assert {t.acked_version for t in node.types.values()} == {control.xds.version}
    assert node.last_nack is None


async def test_a_rejected_snapshot_is_reported_and_the_last_good_keeps_routing(
    control: ControlPlane, serving: Resources, channel: grpc.aio.Channel
) -> None:
    bad = Cluster()
    bad.CopyFrom(serving.clusters["probe"])
    bad.name = "bad"
    bad.lb_policy = Cluster.CLUSTER_PROVIDED  # not for an EDS cluster: Envoy refuses it
    rejected = Resources(
        clusters={**serving.clusters, "bad": bad},
        endpoints={**serving.endpoints, "bad": load_assignment("bad", [])},
        listeners=serving.listeners,
        routes=serving.routes,
    )

    version = control.xds.publish(rejected)  # consistent: only Envoy can tell

    await eventually(
        lambda: (nack := control.xds.status()[0].last_nack) and nack.version == version,
        timeout=10,
        what="Envoy's NACK is recorded",
    )
    nack = control.xds.status()[0].last_nack
    assert nack is not None and nack.type_url == CLUSTER_TYPE and "bad" in nack.message
    assert not await control.xds.wait_acked(version, timeout=0.2)
    assert await check(channel, PROBE)
    fixed = control.xds.publish(serving)
    assert await control.xds.wait_acked(fixed, timeout=10)
    assert await check(channel, PROBE)
    assert control.xds.ack_latencies()  # the fix, published to a connected Envoy, was timed


async def test_a_removed_cluster_goes_after_the_routes_naming_it(
    control: ControlPlane,
    serving: Resources,
    upstream: int,
    ports: Ports,
    channel: grpc.aio.Channel,
) -> None:
    version = control.xds.publish(edge_resources(ports, upstream, spare=True))
    assert await control.xds.wait_acked(version, timeout=10), control.xds.status()
    assert "spare" in await asyncio.to_thread(healthy_hosts, ports.admin)

    version = control.xds.publish(serving)

    assert await control.xds.wait_acked(version, timeout=10), control.xds.status()
    assert "spare" not in await asyncio.to_thread(healthy_hosts, ports.admin)
    nack = control.xds.status()[0].last_nack
    assert nack is None or nack.version < version
    assert await check(channel, PROBE)


async def test_a_draining_endpoint_gets_no_new_calls_once_acked(
    control: ControlPlane,
    serving: Resources,
    upstream: int,
    ports: Ports,
    channel: grpc.aio.Channel,
) -> None:
    old = Endpoint(HOST, upstream)
    async with pinging_server() as port:
        new = Endpoint(HOST, port)
        version = control.xds.publish(with_probe(serving, [old, new]))
        assert await control.xds.wait_acked(version, timeout=10)
        await eventually(
            lambda: probe_hosts(ports.admin, 2), timeout=10, what="both replicas healthy"
        )
        before = {await probe_call(channel) for _ in range(20)}
        assert grpc.StatusCode.UNIMPLEMENTED in before  # the old replica gets calls

        version = control.xds.publish(with_probe(serving, [replace(old, draining=True), new]))
        assert await control.xds.wait_acked(version, timeout=10)

        assert await probe_hosts(ports.admin, 1)
        after = [await probe_call(channel) for _ in range(20)]
        assert after == [grpc.StatusCode.OK] * 20  # none reached the draining replica
        version = control.xds.publish(serving)
        assert await control.xds.wait_acked(version, timeout=10)


def with_probe(resources: Resources, endpoints: list[Endpoint]) -> Resources:
    return replace(
        resources, endpoints={**resources.endpoints, "probe": load_assignment("probe", endpoints)}
    )


async def probe_hosts(admin: int, count: int) -> bool:
    """The probe cluster has `count` hosts Envoy routes to (healthy, not draining)."""
    return (await asyncio.to_thread(healthy_hosts, admin)).get("probe") == count


@contextlib.asynccontextmanager
async def pinging_server() -> AsyncIterator[int]:
    """A second replica: SERVING, and answers PROBE's Ping (the first one does not)."""
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    await servicer.set(PROBE, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)

    async def ping(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return b""

    handler = grpc.unary_unary_rpc_method_handler(
        ping, request_deserializer=bytes, response_serializer=bytes
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(PROBE, {"Ping": handler})]
    )
    port = server.add_insecure_port(f"{HOST}:0")
    await server.start()
    try:
        yield port
    finally:
        await server.stop(grace=None)


async def probe_call(channel: grpc.aio.Channel) -> grpc.StatusCode:
    """A call to PROBE, which the upstream does not implement: UNIMPLEMENTED when it got
    there, UNAVAILABLE when Envoy had no host to send it to."""
    call = channel.unary_unary(
        f"/{PROBE}/Ping", request_serializer=bytes, response_deserializer=bytes
    )
    try:
        await call(b"", timeout=2)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def test_a_restarted_control_plane_resyncs_envoy_without_touching_listeners(
    control: ControlPlane, serving: Resources, channel: grpc.aio.Channel, ports: Ports
) -> None:
    before = await stats(ports.admin, LISTENER_STATS)
    lds_updates = (await stats(ports.admin, ("listener_manager.lds.update_success",)))[
        "listener_manager.lds.update_success"
    ]
    old_version = control.xds.version
    built_before = await listener_built_at(ports.admin, "public")
    results: list[bool] = []
    calling = asyncio.create_task(_call_until_cancelled(channel, results))
    try:
        await control.stop()
        await eventually(
            lambda: not control.xds.status()[0].connected, what="Envoy sees the plane gone"
        )
        xds = await control.start()  # the same state file
        version = xds.publish(serving)
        assert version > old_version
        await eventually(
            lambda: any(n.connected for n in xds.status()), timeout=30, what="Envoy reconnects"
        )
        assert await xds.wait_acked(version, timeout=30), xds.status()
        await eventually(lambda: len(results) > 10, what="calls made during the restart")
    finally:
        calling.cancel()
    assert all(results), f"{results.count(False)} of {len(results)} calls failed"
    assert await stats(ports.admin, LISTENER_STATS) == before
    # Envoy took the new version, and kept the listener it had built before
    assert await accepted_versions(ports.admin) == dict.fromkeys(ACCEPTED_VERSIONS, str(version))
    assert await listener_built_at(ports.admin, "public") == built_before
    updates = await stats(ports.admin, ("listener_manager.lds.update_success",))
    assert updates["listener_manager.lds.update_success"] > lds_updates


async def _call_until_cancelled(channel: grpc.aio.Channel, results: list[bool]) -> None:
    while True:
        results.append(await check(channel, PROBE))
        await asyncio.sleep(0.02)  # pacing between calls, not a wait for a condition
