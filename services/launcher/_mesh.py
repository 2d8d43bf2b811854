"""Starts the mesh in order, waits for each part's health, and stops it by PID."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from switchboard.control.v1 import control_pb2, control_service_pb2_grpc

from services.auth import KeyStore
from services.auth.signing import SigningKey, signing_key
from services.control.resources import bootstrap
from services.launcher import _prometheus, _triton
from services.launcher._config import REPO_ROOT, LauncherConfig, config_env, triton_urls
from services.launcher._edge import CONTROL_SERVICE
from services.launcher._envoy_process import envoy_command, healthy_hosts, write_envoy_config
from services.launcher._envoy_shape import AUTHZ_CLUSTER, OPERATOR, PRINCIPAL_HEADER
from services.launcher._ports import ephemeral_ports_message, planned_ports, ports_inside
from services.launcher._procs import (
    ProcessRecord,
    StateFile,
    ephemeral_port_range,
    port_owner,
    recorded_replicas,
    reserved_ports,
    spawn,
    stop,
    tail,
)
from services.launcher._services import (
    AUTH,
    SERVICES,
)

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]
PG_SYSTEM_USER = "switchboard-pg"
TRITON_MODELS = _triton.MODELS


CONTROL = "control"
"""The control plane's process name."""
ADDRESSES = "addresses.json"
"""Where `up` records the addresses the CLI needs (the internal listener's)."""
OPERATOR_METADATA = ((PRINCIPAL_HEADER, OPERATOR),)
"""What the launcher's calls to the control plane's own (loopback) port carry: the
machine's operator is calling."""


class LaunchError(RuntimeError):
    """The mesh could not start; the message says what is wrong and where to look."""


