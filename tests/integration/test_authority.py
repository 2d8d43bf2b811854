"""Who may do what, through Envoy with real credentials, for every public RPC.

The RPCs are read from the service descriptors, so a new RPC is covered the moment it
exists: it fails `test_every_rpc_has_a_cross_tenant_case` until it gets a case here.
For each RPC:

- the principals its contract leaves out are refused at the edge with PERMISSION_DENIED
  `PRINCIPAL_NOT_ALLOWED` (tenant keys on operator RPCs, operator credentials on
  tenants' data RPCs);
- tenant A, with its own key, names tenant B's resources (ids, tenant fields, names) in
  the request: B's resources are invisible to A (NOT_FOUND, PERMISSION_DENIED
  `TENANT_MISMATCH`, or absent from A's listings) and stay as they were.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool, field_mask_pb2, message_factory
from switchboard.admission.v1 import admission_pb2 as adm
from switchboard.admission.v1 import admission_service_pb2_grpc
from switchboard.auth.v1 import auth_pb2 as keys
from switchboard.auth.v1 import auth_service_pb2_grpc
from switchboard.chat.v1 import chat_pb2 as chat
from switchboard.chat.v1 import chat_service_pb2_grpc
from switchboard.common.v1 import authority_pb2, common_pb2
from switchboard.execution.v1 import execution_pb2 as exe
from switchboard.execution.v1 import execution_service_pb2_grpc
from switchboard.inference.v1 import inference_pb2 as inf
from switchboard.inference.v1 import inference_service_pb2_grpc
from switchboard.rag.v1 import rag_pb2, rag_service_pb2_grpc

from services.auth import keys as key_format
from services.runtime import Principal, error_details, method_contract, public_services
from tests.integration.conftest import as_operator, as_tenant
from tests.polling import eventually

TIMEOUT = 20


def every_method() -> list[Any]:
    pool = descriptor_pool.Default()
    return [m for s in public_services() for m in pool.FindServiceByName(s).methods]


@dataclass
class World:
    """Tenant B's resources, which tenant A tries to reach."""

    a: str
    b: str
    admission: admission_service_pb2_grpc.AdmissionServiceStub
    inference: inference_service_pb2_grpc.InferenceServiceStub
    rag: rag_service_pb2_grpc.RagServiceStub
    execution: execution_service_pb2_grpc.ExecutionServiceStub
    chat: chat_service_pb2_grpc.ChatServiceStub
    keys: auth_service_pb2_grpc.KeyServiceStub
    session_id: str = ""
    task_id: str = ""
    idempotency_key: str = ""
    collection: str = ""
    document_id: str = ""

    def as_a(self) -> tuple[tuple[str, str], ...]:
        return as_tenant(self.a)

    def as_b(self) -> tuple[tuple[str, str], ...]:
        return as_tenant(self.b)


@pytest.fixture(scope="module")
async def world(envoy_target: str) -> AsyncIterator[World]:
    suffix = uuid.uuid4().hex[:8]
    async with grpc.aio.insecure_channel(envoy_target) as channel:
        w = World(
            a=f"attacker-{suffix}",
            b=f"victim-{suffix}",
            admission=admission_service_pb2_grpc.AdmissionServiceStub(channel),
            inference=inference_service_pb2_grpc.InferenceServiceStub(channel),
            rag=rag_service_pb2_grpc.RagServiceStub(channel),
            execution=execution_service_pb2_grpc.ExecutionServiceStub(channel),
            chat=chat_service_pb2_grpc.ChatServiceStub(channel),
            keys=auth_service_pb2_grpc.KeyServiceStub(channel),
        )
        # B's stored policy (an operator's doing)
        await w.admission.UpdatePolicy(
            adm.UpdatePolicyRequest(
                policy=adm.Policy(tenant_id=w.b, max_in_flight=7),
                update_mask=field_mask_pb2.FieldMask(paths=["max_in_flight"]),
            ),
            metadata=as_operator(w.b),
            timeout=TIMEOUT,
        )
        # B's chat session, task, collection and document
        w.session_id = (
            await w.chat.CreateSession(
                chat.CreateSessionRequest(title="b's session"), metadata=w.as_b(), timeout=TIMEOUT
            )
        ).session.session_id
        w.idempotency_key = f"shared-key-{suffix}"
        w.task_id = (
            await w.execution.SubmitTask(
                exe.SubmitTaskRequest(
                    idempotency_key=w.idempotency_key,
                    steps=[
                        exe.Step(
                            name="wait",
                            code=exe.CodeStep(code="import time\ntime.sleep(8)\n'done'"),
                        )
                    ],
                ),
                metadata=w.as_b(),
                timeout=TIMEOUT,
            )
        ).task.task_id
        w.collection, w.document_id = f"vault-{suffix}", "secret-plan"
        await ingest(w, w.as_b(), "The secret plan is to launch on Tuesday.")
        try:
            yield w
        finally:
            await w.execution.CancelTask(
                exe.CancelTaskRequest(task_id=w.task_id), metadata=w.as_b(), timeout=TIMEOUT
            )


