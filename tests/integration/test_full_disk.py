"""Full disks: NATS's JetStream store and PostgreSQL's data directory on small tmpfs
filesystems of a mesh of its own, each filled to the last byte by a ballast file under
load, then freed.

While a disk is full, callers hear clear errors (UNAVAILABLE or RESOURCE_EXHAUSTED with
an ErrorInfo reason; never INTERNAL or UNKNOWN, never past their deadline) or are
answered OK. Once the ballast is deleted, the service is back by itself, and nothing that
was acknowledged is lost or duplicated. The scenarios are `tests/diskfill.py`'s (also
`bench/full_disk.py`, `make bench-full-disk`).
"""

from __future__ import annotations

import pytest

from tests import diskfill

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def full_disk_mesh():
    # its own run directory outside pytest's: a pytest session starting meanwhile sets
    # /tmp/pytest-of-<user> back to 0700, and PostgreSQL (another user) loses its data
    try:
        with diskfill.full_disk_mesh() as mesh:
            yield mesh
    except diskfill.DiskUnavailable as exc:
        pytest.skip(f"small filesystems cannot be mounted here: {exc}")


@pytest.fixture(scope="session")
def credentials():
    """This module's mesh is its own: the session mesh (and its keys) is not needed."""
    return None


def check_clear(outcome: diskfill.Outcome) -> None:
    print(outcome.report())
    unclear = [(c.kind, c.code.name, c.reason, c.message) for c in outcome.calls.unclear()]
    assert not unclear, f"{outcome.name}: answers that are not clear errors: {unclear}"
    late = [(c.kind, c.code.name, round(c.took, 2)) for c in outcome.calls.late()]
    assert not late, f"{outcome.name}: answers past their deadline: {late}"


@pytest.fixture(scope="module")
async def nats_full(full_disk_mesh) -> diskfill.Outcome:
    """The NATS scenario, run once for the tests that read it."""
    return await diskfill.nats_store_full(full_disk_mesh, recovery_timeout=60)


async def test_a_full_nats_store_fails_clearly(nats_full):
    check_clear(nats_full)
    assert nats_full.acknowledged > 0


async def test_a_full_nats_store_heals_and_loses_nothing(nats_full):
    """NATS keeps a stream's write error until it restarts: the control plane restarts
    it once its health check has failed for a while and the store has room again."""
    assert nats_full.recovery_s is not None, nats_full.notes
    assert not nats_full.lost, nats_full.lost
    assert not nats_full.duplicated, nats_full.duplicated
    assert nats_full.nats_restarted


async def test_a_full_postgres_data_directory_fails_clearly_keeps_data_and_heals(full_disk_mesh):
    outcome = await diskfill.postgres_data_full(full_disk_mesh)
    check_clear(outcome)
    assert outcome.recovery_s is not None, outcome.notes
    assert not outcome.lost, outcome.lost
    assert not outcome.duplicated, outcome.duplicated
