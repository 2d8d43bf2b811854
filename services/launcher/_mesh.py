"""Starts the mesh in order, waits for each part's health, and stops it by PID."""

from __future__ import annotations

import importlib.util
import logging
import os
import pwd
import shutil
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

from services.launcher import _envoy, _envoy_http, _envoy_web, _prometheus, _triton
from services.launcher._config import REPO_ROOT, LauncherConfig
from services.launcher._ports import ephemeral_ports_message, planned_ports, ports_inside
from services.launcher._procs import (
    ProcessRecord,
    StateFile,
    ephemeral_port_range,
    port_owner,
    reserved_ports,
    spawn,
    stop,
    tail,
)
from services.launcher._services import (
    AUTH,
    AUTHORIZATION,
    SERVICES,
    ServiceSpec,
    service_processes,
)
from services.runtime import HTTP_HEALTH_PATH

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]
PG_SYSTEM_USER = "switchboard-pg"
TRITON_MODELS = tuple(_triton.available_models(_triton.MODEL_REPOSITORY))
"""Every model of the repository in `triton-models/` (its directories are the names)."""


class LaunchError(RuntimeError):
    """The mesh could not start; the message says what is wrong and where to look."""


class Mesh:
    """The local mesh described by a `LauncherConfig`."""

    def __init__(self, config: LauncherConfig, *, progress: Progress | None = None) -> None:
        self.config = config
        self.state = StateFile(config.run_dir)
        self._records: list[ProcessRecord] = []
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
        if self.config.triton_url:
            return tuple(u.strip() for u in self.config.triton_url.split(",") if u.strip())
        return tuple(
            f"{self.config.host}:{self.config.triton_ports(i)[1]}"
            for i in range(self.config.triton_replicas)
        )

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
            if not self.config.triton_url:
                self._start_tritons()
            for index, (spec, replica) in enumerate(service_processes(self.config)):
                self._start_service(index, spec, replica)
            self._start_envoy()
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
        """Stops every process this run directory records, newest layer first (the edge,
        then services, then Triton replicas together, then NATS and PostgreSQL)."""
        records = self.state.load() or self._records
        layers: list[list[ProcessRecord]] = []
        for record in reversed(records):
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
        self.state.clear()
        self._records = []
        return stopped

    def status(self) -> list[tuple[ProcessRecord, bool]]:
        return [(r, r.process() is not None) for r in self.state.load()]

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
        self._records.append(record)
        self.state.save(self._records)
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
        record = self._spawn(
            "nats",
            [
                binary,
                "-a",
                self.config.host,
                "-p",
                str(self.config.nats_port),
                "-m",
                str(self.config.nats_monitor_port),
                "-js",
                "-sd",
                str(self.config.run_dir / "nats"),
                "--server_name",
                "switchboard",
            ],
        )
        url = f"http://{self.config.host}:{self.config.nats_monitor_port}/healthz?js-enabled-only=true"
        self._wait(record, lambda: _http_ok(url), what="healthy", timeout=30)

    def _triton_files(self) -> tuple[Path, Path, bool]:
        gpu = {"on": True, "off": False}.get(self.config.gpu)
        if gpu is None:
            gpu = _triton.gpu_available()
        repo = self.config.run_dir / "triton-models"
        backend_dir = self.config.run_dir / "triton-backends"
        if not repo.exists():
            repo = _triton.prepare_model_repository(
                _triton.MODEL_REPOSITORY, repo, gpu=gpu, models=TRITON_MODELS
            )
        if not backend_dir.exists():
            backend_dir = _triton.prepare_backend_dir(self.config.run_dir)
        return repo, backend_dir, gpu

    def _start_tritons(self) -> None:
        records = [self._spawn_triton(i) for i in range(self.config.triton_replicas)]
        for i, record in enumerate(records):
            self._wait_triton(i, record)

    def _spawn_triton(self, replica: int) -> ProcessRecord:
        repo, backend_dir, gpu = self._triton_files()
        http, grpc_port, metrics = self.config.triton_ports(replica)
        self._say(
            f"starting Triton replica {replica} ({'GPU' if gpu else 'CPU'}) "
            f"on {self.config.host}:{grpc_port}"
        )
        argv, env = _triton.tritonserver_command(
            model_repo=repo,
            backend_dir=backend_dir,
            http_port=http,
            grpc_port=grpc_port,
            metrics_port=metrics,
            models=TRITON_MODELS,
            gpu=gpu,
        )
        return self._spawn(f"triton-{replica}", argv, env=env)

    def _stop(self, record: ProcessRecord) -> bool:
        """Stops one process; a Triton replica's leftover shared memory goes with it."""
        was_running = stop(record)
        name, _, replica = record.name.partition("-")
        if name == "triton" and replica.isdigit():
            _triton.remove_shm_regions(self.config.triton_ports(int(replica))[1])
        return was_running

    def _wait_triton(self, replica: int, record: ProcessRecord) -> None:
        url = f"http://{self.config.host}:{self.config.triton_ports(replica)[0]}/v2/health/ready"
        self._wait(record, lambda: _http_ok(url), what="ready", timeout=self.config.start_timeout_s)

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
        self._records = self.state.load()
        self._wait_triton(replica, self._spawn_triton(replica))

    def stop_component(self, name: str) -> bool:
        """Stops one recorded process (e.g. `triton-0`) and forgets it."""
        records = self.state.load()
        found = [r for r in records if r.name == name]
        for record in found:
            self._stop(record)
        self._records = [r for r in records if r.name != name]
        self.state.save(self._records)
        return bool(found)

    def start_prometheus(self) -> None:
        """Starts a Prometheus server scraping the running mesh (as `up --prometheus`
        does), with the SLO rules, and waits until it is ready; a running one is stopped
        first."""
        self.stop_component("prometheus")
        self._records = self.state.load()
        self._start_prometheus()

    def start_service(self, name: str, *, env: Mapping[str, str] | None = None) -> None:
        """(Re)starts one service process (e.g. `rag`, `admission-1`) with extra
        environment variables, and waits until it serves; a running one is stopped first."""
        for index, (spec, replica) in enumerate(service_processes(self.config)):
            if spec.process_name(self.config, replica) == name:
                self.stop_component(name)
                self._start_service(index, spec, replica, extra_env=env)
                return
        raise LaunchError(f"no service process is named {name!r}")

    def _start_service(
        self,
        index: int,
        spec: ServiceSpec,
        replica: int = 0,
        *,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        port = spec.port(self.config, replica)
        name = spec.process_name(self.config, replica)
        prefix = f"SWITCHBOARD_{spec.name.upper()}_"
        # Calls between services go through the internal listener: no key, the tenant
        # of the call being handled travels as x-tenant-id and is trusted there.
        env = {
            f"{prefix}REPLICA_ID": name,
            "SWITCHBOARD_ADMISSION_TARGET": self.internal_address,
            "SWITCHBOARD_INFERENCE_TARGET": self.internal_address,
            "SWITCHBOARD_RAG_TARGET": self.internal_address,
            "SWITCHBOARD_EXECUTION_TARGET": self.internal_address,
            "SWITCHBOARD_ADMISSION_REPLICAS": str(self.config.admission_replicas),
            f"{prefix}HOST": self.config.host,
            f"{prefix}PORT": str(port),
            f"{prefix}METRICS_PORT": str(self.config.metrics_base_port + index),
            "SWITCHBOARD_TRITON_URLS": ",".join(self.triton_urls),
            "SWITCHBOARD_MODEL_POLICY": str(self.config.model_policy),
            "SWITCHBOARD_DATABASE_URL": self.database_url,
            "SWITCHBOARD_NATS_URL": self.nats_url,
            "SWITCHBOARD_AUTH_CACHE_TTL": f"{self.config.auth_cache_ttl.total_seconds():g}s",
            "PYTHONUNBUFFERED": "1",
            **(extra_env or {}),
        }
        self._say(f"starting {name} service on {self.config.host}:{port}")
        record = self._spawn(name, [sys.executable, "-m", spec.module], env=env, cwd=REPO_ROOT)
        target = f"{self.config.host}:{port}"
        if spec.http:
            url = f"http://{target}{HTTP_HEALTH_PATH}"
            self._wait(record, lambda: _http_ok(url), what="healthy", timeout=60)
            return
        self._wait(
            record,
            lambda: grpc_serving(target, spec.health_service),
            what="SERVING",
            timeout=60,
        )

    def _start_envoy(self) -> None:
        upstreams = [
            _envoy.Upstream(
                name=spec.name,
                services=spec.grpc_services,
                endpoints=tuple(
                    (self.config.host, spec.port(self.config, i))
                    for i in range(spec.replicas(self.config))
                ),
                hash_header=spec.hash_header,
            )
            for spec in SERVICES
            if spec.public
        ]
        authz = _envoy.Upstream(
            name=_envoy.AUTHZ_CLUSTER,
            services=(AUTHORIZATION,),
            endpoints=((self.config.host, AUTH.port(self.config, 0)),),
        )
        http_upstreams = [
            _envoy_http.HttpUpstream(
                name=spec.name,
                prefixes=spec.service.http_prefixes,
                endpoints=tuple(
                    (self.config.host, spec.port(self.config, i))
                    for i in range(spec.replicas(self.config))
                ),
                health_path=HTTP_HEALTH_PATH,
            )
            for spec in SERVICES
            if spec.http
        ]
        config = _envoy.render_envoy_config(
            listen_host=self.config.host,
            listen_port=self.config.envoy_port,
            admin_port=self.config.envoy_admin_port,
            upstreams=upstreams,
            authz=authz,
            internal_port=self.config.envoy_internal_port,
            http_upstreams=http_upstreams,
        )
        config = _envoy_web.add_browser_access(
            config, origins=_envoy_web.parse_origins(self.config.web_origins)
        )
        path = self.config.run_dir / "envoy.yaml"
        _envoy.write_envoy_config(path, config)
        self._say(f"starting Envoy on {self.envoy_address} (internal: {self.internal_address})")
        record = self._spawn(
            "envoy",
            _envoy.envoy_command(
                config_path=path, base_id=self.config.envoy_base_id, log_path=None
            ),
        )
        wanted = {
            spec.name: spec.replicas(self.config) for spec in SERVICES if spec.public or spec.http
        }
        wanted[authz.name] = 1
        self._wait(
            record,
            lambda: all(
                _envoy.healthy_hosts(self.config.envoy_admin_port).get(name, 0) >= count
                for name, count in wanted.items()
            ),
            what="routing to every service",
            timeout=60,
        )

    def _start_prometheus(self) -> None:
        binary = _prometheus.prometheus_binary()
        if binary is None:
            raise LaunchError(
                "--prometheus needs the prometheus binary (Debian's package): run"
                " `make prometheus`, or `apt-get install prometheus`"
            )
        path = self.config.run_dir / "prometheus.yml"
        _prometheus.write_config(
            path, _prometheus.render_config(_prometheus.scrape_targets(self.config))
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