async def ingest(w: World, metadata: Any, text: str) -> rag_pb2.IngestDocumentsResponse:
    async def documents() -> AsyncIterator[rag_pb2.IngestDocumentsRequest]:
        yield rag_pb2.IngestDocumentsRequest(
            document=rag_pb2.Document(document_id=w.document_id, collection=w.collection, text=text)
        )

    reply = await w.rag.IngestDocuments(documents(), metadata=metadata, timeout=TIMEOUT)
    assert [r.error.code for r in reply.results] == [0], reply
    return reply


async def refused(call: Awaitable[Any], code: grpc.StatusCode, reason: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    details = error_details(err.value)
    assert (details.code, details.error_info.reason) == (code, reason), details
    assert details.error_info_count == 1


async def not_allowed(call: Awaitable[Any]) -> None:
    """The edge refused the call for the kind of credential it carried."""
    await refused(call, grpc.StatusCode.PERMISSION_DENIED, "PRINCIPAL_NOT_ALLOWED")


async def b_in_flight(w: World) -> int:
    reply = await w.admission.GetQuota(adm.GetQuotaRequest(), metadata=w.as_b(), timeout=TIMEOUT)
    return reply.quota.in_flight


async def b_still_has_everything(w: World) -> None:
    """B's resources as B sees them: unchanged by whatever A tried."""
    policy = await w.admission.GetPolicy(adm.GetPolicyRequest(), metadata=w.as_b())
    assert not policy.is_default and policy.policy.max_in_flight == 7
    session = await w.chat.GetSession(
        chat.GetSessionRequest(session_id=w.session_id), metadata=w.as_b(), timeout=TIMEOUT
    )
    assert session.session.title == "b's session"
    task = await w.execution.GetTask(
        exe.GetTaskRequest(task_id=w.task_id), metadata=w.as_b(), timeout=TIMEOUT
    )
    assert task.task.state != exe.TASK_STATE_CANCELLED
    found = await w.rag.Retrieve(
        rag_pb2.RetrieveRequest(collection=w.collection, query="secret plan", top_k=3),
        metadata=w.as_b(),
        timeout=TIMEOUT,
    )
    assert any("Tuesday" in r.text for r in found.chunks)


# -- one case per RPC: tenant A names tenant B's things ------------------------------------


async def generate(w: World) -> None:
    # B's session id as the affinity key: only picks a backend; B's session is untouched
    request = inf.GenerateRequest(prompt="What is the plan?", session_id=w.session_id)
    replies = [r async for r in w.inference.Generate(request, metadata=w.as_a(), timeout=30)]
    assert replies[-1].HasField("complete")
    assert "Tuesday" not in "".join(r.token.text for r in replies if r.HasField("token"))


async def embed(w: World) -> None:  # takes no tenant's resource
    reply = await w.inference.Embed(inf.EmbedRequest(texts=["x"]), metadata=w.as_a())
    assert len(reply.embeddings) == 1


async def list_models(w: World) -> None:  # the catalogue is the platform's, not a tenant's
    reply = await w.inference.ListModels(inf.ListModelsRequest(), metadata=w.as_a())
    assert reply.models


def b_context(w: World, request_id: str = "") -> common_pb2.RequestContext:
    return common_pb2.RequestContext(tenant_id=w.b, request_id=request_id)


async def admit(w: World) -> None:
    call = w.admission.Admit(adm.AdmitRequest(context=b_context(w)), metadata=w.as_a())
    await refused(call, grpc.StatusCode.PERMISSION_DENIED, "TENANT_MISMATCH")


async def admit_stream(w: World) -> None:
    request = adm.AdmitStreamRequest(request=adm.AdmitRequest(context=b_context(w)))
    stream = w.admission.AdmitStream(request, metadata=w.as_a(), timeout=TIMEOUT)

    async def drain() -> None:
        async for _ in stream:
            pass

    await refused(drain(), grpc.StatusCode.PERMISSION_DENIED, "TENANT_MISMATCH")


async def admit_session(w: World) -> None:
    session = w.admission.AdmitSession(metadata=w.as_a(), timeout=TIMEOUT)
    await session.write(
        adm.AdmitSessionRequest(request=adm.AdmitRequest(context=b_context(w, "x")))
    )
    reply = await session.read()
    assert reply.request_id == "x"
    details = error_details(reply.refused)
    assert (details.code, details.error_info.reason) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "TENANT_MISMATCH",
    )
    await session.done_writing()
    assert await session.read() is grpc.aio.EOF