class Mesh:
    """The local mesh described by a `LauncherConfig`."""

    def __init__(self, config: LauncherConfig, *, progress: Progress | None = None) -> None:
        self.config = config
        self.state = StateFile(config.run_dir)
        self._records: list[ProcessRecord] = []
        self._control_channel: grpc.Channel | None = None
        self._say = progress or (lambda msg: logger.info(msg))

    # -- public -----------------------------------------------------------------------------

    @property
    def envoy_address(self) -> str:
        """The public listener, for clients: every call needs an API key."""
        return f"{self.config.host}:{self.config.envoy_port}"

    @property
    def internal_address(self) -> str:
        """The internal listener (loopback only), for the services' calls to each other:
        no key is checked and the `x-tenant-id` sent is trusted."""
        return f"127.0.0.1:{self.config.envoy_internal_port}"

    @property
    def database_url(self) -> str:
        if self.config.database_url:
            return self.config.database_url
        return f"postgresql://postgres@{self.config.host}:{self.config.postgres_port}/switchboard"

    @property
    def nats_url(self) -> str:
        return self.config.nats_url or f"nats://{self.config.host}:{self.config.nats_port}"

    @property
    def triton_urls(self) -> tuple[str, ...]:
        return triton_urls(self.config)

    @property
    def prometheus_url(self) -> str:
        """The Prometheus server's UI and HTTP API (`switchboard up --prometheus`)."""
        return f"http://127.0.0.1:{self.config.prometheus_port}"

    def up(self) -> bool:
        """Starts everything not given externally, in order, each waited for.

        Returns False (and starts nothing) when this run directory's mesh is already up.
        """
        self.config.run_dir.mkdir(parents=True, exist_ok=True)
        if self._recover():
            self._say(f"the mesh is already running: grpcurl -plaintext {self.envoy_address} list")
            if self.config.prometheus and not any(
                r.name == "prometheus" for r in self.state.load()
            ):
                self.start_prometheus()
            return False
        self._check_ports()
        try:
            if not self.config.database_url:
                self._start_postgres()
            if not self.config.nats_url:
                self._start_nats()
            # Envoy starts as soon as the control plane serves ADS, while the replicas
            # start: their first calls to each other then meet Envoy (UNAVAILABLE until
            # the callee is in) rather than a closed port, whose gRPC reconnect backoff
            # would outlast Triton's start-up.
            control = self._start_control()
            self._start_envoy()
            self._wait_control(control)
            if self.config.prometheus:
                self._start_prometheus()
        except BaseException:
            self._say("start failed; stopping what was started")
            self.down()
            raise
        self._say(f"mesh is up: grpcurl -plaintext {self.envoy_address} list")
        self._say("calls need an API key: switchboard keys create --tenant <tenant>")
        if self.config.prometheus:
            self._say(f"metrics and SLO alerts: {self.prometheus_url}/alerts")
        return True

    def down(self) -> int:
        """Stops every process this run directory records, in layers: the edge, then
        the control plane, then its replicas (Triton's together), then NATS and
        PostgreSQL, whatever order they were (re)started in: the control plane, which
        restarts a NATS server that dies, is gone before NATS is stopped. A process
        recorded meanwhile (such a restart) is stopped too."""
        stopped = 0
        seen: set[ProcessRecord] = set()
        while records := [
            r
            for r in [
                *(self.state.load() or self._records),
                *recorded_replicas(self._replicas_path),
            ]
            if r not in seen
        ]:
            seen.update(records)
            stopped += self._stop_layers(records)
        self.state.clear()
        self._replicas_path.unlink(missing_ok=True)
        self._records = []
        return stopped

    def _stop_layers(self, records: list[ProcessRecord]) -> int:
        layers: list[list[ProcessRecord]] = []
        for record in sorted(records, key=_stop_rank):
            kind = record.name.split("-")[0]
            if layers and layers[-1][0].name.split("-")[0] == kind:
                layers[-1].append(record)
            else:
                layers.append([record])
        stopped = 0
        with ThreadPoolExecutor(max_workers=8) as pool:
            for layer in layers:
                for record, was_running in zip(layer, pool.map(self._stop, layer), strict=True):
                    if was_running:
                        stopped += 1
                        self._say(f"stopped {record.name} (pid {record.pid})")
        return stopped

    def status(self) -> list[tuple[ProcessRecord, bool]]:
        """Every process of the mesh (the control plane's replicas among them) and
        whether it runs."""
        return [(r, r.process() is not None) for r in self.records()]

    def records(self) -> list[ProcessRecord]:
        """Every process the mesh started: the launcher's and the control plane's."""
        return [*self.state.load(), *recorded_replicas(self._replicas_path)]

    @property
    def _replicas_path(self) -> Path:
        return self.config.run_dir / "replicas.json"

    # -- recovery and checks ----------------------------------------------------------------

    def _recover(self) -> bool:
        """True when everything recorded is still running; otherwise stops the survivors
        of an earlier, broken run and forgets it."""
        stale = self.state.load()
        if not stale:
            return False
        alive = [r for r in stale if r.process() is not None]
        if len(alive) == len(stale) and any(r.name == "envoy" for r in stale):
            return True
        dead = {r.name for r in stale} - {r.name for r in alive}
        if dead == {CONTROL} and any(r.name == "envoy" for r in alive):
            # Envoy routes on its last config meanwhile; the new control plane adopts
            # the replicas still running
            self._say("the control plane is not running: starting it again")
            self.start_control()
            return True
        if alive:
            self._say(
                f"found {len(alive)} process(es) from an earlier run in {self.config.run_dir}; "
                "stopping them first"
            )
        for record in reversed(stale):
            self._stop(record)
        self.state.clear()
        return False

    def _planned_ports(self) -> list[tuple[str, int]]:
        return [(planned.what, planned.port) for planned in planned_ports(self.config)]

    def _check_ports(self) -> None:
        planned = planned_ports(self.config)
        owners: dict[int, str] = {}
        clashes = []
        for p in planned:
            if p.port in owners:
                clashes.append(f"  port {p.port} is planned for both {owners[p.port]} and {p.what}")
            owners.setdefault(p.port, p.what)
        if clashes:
            raise LaunchError("cannot start: the configured ports overlap\n" + "\n".join(clashes))
        ephemeral = ephemeral_port_range()
        if ephemeral:
            inside = ports_inside(planned, ephemeral, reserved=reserved_ports())
            if inside:
                raise LaunchError(ephemeral_ports_message(inside, ephemeral))
        problems = []
        for p in planned:
            owner = port_owner(self.config.host, p.port)
            if owner:
                problems.append(f"  port {p.port} ({p.what}) is in use by {owner}")
        if problems:
            raise LaunchError(
                "cannot start: ports are taken\n"
                + "\n".join(problems)
                + "\nstop the processes named (a closing connection goes by itself within a"
                " minute), or move Switchboard with SWITCHBOARD_*_PORT variables (see README)"
            )

    # -- starting ---------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str], **kwargs: object) -> ProcessRecord:
        record = spawn(name, argv, log=self.config.run_dir / "logs" / f"{name}.log", **kwargs)
        # what others changed meanwhile (the control plane restarting NATS) is kept
        self._records = self.state.update(lambda now: [*[r for r in now if r.name != name], record])
        return record

    def _wait(
        self, record: ProcessRecord, check: Callable[[], bool], *, what: str, timeout: float
    ) -> None:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if record.process() is None:
                raise LaunchError(
                    f"{record.name} exited during start-up; last lines of {record.log}:\n"
                    + tail(Path(record.log))
                )
            try:
                if check():
                    self._say(f"  {record.name} ready ({time.monotonic() - start:.1f}s)")
                    return
            except Exception:  # noqa: BLE001 - not ready yet
                pass
            time.sleep(0.2)
        raise LaunchError(
            f"{record.name} was not {what} within {timeout:.0f}s; last lines of {record.log}:\n"
            + tail(Path(record.log))
        )

    def _start_postgres(self) -> None:
        bindir = _package_dir("pgserver") / "pginstall" / "bin"
        pgdata = self.config.run_dir / "postgres"
        user = _postgres_user(bindir, pgdata)
        if not (pgdata / "PG_VERSION").exists():
            self._say("initialising PostgreSQL data directory")
            init = subprocess.run(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(pgdata),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-sync",
                ],
                capture_output=True,
                text=True,
                **_as_user(user),
            )
            if init.returncode != 0:
                raise LaunchError(f"initdb failed for {pgdata}:\n{init.stdout}{init.stderr}")
        self._say(
            f"starting PostgreSQL 16 + pgvector on {self.config.host}:{self.config.postgres_port}"
        )
        record = self._spawn(
            "postgres",
            [
                str(bindir / "postgres"),
                "-D",
                str(pgdata),
                "-p",
                str(self.config.postgres_port),
                "-c",
                f"listen_addresses={self.config.host}",
                "-c",
                "unix_socket_directories=",
                "-c",
                "max_connections=200",
                "-c",
                "shared_buffers=256MB",
            ],
            as_user=_as_user(user),
        )
        admin_url = f"postgresql://postgres@{self.config.host}:{self.config.postgres_port}/postgres"
        self._wait(record, lambda: _pg_ready(admin_url), what="accepting connections", timeout=60)
        _pg_bootstrap(admin_url, self.database_url)

    def _start_nats(self) -> None:
        self._say(f"starting NATS JetStream on {self.config.host}:{self.config.nats_port}")
        binary = shutil.which("nats-server", path=str(Path(sys.executable).parent)) or "nats-server"
        conf = self.config.run_dir / "nats.conf"
        conf.write_text(nats_conf(self.config.run_dir / "nats", self.config.nats_sync_interval))
        record = self._spawn(
            "nats",
            [
                binary,
                "-c",
                str(conf),
                "-a",
                self.config.host,
                "-p",
                str(self.config.nats_port),
                "-m",
                str(self.config.nats_monitor_port),
                "--server_name",
                "switchboard",
            ],
        )
        url = f"http://{self.config.host}:{self.config.nats_monitor_port}/healthz?js-enabled-only=true"
        self._wait(record, lambda: _http_ok(url), what="healthy", timeout=30)

    def _stop(self, record: ProcessRecord) -> bool:
        """Stops one process; a Triton replica's leftover shared memory goes with it.
        The control plane is given the time to stop its replicas gracefully; PostgreSQL
        is asked for its fast shutdown (SIGINT: its SIGTERM waits for every client to
        leave, and the services' pools never do)."""
        was_running = stop(
            record,
            timeout=45.0 if record.name == CONTROL else 15.0,
            sig=signal.SIGINT if record.name == "postgres" else signal.SIGTERM,
        )
        name, _, replica = record.name.partition("-")
        if name == "triton" and replica.isdigit():
            _triton.remove_shm_regions(self.config.triton_ports(int(replica))[1])
        return was_running

    def start_postgres(self) -> None:
        """(Re)starts the embedded PostgreSQL on its data directory (its data is kept)."""
        self._records = self.state.load()
        self._start_postgres()

    def start_nats(self) -> None:
        """(Re)starts the embedded NATS server (its JetStream store is kept)."""
        self._records = self.state.load()
        self._start_nats()

    def start_triton(self, replica: int) -> None:
        """(Re)starts one Triton replica and waits until it is ready."""
        self.start_service(f"triton-{replica}")

    def stop_component(self, name: str) -> bool:
        """Stops one process (`triton-0`, `rag`, `postgres`) and keeps it stopped: a
        replica through the control plane (it is not restarted until `start_service`),
        anything else by its recorded PID."""
        if name not in {r.name for r in self.state.load()}:
            try:
                self._control("StopReplica", control_pb2.StopReplicaRequest(replica=name))
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    return False
                raise
            return True
        # forgotten before it is stopped: the control plane restarts a recorded NATS
        # server that dies
        found = [r for r in self.state.load() if r.name == name]
        self._records = self.state.update(lambda now: [r for r in now if r.name != name])
        for record in found:
            self._stop(record)
        return bool(found)

    def start_prometheus(self) -> None:
        """Starts a Prometheus server scraping the running mesh (as `up --prometheus`
        does), with the SLO rules, and waits until it is ready; a running one is stopped
        first."""
        self.stop_component("prometheus")
        self._records = self.state.load()
        self._start_prometheus()

    def start_service(self, name: str, *, env: Mapping[str, str] | None = None) -> None:
        """(Re)starts one replica (`rag`, `admission-1`, `triton-0`) through the control
        plane, with extra `SWITCHBOARD_*` environment variables (replacing any given
        before), and waits until it serves."""
        request = control_pb2.StartReplicaRequest(replica=name, environment=dict(env or {}))
        try:
            self._control("StartReplica", request, timeout=self.config.start_timeout_s)
        except grpc.RpcError as exc:
            raise LaunchError(f"could not start {name}: {exc.details()}") from exc

    def key_store(self, *, signed: bool = True) -> KeyStore:
        """The mesh's API keys (open it before use and close it after, or use it with
        `async with`), signing new ones with the mesh's signing key when it has one, as
        the auth service does; not `signed`, new keys take the older `sb_` form."""
        signer = signing_key(self.config.signing_key_path) if signed else None
        return KeyStore(self.database_url, signer=signer)

    def control(self) -> control_service_pb2_grpc.ControlServiceStub:
        """A ControlService stub on the control plane's own port (loopback), calling as
        the machine's operator; close it with `close_control`."""
        if self._control_channel is None:
            self._control_channel = grpc.insecure_channel(f"127.0.0.1:{self.config.control_port}")
        return control_service_pb2_grpc.ControlServiceStub(self._control_channel)

    def _control(self, method: str, request: object, *, timeout: float = 60.0) -> object:
        call = getattr(self.control(), method)
        return call(request, timeout=timeout, metadata=OPERATOR_METADATA)

    def start_control(self) -> None:
        """(Re)starts the control plane: it adopts the replicas still running (Envoy
        keeps routing to them meanwhile) and restarts the missing ones."""
        self._records = [r for r in self.state.load() if r.name != CONTROL]
        self._wait_control(self._start_control())

    @property
    def control_address(self) -> str:
        """Where the CLI reaches ControlService: Envoy's internal listener, as recorded by
        the `up` that started the mesh (its ports may differ from this config's)."""
        try:
            return json.loads((self.config.run_dir / ADDRESSES).read_text())["internal"]
        except (OSError, ValueError, KeyError):
            return self.internal_address

    def _start_control(self) -> ProcessRecord:
        self._say(f"starting the control plane on 127.0.0.1:{self.config.control_port}")
        env = {
            **config_env(self.config),
            "SWITCHBOARD_DATABASE_URL": self.database_url,
            "SWITCHBOARD_NATS_URL": self.nats_url,
            "SWITCHBOARD_CONTROL_HOST": "127.0.0.1",
            "SWITCHBOARD_CONTROL_METRICS_PORT": str(self.config.metrics_base_port + 50),
            # its own streams (Envoy's ADS, WatchEvents) never end: do not wait for them
            "SWITCHBOARD_CONTROL_GRACE": "1s",
            "PYTHONUNBUFFERED": "1",
        }
        if not self.config.triton_url:
            _triton.run_files(self.config)  # laid out once, before any replica needs them
        SigningKey.ensure(self.config.signing_key_path)
        (self.config.run_dir / ADDRESSES).write_text(
            json.dumps({"internal": self.internal_address})
        )
        record = self._spawn(
            CONTROL, [sys.executable, "-m", "services.control"], env=env, cwd=REPO_ROOT
        )
        self._wait(
            record,
            lambda: grpc_answers(f"127.0.0.1:{self.config.control_port}"),
            what="serving ADS",
            timeout=60,
        )
        return record

    def _wait_control(self, record: ProcessRecord) -> None:
        self._wait(
            record,
            lambda: grpc_serving(f"127.0.0.1:{self.config.control_port}", CONTROL_SERVICE),
            what="SERVING (every replica started)",
            timeout=self.config.start_timeout_s + 60,
        )

    def _start_envoy(self) -> None:
        """Starts Envoy with a bootstrap that holds only its admin API and the way to the
        control plane, which serves it every listener, route, cluster and endpoint."""
        config = bootstrap(
            node_id=f"edge-{self.config.envoy_base_id}",
            cluster="switchboard-edge",
            admin_port=self.config.envoy_admin_port,
            ads_host="127.0.0.1",
            ads_port=self.config.control_port,
        )
        path = self.config.run_dir / "envoy.yaml"
        write_envoy_config(path, config)
        self._say(f"starting Envoy on {self.envoy_address} (internal: {self.internal_address})")
        record = self._spawn(
            "envoy",
            envoy_command(config_path=path, base_id=self.config.envoy_base_id, log_path=None),
        )
        wanted = {
            spec.name: spec.replicas(self.config) for spec in SERVICES if spec.public or spec.http
        }
        wanted[AUTHZ_CLUSTER] = AUTH.replicas(self.config)
        self._wait(
            record,
            lambda: all(
                healthy_hosts(self.config.envoy_admin_port).get(name, 0) >= count
                for name, count in wanted.items()
            ),
            what="routing to every service",
            timeout=self.config.start_timeout_s + 60,
        )

    def _start_prometheus(self) -> None:
        binary = _prometheus.prometheus_binary()
        if binary is None:
            raise LaunchError(
                "--prometheus needs the prometheus binary (Debian's package): run"
                " `make prometheus`, or `apt-get install prometheus`"
            )
        path = self.config.run_dir / "prometheus.yml"
        targets_dir = self.config.run_dir / _prometheus.TARGETS_DIR
        _prometheus.write_config(
            path,
            _prometheus.render_config(
                _prometheus.scrape_targets(self.config), targets_dir=targets_dir
            ),
        )
        self._say(f"starting Prometheus on {self.prometheus_url}")
        record = self._spawn(
            "prometheus",
            _prometheus.prometheus_command(
                binary=binary,
                config_path=path,
                data_dir=self.config.run_dir / "prometheus",
                host="127.0.0.1",
                port=self.config.prometheus_port,
            ),
        )
        url = f"{self.prometheus_url}/-/ready"
        self._wait(record, lambda: _http_ok(url), what="ready", timeout=60)


