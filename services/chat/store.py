"""Chat sessions and their history in PostgreSQL.

A session row holds its settings (the `SessionSettings` message) and running totals;
its history is a table of messages numbered 1, 2, 3, ... per session. Appending takes
the next number from the session row itself (an UPDATE ... RETURNING in the same
transaction as the INSERT), so concurrent appends queue on that row and the numbers
have no gaps and no repeats.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg.rows import dict_row
from switchboard.chat.v1 import chat_pb2 as pb

from services.runtime import Database, NotFound, dependency_unavailable

logger = logging.getLogger(__name__)

_MIGRATION_LOCK = 0x5B_AD_07
MIGRATIONS = {
    1: """
    CREATE TABLE chat_sessions (
        session_id        uuid        PRIMARY KEY,
        tenant_id         text        NOT NULL,
        title             text        NOT NULL DEFAULT '',
        settings          bytea       NOT NULL,
        message_count     bigint      NOT NULL DEFAULT 0,
        prompt_tokens     bigint      NOT NULL DEFAULT 0,
        completion_tokens bigint      NOT NULL DEFAULT 0,
        last_event_id     text        NOT NULL DEFAULT '',
        create_time       timestamptz NOT NULL DEFAULT now(),
        update_time       timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX chat_sessions_tenant ON chat_sessions (tenant_id, update_time DESC, session_id);
    CREATE TABLE chat_messages (
        session_id uuid   NOT NULL REFERENCES chat_sessions ON DELETE CASCADE,
        sequence   bigint NOT NULL,
        message    bytea  NOT NULL,
        PRIMARY KEY (session_id, sequence)
    );
    """,
}


@dataclass(frozen=True, slots=True)
class SessionRow:
    session_id: str
    tenant_id: str
    title: str
    settings: pb.SessionSettings
    message_count: int
    prompt_tokens: int
    completion_tokens: int
    last_event_id: str
    create_time: datetime
    update_time: datetime


def _not_found(session_id: str) -> NotFound:
    return NotFound(
        f"session {session_id!r} does not exist",
        reason="SESSION_NOT_FOUND",
        metadata={"session_id": session_id},
    )


def canonical_id(session_id: str) -> str:
    """The id as the service spells it (a lowercase, hyphenated UUID), however the
    client spelled it; NotFound for anything else (never a database error).

    Raises:
        NotFound: `SESSION_NOT_FOUND`, not a session id.
    """
    try:
        return str(uuid.UUID(session_id))
    except ValueError:
        raise _not_found(session_id) from None


_STORE_DOWN = (psycopg.OperationalError, psycopg.errors.ConnectionTimeout)


def _unavailable(exc: Exception) -> Exception:
    return dependency_unavailable("postgresql", "session store", exc)


def _row(row: dict) -> SessionRow:
    return SessionRow(
        session_id=str(row["session_id"]),
        tenant_id=row["tenant_id"],
        title=row["title"],
        settings=pb.SessionSettings.FromString(row["settings"]),
        message_count=row["message_count"],
        prompt_tokens=row["prompt_tokens"],
        completion_tokens=row["completion_tokens"],
        last_event_id=row["last_event_id"],
        create_time=row["create_time"],
        update_time=row["update_time"],
    )


class SessionStore:
    """Sessions of every tenant; each call names the tenant, and another tenant's
    session is NOT_FOUND, exactly like one that does not exist."""

    def __init__(self, database_url: str, *, pool_size: int = 8) -> None:
        self._db = Database(database_url, max_size=pool_size)

    async def open(self) -> None:
        await self._db.open(prefix="chat", lock=_MIGRATION_LOCK, migrations=MIGRATIONS)

    async def close(self) -> None:
        await self._db.close()

    async def healthy(self) -> bool:
        return await self._db.healthy()

    async def _one(self, sql: str, params: Sequence[object]) -> dict | None:
        try:
            async with self._db.connection() as conn:
                cur = conn.cursor(row_factory=dict_row)
                await cur.execute(sql, params)
                return await cur.fetchone()
        except _STORE_DOWN as exc:
            raise _unavailable(exc) from exc

    async def create(self, tenant_id: str, title: str, settings: pb.SessionSettings) -> SessionRow:
        row = await self._one(
            "INSERT INTO chat_sessions (session_id, tenant_id, title, settings)"
            " VALUES (%s, %s, %s, %s) RETURNING *",
            (str(uuid.uuid4()), tenant_id, title, settings.SerializeToString()),
        )
        assert row is not None
        return _row(row)

    async def get(self, tenant_id: str, session_id: str) -> SessionRow:
        row = await self._one(
            "SELECT * FROM chat_sessions WHERE session_id = %s AND tenant_id = %s",
            (canonical_id(session_id), tenant_id),
        )
        if row is None:
            raise _not_found(session_id)
        return _row(row)

    async def list(
        self, tenant_id: str, *, after: tuple[datetime, str] | None, limit: int
    ) -> list[SessionRow]:
        """Most recently updated first; `after` is the (update_time, id) of the last
        session of the previous page."""
        where, params = "tenant_id = %s", [tenant_id]
        if after is not None:
            where += " AND (update_time, session_id) < (%s, %s::uuid)"
            params.extend(after)
        try:
            async with self._db.connection() as conn:
                cur = conn.cursor(row_factory=dict_row)
                await cur.execute(
                    f"SELECT * FROM chat_sessions WHERE {where}"  # noqa: S608 - fixed clauses
                    " ORDER BY update_time DESC, session_id DESC LIMIT %s",
                    (*params, limit),
                )
                return [_row(r) for r in await cur.fetchall()]
        except _STORE_DOWN as exc:
            raise _unavailable(exc) from exc

    async def update(
        self, tenant_id: str, session_id: str, *, title: str, settings: pb.SessionSettings
    ) -> SessionRow:
        row = await self._one(
            "UPDATE chat_sessions SET title = %s, settings = %s, update_time = clock_timestamp()"
            " WHERE session_id = %s AND tenant_id = %s RETURNING *",
            (title, settings.SerializeToString(), canonical_id(session_id), tenant_id),
        )
        if row is None:
            raise _not_found(session_id)
        return _row(row)

    async def delete(self, tenant_id: str, session_id: str) -> str:
        """Deletes the session; returns its id as the service spells it."""
        row = await self._one(
            "DELETE FROM chat_sessions WHERE session_id = %s AND tenant_id = %s"
            " RETURNING session_id",
            (canonical_id(session_id), tenant_id),
        )
        if row is None:
            raise _not_found(session_id)
        return str(row["session_id"])

    async def append(
        self, tenant_id: str, session_id: str, message: pb.Message, *, last_event_id: str = ""
    ) -> pb.Message:
        """Stores `message` as the session's next one; returns it with its id, sequence
        and time, and adds its usage to the session's totals. `last_event_id`, if given,
        is the session's latest Converse event when the message was stored."""
        sid = canonical_id(session_id)
        try:
            async with self._db.connection() as conn, conn.transaction():
                cur = await conn.execute(
                    "UPDATE chat_sessions SET message_count = message_count + 1,"
                    " prompt_tokens = prompt_tokens + %s,"
                    " completion_tokens = completion_tokens + %s,"
                    " update_time = clock_timestamp(),"
                    " last_event_id = coalesce(nullif(%s, ''), last_event_id)"
                    " WHERE session_id = %s AND tenant_id = %s"
                    " RETURNING message_count, update_time",
                    (
                        message.usage.prompt_tokens,
                        message.usage.completion_tokens,
                        last_event_id,
                        sid,
                        tenant_id,
                    ),
                )
                row = await cur.fetchone()
                if row is None:
                    raise _not_found(session_id)
                sequence, stored_at = row
                stored = pb.Message()
                stored.CopyFrom(message)
                stored.session_id = sid
                stored.sequence = sequence
                stored.message_id = stored.message_id or f"{sid}:{sequence}"
                stored.create_time.FromDatetime(stored_at)
                await conn.execute(
                    "INSERT INTO chat_messages (session_id, sequence, message) VALUES (%s, %s, %s)",
                    (sid, sequence, stored.SerializeToString()),
                )
        except _STORE_DOWN as exc:
            raise _unavailable(exc) from exc
        return stored

    async def messages(
        self, tenant_id: str, session_id: str, *, after: int, limit: int
    ) -> list[pb.Message]:
        """The session's messages with sequence > `after`, oldest first."""
        await self.get(tenant_id, session_id)  # NOT_FOUND, also for another tenant's
        try:
            async with self._db.connection() as conn:
                cur = await conn.execute(
                    "SELECT message FROM chat_messages WHERE session_id = %s AND sequence > %s"
                    " ORDER BY sequence LIMIT %s",
                    (canonical_id(session_id), after, limit),
                )
                return [pb.Message.FromString(r[0]) for r in await cur.fetchall()]
        except _STORE_DOWN as exc:
            raise _unavailable(exc) from exc

    async def client_message_ids(self, tenant_id: str, session_id: str, *, limit: int) -> set[str]:
        """The client ids of the session's latest `limit` messages (for de-duplication)."""
        await self.get(tenant_id, session_id)
        try:
            async with self._db.connection() as conn:
                cur = await conn.execute(
                    "SELECT message FROM chat_messages WHERE session_id = %s"
                    " ORDER BY sequence DESC LIMIT %s",
                    (canonical_id(session_id), limit),
                )
                messages = [pb.Message.FromString(r[0]) for r in await cur.fetchall()]
        except _STORE_DOWN as exc:
            raise _unavailable(exc) from exc
        return {m.client_message_id for m in messages if m.client_message_id}
