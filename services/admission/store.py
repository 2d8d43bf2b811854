"""The PostgreSQL policy store: durable policies, applied on every replica without restart.

Every write bumps one version counter in the same transaction; each replica polls that
counter and, when it moved, reloads the (small) policy table and reconciles its
controller with it, so an UpdatePolicy or DeletePolicy made through any replica is in
force on all of them within one poll interval.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from services.admission.controller import AdmissionController
from services.admission.limits import PolicyLimits
from services.runtime import Database, Unavailable, dependency_unavailable, stop_task

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2
MIGRATION_LOCK = 0x5B_AD_01  # advisory lock key: replicas starting together migrate once
MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE admission_policies (
        tenant_id   text        NOT NULL,
        user_id     text        NOT NULL DEFAULT '',
        fields      jsonb       NOT NULL,
        etag        text        NOT NULL,
        update_time timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (tenant_id, user_id)
    );
    CREATE TABLE admission_policy_version (
        singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
        version   bigint  NOT NULL
    );
    INSERT INTO admission_policy_version (version) VALUES (0);
    """,
    # the live admission replicas (`membership`)
    2: """
    CREATE TABLE admission_replicas (
        instance text        PRIMARY KEY,
        seen_at  timestamptz NOT NULL DEFAULT now()
    );
    """,
}


@dataclass(frozen=True, slots=True)
class StoredPolicy:
    tenant_id: str
    user_id: str
    limits: PolicyLimits
    etag: str
    update_time: datetime


class EtagMismatch(Exception):
    """The stored policy changed since the caller read it."""


def _unavailable(exc: Exception) -> Unavailable:
    return dependency_unavailable("postgresql", "policy store", exc)


def _row(row: Mapping[str, Any]) -> StoredPolicy:
    return StoredPolicy(
        tenant_id=row["tenant_id"],
        user_id=row["user_id"],
        limits=PolicyLimits(**row["fields"]),
        etag=row["etag"],
        update_time=row["update_time"],
    )


