"""What every PostgreSQL-backed service shares: a connection pool with readiness,
versioned migrations, and the error a caller gets while the database is down.

A connection that sat idle in the pool for a while (`IDLE_CHECK_S`) is checked with a
round trip before it is handed out, so the first calls after a PostgreSQL restart get
live connections, not the dead ones the pool held through the outage; one just
returned is handed out as it is (the hot path pays nothing).

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
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from datetime import timedelta
from typing import Any

import psycopg
from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from services.runtime import _tracing
from services.runtime._context import time_remaining
from services.runtime._errors import Unavailable

logger = logging.getLogger(__name__)

POOL_WAIT_S = 10.0
"""The longest wait for a pooled connection (a call without a deadline)."""
DOWN_WAIT_S = 0.5
"""The longest wait while the database is seen down."""
ANSWER_RESERVE_S = 0.05
"""Time kept before the inbound deadline to answer UNAVAILABLE."""
IDLE_CHECK_S = 1.0
"""A connection idle in the pool this long is checked before it is handed out."""


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
    for readiness, closed at shutdown. Every PostgreSQL-backed store is built on one.

    `name` labels the pool's metrics (`switchboard_db_pool_*{pool}`); by default the
    schema prefix given to `open`.
    """

    def __init__(
        self,
        url: str,
        *,
        max_size: int = 8,
        autocommit: bool = True,
        configure: Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]] | None = None,
        name: str = "",
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
        self._returned_at: weakref.WeakKeyDictionary[psycopg.AsyncConnection[Any], float] = (
            weakref.WeakKeyDictionary()
        )
        self.name = name
        self._down = False
        _pools.add(self)

    async def open(
        self,
        *,
        prefix: str = "",
        lock: int = 0,
        migrations: Mapping[int, str] | None = None,
        wait: bool = True,
    ) -> None:
        """Opens the pool, then applies `migrations` (if any) as `apply_migrations` does.
        With `wait` False (and no migrations) it returns at once: the pool connects in
        the background, and a `connection` meanwhile waits as it would for a busy pool."""
        self.name = self.name or prefix
        await self.pool.open(wait=wait, timeout=30)
        if migrations:
            async with self.pool.connection() as conn:
                await apply_migrations(conn, prefix=prefix, lock=lock, migrations=migrations)

    @contextlib.asynccontextmanager
    async def connection(
        self, timeout: float | None = None
    ) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A live pooled connection, waited for as `pool_wait` says (see the module).

        Raises:
            psycopg_pool.PoolTimeout: none came in time (a psycopg.OperationalError,
                which the stores answer as UNAVAILABLE).
        """
        with contextlib.ExitStack() as traced:
            if _tracing.in_trace():  # PostgreSQL work of a traced call, not a sweeper's
                traced.enter_context(
                    _tracing.span(
                        f"postgresql {self.name}",
                        kind=_tracing.SpanKind.CLIENT,
                        attributes={"db.system": "postgresql", "db.namespace": self.name},
                    )
                )
            async with self._connection(timeout) as conn:
                yield conn

    @contextlib.asynccontextmanager
    async def _connection(
        self, timeout: float | None
    ) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        try:
            started = time.monotonic()
            conn = await self._live(pool_wait(timeout, time_remaining(), down=self._down))
            _tracing.current_span().set_attribute(
                "switchboard.db.pool_wait_ms", round((time.monotonic() - started) * 1000, 3)
            )
            try:
                async with conn:
                    yield conn
            finally:
                await self.pool.putconn(conn)
                self._returned_at[conn] = time.monotonic()
        except psycopg.errors.QueryCanceled:
            raise  # a statement cancelled or timed out: the database is up
        except psycopg.OperationalError:
            self._down = True
            raise

    async def _live(self, wait: float) -> psycopg.AsyncConnection[Any]:
        """A connection from the pool within `wait` seconds: one just returned as it is,
        any other checked first; a dead one is dropped (the pool replaces it) and the
        next is waited for briefly, the database having been seen down."""
        deadline = time.monotonic() + wait
        while True:
            left = max(deadline - time.monotonic(), 0.001)
            conn = await self.pool.getconn(timeout=min(left, DOWN_WAIT_S) if self._down else left)
            returned = self._returned_at.get(conn)
            if returned is not None and time.monotonic() - returned < IDLE_CHECK_S:
                return conn
            try:
                await AsyncConnectionPool.check_connection(conn)
            except psycopg.Error:
                self._down = True
                await self.pool.putconn(conn)  # broken: dropped
                continue
            self._down = False
            return conn

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


_pools: weakref.WeakSet[Database] = weakref.WeakSet()
"""Every Database of this process, for the metrics collector."""

_POOL_GAUGES = (
    ("pool_size", "switchboard_db_pool_connections", "Connections the pool holds."),
    ("pool_available", "switchboard_db_pool_idle", "Connections idle in the pool."),
    ("pool_max", "switchboard_db_pool_max", "The most connections the pool may hold."),
    (
        "requests_waiting",
        "switchboard_db_pool_requests_waiting",
        "Requests waiting for a connection now.",
    ),
)
_POOL_COUNTERS = (
    ("requests_num", "switchboard_db_pool_requests", "Connections asked of the pool.", 1.0),
    (
        "requests_queued",
        "switchboard_db_pool_requests_queued",
        "Requests that had to wait for a connection.",
        1.0,
    ),
    (
        "requests_wait_ms",
        "switchboard_db_pool_wait_seconds",
        "Time requests spent waiting for a connection.",
        0.001,
    ),
    (
        "requests_errors",
        "switchboard_db_pool_request_errors",
        "Requests that got no connection (timed out, or the pool was closing).",
        1.0,
    ),
    (
        "connections_errors",
        "switchboard_db_pool_connection_errors",
        "Failed attempts to connect to PostgreSQL.",
        1.0,
    ),
    (
        "connections_lost",
        "switchboard_db_pool_connections_lost",
        "Connections found broken when checked.",
        1.0,
    ),
)


class PoolCollector(Collector):
    """`switchboard_db_pool_*{pool}` of every open pool, from psycopg_pool's `get_stats()`
    at scrape time."""

    def collect(self) -> Iterator[Metric]:
        gauges = {k: GaugeMetricFamily(n, h, labels=["pool"]) for k, n, h in _POOL_GAUGES}
        counters = {
            k: (CounterMetricFamily(n, h, labels=["pool"]), scale)
            for k, n, h, scale in _POOL_COUNTERS
        }
        try:
            databases = list(_pools)
        except RuntimeError:  # a pool was made while this (scrape) thread copied the set
            databases = []
        for db in databases:
            if db.pool.closed:
                continue
            stats = db.pool.get_stats()
            label = [db.name or db.pool.name]
            for key, family in gauges.items():
                family.add_metric(label, stats.get(key, 0))
            for key, (family, scale) in counters.items():
                family.add_metric(label, stats.get(key, 0) * scale)
        yield from gauges.values()
        yield from (family for family, _ in counters.values())


REGISTRY.register(PoolCollector())
