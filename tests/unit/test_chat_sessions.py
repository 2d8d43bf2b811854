"""Session request logic: field-mask updates, the Session message, page cursors, the
session's defaults (pure). The values' own rules are in test_chat_contract."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import pytest
from google.protobuf import field_mask_pb2
from switchboard.chat.v1 import chat_pb2 as pb
from switchboard.common.v1 import common_pb2
from switchboard.inference.v1 import inference_pb2

from services.chat.sessions import (
    apply_mask,
    message_cursor,
    session_cursor,
    session_message,
    session_priority,
    settings_update,
)
from services.chat.store import SessionRow
from services.runtime import InvalidArgument

NOW = datetime(2026, 1, 1, tzinfo=UTC)
CURRENT = SessionRow(
    session_id="00000000-0000-0000-0000-000000000001",
    tenant_id="acme",
    title="old title",
    settings=pb.SessionSettings(
        system_prompt="old prompt",
        allowed_tools=["a", "b"],
        retrieval_top_k=5,
        parameters=inference_pb2.GenerationParameters(max_tokens=50, temperature=0.5),
    ),
    message_count=0,
    prompt_tokens=0,
    completion_tokens=0,
    last_event_id="",
    create_time=NOW,
    update_time=NOW,
)


def update(paths: list[str], **session) -> pb.UpdateSessionRequest:
    return pb.UpdateSessionRequest(
        session=pb.Session(session_id=CURRENT.session_id, **session),
        update_mask=field_mask_pb2.FieldMask(paths=paths),
    )


def test_only_the_masked_fields_change():
    new = pb.SessionSettings(
        system_prompt="new prompt",
        allowed_tools=["c"],
        retrieval_top_k=9,
        parameters=inference_pb2.GenerationParameters(max_tokens=7),
    )
    title, settings = apply_mask(
        CURRENT,
        update(["title", "settings.allowed_tools", "settings.parameters"], title="t", settings=new),
    )
    assert title == "t"
    assert list(settings.allowed_tools) == ["c"]  # a repeated field is replaced, not merged
    assert settings.parameters.max_tokens == 7 and settings.parameters.temperature == 0
    assert settings.system_prompt == "old prompt" and settings.retrieval_top_k == 5
    assert list(CURRENT.settings.allowed_tools) == ["a", "b"]  # the stored row is untouched


def test_the_whole_settings_path_replaces_them():
    _, settings = apply_mask(CURRENT, update(["settings"], settings=pb.SessionSettings(model="m")))
    assert settings == pb.SessionSettings(model="m")


@pytest.mark.parametrize(
    ("paths", "fields"),
    [
        ([], ["update_mask"]),
        (["session_id"], ["update_mask"]),
        (["usage", "title"], ["update_mask"]),
        (["settings.nonexistent"], ["update_mask"]),
    ],
)
def test_paths_that_cannot_be_updated_are_refused(paths, fields):
    with pytest.raises(InvalidArgument) as exc:
        apply_mask(CURRENT, update(paths))
    assert [v.field for v in exc.value.field_violations] == fields


def test_a_settings_frame_is_the_update_session_request_it_stands_for():
    change = pb.ChangeSettings(
        settings=pb.SessionSettings(retrieval_top_k=9, system_prompt="new"),
        update_mask=field_mask_pb2.FieldMask(paths=["retrieval_top_k", "settings.system_prompt"]),
    )
    request = settings_update(CURRENT.session_id, change)
    assert list(request.update_mask.paths) == ["settings.retrieval_top_k", "settings.system_prompt"]
    assert request.session.session_id == CURRENT.session_id
    _, settings = apply_mask(CURRENT, request)
    assert (settings.retrieval_top_k, settings.system_prompt) == (9, "new")
    assert list(settings.allowed_tools) == ["a", "b"]  # outside the mask: kept


def test_usage_totals_beyond_int32_are_capped_not_wrapped():
    row = dataclasses.replace(CURRENT, prompt_tokens=3_000_000_000, completion_tokens=5)
    usage = session_message(row).usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        2**31 - 1,
        5,
        2**31 - 1,
    )
    row = dataclasses.replace(CURRENT, prompt_tokens=2**31 - 10, completion_tokens=20)
    assert session_message(row).usage.total_tokens == 2**31 - 1
    assert session_message(CURRENT).usage.total_tokens == 0


def test_a_session_s_tasks_and_generations_are_interactive_unless_it_says_otherwise():
    assert session_priority(pb.SessionSettings()) == common_pb2.PRIORITY_INTERACTIVE
    batch = pb.SessionSettings(priority=common_pb2.PRIORITY_BATCH)
    assert session_priority(batch) == common_pb2.PRIORITY_BATCH


def test_page_cursors_refuse_what_no_response_gave_out():
    sid = "00000000-0000-0000-0000-0000000000AB"
    assert session_cursor([NOW.isoformat(), sid]) == (NOW, sid.lower())
    assert message_cursor(["42"]) == 42
    for parts in ([NOW.isoformat(), "not-a-uuid"], ["soon", sid], [sid]):
        with pytest.raises(ValueError):
            session_cursor(parts)
    # non-ASCII digits, more digits than int() takes, more than a bigint holds
    for value in ("\u0663", "\u00b2", "1" * 5000, "9" * 19, "-1", ""):
        with pytest.raises(ValueError):
            message_cursor([value])
