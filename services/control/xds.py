"""The ADS server: Envoy's configuration over one aggregated xDS v3 stream per Envoy.

State of the world, go-control-plane's discipline. A snapshot (`publish`) is checked to
be internally consistent before anything of it is sent, gets the next integer version,
and is then pushed to every connected Envoy. The invariants this module keeps:

1. Versions only grow, across restarts too. The last version is written (atomically)
   to `state_path` before a snapshot carrying it is sent, and a new stream whose request
   says Envoy holds a higher version (the file was lost) makes the server jump above it.
   A restarted control plane therefore never sends a version Envoy has already seen, and
   identical resources sent again under a new version change nothing in Envoy: it
   compares each cluster, listener and route configuration with what it runs, so no
   listener drains and no connection is cut.
2. Order, per stream. A new snapshot reaches an Envoy in the order clusters → endpoints
   → listeners → routes. Endpoints follow the clusters at once, as soon as Envoy asked
   for every new cluster's (Envoy ACKs a new cluster only once it has its endpoints: it
   warms until then); listeners, then routes, each go once everything before them was
   answered (ACK or NACK), so a listener or route never arrives before the clusters it
   names exist. When clusters disappear, the first clusters response still holds the
   old ones (those Envoy accepted) next to the new; only after the new listeners and
   routes were ACKed does a final clusters response remove them, so no route Envoy runs
   ever names a cluster it does not have.
3. A NACK keeps the last good config. Envoy keeps running what it accepted last; the
   server records the error (`status()`), sends nothing more of that version (the types
   after the rejected one are held back) and waits for the next `publish`. Nothing is
   resent in a loop.
4. The protocol per type URL: a request whose `response_nonce` is the last one sent is an
   ACK (or, with `error_detail`, a NACK); an empty nonce, or any nonce before this stream
   sent that type, is a (re)subscription; any other nonce is stale (Envoy had not yet
   seen the newest response) and is ignored. Clusters and listeners are wildcard types
   (every resource is sent); endpoints and route configurations are sent for the names
   Envoy asks for, and sent again when those names change.

`XdsServer` holds the snapshot and the streams; `AdsStream` is one stream's protocol as a
plain state machine (requests and snapshots in, responses out), which is what the unit
tests drive. Everything runs on one asyncio event loop: call `publish` from it.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc
from envoy.service.discovery.v3.discovery_pb2 import (
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
    DiscoveryRequest,
    DiscoveryResponse,
)
from google.protobuf.message import Message
from prometheus_client import Counter, Histogram

from services.control.resources import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    TYPE_URLS,
    Resources,
    eds_name,
    route_clusters,
    route_names,
)

logger = logging.getLogger(__name__)

PUSH_SECONDS = Histogram(
    "switchboard_xds_push_seconds",
    "Time from publishing a snapshot to every connected Envoy having ACKed all of it.",
    # fine from 1 to 100 ms, where pushes land, so quantiles read off it are close
    buckets=[ms / 1000 for ms in (1, 2, 3, 5, 7.5, 10, 15, 20, 30, 40, 50, 75, 100, 150, 250)]
    + [0.5, 1, 2.5, 5, 10],
)
NACKS = Counter(
    "switchboard_xds_nacks_total", "Responses an Envoy rejected, by type URL.", ["type_url"]
)

WILDCARD_TYPES = frozenset({CLUSTER_TYPE, LISTENER_TYPE})
"""Types sent whole (state of the world); the others are sent for the names asked."""
_LATENCIES_KEPT = 1024


class InconsistentSnapshot(ValueError):
    """A snapshot that names what it does not hold; it is refused, the previous one kept."""


@dataclass(frozen=True)
class Snapshot:
    version: int
    resources: Resources
    published_at: float = 0.0
    """`time.monotonic()` when published; 0 for a re-versioned one (not timed)."""


@dataclass(frozen=True)
class Nack:
    """A response an Envoy rejected: its type, version and Envoy's error message."""

    type_url: str
    version: int
    message: str


