"""Session request logic: field-mask updates and validation (pure)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from google.protobuf import field_mask_pb2
from switchboard.chat.v1 import chat_pb2 as pb
from switchboard.inference.v1 import inference_pb2

from services.chat.sessions import apply_mask, check_new
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


def test_new_values_are_validated_after_the_mask():
    with pytest.raises(InvalidArgument) as exc:
        apply_mask(
            CURRENT,
            update(["settings.retrieval_top_k"], settings=pb.SessionSettings(retrieval_top_k=50)),
        )
    assert [v.field for v in exc.value.field_violations] == ["session.settings.retrieval_top_k"]


def test_new_sessions_are_validated():
    check_new(pb.CreateSessionRequest(title="ok", settings=pb.SessionSettings(collection="docs")))
    with pytest.raises(InvalidArgument) as exc:
        check_new(
            pb.CreateSessionRequest(
                settings=pb.SessionSettings(allowed_tools=["x" * 65], tier=99, priority=42)
            )
        )
    assert [v.field for v in exc.value.field_violations] == [
        "settings.allowed_tools",
        "settings.tier",
        "settings.priority",
    ]
