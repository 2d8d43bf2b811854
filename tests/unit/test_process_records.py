"""A process record knows its process by PID and start time, whatever the wall clock does.

Reads this test process's own entry in /proc: nothing is started.
"""

from __future__ import annotations

import os
from dataclasses import replace

import psutil

from services.launcher._procs import ProcessRecord, started_since_boot


def _mine(created: float) -> ProcessRecord:
    return ProcessRecord("me", os.getpid(), created, ("python",), "/dev/null")


def test_a_record_knows_its_process_by_its_start_since_boot():
    record = _mine(started_since_boot(os.getpid()))
    assert record.process() is not None
    assert replace(record, created=record.created - 5).process() is None  # PID reused
    wall = psutil.Process().create_time()
    assert abs(record.started_at() - wall) < 1.0


def test_a_record_written_with_a_wall_clock_time_is_still_known():
    record = _mine(psutil.Process().create_time())
    assert record.process() is not None
    assert record.started_at() == record.created
    assert replace(record, created=record.created + 5).process() is None


def test_a_record_tells_a_reused_pid_from_its_own_process_and_from_a_free_one():
    record = _mine(started_since_boot(os.getpid()))
    assert not record.pid_reused()  # its own process
    assert replace(record, created=record.created - 5).pid_reused()  # another started since
    free = max(psutil.pids()) + 100_000  # a PID no process has
    assert not replace(record, pid=free).pid_reused()
