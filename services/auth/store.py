"""API keys in PostgreSQL (hashed), with a short cache of verified keys.

Two kinds of credential share the table and the format: tenant keys (acting for their
tenant only) and operator credentials (managing the platform; no tenant). Each row says
which it is, and `verify` answers with the caller it identifies.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import psycopg

from services.auth import keys
from services.auth.cache import VerificationCache
from services.auth.revocations import RevocationFeed
from services.auth.signing import SigningKey
from services.runtime import (
    Database,
    Principal,
    Unavailable,
    dependency_unavailable,
)

logger = logging.getLogger(__name__)

LOOKUP_TIMEOUT_S = 0.4
"""How long a key check waits for the database (Envoy waits 1 s for the whole check): a
stalled database is then down to the check, which answers from a verification within
the stale grace instead of leaving the edge to time out."""
_MIGRATION_LOCK = 0x5B_AD_06
MIGRATIONS = {
    1: """
    CREATE TABLE auth_api_keys (
        key_id      text        PRIMARY KEY,
        tenant_id   text        NOT NULL,
        name        text        NOT NULL DEFAULT '',
        secret_hash bytea       NOT NULL,
        create_time timestamptz NOT NULL DEFAULT now(),
        revoke_time timestamptz
    );
    CREATE INDEX auth_api_keys_tenant ON auth_api_keys (tenant_id);
    """,
    2: """
    ALTER TABLE auth_api_keys
        ADD COLUMN kind text NOT NULL DEFAULT 'tenant'
            CHECK (kind IN ('tenant', 'operator'));
    ALTER TABLE auth_api_keys
        ADD CONSTRAINT auth_api_keys_tenant_of_kind
            CHECK ((kind = 'operator') = (tenant_id = ''));
    """,
}


@dataclass(frozen=True, slots=True)
class Caller:
    """Who a verified credential is: a tenant's key (with its tenant) or an operator's."""

    principal: Principal
    tenant_id: str = ""
    """The key's tenant; empty for an operator credential."""
    key_id: str = ""


@dataclass(frozen=True, slots=True)
class TenantInfo:
    tenant_id: str
    active_keys: int
    create_time: datetime
    """When its first key was created."""


@dataclass(frozen=True, slots=True)
class KeyInfo:
    key_id: str
    tenant_id: str
    name: str
    create_time: datetime
    revoke_time: datetime | None
    kind: str
    """`tenant` or `operator`."""


