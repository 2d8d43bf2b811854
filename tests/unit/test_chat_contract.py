"""ChatService's request and frame constraints, read from the contract's `buf.validate`
annotations: each rule names its field by path, and a valid request breaks none."""

from __future__ import annotations

import pytest
from google.protobuf import field_mask_pb2
from switchboard.chat.v1 import chat_pb2 as pb
from switchboard.inference.v1 import inference_pb2

from services.runtime import request_violations

SID = "00000000-0000-0000-0000-000000000001"


def fields(request) -> list[str]:
    return sorted(v.field for v in request_violations(request))


def new(**settings) -> pb.CreateSessionRequest:
    return pb.CreateSessionRequest(settings=pb.SessionSettings(**settings))


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (pb.CreateSessionRequest(title="t" * 201), ["title"]),
        (pb.CreateSessionRequest(title="a\x00b"), ["title"]),
        (new(system_prompt="p" * 16_001), ["settings.system_prompt"]),
        (new(collection="bad name!"), ["settings.collection"]),
        (new(collection="c" * 129), ["settings.collection"]),
        (new(retrieval_top_k=-1), ["settings.retrieval_top_k"]),
        (new(retrieval_top_k=21), ["settings.retrieval_top_k"]),
        (new(allowed_tools=["t"] * 33), ["settings.allowed_tools"]),
        (new(allowed_tools=["ok", ""]), ["settings.allowed_tools[1]"]),
        (new(allowed_tools=["t" * 65]), ["settings.allowed_tools[0]"]),
        (new(model="m" * 129), ["settings.model"]),
        (new(tier=99), ["settings.tier"]),
        (new(priority=42), ["settings.priority"]),
        (pb.GetSessionRequest(session_id="s" * 65), ["session_id"]),
        (pb.DeleteSessionRequest(session_id="s" * 65), ["session_id"]),
        (pb.ListSessionsRequest(page_size=-1), ["page_size"]),
        (pb.ListSessionsRequest(page_size=1001), ["page_size"]),
        (pb.ListSessionsRequest(page_token="x" * 513), ["page_token"]),
        (pb.ListMessagesRequest(session_id="s" * 65), ["session_id"]),
        (pb.ListMessagesRequest(session_id=SID, page_size=1001), ["page_size"]),
        (pb.ListMessagesRequest(session_id=SID, page_token="x" * 513), ["page_token"]),
        (pb.UpdateSessionRequest(), ["session", "update_mask"]),
        (
            pb.UpdateSessionRequest(
                session=pb.Session(
                    session_id=SID, title="t" * 201, settings=pb.SessionSettings(tier=5)
                ),
                update_mask=field_mask_pb2.FieldMask(paths=["title"]),
            ),
            ["session.settings.tier", "session.title"],
        ),
    ],
)
def test_request_rules(request_, expected):
    assert fields(request_) == expected


def frame(**kind) -> pb.ConverseRequest:
    return pb.ConverseRequest(**kind)


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (frame(open=pb.OpenSession(session_id="s" * 65)), ["open.session_id"]),
        (frame(resume=pb.ResumeSession(session_id="s" * 65)), ["resume.session_id"]),
        (
            frame(resume=pb.ResumeSession(session_id=SID, last_event_id="1" * 5000)),
            ["resume.last_event_id"],
        ),
        (frame(message=pb.UserMessage(text=" \n ")), ["message.text"]),
        (frame(message=pb.UserMessage(text="")), ["message.text"]),
        (
            frame(message=pb.UserMessage(text="hi", client_message_id="c" * 129)),
            ["message.client_message_id"],
        ),
        (
            frame(cancel=pb.CancelTurn(assistant_message_id="a" * 65)),
            ["cancel.assistant_message_id"],
        ),
        (frame(settings=pb.ChangeSettings()), ["settings.update_mask"]),
        (
            frame(
                settings=pb.ChangeSettings(
                    settings=pb.SessionSettings(retrieval_top_k=50, priority=7),
                    update_mask=field_mask_pb2.FieldMask(paths=["retrieval_top_k"]),
                )
            ),
            ["settings.settings.priority", "settings.settings.retrieval_top_k"],
        ),
        (  # GenerationParameters' own rules (inference.proto) apply in a frame too
            frame(
                settings=pb.ChangeSettings(
                    settings=pb.SessionSettings(
                        parameters=inference_pb2.GenerationParameters(max_tokens=5000)
                    ),
                    update_mask=field_mask_pb2.FieldMask(paths=["parameters"]),
                )
            ),
            ["settings.settings.parameters.max_tokens"],
        ),
    ],
)
def test_frame_rules(request_, expected):
    assert fields(request_) == expected


@pytest.mark.parametrize(
    "request_",
    [
        pb.CreateSessionRequest(
            title="t" * 200,
            settings=pb.SessionSettings(
                system_prompt="p" * 16_000,
                collection="docs.v-1_x",
                retrieval_top_k=20,
                allowed_tools=["t" * 64] * 32,
                model="m" * 128,
                tier=2,
                priority=2,
            ),
        ),
        new(collection="", retrieval_top_k=0),  # empty and 0 mean "none" and "default"
        pb.ListSessionsRequest(page_size=1000),
        pb.ListMessagesRequest(session_id=SID.upper()),
        pb.UpdateSessionRequest(
            session=pb.Session(session_id=SID), update_mask=field_mask_pb2.FieldMask()
        ),
        frame(resume=pb.ResumeSession(session_id=SID, last_event_id="abcd1234.17")),
        frame(message=pb.UserMessage(text="hi", client_message_id="c" * 128)),
        frame(cancel=pb.CancelTurn()),
    ],
)
def test_valid_requests_break_no_rule(request_):
    assert request_violations(request_) == []
