"""The admission replicas alive now, as each replica reports itself in PostgreSQL.

Every replica process has a row in `admission_replicas` under an instance name of its
own (its replica id and a random suffix, so a replacement started while the replica it
replaces drains counts as one more), stamped with the database's clock each poll. The
live replicas are the rows stamped within `stale_after`; a replica that stops deletes
its row, one that dies stops stamping it and drops out after `stale_after`.

The count includes draining replicas: they still grant on the streams open to them, so
they still hold a share of each tier's ceiling. Nothing is asked of the launcher or the
control plane; a replica that cannot reach the database keeps the last view it had.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from datetime import timedelta

import psycopg

from services.admission.store import MIGRATION_LOCK, MIGRATIONS
from services.runtime import Database, stop_task

logger = logging.getLogger(__name__)

_FORGET_AFTER = timedelta(hours=1)
"""Rows of replicas that died are deleted once this old (by whichever replica polls)."""


class Membership:
    """This replica's row in `admission_replicas`, and the live replicas it reads.

    Args:
        replica_id: this replica's name (`admission-0`); the instance adds a suffix.
        observe: called with the live instances after every successful poll.
        interval: how often the row is stamped and the others read.
        stale_after: a row not stamped for this long is a replica that died.
    """

    def __init__(
        self,
        *,
        database_url: str,
        replica_id: str,
        observe: Callable[[frozenset[str]], object],
        interval: timedelta = timedelta(seconds=1),
        stale_after: timedelta = timedelta(seconds=5),
    ) -> None:
        if stale_after <= interval:
            raise ValueError("stale_after must be longer than the poll interval")
        self.instance = f"{replica_id}/{secrets.token_hex(4)}"
        self._db = Database(database_url, max_size=1)
        self._observe = observe
        self._interval = interval.total_seconds()
        self._stale_after = stale_after
        self._registered_at: float | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def settled(self) -> bool:
        """Registered at least one poll interval ago: every live peer polling has seen
        this replica, so their ceilings are split with it counted before it serves."""
        registered = self._registered_at
        return registered is not None and time.monotonic() - registered >= self._interval

    async def start(self) -> None:
        """Registers this replica and reads the others; then keeps doing so each interval."""
        await self._db.open(prefix="admission", lock=MIGRATION_LOCK, migrations=MIGRATIONS)
        await self.poll()
        self._registered_at = time.monotonic()
        self._task = asyncio.create_task(self._run(), name="admission-membership")

    async def close(self) -> None:
        """Stops polling and deletes this replica's row (peers count it out at once)."""
        await stop_task(self._task)
        self._task = None
        try:
            async with self._db.connection() as conn:
                await conn.execute(
                    "DELETE FROM admission_replicas WHERE instance = %s", (self.instance,)
                )
        except (psycopg.Error, OSError) as exc:  # it goes stale instead
            logger.warning("cannot deregister admission replica: %s", exc)
        await self._db.close()

    async def poll(self) -> frozenset[str]:
        """Stamps this replica's row, reads the live ones and hands them to `observe`."""
        async with self._db.connection() as conn:
            await conn.execute(
                "INSERT INTO admission_replicas (instance) VALUES (%s) "
                "ON CONFLICT (instance) DO UPDATE SET seen_at = now()",
                (self.instance,),
            )
            await conn.execute(
                "DELETE FROM admission_replicas WHERE seen_at < now() - %s", (_FORGET_AFTER,)
            )
            cur = await conn.execute(
                "SELECT instance FROM admission_replicas WHERE seen_at >= now() - %s",
                (self._stale_after,),
            )
            live = frozenset(row[0] for row in await cur.fetchall())
        self._observe(live | {self.instance})
        return live

    async def _run(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.poll()
                failing = False
            except (psycopg.Error, OSError) as exc:  # keep the last view meanwhile
                if not failing:
                    logger.warning("cannot poll admission replicas: %s", exc)
                failing = True
            except Exception:  # a bug; keep polling rather than freeze the view
                logger.exception("admission membership poll failed")