_STOP_ORDER = {"prometheus": 0, "envoy": 1, CONTROL: 2, "nats": 4, "postgres": 5}
"""Where each process is stopped in `down`; any other (a replica) comes after the control
plane and before NATS."""


def _stop_rank(record: ProcessRecord) -> int:
    return _STOP_ORDER.get(record.name, 3)


def nats_conf(store_dir: Path, sync_interval: str) -> str:
    """NATS's configuration file: JetStream, its store, and when it syncs to disk."""
    return (
        "jetstream {\n"
        f"  store_dir: {json.dumps(str(store_dir))}\n"
        f"  sync_interval: {sync_interval}\n"
        "}\n"
    )


def _as_user(user: str | None) -> dict[str, object]:
    """subprocess arguments that drop to `user`, its group, and no supplementary groups
    (root's group bits would otherwise still apply)."""
    if user is None:
        return {}
    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _package_dir(name: str) -> Path:
    """Where an installed package lives, without importing it (pgserver's import has
    side effects)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise LaunchError(f"package {name!r} is not installed: run `make install`")
    return Path(next(iter(spec.submodule_search_locations)))


# -- health probes ----------------------------------------------------------------------------


def grpc_serving(target: str, service: str = "") -> bool:
    """Whether `target` reports `service` SERVING over grpc.health.v1."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
        return reply.status == health_pb2.HealthCheckResponse.SERVING


