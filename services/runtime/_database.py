"""What every PostgreSQL-backed service shares: a connection pool with readiness,
versioned migrations, and the error a caller gets while the database is down.

Waiting for a pooled connection never outlasts the call it serves: the wait ends a
moment before the inbound deadline, so the caller hears UNAVAILABLE with RetryInfo (its
store's `dependency_unavailable`) rather than DEADLINE_EXCEEDED. Once the database has
been seen down (a connection failed, or no connection came in time), every wait is
short (`DOWN_WAIT_S`) until a connection is had again: while PostgreSQL restarts or
stalls, calls fail fast instead of queueing for the pool.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import timedelta
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from services.runtime._context import time_remaining
from services.runtime._errors import Unavailable

logger = logging.getLogger(__name__)

POOL_WAIT_S = 10.0
"""The longest wait for a pooled connection (a call without a deadline)."""
DOWN_WAIT_S = 0.5
"""The longest wait while the database is seen down."""
ANSWER_RESERVE_S = 0.05
"""Time kept before the inbound deadline to answer UNAVAILABLE."""


def pool_wait(requested: float | None, remaining: float | None, *, down: bool) -> float:
    """How long to wait for a pooled connection: what the caller asked (or
    `POOL_WAIT_S`), at most `DOWN_WAIT_S` while the database is seen down, and ending
    `ANSWER_RESERVE_S` before the inbound deadline (`remaining` seconds away)."""
    wait = POOL_WAIT_S if requested is None else requested
    if down:
        wait = min(wait, DOWN_WAIT_S)
    if remaining is not None:
        wait = min(wait, remaining - ANSWER_RESERVE_S)
    return max(wait, 0.001)


def dependency_unavailable(dependency: str, what: str, exc: BaseException) -> Unavailable:
    """UNAVAILABLE `DEPENDENCY_UNAVAILABLE` with a one-second RetryInfo, logged once here."""
    logger.warning("%s unavailable: %s", what, exc)
    return Unavailable(
        f"the {what} is unavailable; retry shortly",
        reason="DEPENDENCY_UNAVAILABLE",
        metadata={"dependency": dependency},
        retry_after=timedelta(seconds=1),
    )


async def apply_migrations(
    conn: psycopg.AsyncConnection,
    *,
    prefix: str,
    lock: int,
    migrations: Mapping[int, str],
) -> list[int]:
    """Applies, in one transaction under an advisory lock (so replicas starting together
    migrate once), the migrations `<prefix>_schema_migrations` does not list yet; returns
    the versions applied now. `conn` must be in autocommit mode."""
    table = sql.Identifier(f"{prefix}_schema_migrations")
    applied_now: list[int] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock,))
        await conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (version integer PRIMARY KEY,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            ).format(table)
        )
        cur = await conn.execute(sql.SQL("SELECT version FROM {}").format(table))
        applied = {row[0] for row in await cur.fetchall()}
        for version in sorted(set(migrations) - applied):
            await conn.execute(migrations[version].encode())
            await conn.execute(
                sql.SQL("INSERT INTO {} (version) VALUES (%s)").format(table), (version,)
            )
            applied_now.append(version)
            logger.info("schema migrated", extra={"schema": prefix, "version": version})
    return applied_now


class Database:
    """A service's connection pool: opened (and its schema migrated) at start, probed
    for readiness, closed at shutdown. Every PostgreSQL-backed store is built on one."""

    def __init__(
        self,
        url: str,
        *,
        max_size: int = 8,
        autocommit: bool = True,
        configure: Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]] | None = None,
    ) -> None:
        self.pool = AsyncConnectionPool(
            url,
            min_size=min(2, max_size),
            max_size=max_size,
            open=False,
            kwargs={"autocommit": True} if autocommit else {},
            configure=configure,
            timeout=POOL_WAIT_S,
        )
        self._down = False

    async def open(
        self, *, prefix: str = "", lock: int = 0, migrations: Mapping[int, str] | None = None
    ) -> None:
        """Opens the pool, then applies `migrations` (if any) as `apply_migrations` does."""
        await self.pool.open(wait=True, timeout=30)
        if migrations:
            async with self.pool.connection() as conn:
                await apply_migrations(conn, prefix=prefix, lock=lock, migrations=migrations)

    @contextlib.asynccontextmanager
    async def connection(
        self, timeout: float | None = None
    ) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A pooled connection, waited for as `pool_wait` says.

        Raises:
            psycopg_pool.PoolTimeout: none came in time (a psycopg.OperationalError,
                which the stores answer as UNAVAILABLE).
        """
        wait = pool_wait(timeout, time_remaining(), down=self._down)
        try:
            async with self.pool.connection(timeout=wait) as conn:
                self._down = False
                yield conn
        except psycopg.errors.QueryCanceled:
            raise  # a statement cancelled or timed out: the database is up
        except psycopg.OperationalError:
            self._down = True
            raise

    @property
    def down(self) -> bool:
        """The last attempt to use the database failed (a connection, or the wait)."""
        return self._down

    async def healthy(self) -> bool:
        try:
            async with self.connection(timeout=2) as conn:
                await conn.execute("SELECT 1")
        except (psycopg.Error, OSError):
            return False
        return True

    async def close(self) -> None:
        await self.pool.close()