@dataclass(frozen=True)
class TypeStatus:
    type_url: str
    acked_version: int | None
    sent_version: int | None
    last_nack: Nack | None


@dataclass(frozen=True)
class NodeStatus:
    """One Envoy node as its newest stream sees it."""

    node_id: str
    connected: bool
    types: Mapping[str, TypeStatus]

    @property
    def last_nack(self) -> Nack | None:
        """The NACK of the highest version, over all types."""
        nacks = [t.last_nack for t in self.types.values() if t.last_nack is not None]
        return max(nacks, key=lambda n: n.version) if nacks else None


def check_snapshot(resources: Resources) -> None:
    """Raise InconsistentSnapshot unless every name a resource uses is there: each route's
    clusters, each listener's route configurations, each EDS cluster's endpoints; and
    nothing is orphaned (endpoints of no cluster, route configurations of no listener)."""
    problems: list[str] = []
    for type_url in TYPE_URLS:
        for name, message in resources.of(type_url).items():
            if _name_of(message) != name:
                problems.append(
                    f"{type_url.rsplit('.', 1)[-1]} {_name_of(message)!r} under {name!r}"
                )
    clusters = resources.clusters
    wanted_eds = {eds_name(c) for c in clusters.values()} - {None}
    for missing in sorted(wanted_eds - set(resources.endpoints), key=str):
        problems.append(f"EDS cluster needs endpoints {missing!r}, which are missing")
    for orphan in sorted(set(resources.endpoints) - wanted_eds):
        problems.append(f"endpoints {orphan!r} belong to no EDS cluster")
    referenced: set[str] = set()
    for listener in resources.listeners.values():
        for name in route_names(listener):
            referenced.add(name)
            if name not in resources.routes:
                problems.append(f"listener {listener.name!r} names missing routes {name!r}")
    for name, route_config in resources.routes.items():
        if name not in referenced:
            problems.append(f"route configuration {name!r} is used by no listener")
        for cluster in sorted(route_clusters(route_config) - set(clusters)):
            problems.append(f"route configuration {name!r} names missing cluster {cluster!r}")
    if problems:
        raise InconsistentSnapshot("inconsistent snapshot: " + "; ".join(problems))


# -- one stream ---------------------------------------------------------------------------


@dataclass
class _TypeState:
    """What one stream knows about one type URL."""

    subscribed: bool = False
    names: frozenset[str] = frozenset()
    sent_nonce: str = ""
    sent_version: int | None = None
    sent_names: frozenset[str] = frozenset()
    sent_resources: dict[str, Message] = field(default_factory=dict)
    accepted: dict[str, Message] = field(default_factory=dict)
    """The resources of the last response Envoy ACKed."""
    sent_from: Snapshot | None = None
    in_flight: bool = False
    interim: bool = False
    """Clusters only: the last response still holds clusters the snapshot removed."""
    acked_version: int | None = None
    rejected_version: int | None = None
    last_nack: Nack | None = None

    def sent_names_at(self, version: int) -> frozenset[str]:
        """The names sent at `version` (none when the last response was another's)."""
        return self.sent_names if self.sent_version == version else frozenset()


