"""The launcher's ports: defaults below the ephemeral range, the refusal of ports inside
it, and what the port check says holds a port (no sockets, no processes)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest

from services.launcher import LauncherConfig, LaunchError, Mesh, _mesh
from services.launcher._ports import planned_ports, ports_inside
from services.launcher._procs import describe_port_holder, parse_port_list

LINUX_RANGE = (32_768, 60_999)


class Addr(NamedTuple):
    ip: str
    port: int


class Conn(NamedTuple):
    """The fields of a `psutil.net_connections()` record that the description reads."""

    laddr: Addr
    raddr: Addr | tuple[()]
    status: str
    pid: int | None


def names(pid: int) -> str | None:
    return {4242: "python3"}.get(pid)


@pytest.mark.parametrize("replicas", [1, 2, 3])
@pytest.mark.parametrize("workers", [1, 3])
def test_default_ports_are_distinct_and_below_the_ephemeral_range(
    tmp_path: Path, replicas: int, workers: int
) -> None:
    config = LauncherConfig(run_dir=tmp_path, admission_replicas=replicas, workers=workers)
    ports = [p.port for p in planned_ports(config)]
    assert len(ports) == len(set(ports))
    assert max(ports) < LINUX_RANGE[0]
    assert ports_inside(planned_ports(config), LINUX_RANGE, reserved=frozenset()) == []


def test_default_service_ports() -> None:
    config = LauncherConfig()
    assert (
        config.inference_port,
        config.admission_port,
        config.rag_port,
        config.execution_port,
        config.worker_port,
        config.chat_port,
        config.auth_port,
    ) == (7051, 7052, 7054, 7055, 7056, 7057, 7058)


@pytest.fixture
def linux_range(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_mesh, "ephemeral_port_range", lambda: LINUX_RANGE)
    monkeypatch.setattr(_mesh, "reserved_ports", lambda: frozenset())

    def no_sockets(host: str, port: int) -> str | None:
        raise AssertionError("the refusal comes before any port is probed")

    monkeypatch.setattr(_mesh, "port_owner", no_sockets)


def test_up_refuses_a_port_inside_the_ephemeral_range(tmp_path: Path, linux_range: None) -> None:
    config = LauncherConfig(run_dir=tmp_path, inference_port=50051)
    with pytest.raises(LaunchError) as err:
        Mesh(config)._check_ports()
    message = str(err.value)
    assert "ephemeral port range 32768-60999" in message
    assert "SWITCHBOARD_INFERENCE_PORT=50051: inference on 50051" in message
    assert "move them below 32768" in message
    assert "SWITCHBOARD_RAG_PORT" not in message


def test_a_derived_port_inside_the_range_names_its_base_variable(
    tmp_path: Path, linux_range: None
) -> None:
    config = LauncherConfig(run_dir=tmp_path, admission_port=32_762, metrics_base_port=32_763)
    with pytest.raises(LaunchError) as err:
        Mesh(config)._check_ports()
    message = str(err.value)
    assert "SWITCHBOARD_ADMISSION_PORT=32762: admission-1 on 32772\n" in message
    assert (
        "SWITCHBOARD_METRICS_BASE_PORT=32763:"
        " admission-1 metrics on 32774, chat metrics on 32768, auth metrics on 32769,"
        " gateway metrics on 32770\n"
    ) in message
    assert "adding 32768-32770,32772,32774 to net.ipv4.ip_local_reserved_ports" in message


def test_a_reserved_port_inside_the_range_is_accepted(tmp_path: Path) -> None:
    config = LauncherConfig(run_dir=tmp_path, inference_port=50051, chat_port=50057)
    inside = ports_inside(planned_ports(config), LINUX_RANGE, reserved=frozenset({50051}))
    assert [(p.variable, p.port) for p in inside] == [("SWITCHBOARD_CHAT_PORT", 50057)]


def test_infrastructure_given_by_url_is_not_checked(tmp_path: Path) -> None:
    config = LauncherConfig(
        run_dir=tmp_path, postgres_port=40_000, database_url="postgresql://db.local/switchboard"
    )
    assert ports_inside(planned_ports(config), LINUX_RANGE, reserved=frozenset()) == []


def test_reserved_port_lists_parse_as_the_kernel_writes_them() -> None:
    assert parse_port_list("") == frozenset()
    assert parse_port_list("8080,50051-50053\n") == {8080, 50051, 50052, 50053}


def test_time_wait_is_described_without_a_pid() -> None:
    conns = [Conn(Addr("127.0.0.1", 7051), Addr("127.0.0.1", 4222), "TIME_WAIT", None)]
    assert describe_port_holder("127.0.0.1", 7051, conns, name_of=names) == (
        "a connection to 127.0.0.1:4222 in state TIME_WAIT"
        " (no process owns it; the kernel frees it within 60 s)"
    )


def test_an_outgoing_connection_names_its_process_but_not_as_a_listener() -> None:
    conns = [
        Conn(Addr("127.0.0.1", 7051), Addr("127.0.0.1", 5433), "TIME_WAIT", None),
        Conn(Addr("127.0.0.1", 7051), Addr("127.0.0.1", 4222), "ESTABLISHED", 4242),
    ]
    assert describe_port_holder("127.0.0.1", 7051, conns, name_of=names) == (
        "a connection (not a listener) of pid 4242 (python3) to 127.0.0.1:4222,"
        " state ESTABLISHED (and 1 more socket(s) on this port)"
    )


def test_a_listener_is_named_by_its_pid() -> None:
    conns = [
        Conn(Addr("127.0.0.1", 7051), Addr("127.0.0.1", 4222), "ESTABLISHED", 4242),
        Conn(Addr("0.0.0.0", 7051), (), "LISTEN", 99),
    ]
    assert describe_port_holder("127.0.0.1", 7051, conns, name_of=names) == (
        "pid 99, listening on it (and 1 more socket(s) on this port)"
    )


def test_a_listener_of_another_user_is_not_given_a_pid() -> None:
    conns = [Conn(Addr("127.0.0.1", 7051), (), "LISTEN", None)]
    description = describe_port_holder("127.0.0.1", 7051, conns, name_of=names)
    assert description.startswith("a listener whose process this user cannot see")
    assert "pid" not in description


def test_sockets_on_other_ports_or_addresses_are_not_blamed() -> None:
    conns = [
        Conn(Addr("127.0.0.1", 7052), (), "LISTEN", 4242),
        Conn(Addr("10.0.0.5", 7051), Addr("10.0.0.9", 443), "ESTABLISHED", 4242),
    ]
    description = describe_port_holder("127.0.0.1", 7051, conns, name_of=names)
    assert description == (
        "something this user cannot see (no listener or connection on it is visible)"
    )


@pytest.mark.parametrize("interval", ["always", "2m", "30s", "500ms"])
def test_nats_syncs_as_configured(tmp_path: Path, interval: str) -> None:
    config = LauncherConfig(run_dir=tmp_path, nats_sync_interval=interval)
    conf = _mesh.nats_conf(tmp_path / "nats", config.nats_sync_interval)
    assert f"sync_interval: {interval}\n" in conf
    assert f'store_dir: "{tmp_path / "nats"}"' in conf


@pytest.mark.parametrize("interval", ["", "never", "2", "0s", "1 m", "always\n"])
def test_a_bad_nats_sync_interval_is_refused_naming_its_variable(
    tmp_path: Path, interval: str
) -> None:
    with pytest.raises(ValueError, match="SWITCHBOARD_NATS_SYNC_INTERVAL"):
        LauncherConfig(run_dir=tmp_path, nats_sync_interval=interval)
