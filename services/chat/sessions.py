"""Session requests: field-mask updates, the Session message, the session's defaults.

The values themselves (title, settings) are checked by the contract's `buf.validate`
annotations before they get here: by the runtime for CreateSession and UpdateSession,
frame by frame for Converse (see `live`).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from datetime import datetime

from switchboard.chat.v1 import chat_pb2 as pb
from switchboard.common.v1 import common_pb2

from services.chat.store import SessionRow, SessionStore
from services.runtime import FieldViolation, invalid

logger = logging.getLogger(__name__)

SETTINGS_FIELDS = tuple(f.name for f in pb.SessionSettings.DESCRIPTOR.fields)
UPDATABLE = ("title", "settings", *(f"settings.{name}" for name in SETTINGS_FIELDS))
INT32_MAX = 2**31 - 1


def session_priority(settings: pb.SessionSettings) -> int:
    """The admission class of the session's requests and tasks: unset = interactive (the
    execution service's own default, batch, must not apply to a session's tool calls)."""
    return settings.priority or common_pb2.PRIORITY_INTERACTIVE


def apply_mask(
    current: SessionRow, request: pb.UpdateSessionRequest
) -> tuple[str, pb.SessionSettings]:
    """The title and settings after the update; the new values' constraints hold.

    Raises:
        InvalidArgument: no mask, or a path that cannot be updated.
    """
    paths: Sequence[str] = request.update_mask.paths
    problems = [
        FieldViolation("update_mask", f"{p!r} cannot be updated (use: title, settings[.field])")
        for p in paths
        if p not in UPDATABLE
    ]
    if not paths:
        problems.append(FieldViolation("update_mask", "required: the fields to change"))
    if problems:
        raise invalid(problems, what="UpdateSessionRequest")
    title = current.title
    settings = pb.SessionSettings()
    settings.CopyFrom(current.settings)
    new = request.session
    for path in paths:
        if path == "title":
            title = new.title
        elif path == "settings":
            settings.CopyFrom(new.settings)
        else:
            name = path.removeprefix("settings.")
            field = settings.DESCRIPTOR.fields_by_name[name]
            if field.message_type is not None:
                getattr(settings, name).CopyFrom(getattr(new.settings, name))
            elif field.is_repeated:
                del getattr(settings, name)[:]
                getattr(settings, name).extend(getattr(new.settings, name))
            else:
                setattr(settings, name, getattr(new.settings, name))
    return title, settings


async def update_session(
    store: SessionStore, tenant_id: str, request: pb.UpdateSessionRequest
) -> pb.Session:
    """Applies an UpdateSession request (its field mask over the stored session) and
    stores the result: what UpdateSession and a Converse settings frame both do.

    Raises:
        NotFound: `SESSION_NOT_FOUND`, no such session of the tenant.
        InvalidArgument: a mask path that cannot be updated.
    """
    current = await store.get(tenant_id, request.session.session_id)
    title, settings = apply_mask(current, request)
    row = await store.update(tenant_id, current.session_id, title=title, settings=settings)
    return session_message(row)


async def load_session(
    store: SessionStore, tenant_id: str, session_id: str, *, recent_ids: int
) -> tuple[pb.Session, set[str]]:
    """The session a stream attaches to, and the client message ids of its `recent_ids`
    latest messages (a message sent again under one of them is not answered twice).

    Raises:
        NotFound: `SESSION_NOT_FOUND`, no such session of the tenant.
    """
    row = await store.get(tenant_id, session_id)
    seen = await store.client_message_ids(tenant_id, row.session_id, limit=recent_ids)
    return session_message(row), seen


def settings_update(session_id: str, change: pb.ChangeSettings) -> pb.UpdateSessionRequest:
    """A Converse settings frame as the UpdateSession request it stands for (its mask's
    paths are relative to the settings)."""
    request = pb.UpdateSessionRequest(
        session=pb.Session(session_id=session_id, settings=change.settings),
    )
    request.update_mask.paths.extend(
        p if p.startswith("settings") else f"settings.{p}" for p in change.update_mask.paths
    )
    return request


def _int32(count: int) -> int:
    return max(0, min(count, INT32_MAX))


def session_message(row: SessionRow) -> pb.Session:
    """The Session of a stored row; its usage totals (bigint in the store) are capped at
    what TokenUsage's int32 counts hold."""
    session = pb.Session(
        session_id=row.session_id,
        title=row.title,
        settings=row.settings,
        message_count=row.message_count,
        usage=common_pb2.TokenUsage(
            prompt_tokens=_int32(row.prompt_tokens),
            completion_tokens=_int32(row.completion_tokens),
            total_tokens=_int32(row.prompt_tokens + row.completion_tokens),
        ),
        last_event_id=row.last_event_id,
    )
    session.create_time.FromDatetime(row.create_time)
    session.update_time.FromDatetime(row.update_time)
    return session


def session_cursor(parts: list[str]) -> tuple[datetime, str]:
    """Where a ListSessions page token says the next page starts (ValueError for a
    token no response gave out)."""
    when, session_id = parts
    return datetime.fromisoformat(when), str(uuid.UUID(session_id))


MAX_SEQUENCE_DIGITS = 18
"""A history position in a page token: a bigint, so at most 18 decimal digits."""


def message_cursor(parts: list[str]) -> int:
    """Where a ListMessages page token says the next page starts: the sequence of the
    last message of the previous page (ValueError for a token no response gave out)."""
    (value,) = parts
    if not (value.isascii() and value.isdigit() and len(value) <= MAX_SEQUENCE_DIGITS):
        raise ValueError(value)
    return int(value)