async def release(w: World) -> None:
    attempt_id = f"b-attempt-{uuid.uuid4().hex[:8]}"
    admitted = await w.admission.Admit(
        adm.AdmitRequest(context=common_pb2.RequestContext(request_id=attempt_id)),
        metadata=w.as_b(),
        timeout=TIMEOUT,
    )
    lease_id = admitted.lease.lease_id
    try:
        await refused(
            w.admission.Release(adm.ReleaseRequest(lease_id=lease_id), metadata=w.as_a()),
            grpc.StatusCode.NOT_FOUND,
            "LEASE_NOT_FOUND",
        )
        # attempt ids are per tenant: B's means nothing among A's
        by_attempt = adm.ReleaseRequest(request_id=attempt_id)
        assert not (await w.admission.Release(by_attempt, metadata=w.as_a())).released
        assert await b_in_flight(w) == 1
    finally:
        mine = await w.admission.Release(adm.ReleaseRequest(lease_id=lease_id), metadata=w.as_b())
    assert mine.released


async def get_quota(w: World) -> None:
    await refused(
        w.admission.GetQuota(adm.GetQuotaRequest(tenant_id=w.b), metadata=w.as_a()),
        grpc.StatusCode.PERMISSION_DENIED,
        "TENANT_MISMATCH",
    )
    # a spoofed x-tenant-id is overwritten at the edge: A reads its own quota
    spoofed = (*w.as_a(), ("x-tenant-id", w.b))
    reply = await w.admission.GetQuota(adm.GetQuotaRequest(), metadata=spoofed)
    assert reply.quota.tenant_id == w.a and reply.quota.in_flight == 0


async def get_policy(w: World) -> None:
    await refused(
        w.admission.GetPolicy(adm.GetPolicyRequest(tenant_id=w.b), metadata=w.as_a()),
        grpc.StatusCode.PERMISSION_DENIED,
        "TENANT_MISMATCH",
    )
    own = await w.admission.GetPolicy(adm.GetPolicyRequest(), metadata=w.as_a())
    assert own.policy.tenant_id == w.a and own.is_default


async def update_policy(w: World) -> None:
    for tenant in (w.b, w.a):  # neither another's nor its own
        request = adm.UpdatePolicyRequest(
            policy=adm.Policy(tenant_id=tenant, max_in_flight=1, weight=1000)
        )
        await refused(
            w.admission.UpdatePolicy(request, metadata=w.as_a()),
            grpc.StatusCode.PERMISSION_DENIED,
            "PRINCIPAL_NOT_ALLOWED",
        )


