"""ChatService sessions and history, through Envoy, on the mesh's PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
from google.protobuf import field_mask_pb2
from switchboard.chat.v1 import chat_pb2 as pb
from switchboard.chat.v1 import chat_service_pb2_grpc
from switchboard.common.v1 import common_pb2

from services.chat.store import SessionStore
from services.runtime import error_details
from tests.integration.conftest import as_tenant


def new_tenant() -> str:
    return f"tenant-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def chat(envoy_target: str):
    async with grpc.aio.insecure_channel(envoy_target) as channel:
        yield chat_service_pb2_grpc.ChatServiceStub(channel)


async def create(stub, tenant: str, title: str = "", **settings) -> pb.Session:
    reply = await stub.CreateSession(
        pb.CreateSessionRequest(title=title, settings=pb.SessionSettings(**settings)),
        metadata=as_tenant(tenant),
        timeout=10,
    )
    return reply.session


async def test_sessions_are_created_read_updated_listed_and_deleted(chat):
    tenant = new_tenant()
    session = await create(
        chat, tenant, "support", system_prompt="Be brief.", collection="handbook",
        retrieval_top_k=4, allowed_tools=["retrieve"], priority=common_pb2.PRIORITY_BATCH,
    )  # fmt: skip
    assert session.session_id and session.message_count == 0
    got = (
        await chat.GetSession(
            pb.GetSessionRequest(session_id=session.session_id), metadata=as_tenant(tenant)
        )
    ).session
    assert got == session
    changed = (
        await chat.UpdateSession(
            pb.UpdateSessionRequest(
                session=pb.Session(
                    session_id=session.session_id,
                    title="ignored",
                    settings=pb.SessionSettings(system_prompt="Be thorough.", retrieval_top_k=9),
                ),
                update_mask=field_mask_pb2.FieldMask(paths=["settings.system_prompt"]),
            ),
            metadata=as_tenant(tenant),
        )
    ).session
    assert changed.title == "support"
    assert changed.settings.system_prompt == "Be thorough."
    assert changed.settings.retrieval_top_k == 4  # not in the mask: unchanged
    assert list(changed.settings.allowed_tools) == ["retrieve"]
    assert changed.update_time.ToDatetime() >= session.update_time.ToDatetime()

    others = [await create(chat, tenant, f"s{i}") for i in range(4)]
    seen, token = [], ""
    while True:
        page = await chat.ListSessions(
            pb.ListSessionsRequest(page_size=2, page_token=token), metadata=as_tenant(tenant)
        )
        seen += [s.session_id for s in page.sessions]
        token = page.next_page_token
        if not token:
            break
    assert sorted(seen) == sorted([session.session_id, *(o.session_id for o in others)])
    assert seen[0] == others[-1].session_id  # most recently updated first

    await chat.DeleteSession(
        pb.DeleteSessionRequest(session_id=session.session_id), metadata=as_tenant(tenant)
    )
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await chat.GetSession(
            pb.GetSessionRequest(session_id=session.session_id), metadata=as_tenant(tenant)
        )
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND


async def test_another_tenants_session_is_not_found(chat):
    owner, stranger = new_tenant(), new_tenant()
    session = await create(chat, owner, "private")
    sid = session.session_id
    them = as_tenant(stranger)
    calls = [
        chat.GetSession(pb.GetSessionRequest(session_id=sid), metadata=them),
        chat.DeleteSession(pb.DeleteSessionRequest(session_id=sid), metadata=them),
        chat.ListMessages(pb.ListMessagesRequest(session_id=sid), metadata=them),
        chat.UpdateSession(
            pb.UpdateSessionRequest(
                session=pb.Session(session_id=sid, title="mine now"),
                update_mask=field_mask_pb2.FieldMask(paths=["title"]),
            ),
            metadata=them,
        ),
        chat.GetSession(pb.GetSessionRequest(session_id="not-a-uuid"), metadata=as_tenant(owner)),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await call
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND  # not PERMISSION_DENIED
        assert error_details(exc.value).error_info.reason == "SESSION_NOT_FOUND"
    listed = await chat.ListSessions(pb.ListSessionsRequest(), metadata=as_tenant(stranger))
    assert list(listed.sessions) == []
    still = await chat.GetSession(
        pb.GetSessionRequest(session_id=session.session_id), metadata=as_tenant(owner)
    )
    assert still.session.title == "private"


async def test_invalid_session_requests_name_their_fields(chat):
    tenant = new_tenant()
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await create(chat, tenant, "t" * 201, retrieval_top_k=21, collection="bad name!")
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = [v.field for v in error_details(exc.value).field_violations]
    assert fields == ["title", "settings.collection", "settings.retrieval_top_k"]
    session = await create(chat, tenant)
    for paths, field in ((["message_count"], "update_mask"), ([], "update_mask")):
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await chat.UpdateSession(
                pb.UpdateSessionRequest(
                    session=pb.Session(session_id=session.session_id),
                    update_mask=field_mask_pb2.FieldMask(paths=paths),
                ),
                metadata=as_tenant(tenant),
            )
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in error_details(exc.value).field_violations] == [field]
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await chat.ListSessions(
            pb.ListSessionsRequest(page_token="garbage"), metadata=as_tenant(tenant)
        )
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_converse_refuses_an_empty_first_frame(chat):
    async def frames():
        yield pb.ConverseRequest()

    with pytest.raises(grpc.aio.AioRpcError) as exc:
        async for _ in chat.Converse(frames(), metadata=as_tenant(new_tenant()), timeout=10):
            pass
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(exc.value).error_info.reason == "FRAME_OUT_OF_ORDER"
    assert "an empty frame" in exc.value.details()


async def test_history_appends_are_gapless_and_listed_in_pages(chat, mesh):
    tenant = new_tenant()
    session = await create(chat, tenant)
    store = SessionStore(mesh.database_url, pool_size=8)
    await store.open()
    try:
        stored = await asyncio.gather(
            *(
                store.append(
                    tenant,
                    session.session_id,
                    pb.Message(
                        role=pb.MESSAGE_ROLE_USER if i % 2 == 0 else pb.MESSAGE_ROLE_ASSISTANT,
                        status=pb.MESSAGE_STATUS_COMPLETED,
                        text=f"message {i}",
                        usage=common_pb2.TokenUsage(prompt_tokens=1, completion_tokens=i % 2),
                    ),
                )
                for i in range(60)
            )
        )
    finally:
        await store.close()
    assert sorted(m.sequence for m in stored) == list(range(1, 61))
    listed, token = [], ""
    while True:
        page = await chat.ListMessages(
            pb.ListMessagesRequest(session_id=session.session_id, page_size=25, page_token=token),
            metadata=as_tenant(tenant),
        )
        listed += list(page.messages)
        token = page.next_page_token
        if not token:
            break
    assert [m.sequence for m in listed] == list(range(1, 61))
    assert {m.text for m in listed} == {f"message {i}" for i in range(60)}
    got = (
        await chat.GetSession(
            pb.GetSessionRequest(session_id=session.session_id), metadata=as_tenant(tenant)
        )
    ).session
    assert got.message_count == 60
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (60, 30)