class PolicyStore:
    """Policies in PostgreSQL, mirrored into one replica's `AdmissionController`."""

    def __init__(
        self,
        *,
        database_url: str,
        controller: AdmissionController,
        poll_interval: timedelta = timedelta(seconds=1),
    ) -> None:
        self._db = Database(database_url, max_size=4)
        self._controller = controller
        self._poll = poll_interval.total_seconds()
        self._version = -1
        self._applied: dict[tuple[str, str], PolicyLimits] = {}
        self._task: asyncio.Task[None] | None = None
        self.healthy = False

    async def start(self) -> None:
        """Opens the pool, migrates, loads every policy and starts polling for changes."""
        await self._db.open(prefix="admission", lock=MIGRATION_LOCK, migrations=MIGRATIONS)
        await self.refresh()
        self.healthy = True
        self._task = asyncio.create_task(self._watch(), name="admission-policy-watch")

    async def close(self) -> None:
        await stop_task(self._task)
        self._task = None
        await self._db.close()

    # ---- reads -----------------------------------------------------------------------

    async def get(self, tenant_id: str, user_id: str) -> StoredPolicy | None:
        try:
            async with self._db.connection() as conn:
                cur = conn.cursor(row_factory=dict_row)
                await cur.execute(
                    "SELECT * FROM admission_policies WHERE tenant_id = %s AND user_id = %s",
                    (tenant_id, user_id),
                )
                row = await cur.fetchone()
        except psycopg.Error as exc:
            raise _unavailable(exc) from exc
        return None if row is None else _row(row)

    async def list(
        self, *, tenant_id: str, after: tuple[str, str] | None, limit: int
    ) -> list[StoredPolicy]:
        clauses, params = [], []
        if tenant_id:
            clauses.append("tenant_id = %s")
            params.append(tenant_id)
        if after is not None:
            clauses.append("(tenant_id, user_id) > (%s, %s)")
            params.extend(after)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        try:
            async with self._db.connection() as conn:
                cur = conn.cursor(row_factory=dict_row)
                await cur.execute(
                    f"SELECT * FROM admission_policies {where} "  # noqa: S608 - fixed clauses
                    "ORDER BY tenant_id, user_id LIMIT %s",
                    (*params, limit),
                )
                rows = await cur.fetchall()
        except psycopg.Error as exc:
            raise _unavailable(exc) from exc
        return [_row(r) for r in rows]

    # ---- writes ----------------------------------------------------------------------

    async def put(
        self,
        tenant_id: str,
        user_id: str,
        merge: Any,
        *,
        etag: str = "",
    ) -> StoredPolicy:
        """Stores the policy `merge(current or None)` returns, if `etag` matches.

        `merge` validates (raising InvalidArgument); it runs inside the transaction,
        with the stored row locked, so concurrent partial updates do not lose fields.

        Raises:
            EtagMismatch: `etag` was given and is not the stored one.
        """
        try:
            async with self._db.connection() as conn, conn.transaction():
                cur = conn.cursor(row_factory=dict_row)
                await cur.execute(
                    "SELECT * FROM admission_policies WHERE tenant_id = %s AND user_id = %s "
                    "FOR UPDATE",
                    (tenant_id, user_id),
                )
                row = await cur.fetchone()
                current = None if row is None else _row(row)
                if etag and (current is None or current.etag != etag):
                    raise EtagMismatch
                limits: PolicyLimits = merge(current.limits if current else None)
                await cur.execute(
                    "INSERT INTO admission_policies (tenant_id, user_id, fields, etag) "
                    "VALUES (%s, %s, %s, %s) ON CONFLICT (tenant_id, user_id) DO UPDATE "
                    "SET fields = excluded.fields, etag = excluded.etag, update_time = now() "
                    "RETURNING *",
                    (tenant_id, user_id, Jsonb(asdict(limits)), secrets.token_hex(8)),
                )
                stored = _row(await cur.fetchone())  # type: ignore[arg-type]
                await conn.execute("UPDATE admission_policy_version SET version = version + 1")
        except psycopg.Error as exc:
            raise _unavailable(exc) from exc
        self._apply(stored.tenant_id, stored.user_id, stored.limits)
        return stored

    async def delete(self, tenant_id: str, user_id: str) -> bool:
        try:
            async with self._db.connection() as conn, conn.transaction():
                cur = await conn.execute(
                    "DELETE FROM admission_policies WHERE tenant_id = %s AND user_id = %s",
                    (tenant_id, user_id),
                )
                deleted = cur.rowcount > 0
                if deleted:
                    await conn.execute("UPDATE admission_policy_version SET version = version + 1")
        except psycopg.Error as exc:
            raise _unavailable(exc) from exc
        if deleted:
            self._forget(tenant_id, user_id)
        return deleted

    # ---- keeping the controller in step ----------------------------------------------

    async def refresh(self) -> bool:
        """Reloads every policy if the version moved; True if it did."""
        async with self._db.connection() as conn:
            cur = await conn.execute("SELECT version FROM admission_policy_version")
            (version,) = await cur.fetchone()  # type: ignore[misc]
            if version == self._version:
                return False
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute("SELECT * FROM admission_policies")
            rows = [_row(r) for r in await cur.fetchall()]
        wanted = {(p.tenant_id, p.user_id): p.limits for p in rows}
        for key in [k for k in self._applied if k not in wanted]:
            self._forget(*key)
        for (tenant_id, user_id), limits in wanted.items():
            self._apply(tenant_id, user_id, limits)
        self._version = version
        return True

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._poll)
            try:
                if await self.refresh():
                    logger.info("admission policies reloaded", extra={"version": self._version})
                self.healthy = True
            except (psycopg.Error, OSError) as exc:
                if self.healthy:
                    logger.warning("cannot poll admission policies: %s", exc)
                self.healthy = False
            except Exception:  # a bug; keep polling rather than freeze the policies
                logger.exception("admission policy poll failed")

    def _apply(self, tenant_id: str, user_id: str, limits: PolicyLimits) -> None:
        if self._applied.get((tenant_id, user_id)) != limits:
            self._controller.set_policy(tenant_id, limits, user_id=user_id)
            self._applied[(tenant_id, user_id)] = limits

    def _forget(self, tenant_id: str, user_id: str) -> None:
        if self._applied.pop((tenant_id, user_id), None) is not None:
            self._controller.delete_policy(tenant_id, user_id=user_id)
