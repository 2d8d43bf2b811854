"""Warm spares (`services.control.spares`, `services.runtime.spare`): real processes,
turned into replicas with their environment and log, replaced when stale."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path

import pytest

from services.control.kinds import Command, Kind
from services.control.spares import Spares
from services.launcher._procs import stop
from tests.polling import eventually

TARGET = "tests.system.spare_target"


class _Target(Kind):
    name = "target"
    numbered = False
    scalable = True
    start_timeout = 10.0
    spare_module = TARGET

    def command(self, slot: int, extra_env: Mapping[str, str]) -> Command:
        return _command(f"target-{slot}")


class _NoSpare(Kind):
    name = "plain"
    numbered = False
    scalable = True
    start_timeout = 10.0


def _command(replica: str, module: str = TARGET) -> Command:
    return Command(["python", "-m", module], {"SPARE_TEST_REPLICA": replica})


@pytest.fixture
async def spares(tmp_path: Path):
    made = Spares({"target": _Target(), "plain": _NoSpare()}, log_dir=tmp_path)
    yield made
    await made.stop_all()


async def test_a_spare_becomes_the_replica_with_its_environment_and_log(spares, tmp_path) -> None:
    assert spares.fill({"target": 1}) == ["target"]  # none for a kind without a module
    assert spares.fill({"target": 1}) == []  # one is enough
    (spare,) = _spare_records(spares)
    # started with its kind's environment (its first slot's), as /proc shows it once the
    # forked process has exec'd (until then it shows the parent's)
    await eventually(
        lambda: spare.process().environ().get("SPARE_TEST_REPLICA") == "target-0",
        timeout=30,
        what="the spare running with its kind's environment",
    )
    log = tmp_path / "target-1.log"
    record = spares.take("target", 1, name="target-1", command=_command("target-1"), log=log)
    assert record is not None and record.name == "target-1" and record.log == str(log)
    try:
        await eventually(
            lambda: log.exists() and "became target-1 as spare_target.py" in log.read_text(),
            timeout=30,
            what="the spare ran the module as the replica",
        )
        assert record.process() is not None
        # used once: the next one is a new process
        assert spares.take("target", 1, name="t", command=_command("t"), log=log) is None
        assert spares.fill({"target": 1}) == ["target"]
    finally:
        await asyncio.to_thread(stop, record, timeout=5)


async def test_a_spare_of_an_older_generation_is_never_used(spares, tmp_path) -> None:
    spares.fill({"target": 1})
    (old,) = _spare_records(spares)
    # a rollout to generation 2: the spare imported the old code
    assert spares.take("target", 2, name="x", command=_command("x"), log=tmp_path / "x") is None
    await eventually(lambda: old.process() is None, timeout=10, what="the stale spare stopped")
    spares.fill({"target": 2})
    (new,) = _spare_records(spares)
    assert new.pid != old.pid
    spares.fill({"target": 3})  # fill replaces a stale one by itself too
    await eventually(lambda: new.process() is None, timeout=10, what="replaced spare stopped")


async def test_a_spare_is_not_taken_for_another_module(spares, tmp_path) -> None:
    spares.fill({"target": 1})
    other = _command("y", module="tests.system.other")
    assert spares.take("target", 1, name="y", command=other, log=tmp_path / "y") is None


async def test_stopping_the_spares_ends_their_processes(spares) -> None:
    spares.fill({"target": 1})
    (record,) = _spare_records(spares)
    await spares.stop_all()
    assert record.process() is None


def _spare_records(spares: Spares):
    return [spare.record for spare in spares._spares.values()]