class KeyStore:
    """Keys of every tenant; `verify` answers from a cache for `cache_ttl`, and for
    `stale_grace` while the database is down."""

    def __init__(
        self,
        database_url: str,
        *,
        cache_ttl: timedelta = timedelta(seconds=30),
        stale_grace: timedelta = timedelta(minutes=10),
        cache_size: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        signer: SigningKey | None = None,
    ) -> None:
        self._db = Database(database_url, max_size=4)
        self._signer = signer
        self.revocations = RevocationFeed(self._db, clock=clock)
        """Followed by the auth service (`forget_revoked`): a key revoked through any
        replica (or the CLI) leaves this one's cache within the feed's poll interval,
        not only once its entry expires."""
        self._cache: VerificationCache[Caller | None] = VerificationCache(
            ttl=cache_ttl.total_seconds(),
            stale_grace=max(stale_grace, cache_ttl).total_seconds(),
            size=cache_size,
        )
        self._clock = clock
        self._lookups: dict[bytes, asyncio.Task[Caller | None]] = {}
        """The database read of each key being checked: one per key, however many
        checks wait for it (a stalled database holds one connection per key, not one
        per check)."""

    async def open(self) -> None:
        await self._db.open(prefix="auth", lock=_MIGRATION_LOCK, migrations=MIGRATIONS)

    async def __aenter__(self) -> KeyStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for lookup in list(self._lookups.values()):
            lookup.cancel()
        await asyncio.gather(*self._lookups.values(), return_exceptions=True)
        await self._db.close()

    async def healthy(self) -> bool:
        return await self._db.healthy()

    async def create(self, tenant_id: str, name: str = "") -> tuple[str, str]:
        """A new key for the tenant: (key_id, the whole key, shown only now)."""
        if not keys.TENANT_ID.fullmatch(tenant_id):
            raise ValueError("a tenant id is 1..63 of [A-Za-z0-9_.-], starting alphanumeric")
        return await self._insert(Principal.TENANT, tenant_id, name)

    async def create_operator(self, name: str = "") -> tuple[str, str]:
        """A new operator credential: (key_id, the whole key, shown only now)."""
        return await self._insert(Principal.OPERATOR, "", name)

    async def _insert(self, principal: Principal, tenant_id: str, name: str) -> tuple[str, str]:
        if len(name) > 200:
            raise ValueError("a key's name is at most 200 characters")
        key = keys.new_key(principal.header_value, tenant_id, self._signer)
        async with self._db.connection() as conn:
            await conn.execute(
                "INSERT INTO auth_api_keys (key_id, tenant_id, name, secret_hash, kind)"
                " VALUES (%s, %s, %s, %s, %s)",
                (key.key_id, tenant_id, name, key.secret_hash, principal.header_value),
            )
        return key.key_id, key.token

    async def forget_revoked(self, newly: frozenset[str]) -> None:
        """Drops the cached verifications of the keys just revoked (`revocations`)."""
        if not newly:
            return
        dropped = self._cache.drop(lambda caller: caller is not None and caller.key_id in newly)
        if dropped:
            logger.info("dropped %d cached verifications of revoked keys", dropped)

    async def get(self, key_id: str) -> KeyInfo | None:
        async with self._db.connection() as conn:
            cur = await conn.execute(
                "SELECT key_id, tenant_id, name, create_time, revoke_time, kind FROM auth_api_keys"
                " WHERE key_id = %s",
                (key_id,),
            )
            row = await cur.fetchone()
        return None if row is None else KeyInfo(*row)

    async def revoke(self, key_id: str) -> bool | None:
        """Revokes a key: True if this call did, False if it was revoked already, None if
        there is no such key."""
        async with self._db.connection() as conn:
            cur = await conn.execute(
                "UPDATE auth_api_keys SET revoke_time = coalesce(revoke_time, now())"
                " WHERE key_id = %s RETURNING revoke_time = now()",
                (key_id,),
            )
            row = await cur.fetchone()
        return None if row is None else bool(row[0])

    async def list(
        self,
        tenant_id: str = "",
        *,
        after: tuple[str, datetime, str] | None = None,
        limit: int | None = None,
    ) -> list[KeyInfo]:
        """Keys by tenant (operators' first), then creation; those after `after`, a
        (tenant_id, create_time, key_id) of the last key of a previous page."""
        async with self._db.connection() as conn:
            cur = await conn.execute(
                "SELECT key_id, tenant_id, name, create_time, revoke_time, kind FROM auth_api_keys"
                " WHERE (%(tenant)s = '' OR tenant_id = %(tenant)s)"
                " AND (%(after)s::boolean IS NOT TRUE"
                "      OR (tenant_id, create_time, key_id) > (%(t)s, %(c)s, %(k)s))"
                " ORDER BY tenant_id, create_time, key_id LIMIT %(limit)s",
                {
                    "tenant": tenant_id,
                    "after": after is not None,
                    "t": after[0] if after else "",
                    "c": after[1] if after else None,
                    "k": after[2] if after else "",
                    "limit": limit,
                },
            )
            return [KeyInfo(*row) for row in await cur.fetchall()]

    async def tenants(self, *, after: str = "", limit: int = 100) -> list[TenantInfo]:
        """Tenant ids that have or had a key, by id, those after `after`."""
        async with self._db.connection() as conn:
            cur = await conn.execute(
                "SELECT tenant_id, count(*) FILTER (WHERE revoke_time IS NULL),"
                " min(create_time) FROM auth_api_keys"
                " WHERE kind = 'tenant' AND tenant_id > %s"
                " GROUP BY tenant_id ORDER BY tenant_id LIMIT %s",
                (after, limit),
            )
            return [TenantInfo(*row) for row in await cur.fetchall()]

    async def verify(self, token: str) -> Caller | None:
        """Who a valid, unrevoked key identifies, else None; from the cache while its
        answer is fresh, and from an older answer while the database is down (see
        `cache`).

        Raises:
            Unavailable: the database cannot be reached and has not verified the key
                within the stale grace.
        """
        slot = keys.hash_secret(token)  # the cache holds no key in clear
        if (entry := self._cache.fresh(slot, self._clock())) is not None:
            return entry.value
        lookup = self._lookups.get(slot)
        if lookup is None:
            lookup = self._lookups[slot] = asyncio.ensure_future(self._lookup(token))
            lookup.add_done_callback(lambda done: self._looked_up(slot, done))
        try:
            # not cancelled past the wait: psycopg would wait seconds on a stalled server
            # to cancel the query; the read goes on, and its answer is cached when it comes
            caller = await asyncio.wait_for(asyncio.shield(lookup), LOOKUP_TIMEOUT_S)
        except (Unavailable, TimeoutError) as exc:
            now = self._clock()
            if (entry := self._cache.stale(slot, now)) is None:
                if isinstance(exc, TimeoutError):  # stalled: as good as down
                    raise dependency_unavailable("postgresql", "key store", exc) from None
                raise
            logger.warning(
                "key store unavailable: answering from a verification %.0f s old",
                now - entry.read_at,
            )
            return entry.value
        return caller

    def _looked_up(self, slot: bytes, lookup: asyncio.Task[Caller | None]) -> None:
        """A key's database read ended: its answer is cached (whoever still waits)."""
        if self._lookups.get(slot) is lookup:
            del self._lookups[slot]
        if not lookup.cancelled() and lookup.exception() is None:
            self._cache.put(slot, lookup.result(), self._clock())

    async def _lookup(self, token: str) -> Caller | None:
        parsed = keys.parse(token)
        if parsed is None:
            return None
        key_id, secret = parsed
        try:
            async with self._db.connection() as conn:
                cur = await conn.execute(
                    "SELECT tenant_id, secret_hash, kind FROM auth_api_keys"
                    " WHERE key_id = %s AND revoke_time IS NULL",
                    (key_id,),
                )
                row = await cur.fetchone()
        except (psycopg.OperationalError, psycopg.errors.ConnectionTimeout) as exc:
            raise dependency_unavailable("postgresql", "key store", exc) from exc
        if row is None or not keys.matches(secret, bytes(row[1])):
            return None
        if row[2] == Principal.OPERATOR.header_value:
            return Caller(Principal.OPERATOR, key_id=key_id)
        return Caller(Principal.TENANT, str(row[0]), key_id)
