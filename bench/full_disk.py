"""Full disks: NATS's JetStream store, then PostgreSQL's data directory, filled to the last
byte under load on a mesh of its own (each on a small tmpfs), then freed; how callers
fared, how fast the service came back by itself, and what was lost.

The scenarios are `tests/diskfill.py`'s, which `tests/integration/test_full_disk.py`
asserts on. Needs root (it mounts tmpfs filesystems). Writes
bench/results/full-disk.json and the recovery and loss figures into faults.json.
"""

from __future__ import annotations

import asyncio
import logging

from bench._common import merge_metrics, print_table, write_result
from tests import diskfill

logger = logging.getLogger(__name__)


def run() -> dict:
    with diskfill.full_disk_mesh() as mesh:
        nats = asyncio.run(diskfill.nats_store_full(mesh))
        print(nats.report(), flush=True)
        postgres = asyncio.run(diskfill.postgres_data_full(mesh))
        print(postgres.report(), flush=True)
    for outcome in (nats, postgres):
        during = outcome.calls.between(outcome.full_at, outcome.freed_at)
        print_table(
            f"answers while the {outcome.name.removesuffix(' full')} was full",
            ("kind status reason", "calls"),
            sorted(outcome.calls.summary(during).items()),
        )
    # NATS's losses are counted only once its tasks run again (not known without recovery)
    lost = len(nats.lost) + len(postgres.lost) + len(nats.duplicated) + len(postgres.duplicated)
    faults = {
        "disk_full_nats_recovery_s": nats.recovery_s,
        "disk_full_pg_recovery_s": postgres.recovery_s,
        "disk_full_lost": lost,
    }
    metrics = {
        **faults,
        "disk_full_unclear_answers": len(nats.calls.unclear()) + len(postgres.calls.unclear()),
        "disk_full_late_answers": len(nats.calls.late()) + len(postgres.calls.late()),
        "disk_full_nats_acknowledged": nats.acknowledged,
        "disk_full_pg_acknowledged": postgres.acknowledged,
        "disk_full_pg_restarted": int(postgres.postgres_restarted),
        "disk_full_nats_restarted": int(nats.nats_restarted),
        "disk_full_reruns": nats.reruns + postgres.reruns,
    }
    targets = {
        "disk_full_lost": "<= 0",
        "disk_full_unclear_answers": "<= 0",
        "disk_full_late_answers": "<= 0",
    }
    notes = (
        f"NATS store {diskfill.NATS_MIB} MiB and PostgreSQL data {diskfill.POSTGRES_MIB} MiB"
        f" tmpfs, each full for {diskfill.FULL_S:g} s under load (deadline"
        f" {diskfill.DEADLINE_S:g} s); recovery from freeing the space to a new task completing"
        " (NATS) / every kind of call succeeding (PostgreSQL); None = not within"
        f" {diskfill.RECOVERY_TIMEOUT_S:g} s. lost = acknowledged tasks not completed, documents"
        " or sessions not found, keys with two tasks.\n"
        f"{nats.report()}\n{postgres.report()}"
    )
    result = write_result("full-disk", metrics, targets, notes)
    merge_metrics("faults", faults, source="full-disk")
    return result
