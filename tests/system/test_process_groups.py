"""Stopping a process the launcher started (`services.launcher._procs`): real processes,
in their own session, with a child that outlives its parent."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import replace

import psutil
import pytest

from services.launcher import _procs
from services.launcher._procs import ProcessRecord, exited, spawn, stop
from tests.polling import eventually

# a parent that starts a long-lived child in its own group, says the child's PID, waits
_PARENT = (
    "import subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
    "print(child.pid, flush=True)\n"
    "time.sleep(600)\n"
)


def _gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
async def family(tmp_path) -> AsyncIterator[tuple[ProcessRecord, psutil.Process]]:
    """A parent in its own session and its child; both killed (by PID) after the test."""
    log = tmp_path / "parent.log"
    record = spawn("parent", [sys.executable, "-c", _PARENT], log=log)
    child: psutil.Process | None = None
    try:
        await eventually(lambda: log.read_text().strip(), what="the child's PID")
        child = psutil.Process(int(log.read_text().split()[0]))
        assert os.getpgid(child.pid) == record.pid  # the parent's session's group
        yield record, child
    finally:
        stop(record, timeout=5.0)
        if child is not None and not _gone(child):
            child.kill()


async def test_stopping_a_live_process_ends_its_group(family) -> None:
    record, child = family
    assert stop(record, timeout=5.0) is True
    assert _gone(child)


async def test_stopping_a_process_killed_before_ends_what_it_left_in_its_group(family) -> None:
    record, child = family
    os.kill(record.pid, signal.SIGKILL)  # a crash: the child lives on, orphaned
    await eventually(lambda: record.process() is None, what="the parent dead")
    assert not _gone(child)
    assert stop(record, timeout=5.0) is False  # it was not running
    await eventually(lambda: _gone(child), what="the orphaned child killed")


def test_a_stale_record_leaves_the_new_owner_of_its_pid_alone(tmp_path) -> None:
    # a record of a process gone long ago, whose PID is now another session leader's
    log = tmp_path / "other.log"
    other = spawn("other", [sys.executable, "-c", "import time; time.sleep(600)"], log=log)
    try:
        stale = replace(other, created=other.created - 3600)  # started an hour before
        assert stale.pid_reused()
        assert stop(stale, timeout=5.0) is False
        assert other.process() is not None  # untouched
    finally:
        stop(other, timeout=5.0)


async def test_exited_says_when_a_process_ends_and_lets_go_of_what_it_watched_it_with(
    family,
) -> None:
    record, _ = family
    assert not exited(record)
    assert not exited(record)  # a second look: the pidfd the first one opened
    os.kill(record.pid, signal.SIGKILL)
    await eventually(lambda: exited(record), what="the parent seen to exit")
    assert record.process() is None  # what /proc says too
    assert (record.pid, record.created) not in _procs._exit_fds  # its pidfd closed


def test_exited_counts_a_reused_pid_as_an_exit_and_stop_closes_the_pidfd(tmp_path) -> None:
    other = spawn(
        "other", [sys.executable, "-c", "import time; time.sleep(600)"], log=tmp_path / "o.log"
    )
    try:
        assert exited(replace(other, created=other.created - 3600))  # not the recorded one
        assert not exited(other)
        assert (other.pid, other.created) in _procs._exit_fds
        assert stop(other, timeout=5.0) is True
        assert (other.pid, other.created) not in _procs._exit_fds
        assert exited(other)
    finally:
        stop(other, timeout=5.0)
