"""The launcher's process handling on real processes: PIDs, groups, ports, stale state."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import urllib.request
from dataclasses import replace

import psutil
import pytest

from services.launcher import LaunchError, Mesh, StateFile, isolated_config, port_owner, spawn, stop
from tests.polling import eventually


async def test_stop_ends_the_process_and_its_children(tmp_path):
    script = "import subprocess, time; subprocess.Popen(['sleep', '60']); time.sleep(60)"
    record = spawn("sleeper", [sys.executable, "-c", script], log=tmp_path / "s.log")
    await eventually(
        lambda: psutil.Process(record.pid).children(), timeout=10, what="the child started"
    )
    (child,) = psutil.Process(record.pid).children()
    assert await asyncio.to_thread(stop, record, timeout=5)
    assert record.process() is None
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    assert not stop(record), "stopping twice is a no-op"


def test_a_recycled_pid_is_not_ours(tmp_path):
    record = spawn("short", [sys.executable, "-c", "pass"], log=tmp_path / "x.log")
    stop(record)
    impostor = replace(record, created=record.created - 1000)
    assert impostor.process() is None


def test_port_owner_names_the_listener():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        owner = port_owner("127.0.0.1", port)
        assert owner is not None and str(psutil.Process().pid) in owner
    assert port_owner("127.0.0.1", port) is None


def test_up_says_exactly_which_port_is_taken(tmp_path):
    config = isolated_config(tmp_path)
    with socket.socket() as sock:
        sock.bind((config.host, config.envoy_port))
        sock.listen()
        with pytest.raises(LaunchError) as err:
            Mesh(config, progress=lambda _: None).up()
    message = str(err.value)
    assert f"port {config.envoy_port} (envoy)" in message
    assert f"pid {psutil.Process().pid}" in message
    assert not StateFile(tmp_path).load(), "nothing was started"


def test_up_after_a_crash_clears_stale_state(tmp_path):
    config = isolated_config(tmp_path)
    dead = spawn("envoy", [sys.executable, "-c", "pass"], log=tmp_path / "d.log")
    stop(dead)
    StateFile(tmp_path).save([dead])
    mesh = Mesh(config, progress=lambda _: None)
    assert mesh._recover() is False
    assert StateFile(tmp_path).load() == []


def test_cli_status_and_logs_of_the_running_mesh(mesh):
    env = {"SWITCHBOARD_RUN_DIR": str(mesh.config.run_dir), "PATH": "/usr/bin:/bin"}
    status = subprocess.run(
        [sys.executable, "-m", "services.launcher.cli", "status"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert status.returncode == 0, status.stdout + status.stderr
    for name in ("postgres", "nats", "triton-0", "triton-1", "inference", "auth", "envoy"):
        assert name in status.stdout
    logs = subprocess.run(
        [sys.executable, "-m", "services.launcher.cli", "logs", "inference", "-n", "5"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert logs.returncode == 0 and "inference.log" in logs.stdout


def test_up_on_a_running_mesh_is_a_no_op(mesh):
    before = [r.pid for r in mesh.records()]
    Mesh(mesh.config, progress=lambda _: None).up()
    assert [r.pid for r in mesh.records()] == before


def test_services_call_each_other_through_the_internal_listener(mesh):
    assert mesh.internal_address.startswith("127.0.0.1:")
    assert mesh.internal_address != mesh.envoy_address
    services = [
        r for r in mesh.records() if r.argv[1:2] == ("-m",) and r.argv[2] != "services.control"
    ]
    assert {r.name for r in services} >= {"inference", "rag", "execution", "worker-0", "auth"}
    for record in services:
        environ = psutil.Process(record.pid).environ()
        targets = {k: v for k, v in environ.items() if k.endswith("_TARGET")}
        assert len(targets) >= 4, record.name
        assert set(targets.values()) == {mesh.internal_address}, (record.name, targets)


def test_jetstream_syncs_each_message_before_acknowledging_it(mesh):
    """The default `SWITCHBOARD_NATS_SYNC_INTERVAL=always`, as NATS itself reports it."""
    url = f"http://{mesh.config.host}:{mesh.config.nats_monitor_port}/varz"
    with urllib.request.urlopen(url, timeout=5) as reply:  # noqa: S310 - loopback only
        jetstream = json.load(reply)["jetstream"]["config"]
    assert mesh.config.nats_sync_interval == "always"
    assert jetstream["sync_always"] is True
    assert jetstream["store_dir"] == str(mesh.config.run_dir / "nats" / "jetstream")
