"""The control plane process: the supervisor of every replica (and of the mesh's own NATS
server, `dependencies`), and the ADS server that tells Envoy which of them to route to.
Runs on the shared runtime (health, metrics, graceful SIGTERM); ready once every replica
`up` asked for is SERVING.

Every change of the replica set renders the edge's whole config for the replicas of the
moment (`launcher._edge.edge_config`, the same renderer a static config came from),
converts it to xDS resources (DRAINING replicas marked so in EDS) and publishes it as
the next version; the push returns once every connected Envoy has acknowledged it, or
after `ACK_WAIT_S`, so that a replica is stopped only after Envoy stopped sending it
new calls.

The edge checks API key tokens itself (`launcher._envoy_keys`): the control plane gives
it the signing key's public half, and the revoked key ids, read from the key table every
second (`auth.revocations`) and pushed when they change.

With tracing on (`trace_sampling` above 0) the config also has Envoy trace the calls it
routes and export its spans to this process (the bootstrap's cluster to it), which writes
them into the run directory's trace store (`traces`).
"""

from __future__ import annotations

import asyncio
import logging
import os

import grpc
from prometheus_client import Gauge
from switchboard.control.v1 import control_service_pb2_grpc

from services.auth.revocations import RevocationFeed
from services.auth.signing import public_jwks
from services.control.dependencies import NatsWatch
from services.control.events import EventBus
from services.control.kinds import ServiceKind, initial_counts, mesh_kinds
from services.control.resources import XDS_CLUSTER, Endpoint, Resources, resources_from_static
from services.control.servicer import ControlServicer
from services.control.supervisor import ROUTED, Supervisor
from services.control.traces import ENVOY, TraceReceiver
from services.control.xds import XdsServer
from services.launcher._config import (
    LauncherConfig,
    config_env,
    load_launcher_config,
    triton_urls,
)
from services.launcher._edge import CONTROL_SERVICE, edge_config
from services.launcher._envoy_keys import LocalKeys, add_local_keys
from services.launcher._envoy_tracing import Tracing, add_tracing
from services.launcher._procs import StateFile
from services.launcher._prometheus import TARGETS_DIR, ScrapeTarget, write_service_targets
from services.launcher._services import MeshAddresses
from services.runtime import Database, stop_task
from services.runtime import main as serve_main

logger = logging.getLogger(__name__)

ACK_WAIT_S = 2.0
"""How long a push waits for Envoy's acknowledgement before going on."""

REVOCATIONS_TRUSTED_S = 30.0
"""How long the edge trusts the revoked keys it was given without a fresh read (the key
table unreachable): then every call is checked by the auth service again."""

REVOCATIONS_CHECK_S = 0.1
"""How often the control plane looks at what the revocation feed last read."""

REPLICAS = Gauge(
    "switchboard_control_replicas",
    "Replicas the control plane supervises, by service and state.",
    ["service", "state"],
)


