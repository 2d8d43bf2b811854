"""The ADS protocol without a network: one stream's state machine driven by the requests
Envoy would send, and the server's snapshots, versions and ACK bookkeeping."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import pytest
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
from envoy.config.route.v3.route_pb2 import RouteConfiguration
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest, DiscoveryResponse
from google.rpc import status_pb2

from services.control.resources import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    Endpoint,
    Resources,
    resources_from_static,
)
from services.control.xds import AdsStream, InconsistentSnapshot, Snapshot, XdsServer
from services.launcher._envoy import Upstream, render_envoy_config
from tests.polling import eventually

NODE = "edge-1"


def resources(*names: str, draining: bool = False) -> Resources:
    """The launcher's edge config for upstreams `names` (one replica each) as resources;
    the reflection cluster holds every replica."""
    upstreams = [
        Upstream(name=n, services=(f"test.v1.{n.title()}",), endpoints=(("127.0.0.1", 7000 + i),))
        for i, n in enumerate(names)
    ]
    config = render_envoy_config(
        listen_host="127.0.0.1", listen_port=8080, admin_port=9901, upstreams=upstreams
    )
    endpoints = {n: [Endpoint("127.0.0.1", 7000 + i, draining)] for i, n in enumerate(names)}
    endpoints["reflection"] = [e for n in names for e in endpoints[n]]
    return resources_from_static(config, endpoints)


def touched(original: Resources) -> Resources:
    """`original` with one setting of every resource changed: a snapshot whose every
    type must be sent again (an unchanged type is not)."""
    changed = Resources(
        clusters={n: _copy(m) for n, m in original.clusters.items()},
        endpoints={n: _copy(m) for n, m in original.endpoints.items()},
        listeners={n: _copy(m) for n, m in original.listeners.items()},
        routes={n: _copy(m) for n, m in original.routes.items()},
    )
    for cluster in changed.clusters.values():
        cluster.connect_timeout.nanos += 1000
    for assignment in changed.endpoints.values():
        assignment.policy.overprovisioning_factor.value = 141
    for listener in changed.listeners.values():
        listener.stat_prefix = "touched"
    for route_config in changed.routes.values():
        route_config.max_direct_response_body_size_bytes.value = 4096
    return changed


def _copy(message):
    copied = type(message)()
    copied.CopyFrom(message)
    return copied


def request(
    type_url: str,
    *,
    answering: DiscoveryResponse | None = None,
    names: Iterable[str] = (),
    error: str | None = None,
    version_info: str | None = None,
) -> DiscoveryRequest:
    """What Envoy sends: a first request, or the answer (ACK, or NACK with `error`) to a
    response, carrying the names it subscribes to now."""
    req = DiscoveryRequest(type_url=type_url, resource_names=sorted(names))
    req.node.id = NODE
    if answering is not None:
        req.response_nonce = answering.nonce
        req.version_info = answering.version_info if error is None else ""
    if version_info is not None:
        req.version_info = version_info
    if error is not None:
        req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return req


def names_in(response: DiscoveryResponse) -> set[str]:
    kinds = {
        CLUSTER_TYPE: Cluster,
        ENDPOINT_TYPE: ClusterLoadAssignment,
        ROUTE_TYPE: RouteConfiguration,
    }
    names = set()
    for packed in response.resources:
        if response.type_url == LISTENER_TYPE:
            names.add("listener")
            continue
        message = kinds[response.type_url]()
        packed.Unpack(message)
        names.add(getattr(message, "cluster_name", "") or message.name)
    return names


def only(responses: list[DiscoveryResponse], type_url: str) -> DiscoveryResponse:
    assert [r.type_url for r in responses] == [type_url]
    return responses[0]


def synced(snapshot: Snapshot) -> tuple[AdsStream, dict[str, DiscoveryResponse]]:
    """A stream through Envoy's start-up: CDS, then EDS for the clusters, LDS, RDS."""
    stream = AdsStream()
    assert stream.on_snapshot(snapshot) == []  # nothing asked for yet
    last = {CLUSTER_TYPE: only(stream.on_request(request(CLUSTER_TYPE)), CLUSTER_TYPE)}
    assert stream.on_request(request(CLUSTER_TYPE, answering=last[CLUSTER_TYPE])) == []
    eds = set(snapshot.resources.endpoints)
    last[ENDPOINT_TYPE] = only(stream.on_request(request(ENDPOINT_TYPE, names=eds)), ENDPOINT_TYPE)
    assert names_in(last[ENDPOINT_TYPE]) == eds
    assert stream.on_request(request(ENDPOINT_TYPE, answering=last[ENDPOINT_TYPE], names=eds)) == []
    last[LISTENER_TYPE] = only(stream.on_request(request(LISTENER_TYPE)), LISTENER_TYPE)
    assert stream.on_request(request(LISTENER_TYPE, answering=last[LISTENER_TYPE])) == []
    rds = {"public"}
    last[ROUTE_TYPE] = only(stream.on_request(request(ROUTE_TYPE, names=rds)), ROUTE_TYPE)
    assert stream.on_request(request(ROUTE_TYPE, answering=last[ROUTE_TYPE], names=rds)) == []
    assert stream.has_acked(snapshot.version)
    return stream, last