def grpc_answers(target: str) -> bool:
    """Whether a gRPC server at `target` answers a health check, whatever it says."""
    with grpc.insecure_channel(target) as channel:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
        return True


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=1.0) as reply:  # noqa: S310 - loopback only
        return 200 <= reply.status < 300


def _pg_ready(url: str) -> bool:
    import psycopg

    with psycopg.connect(url, connect_timeout=1):
        return True


def _pg_bootstrap(admin_url: str, database_url: str) -> None:
    """Creates the `switchboard` database with pgvector (idempotent)."""
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = 'switchboard'").fetchone():
            conn.execute("CREATE DATABASE switchboard")
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")


def _postgres_user(bindir: Path, pgdata: Path) -> str | None:
    """PostgreSQL refuses to run as root: as root, run it as a dedicated system user."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", PG_SYSTEM_USER],
            check=True,
            capture_output=True,
        )
    entry = pwd.getpwnam(PG_SYSTEM_USER)
    # the server binaries and libraries must be readable and the data path traversable
    install = bindir.parent
    for path in [install, *install.rglob("*")]:
        mode = path.stat().st_mode
        wanted = mode | stat.S_IROTH | (stat.S_IXOTH if path.is_dir() or mode & stat.S_IXUSR else 0)
        if wanted != mode:
            path.chmod(wanted)
    for parent in [*reversed(pgdata.parents)]:
        if parent.exists() and not parent.stat().st_mode & stat.S_IXOTH:
            parent.chmod(parent.stat().st_mode | stat.S_IXOTH)
    pgdata.mkdir(parents=True, exist_ok=True)
    pgdata.chmod(0o700)
    os.chown(pgdata, entry.pw_uid, entry.pw_gid)
    return PG_SYSTEM_USER
