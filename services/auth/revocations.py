"""Revoked keys, as a set that follows the key table within a poll interval.

Two readers need to know soon that a key was revoked: the edge, whose own check of a
key token (`launcher._envoy_keys`) lets every unrevoked tenant key through without the
auth service (the control plane reads this set and pushes it to Envoy), and the auth
service's cache of verified keys (each replica drops a revoked key's entries). Both
poll: a revocation reaches them within `POLL_INTERVAL_S` plus what they do with it. A
poll reads only a count and a time; the ids are read again when either has changed,
which is exactly when a key was revoked (a revocation is never undone).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime

import psycopg

from services.runtime import Database

logger = logging.getLogger(__name__)

POLL_INTERVAL_S = 1.0


class RevocationFeed:
    """The ids of revoked keys in `db`'s key table, as of the last `poll`."""

    def __init__(self, db: Database, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._db = db
        self._clock = clock
        self._mark: tuple[int, datetime | None] | None = None
        self.revoked: frozenset[str] | None = None
        """None until the first read."""
        self.read_at: float | None = None
        """When (the clock's time) the table was last read."""

    async def poll(self) -> frozenset[str]:
        """Reads the table; returns the keys revoked since the last read.

        Raises:
            psycopg.Error, OSError: the table could not be read (the set is kept).
        """
        async with self._db.connection() as conn:
            cur = await conn.execute(
                "SELECT count(*), max(revoke_time) FROM auth_api_keys WHERE revoke_time IS NOT NULL"
            )
            count, latest = await cur.fetchone() or (0, None)
            mark = (int(count), latest)
            if mark != self._mark:
                cur = await conn.execute(
                    "SELECT key_id FROM auth_api_keys WHERE revoke_time IS NOT NULL"
                )
                revoked = frozenset(str(row[0]) for row in await cur.fetchall())
            else:
                revoked = self.revoked or frozenset()
        self.read_at = self._clock()
        newly = revoked - (self.revoked or frozenset())
        self._mark, self.revoked = mark, revoked
        return newly

    def fresh(self, within: float) -> frozenset[str] | None:
        """The set if it was read within `within` seconds, else None (not known)."""
        if self.read_at is None or self._clock() - self.read_at > within:
            return None
        return self.revoked

    async def follow(
        self,
        on_poll: Callable[[frozenset[str]], Awaitable[None]] | None = None,
        *,
        interval: float = POLL_INTERVAL_S,
    ) -> None:
        """Polls every `interval` until cancelled, calling `on_poll(newly_revoked)` (if
        given) after each poll, read or not (a failed read passes nothing new)."""
        while True:
            newly: frozenset[str] = frozenset()
            try:
                newly = await self.poll()
            except (psycopg.Error, OSError) as exc:
                logger.debug("revoked keys not read (keeping the last): %s", exc)
            except Exception:  # noqa: BLE001 - the feed must outlive one bad read
                logger.exception("reading revoked keys failed")
            if on_poll is not None:
                await on_poll(newly)
            await asyncio.sleep(interval)


__all__ = ["POLL_INTERVAL_S", "RevocationFeed"]
