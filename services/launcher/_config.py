"""The launcher's configuration: ports, run directory, external infrastructure URLs."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from services.launcher._envoy_web import parse_origins
from services.runtime import load_config

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
ENV_PREFIX = "SWITCHBOARD_"
_DURATION = re.compile(r"[1-9][0-9]*(ms|s|m|h)")
REPLICA_FIELDS = (
    "inference_replicas",
    "admission_replicas",
    "rag_replicas",
    "execution_replicas",
    "workers",
    "chat_replicas",
    "auth_replicas",
    "gateway_replicas",
)
"""The fields holding how many replicas of each service `up` starts."""


@dataclass(frozen=True)
class LauncherConfig:
    """Read from `SWITCHBOARD_*` variables; every port can be moved (`switchboard up`
    refuses one inside the machine's ephemeral port range).

    `DATABASE_URL`, `NATS_URL` and `TRITON_URL` (comma-separated `host:port` gRPC
    addresses) point at external servers instead of starting embedded ones.
    """

    run_dir: Path = REPO_ROOT / ".run"
    host: str = "127.0.0.1"
    envoy_port: int = 8080
    """The public listener: every client call, each checked for an API key."""
    envoy_internal_port: int = 8081
    """The internal listener, on 127.0.0.1 only: the services' calls to each other. It
    trusts the `x-tenant-id` it is sent, so it must never be reachable by clients."""
    envoy_admin_port: int = 9901
    envoy_base_id: int = 17
    postgres_port: int = 5433
    nats_port: int = 4222
    nats_monitor_port: int = 8222
    nats_sync_interval: str = "always"
    """When JetStream flushes its files to disk: `always` (each message before its
    publish is acknowledged: an acknowledged task step or event survives a power loss) or
    a duration such as `2m` (NATS's default: a power loss can lose what was acknowledged
    in the last interval; a crash of the server process alone loses nothing)."""
    triton_base_port: int = 8100
    """Triton replica i listens on http base+3i, grpc base+3i+1, metrics base+3i+2."""
    triton_replicas: int = 2
    # The services' ports lie below the kernel's ephemeral range (32768 and up on Linux),
    # from which outgoing connections take their local ports: one could hold them.
    # A service's replica in slot s listens on its port + 10s (s < 5: up to 4 replicas
    # and a rollout's surge replica).
    inference_port: int = 7051
    inference_replicas: int = 1
    admission_port: int = 7052
    admission_replicas: int = 2
    rag_port: int = 7054
    rag_replicas: int = 1
    execution_port: int = 7055
    execution_replicas: int = 1
    worker_port: int = 7056
    """Execution worker i serves health on worker_port + 10i."""
    workers: int = 1
    """Execution worker processes (each runs SWITCHBOARD_EXECUTION_WORKERS steps at once)."""
    chat_port: int = 7057
    chat_replicas: int = 1
    auth_port: int = 7058
    """The auth service, asked by Envoy about every public call (ext_authz)."""
    auth_replicas: int = 1
    gateway_port: int = 7059
    """The OpenAI-compatible HTTP API (Envoy routes `/v1/` on the public port to it)."""
    gateway_replicas: int = 1
    control_port: int = 7050
    """The control plane (on 127.0.0.1): Envoy's ADS stream, and ControlService, which
    operators reach through Envoy's internal listener."""
    max_replicas: int = 4
    """The most replicas `switchboard scale` gives a service (at most 4)."""
    spares: bool = True
    """Keep one warm (pre-imported, idle) process per service kind, which the control
    plane turns into the replica that replaces a dead one: recovery then costs the
    service's own start, not the interpreter's imports."""
    web_origins: str = ""
    """Browser origins other than the public port's own (comma-separated, such as
    `https://app.example.com`) whose pages may call the public port with gRPC-Web
    (CORS); the chat page served on the port needs none."""
    auth_cache_ttl: timedelta = timedelta(seconds=30)
    """How long the auth service trusts a key it has checked (a revoked key leaves its
    cache sooner: each replica reads the revoked keys every second)."""
    metrics_base_port: int = 9100
    """Service replicas' Prometheus endpoints: metrics_base_port + 10·slot + the
    service's place in the launcher's list (up to +49); the control plane's is +50."""
    prometheus: bool = False
    """Also start a Prometheus server scraping every process, with the SLO rules
    (`switchboard up --prometheus`; Debian's `prometheus` package, `make prometheus`)."""
    prometheus_port: int = 9090
    """That Prometheus server's port (on 127.0.0.1): its UI and HTTP API."""
    trace_sampling: float = 1.0
    """The share of requests traced (0..1): every process, and Envoy, writes the spans of
    sampled requests under the run directory's `traces/` (`switchboard trace`), and to
    an OpenTelemetry collector too when `OTEL_EXPORTER_OTLP_ENDPOINT` is set. 0 turns
    tracing off."""
    model_policy: Path = REPO_ROOT / "services" / "inference" / "models.yaml"
    gpu: str = "auto"
    """`auto` uses KIND_GPU Triton instances when nvidia-smi sees a GPU; `on`/`off` force."""
    start_timeout_s: float = 240.0
    database_url: str = ""
    nats_url: str = ""
    triton_url: str = ""

    def __post_init__(self) -> None:
        if self.triton_replicas < 1:
            raise ValueError("SWITCHBOARD_TRITON_REPLICAS must be at least 1")
        if not 1 <= self.max_replicas <= 4:
            raise ValueError("SWITCHBOARD_MAX_REPLICAS must be 1..4")
        for name in REPLICA_FIELDS:
            if not 1 <= getattr(self, name) <= self.max_replicas:
                raise ValueError(
                    f"{ENV_PREFIX}{name.upper()} must be 1..{self.max_replicas}"
                    f" ({ENV_PREFIX}MAX_REPLICAS)"
                )
        if self.nats_sync_interval != "always" and not _DURATION.fullmatch(self.nats_sync_interval):
            raise ValueError(
                "SWITCHBOARD_NATS_SYNC_INTERVAL must be `always` or a duration such as 2m,"
                " 30s or 500ms"
            )
        if self.gpu not in ("auto", "on", "off"):
            raise ValueError("SWITCHBOARD_GPU must be auto, on or off")
        if not 0.0 <= self.trace_sampling <= 1.0:
            raise ValueError("SWITCHBOARD_TRACE_SAMPLING must be within 0..1")
        parse_origins(self.web_origins)  # a bad SWITCHBOARD_WEB_ORIGINS fails at start

    @property
    def traces_dir(self) -> Path:
        """Where the processes write their spans (one JSON object per line)."""
        return self.run_dir / "traces"

    @property
    def signing_key_path(self) -> Path:
        """The mesh's key-signing key (`services.auth.signing`): created by `up` if
        missing, read by the auth service (private half) and the control plane (public
        half, for the edge)."""
        return self.run_dir / "auth" / "signing-key.pem"

    def triton_ports(self, replica: int) -> tuple[int, int, int]:
        base = self.triton_base_port + 3 * replica
        return base, base + 1, base + 2


def config_env(config: LauncherConfig) -> dict[str, str]:
    """`config` as the `SWITCHBOARD_*` variables `load_launcher_config` reads back (how
    the launcher hands its configuration to the control plane)."""
    from dataclasses import fields

    env = {}
    for field in fields(config):
        value = getattr(config, field.name)
        if isinstance(value, timedelta):
            text = f"{value.total_seconds():g}s"
        elif isinstance(value, bool):
            text = "true" if value else "false"
        else:
            text = str(value)
        env[f"{ENV_PREFIX}{field.name.upper()}"] = text
    return env


def triton_urls(config: LauncherConfig) -> tuple[str, ...]:
    """The gRPC addresses of the mesh's Triton servers: TRITON_URL's, or the embedded
    replicas'."""
    if config.triton_url:
        return tuple(u.strip() for u in config.triton_url.split(",") if u.strip())
    return tuple(
        f"{config.host}:{config.triton_ports(i)[1]}" for i in range(config.triton_replicas)
    )


def isolated_config(
    run_dir: Path,
    *,
    triton_replicas: int = 2,
    admission_replicas: int = 2,
    workers: int = 1,
    gpu: str = "off",
    **replicas: int,
) -> LauncherConfig:
    """A config on a free, random port range and its own run directory, so tests and
    benchmarks never collide with a mesh started by `make up`; `replicas` sets other
    services' replica counts (`chat_replicas=2`)."""
    from services.launcher._procs import free_port_base

    base = free_port_base(host="127.0.0.1", span=140)
    return LauncherConfig(
        run_dir=run_dir,
        envoy_port=base,
        envoy_admin_port=base + 1,
        envoy_base_id=base,
        postgres_port=base + 2,
        nats_port=base + 3,
        nats_monitor_port=base + 4,
        inference_port=base + 5,
        admission_port=base + 6,  # replica i on base + 6 + 10i: base+16, base+26
        admission_replicas=admission_replicas,
        rag_port=base + 7,
        execution_port=base + 8,
        worker_port=base + 9,  # worker i on base + 9 + 10i: base+19, base+29
        workers=workers,
        chat_port=base + 11,
        auth_port=base + 12,
        envoy_internal_port=base + 13,
        gateway_port=base + 14,  # slots: + 10s, up to base+54
        control_port=base + 55,
        triton_base_port=base + 60,  # three ports a replica
        prometheus_port=base + 75,
        metrics_base_port=base + 80,  # up to base+130
        triton_replicas=triton_replicas,
        gpu=gpu,
        **replicas,
    )


def load_launcher_config() -> LauncherConfig:
    config = load_config(LauncherConfig, prefix=ENV_PREFIX)
    external = {
        "database_url": os.environ.get("DATABASE_URL", ""),
        "nats_url": os.environ.get("NATS_URL", ""),
        "triton_url": os.environ.get("TRITON_URL", ""),
    }
    from dataclasses import replace

    return replace(config, **{k: v for k, v in external.items() if v})