class ControlPlane:
    """The `Service` the runtime serves as the control plane."""

    name = "control"
    service_names = (CONTROL_SERVICE,)

    def __init__(self, config: LauncherConfig, mesh: MeshAddresses) -> None:
        run_dir = config.run_dir
        self._config = config
        self.events = EventBus()
        self.xds = XdsServer(state_path=run_dir / "xds-version")
        self.traces = TraceReceiver(path=config.traces_dir / f"{ENVOY}.jsonl")
        self._tracing = Tracing(collector_cluster=XDS_CLUSTER, sampling=config.trace_sampling)
        self.supervisor = Supervisor(
            mesh_kinds(config, mesh),
            state_path=run_dir / "replicas.json",
            log_dir=run_dir / "logs",
            on_change=self.push,
            events=self.events,
            max_replicas=config.max_replicas,
            spares=config.spares,
        )
        self.nats = NatsWatch(
            state=StateFile(run_dir),
            monitor_url=f"http://{config.host}:{config.nats_monitor_port}",
            store_dir=run_dir / "nats",
            events=self.events,
        )
        self._jwks = public_jwks(config.signing_key_path)
        self._keys_db = Database(config.database_url, max_size=1, name="control_keys")
        self.revocations = RevocationFeed(self._keys_db)
        self._edge_revoked: frozenset[str] | None = None
        """The revoked keys the edge was last given; None: not known (or not read for
        `REVOCATIONS_TRUSTED_S`), so no call skips the auth service."""
        self._push_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._nats_watch: asyncio.Task[None] | None = None
        self._ready = False

    def register(self, server: grpc.aio.Server) -> None:
        self.xds.add_to_server(server)
        self.traces.add_to_server(server)
        control_service_pb2_grpc.add_ControlServiceServicer_to_server(
            ControlServicer(self.supervisor, self.xds, self.events), server
        )

    async def start(self) -> None:
        self.supervisor.restore(initial_counts(self._config))
        # A restarted control plane first publishes the replicas it adopted: the config
        # Envoy already runs, at a higher version.
        await self.push()
        loop = asyncio.get_running_loop()
        self._nats_watch = loop.create_task(self.nats.run())
        self._tasks = [
            loop.create_task(self.supervisor.run()),
            loop.create_task(self._boot()),
            self._nats_watch,
        ]
        if self._jwks is not None:
            await self._keys_db.open(wait=False)
            self._tasks += [
                loop.create_task(self.revocations.follow()),
                loop.create_task(self._follow_revocations()),
            ]

    async def _boot(self) -> None:
        try:
            await self.supervisor.start_all(timeout=self._config.start_timeout_s)
        except Exception:  # noqa: BLE001 - reported; the supervisor keeps trying
            logger.exception("the mesh's replicas did not all start")
            return
        self._ready = True
        logger.info("every replica is SERVING")

    async def ready(self) -> bool:
        return self._ready

    async def drain(self) -> None:
        """Told it is stopping: it no longer restarts NATS (`switchboard down` stops NATS
        next, on purpose)."""
        await stop_task(self._nats_watch)

    async def shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.supervisor.shutdown()
        await self.traces.shutdown()
        await self._keys_db.close()

    async def push(self) -> None:
        """Publishes the edge config for the replicas of the moment and waits (bounded)
        until every connected Envoy has acknowledged it."""
        async with self._push_lock:
            routed = self.supervisor.endpoints()
            # rendered in a thread (tens of ms of CPU): the loop goes on answering Envoy's
            # ACKs of earlier pushes, and watching the replicas, meanwhile
            resources = await asyncio.to_thread(self._resources, routed)
            version = self.xds.publish(resources)
            self.events.emit(
                "config_pushed", f"config version {version} published", config_version=version
            )
            if await self.xds.wait_acked(version, timeout=ACK_WAIT_S):
                self.events.emit(
                    "config_acked", f"config version {version} acknowledged", config_version=version
                )
            else:
                logger.warning("Envoy did not acknowledge config version %d in time", version)
            # after the ACK, and off the loop: a file write on a busy disk can stall for
            # longer than the push itself, and Prometheus reads these files at its pace
            self._count_replicas()
            await asyncio.to_thread(
                write_service_targets, self._config.run_dir / TARGETS_DIR, self._scrape_targets()
            )

    async def _follow_revocations(self) -> None:
        """Gives the edge the revoked keys when they change, and takes its own key check
        away when they have not been read for too long (a poll can hang on a stalled
        database: this loop does not wait for it)."""
        while True:
            known = self.revocations.fresh(REVOCATIONS_TRUSTED_S)
            if known != self._edge_revoked:
                if known is None:
                    logger.warning(
                        "revoked keys not read for %g s: the edge checks every key with"
                        " the auth service until they are",
                        REVOCATIONS_TRUSTED_S,
                    )
                elif self._edge_revoked is not None and known - self._edge_revoked:
                    logger.info("keys revoked: %s", ", ".join(sorted(known - self._edge_revoked)))
                self._edge_revoked = known
                await self.push()
            await asyncio.sleep(REVOCATIONS_CHECK_S)

    def _resources(self, routed: dict[str, list[tuple[str, int, bool]]]) -> Resources:
        """The edge config for the replicas `routed` (kind -> (host, port, draining)) as
        typed xDS resources."""
        static = edge_config(
            self._config, {kind: [(h, p) for h, p, _ in eps] for kind, eps in routed.items()}
        )
        static = add_tracing(static, self._tracing)
        if self._jwks is not None:
            static = add_local_keys(static, LocalKeys(self._jwks, self._edge_revoked))
        draining = {(h, p) for eps in routed.values() for h, p, d in eps if d}
        endpoints = {
            cluster["name"]: [
                Endpoint(host, port, draining=(host, port) in draining)
                for group in cluster["load_assignment"]["endpoints"]
                for lb in group["lb_endpoints"]
                for host, port in [_address(lb)]
            ]
            for cluster in static["static_resources"]["clusters"]
        }
        return resources_from_static(static, endpoints)

    def _scrape_targets(self) -> list[ScrapeTarget]:
        """Every service replica whose process runs, for Prometheus."""
        return [
            ScrapeTarget(
                replica.kind,
                replica.name,
                f"{self._config.host}:{kind.spec.metrics_port(self._config, replica.slot)}",
            )
            for replica in self.supervisor.replicas.values()
            if replica.record is not None
            and isinstance(kind := self.supervisor.kinds[replica.kind], ServiceKind)
        ]

    def _count_replicas(self) -> None:
        counts: dict[tuple[str, str], int] = {}
        for replica in self.supervisor.replicas.values():
            key = (replica.kind, replica.state.value)
            counts[key] = counts.get(key, 0) + 1
        REPLICAS.clear()
        for (service, state), count in counts.items():
            REPLICAS.labels(service, state).set(count)


def _address(lb_endpoint: dict) -> tuple[str, int]:
    socket = lb_endpoint["endpoint"]["address"]["socket_address"]
    return socket["address"], int(socket["port_value"])


def main() -> None:
    """Serves the control plane of the mesh the `SWITCHBOARD_*` variables describe (the
    launcher sets them: the mesh's database and NATS URLs among them)."""
    config = load_launcher_config()
    # The replicas get the environment the launcher would give them, not its config.
    for key in config_env(config):
        if not key.startswith("SWITCHBOARD_CONTROL_"):
            os.environ.pop(key, None)
    mesh = MeshAddresses(
        internal=f"127.0.0.1:{config.envoy_internal_port}",
        database_url=config.database_url,
        nats_url=config.nats_url,
        triton_urls=triton_urls(config),
    )
    serve_main(ControlPlane(config, mesh))


__all__ = ["ROUTED", "ControlPlane", "main"]
