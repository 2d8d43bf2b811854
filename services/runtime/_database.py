"""What every PostgreSQL-backed service shares: a connection pool with readiness,
versioned migrations, and the error a caller gets while the database is down."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from datetime import timedelta
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from services.runtime._errors import Unavailable

logger = logging.getLogger(__name__)


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
            timeout=10,
        )

    async def open(
        self, *, prefix: str = "", lock: int = 0, migrations: Mapping[int, str] | None = None
    ) -> None:
        """Opens the pool, then applies `migrations` (if any) as `apply_migrations` does."""
        await self.pool.open(wait=True, timeout=30)
        if migrations:
            async with self.pool.connection() as conn:
                await apply_migrations(conn, prefix=prefix, lock=lock, migrations=migrations)

    def connection(
        self, timeout: float | None = None
    ) -> AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]:
        return self.pool.connection(timeout=timeout)

    async def healthy(self) -> bool:
        try:
            async with self.pool.connection(timeout=2) as conn:
                await conn.execute("SELECT 1")
        except (psycopg.Error, OSError):
            return False
        return True

    async def close(self) -> None:
        await self.pool.close()