def walk(
    stream: AdsStream, first: list[DiscoveryResponse], names: dict[str, set[str]]
) -> list[DiscoveryResponse]:
    """ACK every response as Envoy would, until the stream sends nothing more."""
    sent: list[DiscoveryResponse] = []
    pending = list(first)
    while pending:
        response = pending.pop(0)
        sent.append(response)
        pending += stream.on_request(
            request(response.type_url, answering=response, names=names.get(response.type_url, ()))
        )
    return sent


def test_startup_acks_every_type_at_the_version() -> None:
    stream, last = synced(Snapshot(1, resources("alpha", "beta")))

    assert {r.version_info for r in last.values()} == {"1"}
    status = stream.type_status()
    assert {t: (s.acked_version, s.sent_version) for t, s in status.items()} == {
        t: (1, 1) for t in (CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE)
    }
    assert stream.node_id == NODE


def test_a_new_snapshot_goes_clusters_endpoints_listeners_routes() -> None:
    stream, _ = synced(Snapshot(1, resources("alpha", "beta")))
    eds = {"alpha", "beta", "reflection"}

    sent = walk(
        stream,
        stream.on_snapshot(Snapshot(2, touched(resources("alpha", "beta", draining=True)))),
        {ENDPOINT_TYPE: eds, ROUTE_TYPE: {"public"}},
    )

    assert [r.type_url for r in sent] == [CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE]
    assert {r.version_info for r in sent} == {"2"}
    assert stream.has_acked(2)


def test_a_change_of_endpoints_only_is_one_eds_round_trip() -> None:
    stream, _ = synced(Snapshot(1, resources("alpha", "beta")))
    eds = {"alpha", "beta", "reflection"}

    sent = walk(
        stream,
        stream.on_snapshot(Snapshot(2, resources("alpha", "beta", draining=True))),
        {ENDPOINT_TYPE: eds, ROUTE_TYPE: {"public"}},
    )

    assert [(r.type_url, r.version_info) for r in sent] == [(ENDPOINT_TYPE, "2")]
    assert stream.has_acked(2)  # the unchanged types count as ACKed at 2
    assert {t: s.acked_version for t, s in stream.type_status().items()} == {
        t: 2 for t in (CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE)
    }
    # and a later change of every type goes out whole, in order
    again = walk(
        stream,
        stream.on_snapshot(Snapshot(3, touched(resources("alpha", "beta")))),
        {ENDPOINT_TYPE: eds, ROUTE_TYPE: {"public"}},
    )
    assert [r.type_url for r in again] == [CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE]