class AdsStream:
    """One Envoy's ADS stream: the protocol of the module docstring as a state machine.

    `on_request` and `on_snapshot` return the responses to send, in order; they never
    block and never do I/O.
    """

    def __init__(self, *, nonce_prefix: str = "") -> None:
        self.node_id = ""
        self.open = True
        self._target: Snapshot | None = None
        self._types = {type_url: _TypeState() for type_url in TYPE_URLS}
        self._nonces = (f"{nonce_prefix}{n}" for n in itertools.count(1))
        self.acked: list[tuple[str, int]] = []
        """(type URL, version) of each ACK since the caller last cleared it."""
        self.nacked: list[Nack] = []
        """Likewise for NACKs."""

    @property
    def target(self) -> Snapshot | None:
        """The snapshot this stream is bringing Envoy to."""
        return self._target

    # -- inputs ---------------------------------------------------------------------------

    def on_snapshot(self, snapshot: Snapshot) -> list[DiscoveryResponse]:
        self._target = snapshot
        return self._advance()

    def on_request(self, request: DiscoveryRequest) -> list[DiscoveryResponse]:
        if request.node.id and not self.node_id:
            self.node_id = request.node.id
        state = self._types.get(request.type_url)
        if state is None:
            logger.warning("unknown xDS type requested", extra={"type_url": request.type_url})
            return []
        nonce = request.response_nonce
        if state.sent_nonce and nonce and nonce != state.sent_nonce:
            return []  # stale: Envoy will answer the newer response with its current names
        if state.sent_nonce and nonce == state.sent_nonce and state.in_flight:
            self._answered(request.type_url, state, request)
        # otherwise a (re)subscription: nothing sent yet, or a nonce of an earlier stream
        state.subscribed = True
        if request.type_url not in WILDCARD_TYPES:
            state.names = frozenset(request.resource_names)
        return [*self._advance(), *self._resend_for_names(request.type_url, state)]

    # -- status ---------------------------------------------------------------------------

    def type_status(self) -> dict[str, TypeStatus]:
        return {
            t: TypeStatus(t, s.acked_version, s.sent_version, s.last_nack)
            for t, s in self._types.items()
        }

    def has_acked(self, version: int) -> bool:
        """Clusters and listeners, and endpoints and routes where subscribed, were ACKed
        at `version` or later."""
        for type_url, state in self._types.items():
            required = type_url in WILDCARD_TYPES or (state.subscribed and bool(state.names))
            if required and (state.acked_version is None or state.acked_version < version):
                return False
        return True

    # -- the protocol ---------------------------------------------------------------------

    def _answered(self, type_url: str, state: _TypeState, request: DiscoveryRequest) -> None:
        state.in_flight = False
        version = state.sent_version if state.sent_version is not None else 0
        if request.HasField("error_detail"):
            nack = Nack(type_url, version, request.error_detail.message)
            state.rejected_version = version
            state.last_nack = nack
            self.nacked.append(nack)
        else:
            state.accepted = state.sent_resources
            if not state.interim:
                state.acked_version = version
                self.acked.append((type_url, version))

    def _advance(self) -> list[DiscoveryResponse]:
        """Every response of the target snapshot that may go now, in order."""
        responses = []
        while (response := self._next()) is not None:
            responses.append(response)
        return responses

    def _next(self) -> DiscoveryResponse | None:
        """The next response of the target snapshot, or None while answers are awaited.

        Clusters, then endpoints right behind them without waiting for the clusters'
        answer (Envoy ACKs a new cluster only once its endpoints arrived), then
        listeners and routes, each once everything before it was answered; a NACK at
        the target version stops the rest of it.
        """
        target = self._target
        if target is None:
            return None
        version = target.version
        clusters, endpoints, listeners, routes = (self._types[t] for t in TYPE_URLS)
        if clusters.in_flight and clusters.sent_version != version:
            return None
        if clusters.subscribed and clusters.sent_version != version:
            if not self._settled(CLUSTER_TYPE, clusters, target):
                return self._send(CLUSTER_TYPE, clusters, target, self._first_clusters(target))
        if clusters.rejected_version == version:
            return None
        if endpoints.subscribed and not _eds_names(target) <= endpoints.sent_names_at(version):
            if endpoints.in_flight or not _eds_names(target) <= endpoints.names:
                return None  # Envoy asks for a new cluster's endpoints once it has it
            if not self._settled(ENDPOINT_TYPE, endpoints, target):
                return self._send(ENDPOINT_TYPE, endpoints, target, None)
        for type_url, state in ((LISTENER_TYPE, listeners), (ROUTE_TYPE, routes)):
            if any(s.in_flight for s in (clusters, endpoints, listeners, routes)):
                return None
            if any(s.rejected_version == version for s in (endpoints, listeners)):
                return None
            if state.subscribed and state.sent_version != version:
                if not self._settled(type_url, state, target):
                    return self._send(type_url, state, target, None)
        if clusters.interim and clusters.sent_version == version and not routes.in_flight:
            if routes.rejected_version != version:
                return self._send(CLUSTER_TYPE, clusters, target, dict(target.resources.clusters))
        return None

    def _settled(self, type_url: str, state: _TypeState, target: Snapshot) -> bool:
        """Whether Envoy already runs exactly what `target` holds of this type (the
        resources of its last ACKed response, for the same names): then nothing is sent,
        and the type counts as ACKed at the target's version. A change of endpoints only
        (a replica started, stopped or draining) is thus one EDS round trip, not four."""
        if state.in_flight or state.interim or state.acked_version is None:
            return False
        if state.sent_version != state.acked_version:  # the last response was NACKed
            return False
        resources = target.resources.of(type_url)
        if type_url not in WILDCARD_TYPES:
            if state.names != state.sent_names:
                return False
            resources = {n: m for n, m in resources.items() if n in state.names}
        if resources != state.accepted:
            return False
        state.sent_version = state.acked_version = target.version
        state.sent_from = target
        self.acked.append((type_url, target.version))
        return True

    def _first_clusters(self, target: Snapshot) -> dict[str, Message]:
        """The target's clusters, plus any it removes while routes may still name them
        (then the first of two responses, `interim`)."""
        clusters: dict[str, Message] = dict(target.resources.clusters)
        if self._types[LISTENER_TYPE].sent_version is None:
            return clusters  # no route to keep whole yet
        # what Envoy accepted last: a rejected cluster is not kept (it would be NACKed again)
        accepted = self._types[CLUSTER_TYPE].accepted
        return {**{n: m for n, m in accepted.items() if n not in clusters}, **clusters}

    def _resend_for_names(self, type_url: str, state: _TypeState) -> list[DiscoveryResponse]:
        """Endpoints or routes asked for by other names than last sent, outside the
        target's own sending (e.g. clusters Envoy took from a response it NACKed): sent
        from the snapshot of the clusters (listeners) Envoy read last."""
        if type_url in WILDCARD_TYPES or state.in_flight or state.names == state.sent_names:
            return []
        parent = self._types[CLUSTER_TYPE if type_url == ENDPOINT_TYPE else LISTENER_TYPE]
        source = parent.sent_from or state.sent_from  # Envoy asks having read the parent
        if source is None:
            return []
        return [self._send(type_url, state, source, None)]

    def _send(
        self,
        type_url: str,
        state: _TypeState,
        snapshot: Snapshot,
        resources: Mapping[str, Message] | None,
    ) -> DiscoveryResponse:
        if resources is None:
            resources = snapshot.resources.of(type_url)
        if type_url not in WILDCARD_TYPES:
            resources = {n: m for n, m in resources.items() if n in state.names}
        if type_url == CLUSTER_TYPE:
            state.interim = resources.keys() != snapshot.resources.clusters.keys()
        nonce = next(self._nonces)
        state.sent_nonce = nonce
        state.sent_version = snapshot.version
        state.sent_names = state.names
        state.sent_resources = dict(resources)
        state.sent_from = snapshot
        state.in_flight = True
        response = DiscoveryResponse(
            version_info=str(snapshot.version), type_url=type_url, nonce=nonce
        )
        for name in sorted(resources):
            response.resources.add().Pack(resources[name])
        return response


