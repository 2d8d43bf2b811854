"""The ports `up` binds, each with the variable that places it, and the check that none
lies in the machine's ephemeral port range."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from services.launcher._config import ENV_PREFIX, LauncherConfig
from services.launcher._services import service_processes

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlannedPort:
    """A port the mesh will listen on, and the variable that places it."""

    what: str
    """The listener: `envoy`, `admission-1`, `rag metrics`, `triton-0 grpc`."""
    port: int
    field: str
    """The LauncherConfig field (`SWITCHBOARD_<FIELD>`) the port is derived from."""
    offset: int = 0
    """port = the field's value + offset (replicas, metrics, Triton's three ports)."""

    @property
    def variable(self) -> str:
        return ENV_PREFIX + self.field.upper()


def planned_ports(config: LauncherConfig) -> list[PlannedPort]:
    """Every port `up` binds (none for infrastructure given by URL)."""
    ports = [
        PlannedPort("envoy", config.envoy_port, "envoy_port"),
        PlannedPort("envoy internal", config.envoy_internal_port, "envoy_internal_port"),
        PlannedPort("envoy admin", config.envoy_admin_port, "envoy_admin_port"),
    ]
    if not config.database_url:
        ports.append(PlannedPort("postgres", config.postgres_port, "postgres_port"))
    if not config.nats_url:
        ports += [
            PlannedPort("nats", config.nats_port, "nats_port"),
            PlannedPort("nats monitor", config.nats_monitor_port, "nats_monitor_port"),
        ]
    if not config.triton_url:
        for i in range(config.triton_replicas):
            kinds = ("http", "grpc", "metrics")
            for kind, port in zip(kinds, config.triton_ports(i), strict=True):
                offset = port - config.triton_base_port
                ports.append(PlannedPort(f"triton-{i} {kind}", port, "triton_base_port", offset))
    ports.append(PlannedPort("control", config.control_port, "control_port"))
    for spec, slot in service_processes(config):
        name = spec.process_name(config, slot)
        port = spec.port(config, slot)
        ports.append(
            PlannedPort(name, port, spec.port_field, port - getattr(config, spec.port_field))
        )
        metrics = spec.metrics_port(config, slot)
        ports.append(
            PlannedPort(
                f"{name} metrics", metrics, "metrics_base_port", metrics - config.metrics_base_port
            )
        )
    if config.prometheus:
        ports.append(PlannedPort("prometheus", config.prometheus_port, "prometheus_port"))
    return ports


def ports_inside(
    planned: list[PlannedPort], port_range: tuple[int, int], *, reserved: frozenset[int]
) -> list[PlannedPort]:
    """The planned ports inside the ephemeral `port_range` and not reserved from it: an
    outgoing connection may hold one of them when `up` binds it."""
    low, high = port_range
    return [p for p in planned if low <= p.port <= high and p.port not in reserved]


def ephemeral_ports_message(inside: list[PlannedPort], port_range: tuple[int, int]) -> str:
    """Why `up` refuses `inside`, each with the variable that places it, and the way out."""
    low, high = port_range
    lines = [
        f"cannot start: ports inside this machine's ephemeral port range {low}-{high}"
        " (net.ipv4.ip_local_port_range): the kernel gives the local end of outgoing"
        " connections a port from it, so any of these may be held when `up` binds it:"
    ]
    by_variable: dict[tuple[str, int], list[PlannedPort]] = {}
    for p in inside:
        by_variable.setdefault((p.variable, p.port - p.offset), []).append(p)
    for (variable, value), ports in by_variable.items():
        lines.append(f"  {variable}={value}: " + ", ".join(f"{p.what} on {p.port}" for p in ports))
    lines.append(
        f"move them below {low} with these variables (see README), or reserve them from"
        " the range by adding"
        f" {_port_list(sorted(p.port for p in inside))} to net.ipv4.ip_local_reserved_ports"
    )
    return "\n".join(lines)


def _port_list(ports: list[int]) -> str:
    """Sorted ports as the kernel writes a port list: `7051,7062-7065`."""
    runs: list[list[int]] = []
    for port in ports:
        if runs and port == runs[-1][1] + 1:
            runs[-1][1] = port
        else:
            runs.append([port, port])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in runs)
