"""The control plane's pure parts: restart backoff and the crash-loop limit, replica
names and slots, the launcher's config handed over as variables, the replica records
`down` reads, and control events' fan-out."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from datetime import timedelta
from pathlib import Path

import pytest

from services.control.events import EventBus
from services.control.restarts import RestartPolicy
from services.control.supervisor import Replica, State, _replica_from_json
from services.launcher._config import LauncherConfig, config_env, load_launcher_config
from services.launcher._procs import ProcessRecord, recorded_replicas
from services.launcher._services import MAX_SLOTS, SERVICES, spec_of


def test_the_first_exit_restarts_at_once_then_the_wait_doubles() -> None:
    policy = RestartPolicy(base_delay=0.5, max_delay=3, window=60, limit=6)
    assert policy.delay([100.0], 100.0) == 0.0
    assert policy.delay([100.0, 101.0], 101.0) == 0.5
    assert policy.delay([100.0, 101.0, 102.0], 102.0) == 1.0
    assert policy.delay([100.0, 101.0, 102.0, 103.0], 103.0) == 2.0
    assert policy.delay([100.0, 101.0, 102.0, 103.0, 104.0], 104.0) == 3.0  # capped


def test_limit_exits_within_the_window_is_a_crash_loop() -> None:
    policy = RestartPolicy(window=60, limit=3)
    assert policy.delay([10.0, 20.0, 30.0], 30.0) is None
    # exits older than the window are forgotten: a replica that crashes once an hour
    # is restarted at once every time
    assert policy.delay([10.0, 20.0, 100.0], 100.0) == 0.0
    assert policy.recent([10.0, 20.0, 100.0], 100.0) == [100.0]


def test_a_bad_policy_is_refused() -> None:
    with pytest.raises(ValueError):
        RestartPolicy(limit=0)


def test_replica_names_map_to_their_slots_and_back(tmp_path: Path) -> None:
    config = LauncherConfig(run_dir=tmp_path)
    for spec in SERVICES:
        for slot in range(MAX_SLOTS):
            name = spec.process_name(config, slot)
            assert spec_of(name) == (spec, slot)
    assert [spec_of(n) for n in ("inference-0", "admission", "rag-5", "nope", "triton-0")] == [
        None
    ] * 5
    assert spec_of("inference")[0].name == "inference"  # type: ignore[index]
    assert spec_of("admission-0")[1] == 0  # type: ignore[index]


def test_the_config_survives_the_trip_through_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = dataclasses.replace(
        LauncherConfig(run_dir=tmp_path / "run"),
        rag_replicas=3,
        auth_cache_ttl=timedelta(seconds=2.5),
        prometheus=True,
        web_origins="https://a.example",
    )
    for name, value in config_env(config).items():
        monkeypatch.setenv(name, value)
    assert load_launcher_config() == config


def test_out_of_range_replica_counts_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="SWITCHBOARD_AUTH_REPLICAS must be 1..4"):
        LauncherConfig(run_dir=tmp_path, auth_replicas=5)
    with pytest.raises(ValueError, match="SWITCHBOARD_CHAT_REPLICAS must be 1..4"):
        LauncherConfig(run_dir=tmp_path, chat_replicas=5)
    with pytest.raises(ValueError, match="SWITCHBOARD_RAG_REPLICAS must be 1..2"):
        LauncherConfig(run_dir=tmp_path, max_replicas=2, rag_replicas=3)
    with pytest.raises(ValueError, match="SWITCHBOARD_MAX_REPLICAS"):
        LauncherConfig(run_dir=tmp_path, max_replicas=5)


def test_replica_records_round_trip_and_down_finds_their_processes(tmp_path: Path) -> None:
    record = ProcessRecord("rag-1", 4242, 1.5, ("python", "-m", "services.rag"), "/x/rag-1.log")
    replica = Replica("rag", 1, "rag-1", 3, State.SERVING, record, restarts=2, env={"A": "b"})
    again = _replica_from_json(json.loads(json.dumps(replica.to_json())))
    assert again == dataclasses.replace(replica, exits=[], started_at=0.0)
    stopped = Replica("rag", 2, "rag-2", 3, State.STOPPED)
    path = tmp_path / "replicas.json"
    path.write_text(json.dumps({"replicas": [replica.to_json(), stopped.to_json()]}))
    assert recorded_replicas(path) == [record]
    assert recorded_replicas(tmp_path / "missing.json") == []
    assert _replica_from_json({"kind": "rag"}) is None


async def test_every_watcher_gets_the_events_and_a_slow_one_loses_the_oldest() -> None:
    bus = EventBus(queue_size=2)
    fast, slow = bus.watch(), bus.watch()
    first = asyncio.ensure_future(anext(fast))
    first_slow = asyncio.ensure_future(anext(slow))
    await asyncio.sleep(0)  # both generators are now subscribed
    bus.emit("started", "rag started", replica="rag", service="rag")
    assert (await first).kind == (await first_slow).kind == "started"
    for kind in ("exited", "started", "serving"):
        bus.emit(kind, kind)
    assert [(await anext(slow)).kind for _ in range(2)] == ["started", "serving"]
    assert (await anext(fast)).kind == "started"  # kept the last two: started, serving
    await fast.aclose()
    await slow.aclose()