def test_endpoints_follow_clusters_at_once_and_the_rest_waits_for_answers() -> None:
    stream, _ = synced(Snapshot(1, resources("alpha")))

    changed = touched(resources("alpha", draining=True))
    clusters, endpoints = stream.on_snapshot(Snapshot(2, changed))
    assert (clusters.type_url, endpoints.type_url) == (CLUSTER_TYPE, ENDPOINT_TYPE)
    assert stream.on_snapshot(Snapshot(2, changed)) == []  # both unanswered
    assert stream.on_request(request(CLUSTER_TYPE, answering=clusters)) == []
    eds = {"alpha", "reflection"}
    listeners = only(
        stream.on_request(request(ENDPOINT_TYPE, answering=endpoints, names=eds)), LISTENER_TYPE
    )
    assert listeners.version_info == "2"
    assert not stream.has_acked(2)


def test_removed_clusters_leave_only_after_the_routes_that_named_them() -> None:
    stream, _ = synced(Snapshot(1, resources("alpha", "beta")))
    names = {ENDPOINT_TYPE: {"alpha", "beta", "reflection"}, ROUTE_TYPE: {"public"}}

    sent = walk(stream, stream.on_snapshot(Snapshot(2, touched(resources("alpha")))), names)

    assert [r.type_url for r in sent] == [
        CLUSTER_TYPE,
        ENDPOINT_TYPE,
        LISTENER_TYPE,
        ROUTE_TYPE,
        CLUSTER_TYPE,
    ]
    assert names_in(sent[0]) == {"alpha", "beta", "reflection"}  # old and new together
    assert names_in(sent[-1]) == {"alpha", "reflection"}  # beta goes last
    assert stream.has_acked(2)


def test_clusters_are_not_acked_at_a_version_until_the_final_response() -> None:
    stream, _ = synced(Snapshot(1, resources("alpha", "beta")))

    interim, _ = stream.on_snapshot(Snapshot(2, resources("alpha")))
    stream.on_request(request(CLUSTER_TYPE, answering=interim))

    assert stream.type_status()[CLUSTER_TYPE].acked_version == 1


def test_endpoints_of_a_new_cluster_wait_for_envoy_to_ask_for_them() -> None:
    stream, last = synced(Snapshot(1, resources("alpha")))

    clusters = only(
        stream.on_snapshot(Snapshot(2, touched(resources("alpha", "beta")))), CLUSTER_TYPE
    )
    # Envoy created beta and asks for its endpoints (its last EDS nonce is the current),
    # and ACKs the clusters only once beta has them
    asked = {"alpha", "beta", "reflection"}
    endpoints = only(
        stream.on_request(request(ENDPOINT_TYPE, answering=last[ENDPOINT_TYPE], names=asked)),
        ENDPOINT_TYPE,
    )
    assert endpoints.version_info == "2"
    assert names_in(endpoints) == asked
    assert stream.on_request(request(ENDPOINT_TYPE, answering=endpoints, names=asked)) == []
    assert only(stream.on_request(request(CLUSTER_TYPE, answering=clusters)), LISTENER_TYPE)


def test_endpoints_and_routes_are_sent_for_the_names_asked() -> None:
    stream = AdsStream()
    stream.on_snapshot(Snapshot(1, resources("alpha", "beta")))
    stream.on_request(request(CLUSTER_TYPE, answering=stream.on_request(request(CLUSTER_TYPE))[0]))

    first = only(stream.on_request(request(ENDPOINT_TYPE, names={"alpha"})), ENDPOINT_TYPE)
    assert names_in(first) == {"alpha"}
    more = only(
        stream.on_request(request(ENDPOINT_TYPE, answering=first, names={"alpha", "beta"})),
        ENDPOINT_TYPE,
    )
    assert names_in(more) == {"alpha", "beta"}
    assert more.version_info == "1"
    assert stream.on_request(request(ENDPOINT_TYPE, answering=more, names={"alpha", "beta"})) == []


