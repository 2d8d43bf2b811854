"""The control plane's watch over the mesh's own NATS server: when it restarts it (on a
fake clock, with the health check and the process swap replaced), and the launcher's
state file that it shares with the launcher."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.control.dependencies import NatsWatch, Observation, Verdict, WatchPolicy, judge
from services.control.events import EventBus
from services.control.restarts import RestartPolicy
from services.launcher._procs import ProcessRecord, StateFile

POLICY = WatchPolicy(grace=5.0, min_free_bytes=100)
ROOMY = 10_000


def seen(*, alive: bool = True, healthy: bool = True, free: int = ROOMY) -> Observation:
    return Observation(alive=alive, healthy=healthy, free_bytes=free)


def test_a_healthy_server_is_left_alone() -> None:
    assert judge(seen(), None, 100.0, POLICY) is Verdict.HEALTHY


def test_a_server_that_exited_is_restarted_at_once() -> None:
    assert judge(seen(alive=False, healthy=False), None, 100.0, POLICY) is Verdict.RESTART_EXITED


def test_an_unhealthy_server_gets_its_grace_then_is_restarted() -> None:
    unhealthy = seen(healthy=False)
    assert judge(unhealthy, 100.0, 100.0, POLICY) is Verdict.WAIT
    assert judge(unhealthy, 100.0, 104.9, POLICY) is Verdict.WAIT
    assert judge(unhealthy, 100.0, 105.0, POLICY) is Verdict.RESTART_UNHEALTHY


def test_an_unhealthy_server_on_a_full_disk_waits_for_the_space() -> None:
    full = seen(healthy=False, free=99)
    assert judge(full, 100.0, 200.0, POLICY) is Verdict.WAIT
    assert judge(seen(healthy=False, free=100), 100.0, 200.0, POLICY) is Verdict.RESTART_UNHEALTHY


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ScriptedWatch(NatsWatch):
    """A watch whose health checks are scripted and whose restarts swap records only."""

    def __init__(self, state: StateFile, clock: Clock, **kwargs: object) -> None:
        super().__init__(
            state=state,
            monitor_url="http://unused",
            store_dir=Path("/unused"),
            events=EventBus(),
            policy=POLICY,
            clock=clock,
            **kwargs,  # type: ignore[arg-type]
        )
        self.next: Observation = seen()
        self.swapped: list[ProcessRecord] = []

    def _observe(self, record: ProcessRecord) -> Observation:
        return self.next

    def _replace(self, record: ProcessRecord) -> ProcessRecord | None:
        fresh = ProcessRecord("nats", record.pid + 1, 0.0, record.argv, record.log)
        self.state.update(lambda rs: [fresh if r == record else r for r in rs])
        self.swapped.append(record)
        return fresh


def nats_record(pid: int = 10) -> ProcessRecord:
    return ProcessRecord("nats", pid, 0.0, ("nats-server",), "/tmp/nats.log")


@pytest.fixture
def state(tmp_path: Path) -> StateFile:
    return StateFile(tmp_path)


async def test_nothing_is_watched_while_no_nats_is_recorded(state: StateFile) -> None:
    watch = ScriptedWatch(state, Clock())
    watch.next = seen(alive=False, healthy=False)
    assert await watch.tick() is None
    assert watch.swapped == []


async def test_a_stream_write_error_restarts_the_server_once_its_grace_is_over(
    state: StateFile,
) -> None:
    state.save([ProcessRecord("postgres", 5, 0.0, ("postgres",), "/tmp/pg.log"), nats_record()])
    clock = Clock()
    watch = ScriptedWatch(state, clock)
    watch.next = seen(healthy=False)
    assert await watch.tick() is Verdict.WAIT
    clock.now += 4.0
    assert await watch.tick() is Verdict.WAIT
    clock.now += 1.0
    assert await watch.tick() is Verdict.RESTART_UNHEALTHY
    assert [r.pid for r in watch.swapped] == [10]
    assert [r.name for r in state.load()] == ["postgres", "nats"]
    assert next(r.pid for r in state.load() if r.name == "nats") == 11
    # the restarted server's own start-up gets a fresh grace
    clock.now += 1.0
    assert await watch.tick() is Verdict.WAIT
    watch.next = seen()
    assert await watch.tick() is Verdict.HEALTHY
    assert len(watch.swapped) == 1


async def test_a_server_that_keeps_exiting_is_given_up_and_reported(state: StateFile) -> None:
    state.save([nats_record()])
    clock = Clock()
    watch = ScriptedWatch(state, clock, restarts=RestartPolicy(base_delay=0.0, limit=3))
    kinds: list[str] = []
    watch.events.emit = lambda kind, message, **_: kinds.append(kind)  # type: ignore[method-assign]
    watch.next = seen(alive=False, healthy=False)
    for _ in range(4):
        await watch.tick()
        clock.now += 1.0
    assert len(watch.swapped) == 2
    assert kinds == ["dependency_restarted", "dependency_restarted", "dependency_failed"]


def test_state_updates_keep_what_others_wrote(state: StateFile) -> None:
    state.save([nats_record(10)])
    # the launcher adds a process while the control plane swapped NATS: both kept
    state.update(lambda rs: [nats_record(11) if r.pid == 10 else r for r in rs])
    records = state.update(lambda rs: [*rs, ProcessRecord("envoy", 7, 0.0, ("envoy",), "x")])
    assert [(r.name, r.pid) for r in records] == [("nats", 11), ("envoy", 7)]
    assert state.load() == records