# -- the server ---------------------------------------------------------------------------


_SNAPSHOT = object()
"""Queued to a stream: the server has a new snapshot."""
_END = object()
"""Queued to a stream: Envoy closed its side."""


@dataclass(eq=False)
class _Connection:
    stream: AdsStream
    queue: asyncio.Queue[object] = field(default_factory=asyncio.Queue)


class XdsServer:
    """Publishes snapshots of Envoy resources to every Envoy connected over ADS.

    Args:
        state_path: a small file holding the last version published, so a restarted
            control plane goes on above it (written atomically before a version is sent).
    """

    def __init__(self, *, state_path: Path) -> None:
        self._state_path = Path(state_path)
        self._version = _load_version(self._state_path)
        self._snapshot: Snapshot | None = None
        self._connections: set[_Connection] = set()
        self._nodes: dict[str, _Connection] = {}
        self._nonce_prefix = uuid.uuid4().hex[:8] + "-"
        self._changed = asyncio.Event()
        self._unacked: dict[int, float] = {}
        self._latencies: collections.deque[float] = collections.deque(maxlen=_LATENCIES_KEPT)

    @property
    def version(self) -> int:
        """The last version published (or read from the state file)."""
        return self._version

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    def publish(self, resources: Resources) -> int:
        """Checks `resources`, makes them the next version, and sends them to every Envoy.

        Returns:
            The new version.

        Raises:
            InconsistentSnapshot: the previous snapshot stays published.
            OSError: the version could not be persisted; likewise.
        """
        check_snapshot(resources)
        version = self._version + 1
        _store_version(self._state_path, version)
        self._version = version
        self._snapshot = Snapshot(version, resources, published_at=time.monotonic())
        if self._connections:
            self._unacked[version] = self._snapshot.published_at
            while len(self._unacked) > _LATENCIES_KEPT:  # an Envoy that never ACKs
                del self._unacked[min(self._unacked)]
        logger.info("xDS snapshot published", extra={"version": version})
        self._push()
        return version

    def status(self) -> list[NodeStatus]:
        """Every node seen since start, as its newest stream sees it."""
        return [
            NodeStatus(node_id, connection.stream.open, connection.stream.type_status())
            for node_id, connection in sorted(self._nodes.items())
        ]

    async def wait_acked(self, version: int, *, timeout: float) -> bool:
        """True once every connected Envoy ACKed `version` (or later) for every type;
        False after `timeout` seconds. With no Envoy connected it is True at once: there
        is no one to wait for (see `status` for who is connected)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._acked_everywhere(version):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                return self._acked_everywhere(version)
        return True

    def ack_latencies(self) -> list[float]:
        """Seconds from publish to full ACK of the recent versions, oldest first."""
        return list(self._latencies)

    def servicer(self) -> ads_pb2_grpc.AggregatedDiscoveryServiceServicer:
        """The gRPC servicer of this server's ADS."""
        return _Servicer(self)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Serve ADS on `server`, next to whatever else it serves."""
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self.servicer(), server)

    # -- streams --------------------------------------------------------------------------

    async def _serve(
        self, requests: AsyncIterator[DiscoveryRequest]
    ) -> AsyncIterator[DiscoveryResponse]:
        connection = _Connection(AdsStream(nonce_prefix=self._nonce_prefix))
        self._connections.add(connection)
        reader = asyncio.create_task(_read(requests, connection.queue))
        if self._snapshot is not None:
            connection.queue.put_nowait(_SNAPSHOT)
        try:
            while (item := await connection.queue.get()) is not _END:
                for response in self._handle(connection, item):
                    yield response
        finally:
            reader.cancel()
            connection.stream.open = False
            self._connections.discard(connection)
            if not self._connections:
                self._unacked.clear()  # no one left to time
            self._notify()
            logger.info("ADS stream closed", extra={"node": connection.stream.node_id})

    def _handle(self, connection: _Connection, item: object) -> list[DiscoveryResponse]:
        stream = connection.stream
        if item is _SNAPSHOT:
            responses = stream.on_snapshot(self._snapshot) if self._snapshot else []
            self._account(stream)  # types Envoy already runs count as ACKed at once
            return responses
        assert isinstance(item, DiscoveryRequest)
        if not stream.node_id and item.node.id:
            self._nodes[item.node.id] = connection
            logger.info("ADS stream opened", extra={"node": item.node.id})
        self._jump_above(item.version_info)
        responses = []
        if self._snapshot is not None and stream.target is not self._snapshot:
            responses += stream.on_snapshot(self._snapshot)
        responses += stream.on_request(item)
        self._account(stream)
        return responses

    def _jump_above(self, version_info: str) -> None:
        """Envoy holds a version above ours: the state file was lost. Go on above it."""
        try:
            seen = int(version_info)
        except ValueError:
            return
        if seen <= self._version:
            return
        version = seen + 1
        logger.warning(
            "Envoy holds a newer xDS version than the state file; jumping above it",
            extra={"seen": seen, "version": version},
        )
        _store_version(self._state_path, version)
        self._version = version
        if self._snapshot is not None:
            self._snapshot = Snapshot(version, self._snapshot.resources)
            self._push()

    def _account(self, stream: AdsStream) -> None:
        for nack in stream.nacked:
            NACKS.labels(type_url=nack.type_url).inc()
            logger.warning(
                "Envoy rejected xDS config",
                extra={
                    "node": stream.node_id,
                    "type_url": nack.type_url,
                    "version": nack.version,
                    "error": nack.message,
                },
            )
        if stream.acked or stream.nacked:
            stream.acked.clear()
            stream.nacked.clear()
            self._time_acks()
            self._notify()

    def _time_acks(self) -> None:
        now = time.monotonic()
        for version, published_at in sorted(self._unacked.items()):
            if not self._acked_everywhere(version):
                break
            del self._unacked[version]
            PUSH_SECONDS.observe(now - published_at)
            self._latencies.append(now - published_at)

    def _acked_everywhere(self, version: int) -> bool:
        return all(c.stream.has_acked(version) for c in self._connections)

    def _push(self) -> None:
        for connection in self._connections:
            connection.queue.put_nowait(_SNAPSHOT)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()


class _Servicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """gRPC ↔ `XdsServer`; state of the world only."""

    def __init__(self, server: XdsServer) -> None:
        self._server = server

    async def StreamAggregatedResources(  # noqa: N802 - the generated servicer's name
        self, request_iterator: AsyncIterator[DiscoveryRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[DiscoveryResponse]:
        responses = self._server._serve(request_iterator)
        try:
            async for response in responses:
                yield response
        finally:
            await responses.aclose()

    async def DeltaAggregatedResources(  # noqa: N802
        self,
        request_iterator: AsyncIterator[DeltaDiscoveryRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[DeltaDiscoveryResponse]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "only state-of-the-world ADS")
        yield DeltaDiscoveryResponse()  # pragma: no cover - abort raised


async def _read(requests: AsyncIterator[DiscoveryRequest], queue: asyncio.Queue[object]) -> None:
    try:
        async for request in requests:
            queue.put_nowait(request)
    except asyncio.CancelledError:
        pass  # the stream is over: its handler cancels the reader on the way out
    except Exception as error:  # noqa: BLE001 - any broken stream just ends that stream
        logger.info("ADS stream broken", extra={"error": repr(error)})
    finally:
        queue.put_nowait(_END)


def _eds_names(snapshot: Snapshot) -> frozenset[str]:
    return frozenset(n for c in snapshot.resources.clusters.values() if (n := eds_name(c)))


def _name_of(message: Message) -> str:
    return str(getattr(message, "cluster_name", "") or getattr(message, "name", ""))


def _load_version(path: Path) -> int:
    try:
        return int(json.loads(path.read_text())["version"])
    except FileNotFoundError:
        return 0
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.warning(
            "unreadable xDS state file; starting at 0 (Envoy's own version lifts it)",
            extra={"path": str(path), "error": str(error)},
        )
        return 0


def _store_version(path: Path, version: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as out:
            json.dump({"version": version}, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