def test_a_nack_keeps_the_last_good_version_and_is_recorded() -> None:
    stream, _ = synced(Snapshot(1, resources("alpha")))

    clusters = only(stream.on_snapshot(Snapshot(2, resources("alpha", "beta"))), CLUSTER_TYPE)
    after = stream.on_request(request(CLUSTER_TYPE, answering=clusters, error="bad cluster"))

    assert after == []  # nothing resent, nothing after clusters sent: wait for a publish
    status = stream.type_status()[CLUSTER_TYPE]
    assert (status.acked_version, status.sent_version) == (1, 2)
    assert status.last_nack is not None
    assert (status.last_nack.version, status.last_nack.message) == (2, "bad cluster")
    assert [n.message for n in stream.nacked] == ["bad cluster"]
    assert stream.type_status()[LISTENER_TYPE].sent_version == 1
    # the next snapshot goes out as usual
    fixed = stream.on_snapshot(Snapshot(3, touched(resources("alpha"))))
    assert [(r.type_url, r.version_info) for r in fixed] == [
        (CLUSTER_TYPE, "3"),
        (ENDPOINT_TYPE, "3"),
    ]


def test_a_rejected_cluster_is_not_kept_for_the_routes() -> None:
    stream, _ = synced(Snapshot(1, resources("alpha")))
    clusters = only(stream.on_snapshot(Snapshot(2, resources("alpha", "beta"))), CLUSTER_TYPE)
    stream.on_request(request(CLUSTER_TYPE, answering=clusters, error="beta is bad"))

    fixed, _ = stream.on_snapshot(Snapshot(3, touched(resources("alpha"))))

    assert names_in(fixed) == {"alpha", "reflection"}
    stream.on_request(request(CLUSTER_TYPE, answering=fixed))
    assert stream.type_status()[CLUSTER_TYPE].acked_version == 3


def test_a_stale_nonce_is_ignored() -> None:
    stream, last = synced(Snapshot(1, resources("alpha")))
    newer, _ = stream.on_snapshot(Snapshot(2, touched(resources("alpha"))))

    stale = request(CLUSTER_TYPE, answering=last[CLUSTER_TYPE], error="old news")

    assert stream.on_request(stale) == []
    assert stream.type_status()[CLUSTER_TYPE].last_nack is None
    stream.on_request(request(CLUSTER_TYPE, answering=newer))
    assert stream.type_status()[CLUSTER_TYPE].acked_version == 2


def test_a_nonce_from_an_earlier_stream_subscribes() -> None:
    stream = AdsStream()
    stream.on_snapshot(Snapshot(5, resources("alpha")))
    first = request(CLUSTER_TYPE, version_info="4")
    first.response_nonce = "another-control-plane-17"

    assert only(stream.on_request(first), CLUSTER_TYPE).version_info == "5"


# -- the server ---------------------------------------------------------------------------


def test_an_inconsistent_snapshot_is_refused_and_the_previous_kept(tmp_path: Path) -> None:
    server = XdsServer(state_path=tmp_path / "xds.json")
    good = resources("alpha")
    assert server.publish(good) == 1
    broken = Resources(
        clusters={k: v for k, v in good.clusters.items() if k != "alpha"},
        endpoints=good.endpoints,
        listeners=good.listeners,
        routes=good.routes,
    )

    with pytest.raises(InconsistentSnapshot, match="alpha") as raised:
        server.publish(broken)

    assert "missing cluster 'alpha'" in str(raised.value)
    assert "belong to no EDS cluster" in str(raised.value)
    assert server.snapshot is not None and server.snapshot.resources is good
    assert server.version == 1
    assert json.loads((tmp_path / "xds.json").read_text()) == {"version": 1}


def test_routes_named_by_no_listener_are_inconsistent(tmp_path: Path) -> None:
    good = resources("alpha")
    with pytest.raises(InconsistentSnapshot, match="no listener"):
        XdsServer(state_path=tmp_path / "xds.json").publish(
            Resources(clusters=good.clusters, endpoints=good.endpoints, routes=good.routes)
        )


def test_versions_survive_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "state" / "xds.json"
    first = XdsServer(state_path=state)
    first.publish(resources("alpha"))
    first.publish(resources("alpha"))

    again = XdsServer(state_path=state)

    assert again.version == 2
    assert again.publish(resources("alpha")) == 3


