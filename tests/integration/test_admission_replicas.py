"""Admission replicas counting each other through PostgreSQL (`services.admission.membership`):
the live set each one splits the tier ceilings over, and whose changes begin epochs."""

from __future__ import annotations

import asyncio

import psycopg

from tests.polling import eventually

STALE_AFTER = "5 seconds"
"""`admission_membership_stale_after`'s default."""


async def live_instances(database_url: str, *, stale_too: bool = False) -> set[str]:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT instance FROM admission_replicas WHERE %s OR seen_at >= now() - %s::interval",
            (stale_too, STALE_AFTER),
        )
        return {row[0] for row in await cur.fetchall()}


def replicas_of(instances: set[str]) -> list[str]:
    return sorted(instance.partition("/")[0] for instance in instances)


async def test_every_admission_replica_keeps_its_row_alive(mesh):
    expected = [f"admission-{i}" for i in range(mesh.config.admission_replicas)]
    first = await live_instances(mesh.database_url)
    assert replicas_of(first) == expected
    await asyncio.sleep(1.5)  # a poll later: stamped again, the same instances
    assert await live_instances(mesh.database_url) == first


async def test_a_restarted_replica_counts_once_under_a_new_instance(mesh):
    before = await live_instances(mesh.database_url)
    (old,) = [i for i in before if i.startswith("admission-1/")]
    await asyncio.to_thread(mesh.start_service, "admission-1")  # stops it first
    # the new one registered before it served; the stopped one deleted its row (a
    # killed one's would go stale instead, and stay until an hour old)
    after = await live_instances(mesh.database_url)
    (new,) = [i for i in after if i.startswith("admission-1/") and i != old]
    assert before - {old} == after - {new, old}

    async def deregistered() -> bool:
        return old not in await live_instances(mesh.database_url, stale_too=True)

    await eventually(deregistered, timeout=3.0)