async def list_policies(w: World) -> None:
    await not_allowed(w.admission.ListPolicies(adm.ListPoliciesRequest(), metadata=w.as_a()))


async def delete_policy(w: World) -> None:
    await not_allowed(
        w.admission.DeletePolicy(adm.DeletePolicyRequest(tenant_id=w.b), metadata=w.as_a())
    )


async def ingest_documents(w: World) -> None:
    # the same collection and document id land in A's own namespace
    await ingest(w, w.as_a(), "A's own text about something else entirely.")
    mine = await w.rag.Retrieve(
        rag_pb2.RetrieveRequest(collection=w.collection, query="secret plan", top_k=5),
        metadata=w.as_a(),
    )
    assert mine.chunks and all("Tuesday" not in r.text for r in mine.chunks)
    # and are A's to delete, leaving B's alone
    await w.rag.DeleteDocument(
        rag_pb2.DeleteDocumentRequest(collection=w.collection, document_id=w.document_id),
        metadata=w.as_a(),
    )


async def ingest_document(w: World) -> None:
    # one document, unary: the same collection and id again land in A's own namespace
    document = rag_pb2.Document(
        document_id=w.document_id, collection=w.collection, text="A's note on gardening."
    )
    reply = await w.rag.IngestDocument(
        rag_pb2.IngestDocumentRequest(document=document), metadata=w.as_a(), timeout=TIMEOUT
    )
    assert reply.result.chunks == 1
    request = rag_pb2.RetrieveRequest(collection=w.collection, query="secret plan", top_k=5)
    mine = await w.rag.Retrieve(request, metadata=w.as_a(), timeout=TIMEOUT)
    assert mine.chunks and all("Tuesday" not in c.text for c in mine.chunks)
    theirs = await w.rag.Retrieve(request, metadata=w.as_b(), timeout=TIMEOUT)
    assert any("Tuesday" in c.text for c in theirs.chunks)  # B's document is untouched
    await w.rag.DeleteDocument(
        rag_pb2.DeleteDocumentRequest(collection=w.collection, document_id=w.document_id),
        metadata=w.as_a(),
    )


async def retrieve(w: World) -> None:
    request = rag_pb2.RetrieveRequest(collection=w.collection, query="secret plan", top_k=5)
    await refused(
        w.rag.Retrieve(request, metadata=w.as_a()),
        grpc.StatusCode.NOT_FOUND,
        "COLLECTION_NOT_FOUND",
    )


async def delete_document(w: World) -> None:
    request = rag_pb2.DeleteDocumentRequest(collection=w.collection, document_id=w.document_id)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await w.rag.DeleteDocument(request, metadata=w.as_a())
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def list_collections(w: World) -> None:
    reply = await w.rag.ListCollections(rag_pb2.ListCollectionsRequest(), metadata=w.as_a())
    assert w.collection not in [c.name for c in reply.collections]


def small_task(key: str = "") -> exe.SubmitTaskRequest:
    return exe.SubmitTaskRequest(
        idempotency_key=key, steps=[exe.Step(name="m", tool=exe.ToolStep(tool="list_models"))]
    )


async def submit_task(w: World) -> None:
    # B's idempotency key is only a key among A's own: A gets a task of its own
    reply = await w.execution.SubmitTask(small_task(w.idempotency_key), metadata=w.as_a())
    assert reply.task.task_id != w.task_id


async def submit_tasks(w: World) -> None:
    batch = exe.SubmitTasksRequest(tasks=[small_task(w.idempotency_key + "-batch")])
    reply = await w.execution.SubmitTasks(batch, metadata=w.as_a())
    assert reply.results[0].submitted.task.task_id not in ("", w.task_id)


async def get_task(w: World) -> None:
    await refused(
        w.execution.GetTask(exe.GetTaskRequest(task_id=w.task_id), metadata=w.as_a()),
        grpc.StatusCode.NOT_FOUND,
        "TASK_NOT_FOUND",
    )