class FakeEnvoy:
    """The client side of one ADS stream as the servicer sees it: it asks for every type
    at once (as Envoy does when it reconnects) and answers each response, ACK, or NACK
    for the type URL in `reject`."""

    def __init__(self, server: XdsServer, *, reject: str = "", version_info: str = "") -> None:
        self.received: list[DiscoveryResponse] = []
        self._requests: asyncio.Queue[DiscoveryRequest | None] = asyncio.Queue()
        self._names = {ENDPOINT_TYPE: {"alpha", "reflection"}, ROUTE_TYPE: {"public"}}
        self._reject = reject
        for type_url in (CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE):
            first = request(type_url, names=self._names.get(type_url, ()))
            first.version_info = version_info
            self._requests.put_nowait(first)
        responses = server.servicer().StreamAggregatedResources(self._stream(), None)
        self._task = asyncio.create_task(self._answer(responses))

    async def _stream(self) -> AsyncIterator[DiscoveryRequest]:
        while (item := await self._requests.get()) is not None:
            yield item

    async def _answer(self, responses: AsyncIterator[DiscoveryResponse]) -> None:
        async for response in responses:
            self.received.append(response)
            error = "rejected" if response.type_url == self._reject else None
            names = self._names.get(response.type_url, ())
            self._requests.put_nowait(
                request(response.type_url, answering=response, names=names, error=error)
            )

    async def close(self) -> None:
        self._requests.put_nowait(None)
        await asyncio.wait_for(self._task, 5)


async def test_every_connected_envoy_acks_and_the_push_is_timed(tmp_path: Path) -> None:
    server = XdsServer(state_path=tmp_path / "xds.json")
    envoy = FakeEnvoy(server)
    await eventually(lambda: server.status(), what="the node is known")

    version = server.publish(resources("alpha"))

    assert await server.wait_acked(version, timeout=5)
    assert len(server.ack_latencies()) == 1
    (node,) = server.status()
    assert node.node_id == NODE and node.connected
    assert {t.acked_version for t in node.types.values()} == {version}
    await envoy.close()
    assert not server.status()[0].connected


async def test_a_snapshot_envoy_already_runs_is_acked_at_once_with_nothing_sent(
    tmp_path: Path,
) -> None:
    server = XdsServer(state_path=tmp_path / "xds.json")
    envoy = FakeEnvoy(server)
    await eventually(lambda: server.status(), what="the node is known")
    first = server.publish(resources("alpha"))
    assert await server.wait_acked(first, timeout=5)
    sent = len(envoy.received)

    again = server.publish(resources("alpha"))  # e.g. a replica started, not yet routed

    assert await server.wait_acked(again, timeout=1)
    assert len(envoy.received) == sent
    assert len(server.ack_latencies()) == 2 and server.ack_latencies()[-1] < 1
    await envoy.close()


async def test_a_nack_is_reported_and_not_acked(tmp_path: Path) -> None:
    server = XdsServer(state_path=tmp_path / "xds.json")
    envoy = FakeEnvoy(server, reject=LISTENER_TYPE)
    await eventually(lambda: server.status(), what="the node is known")
    version = server.publish(resources("alpha"))

    await eventually(lambda: server.status()[0].last_nack, what="the NACK is recorded")

    assert not await server.wait_acked(version, timeout=0.1)
    nack = server.status()[0].last_nack
    assert nack is not None
    assert (nack.type_url, nack.version, nack.message) == (LISTENER_TYPE, version, "rejected")
    assert [r.type_url for r in envoy.received] == [CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE]
    await envoy.close()


async def test_an_envoy_ahead_of_the_state_file_lifts_the_version(tmp_path: Path) -> None:
    server = XdsServer(state_path=tmp_path / "xds.json")  # the file was lost
    server.publish(resources("alpha"))

    envoy = FakeEnvoy(server, version_info="41")
    await eventually(lambda: server.status(), what="the node is known")

    assert await server.wait_acked(42, timeout=5)
    assert {r.version_info for r in envoy.received} == {"42"}
    assert server.version == 42
    assert XdsServer(state_path=tmp_path / "xds.json").version == 42
    assert server.publish(resources("alpha")) == 43
    await envoy.close()
