"""Session requests: validation, field-mask updates, and the Session message."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime

from switchboard.chat.v1 import chat_pb2 as pb
from switchboard.common.v1 import common_pb2

from services.chat.store import SessionRow
from services.rag.ingest import validate_collection
from services.runtime import FieldViolation, invalid

logger = logging.getLogger(__name__)

MAX_TITLE_CHARS = 200
MAX_SYSTEM_PROMPT_CHARS = 16_000
MAX_TOP_K = 20
MAX_TOOLS = 32
SETTINGS_FIELDS = tuple(f.name for f in pb.SessionSettings.DESCRIPTOR.fields)
UPDATABLE = ("title", "settings", *(f"settings.{name}" for name in SETTINGS_FIELDS))


def settings_problems(settings: pb.SessionSettings, field: str) -> list[FieldViolation]:
    problems = []
    if len(settings.system_prompt) > MAX_SYSTEM_PROMPT_CHARS:
        problems.append(
            FieldViolation(f"{field}.system_prompt", f"at most {MAX_SYSTEM_PROMPT_CHARS} chars")
        )
    if settings.collection and (bad := validate_collection(settings.collection, "")):
        problems.append(FieldViolation(f"{field}.collection", bad.description))
    if not 0 <= settings.retrieval_top_k <= MAX_TOP_K:
        problems.append(FieldViolation(f"{field}.retrieval_top_k", f"must be 0..{MAX_TOP_K}"))
    if len(settings.allowed_tools) > MAX_TOOLS or any(
        not 0 < len(t) <= 64 for t in settings.allowed_tools
    ):
        problems.append(
            FieldViolation(f"{field}.allowed_tools", f"at most {MAX_TOOLS} names of 1..64 chars")
        )
    if settings.tier not in common_pb2.ModelTier.values():
        problems.append(FieldViolation(f"{field}.tier", "unknown tier"))
    if settings.priority not in common_pb2.Priority.values():
        problems.append(FieldViolation(f"{field}.priority", "unknown priority"))
    return problems


def check_new(request: pb.CreateSessionRequest) -> None:
    problems = settings_problems(request.settings, "settings")
    if len(request.title) > MAX_TITLE_CHARS:
        problems.insert(0, FieldViolation("title", f"at most {MAX_TITLE_CHARS} characters"))
    if problems:
        raise invalid(problems, what="CreateSessionRequest")


def apply_mask(
    current: SessionRow, request: pb.UpdateSessionRequest
) -> tuple[str, pb.SessionSettings]:
    """The title and settings after the update.

    Raises:
        InvalidArgument: no mask, a path that cannot be updated, or bad new values.
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
    problems = settings_problems(settings, "session.settings")
    if len(title) > MAX_TITLE_CHARS:
        problems.insert(0, FieldViolation("session.title", f"at most {MAX_TITLE_CHARS} chars"))
    if problems:
        raise invalid(problems, what="UpdateSessionRequest")
    return title, settings


def session_message(row: SessionRow) -> pb.Session:
    session = pb.Session(
        session_id=row.session_id,
        title=row.title,
        settings=row.settings,
        message_count=row.message_count,
        usage=common_pb2.TokenUsage(
            prompt_tokens=row.prompt_tokens,
            completion_tokens=row.completion_tokens,
            total_tokens=row.prompt_tokens + row.completion_tokens,
        ),
        last_event_id=row.last_event_id,
    )
    session.create_time.FromDatetime(row.create_time)
    session.update_time.FromDatetime(row.update_time)
    return session


def session_cursor(parts: list[str]) -> tuple[datetime, str]:
    """Where a ListSessions page token says the next page starts."""
    when, session_id = parts
    return datetime.fromisoformat(when), session_id