async def list_tasks(w: World) -> None:
    reply = await w.execution.ListTasks(exe.ListTasksRequest(), metadata=w.as_a())
    assert w.task_id not in [t.task_id for t in reply.tasks]


async def watch_task(w: World) -> None:
    async def drain() -> None:
        async for _ in w.execution.WatchTask(
            exe.WatchTaskRequest(task_id=w.task_id), metadata=w.as_a(), timeout=TIMEOUT
        ):
            pass

    await refused(drain(), grpc.StatusCode.NOT_FOUND, "TASK_NOT_FOUND")


async def cancel_task(w: World) -> None:
    await refused(
        w.execution.CancelTask(exe.CancelTaskRequest(task_id=w.task_id), metadata=w.as_a()),
        grpc.StatusCode.NOT_FOUND,
        "TASK_NOT_FOUND",
    )


async def run_code(w: World) -> None:  # a fresh sandbox, nobody's resource
    reply = await w.execution.RunCode(exe.RunCodeRequest(code="6 * 7"), metadata=w.as_a())
    assert reply.result == "42"


async def converse(w: World) -> None:
    for first in (
        chat.ConverseRequest(open=chat.OpenSession(session_id=w.session_id)),
        chat.ConverseRequest(resume=chat.ResumeSession(session_id=w.session_id)),
    ):
        stream = w.chat.Converse(metadata=w.as_a(), timeout=TIMEOUT)
        await stream.write(first)

        async def drain(stream: Any = stream) -> None:
            while await stream.read() is not grpc.aio.EOF:
                pass

        await refused(drain(), grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")


async def create_session(w: World) -> None:  # A's session, which B does not see
    created = await w.chat.CreateSession(chat.CreateSessionRequest(title="a"), metadata=w.as_a())
    theirs = await w.chat.ListSessions(chat.ListSessionsRequest(), metadata=w.as_b())
    assert created.session.session_id not in [s.session_id for s in theirs.sessions]


async def get_session(w: World) -> None:
    await refused(
        w.chat.GetSession(chat.GetSessionRequest(session_id=w.session_id), metadata=w.as_a()),
        grpc.StatusCode.NOT_FOUND,
        "SESSION_NOT_FOUND",
    )


async def list_sessions(w: World) -> None:
    reply = await w.chat.ListSessions(chat.ListSessionsRequest(), metadata=w.as_a())
    assert w.session_id not in [s.session_id for s in reply.sessions]


async def update_session(w: World) -> None:
    request = chat.UpdateSessionRequest(
        session=chat.Session(session_id=w.session_id, title="taken over"),
        update_mask=field_mask_pb2.FieldMask(paths=["title"]),
    )
    await refused(
        w.chat.UpdateSession(request, metadata=w.as_a()),
        grpc.StatusCode.NOT_FOUND,
        "SESSION_NOT_FOUND",
    )


async def delete_session(w: World) -> None:
    await refused(
        w.chat.DeleteSession(chat.DeleteSessionRequest(session_id=w.session_id), metadata=w.as_a()),
        grpc.StatusCode.NOT_FOUND,
        "SESSION_NOT_FOUND",
    )


async def list_messages(w: World) -> None:
    await refused(
        w.chat.ListMessages(chat.ListMessagesRequest(session_id=w.session_id), metadata=w.as_a()),
        grpc.StatusCode.NOT_FOUND,
        "SESSION_NOT_FOUND",
    )


async def send_message(w: World) -> None:
    request = chat.SendMessageRequest(
        session_id=w.session_id, message=chat.UserMessage(client_message_id="a-1", text="hi")
    )
    await refused(
        w.chat.SendMessage(request, metadata=w.as_a()),
        grpc.StatusCode.NOT_FOUND,
        "SESSION_NOT_FOUND",
    )


async def cancel_turn(w: World) -> None:
    await refused(
        w.chat.CancelTurn(chat.CancelTurnRequest(session_id=w.session_id), metadata=w.as_a()),
        grpc.StatusCode.NOT_FOUND,
        "SESSION_NOT_FOUND",
    )


async def stream_events(w: World) -> None:
    stream = w.chat.StreamEvents(
        chat.StreamEventsRequest(session_id=w.session_id), metadata=w.as_a(), timeout=TIMEOUT
    )
    await refused(stream.read(), grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")


async def create_key(w: World) -> None:  # a key for B would let A act as B
    await not_allowed(w.keys.CreateKey(keys.CreateKeyRequest(tenant_id=w.b), metadata=w.as_a()))


async def list_keys(w: World) -> None:
    await not_allowed(w.keys.ListKeys(keys.ListKeysRequest(tenant_id=w.b), metadata=w.as_a()))


async def revoke_key(w: World) -> None:
    # B's own key: A must not revoke it
    b_key_id, _ = key_format.parse(w.as_b()[0][1].removeprefix("Bearer ")) or ("", "")
    await not_allowed(w.keys.RevokeKey(keys.RevokeKeyRequest(key_id=b_key_id), metadata=w.as_a()))
    # the key is still active (the edge's key cache alone would hide a revocation)
    listed = await w.keys.ListKeys(keys.ListKeysRequest(tenant_id=w.b), metadata=as_operator())
    assert [(k.key_id, k.HasField("revoke_time")) for k in listed.keys] == [(b_key_id, False)]


async def list_tenants(w: World) -> None:
    await not_allowed(w.keys.ListTenants(keys.ListTenantsRequest(), metadata=w.as_a()))


CASES: dict[str, Callable[[World], Awaitable[None]]] = {
    "switchboard.inference.v1.InferenceService.Generate": generate,
    "switchboard.inference.v1.InferenceService.Embed": embed,
    "switchboard.inference.v1.InferenceService.ListModels": list_models,
    "switchboard.admission.v1.AdmissionService.Admit": admit,
    "switchboard.admission.v1.AdmissionService.AdmitStream": admit_stream,
    "switchboard.admission.v1.AdmissionService.AdmitSession": admit_session,
    "switchboard.admission.v1.AdmissionService.Release": release,
    "switchboard.admission.v1.AdmissionService.GetQuota": get_quota,
    "switchboard.admission.v1.AdmissionService.GetPolicy": get_policy,
    "switchboard.admission.v1.AdmissionService.UpdatePolicy": update_policy,
    "switchboard.admission.v1.AdmissionService.ListPolicies": list_policies,
    "switchboard.admission.v1.AdmissionService.DeletePolicy": delete_policy,
    # before A has a collection of the same name (IngestDocuments makes one)
    "switchboard.rag.v1.RagService.Retrieve": retrieve,
    "switchboard.rag.v1.RagService.DeleteDocument": delete_document,
    "switchboard.rag.v1.RagService.ListCollections": list_collections,
    "switchboard.rag.v1.RagService.IngestDocuments": ingest_documents,
    "switchboard.rag.v1.RagService.IngestDocument": ingest_document,
    "switchboard.execution.v1.ExecutionService.SubmitTask": submit_task,
    "switchboard.execution.v1.ExecutionService.SubmitTasks": submit_tasks,
    "switchboard.execution.v1.ExecutionService.GetTask": get_task,
    "switchboard.execution.v1.ExecutionService.ListTasks": list_tasks,
    "switchboard.execution.v1.ExecutionService.WatchTask": watch_task,
    "switchboard.execution.v1.ExecutionService.CancelTask": cancel_task,
    "switchboard.execution.v1.ExecutionService.RunCode": run_code,
    "switchboard.chat.v1.ChatService.Converse": converse,
    "switchboard.chat.v1.ChatService.CreateSession": create_session,
    "switchboard.chat.v1.ChatService.GetSession": get_session,
    "switchboard.chat.v1.ChatService.ListSessions": list_sessions,
    "switchboard.chat.v1.ChatService.UpdateSession": update_session,
    "switchboard.chat.v1.ChatService.DeleteSession": delete_session,
    "switchboard.chat.v1.ChatService.ListMessages": list_messages,
    "switchboard.chat.v1.ChatService.SendMessage": send_message,
    "switchboard.chat.v1.ChatService.CancelTurn": cancel_turn,
    "switchboard.chat.v1.ChatService.StreamEvents": stream_events,
    "switchboard.auth.v1.KeyService.CreateKey": create_key,
    "switchboard.auth.v1.KeyService.ListKeys": list_keys,
    "switchboard.auth.v1.KeyService.RevokeKey": revoke_key,
    "switchboard.auth.v1.KeyService.ListTenants": list_tenants,
}


def test_every_rpc_has_a_cross_tenant_case():
    assert set(CASES) == {m.full_name for m in every_method()}


async def test_another_tenants_resources_are_invisible_and_unchangeable(world):
    for name, case in CASES.items():
        try:
            await case(world)
        except BaseException as exc:
            raise AssertionError(f"{name}: {exc}") from exc
        await b_still_has_everything(world)


# -- principals the contract leaves out ------------------------------------------------------


async def call_raw(channel: grpc.aio.Channel, method: Any, metadata: Any) -> None:
    """Calls `method` with an empty request (the edge decides before reading it)."""
    request = message_factory.GetMessageClass(method.input_type)()
    response = message_factory.GetMessageClass(method.output_type)
    path = f"/{method.containing_service.full_name}/{method.name}"
    kinds = (method.client_streaming, method.server_streaming)
    options = {
        "request_serializer": type(request).SerializeToString,
        "response_deserializer": response.FromString,
    }
    if kinds == (False, False):
        await channel.unary_unary(path, **options)(request, metadata=metadata, timeout=TIMEOUT)
    elif kinds == (False, True):
        async for _ in channel.unary_stream(path, **options)(
            request, metadata=metadata, timeout=TIMEOUT
        ):
            pass
    elif kinds == (True, False):
        await channel.stream_unary(path, **options)(
            iter([request]), metadata=metadata, timeout=TIMEOUT
        )
    else:
        async for _ in channel.stream_stream(path, **options)(
            iter([request]), metadata=metadata, timeout=TIMEOUT
        ):
            pass


@pytest.mark.parametrize("principal", list(Principal), ids=lambda p: p.header_value)
async def test_a_credential_the_contract_leaves_out_is_refused_at_the_edge(envoy_target, principal):
    metadata = as_operator() if principal is Principal.OPERATOR else as_tenant("outsider")
    refused_methods = [
        m for m in every_method() if principal not in method_contract(m.full_name).principals
    ]
    assert refused_methods, "each kind of credential is refused somewhere"
    async with grpc.aio.insecure_channel(envoy_target) as channel:
        for method in refused_methods:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call_raw(channel, method, metadata)
            details = error_details(err.value)
            assert details.code == grpc.StatusCode.PERMISSION_DENIED, method.full_name
            assert details.error_info.reason == "PRINCIPAL_NOT_ALLOWED", method.full_name
            assert details.error_info.metadata["method"] == method.full_name


async def test_an_operator_manages_any_tenants_policy_and_reads_its_quota(world):
    w, tenant = world, f"managed-{uuid.uuid4().hex[:8]}"
    stored = await w.admission.UpdatePolicy(
        adm.UpdatePolicyRequest(
            policy=adm.Policy(tenant_id=tenant, weight=3),
            update_mask=field_mask_pb2.FieldMask(paths=["weight"]),
        ),
        metadata=as_operator(),
    )
    assert stored.policy.weight == 3
    listed = await w.admission.ListPolicies(
        adm.ListPoliciesRequest(tenant_id=tenant), metadata=as_operator()
    )
    assert [p.tenant_id for p in listed.policies] == [tenant]
    # the tenant itself reads it, and cannot change it
    own = await w.admission.GetPolicy(adm.GetPolicyRequest(), metadata=as_tenant(tenant))
    assert own.policy.weight == 3
    # an operator reads a tenant's live quota, routed by the x-tenant-id it sends
    held = await w.admission.Admit(adm.AdmitRequest(), metadata=w.as_b(), timeout=TIMEOUT)
    quota = await w.admission.GetQuota(
        adm.GetQuotaRequest(tenant_id=w.b), metadata=as_operator(w.b)
    )
    await w.admission.Release(adm.ReleaseRequest(lease_id=held.lease.lease_id), metadata=w.as_b())
    assert quota.quota.tenant_id == w.b and quota.quota.in_flight == 1
    deleted = await w.admission.DeletePolicy(
        adm.DeletePolicyRequest(tenant_id=tenant), metadata=as_operator()
    )
    assert deleted.deleted


async def test_no_operator_authority_travels_through_the_internal_listener(mesh):
    """The services' listener trusts `x-tenant-id` but drops a claimed principal: a call
    there is a tenant's, so an operator RPC is refused even when the caller says
    `operator`."""
    async with grpc.aio.insecure_channel(mesh.internal_address) as channel:
        stub = admission_service_pb2_grpc.AdmissionServiceStub(channel)
        request = adm.UpdatePolicyRequest(policy=adm.Policy(tenant_id="anyone", weight=9))
        claims = (("x-tenant-id", "anyone"), ("x-switchboard-principal", "operator"))
        await refused(
            stub.UpdatePolicy(request, metadata=claims, timeout=TIMEOUT),
            grpc.StatusCode.PERMISSION_DENIED,
            "PRINCIPAL_NOT_ALLOWED",
        )


async def test_an_operator_manages_keys_and_lists_tenants(world):
    w, tenant = world, f"onboarded-{uuid.uuid4().hex[:8]}"
    created = await w.keys.CreateKey(
        keys.CreateKeyRequest(tenant_id=tenant, name="first key"), metadata=as_operator()
    )
    assert created.key.tenant_id == tenant
    # a token the mesh signed, whose id is the key's (the auth service has the signing key)
    assert created.token.count(".") == 2 and created.token.startswith("eyJ")
    assert key_format.parse(created.token) == (created.key.key_id, created.token)
    assert created.key.principal == authority_pb2.PRINCIPAL_TENANT
    as_new = (("authorization", f"Bearer {created.token}"),)
    # the key works, for its tenant alone
    quota = await w.admission.GetQuota(adm.GetQuotaRequest(), metadata=as_new, timeout=TIMEOUT)
    assert quota.quota.tenant_id == tenant

    listed = await w.keys.ListKeys(keys.ListKeysRequest(tenant_id=tenant), metadata=as_operator())
    assert [k.key_id for k in listed.keys] == [created.key.key_id]
    assert not listed.keys[0].HasField("revoke_time")
    assert created.token.split(".")[2] not in str(listed)  # never the key itself

    w.as_a()  # A's key exists whichever tests ran before this one
    tenants, token = [], ""
    while True:
        page = await w.keys.ListTenants(
            keys.ListTenantsRequest(page_size=50, page_token=token), metadata=as_operator()
        )
        tenants += [t.tenant_id for t in page.tenants]
        if not (token := page.next_page_token):
            break
    assert {tenant, w.a, w.b} <= set(tenants) and tenants == sorted(tenants)

    revoked = await w.keys.RevokeKey(
        keys.RevokeKeyRequest(key_id=created.key.key_id), metadata=as_operator()
    )
    assert revoked.revoked
    again = await w.keys.RevokeKey(
        keys.RevokeKeyRequest(key_id=created.key.key_id), metadata=as_operator()
    )
    assert not again.revoked
    await refused(
        w.keys.RevokeKey(keys.RevokeKeyRequest(key_id="0" * 12), metadata=as_operator()),
        grpc.StatusCode.NOT_FOUND,
        "KEY_NOT_FOUND",
    )

    async def refused_at_the_edge() -> bool:
        try:
            await w.admission.GetQuota(adm.GetQuotaRequest(), metadata=as_new, timeout=TIMEOUT)
        except grpc.aio.AioRpcError as err:
            return error_details(err).error_info.reason == "API_KEY_INVALID"
        return False

    # the test mesh caches keys for 2 s
    await eventually(refused_at_the_edge, timeout=10, interval=0.2, what="the revoked key fails")
