"""Every documented request constraint is enforced, one way, for every public RPC.

The constraints are read from the contracts themselves (`buf.validate` annotations in
the descriptors; `tests/violations.py` breaks each rule in turn, in an otherwise valid
request), and each broken request is sent through Envoy with a real credential. The
service must refuse it with INVALID_ARGUMENT, the reason `INVALID_REQUEST`, exactly one
`ErrorInfo`, and a field violation naming the field; where a streamed item is answered on
its own (an ingested document, a chat frame, an admission of AdmitSession, a task of
SubmitTasks), that item's status must say the same. Every reason seen is in the
catalogue. A new RPC fails `test_every_rpc_has_a_valid_request` until it has one here;
a new rule is exercised without a line changed.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import descriptor_pool, duration_pb2, field_mask_pb2, message_factory
from switchboard.admission.v1 import admission_pb2 as adm
from switchboard.admission.v1 import admission_service_pb2_grpc
from switchboard.auth.v1 import auth_pb2 as keys
from switchboard.chat.v1 import chat_pb2 as chat
from switchboard.chat.v1 import chat_service_pb2_grpc
from switchboard.common.v1 import common_pb2
from switchboard.execution.v1 import execution_pb2 as exe
from switchboard.execution.v1 import execution_service_pb2_grpc
from switchboard.inference.v1 import inference_pb2 as inf
from switchboard.rag.v1 import rag_pb2, rag_service_pb2_grpc

from services.runtime import (
    REASONS,
    ErrorDetails,
    Principal,
    error_details,
    method_contract,
    public_services,
    request_violations,
)
from tests.integration.conftest import as_operator, as_tenant
from tests.violations import Violation, at_bounds, reported, rule_sites, violations

TIMEOUT = 30
TENANT = f"conformance-{uuid.uuid4().hex[:8]}"
SOME_ID = str(uuid.uuid4())


def every_method() -> list[Any]:
    pool = descriptor_pool.Default()
    return [m for s in public_services() for m in pool.FindServiceByName(s).methods]


def duration(seconds: float) -> Any:
    value = duration_pb2.Duration()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


def context() -> common_pb2.RequestContext:
    return common_pb2.RequestContext(
        tenant_id=TENANT, user_id="u", request_id="r-1", priority=common_pb2.PRIORITY_BATCH
    )


def admit_request() -> adm.AdmitRequest:
    return adm.AdmitRequest(
        context=context(),
        tier=common_pb2.MODEL_TIER_SMALL,
        estimated_prompt_tokens=10,
        max_completion_tokens=10,
        max_wait=duration(1),
    )


def generation() -> inf.GenerationParameters:
    return inf.GenerationParameters(max_tokens=16, temperature=0.5)


def settings() -> chat.SessionSettings:
    return chat.SessionSettings(
        system_prompt="Be brief.",
        collection="handbook",
        retrieval_top_k=3,
        allowed_tools=["list_models"],
        model="",
        tier=common_pb2.MODEL_TIER_SMALL,
        parameters=generation(),
        priority=common_pb2.PRIORITY_INTERACTIVE,
    )


def task() -> exe.SubmitTaskRequest:
    return exe.SubmitTaskRequest(
        idempotency_key="key-1",
        labels={"team": "core"},
        priority=common_pb2.PRIORITY_BATCH,
        steps=[
            exe.Step(
                name="find",
                retrieve=exe.RetrieveStep(
                    collection="handbook",
                    query="leave",
                    top_k=3,
                    mode=rag_pb2.RETRIEVAL_MODE_HYBRID,
                    metadata_filter={"team": "people"},
                ),
                max_attempts=2,
                timeout=duration(5),
            ),
            exe.Step(
                name="count",
                depends_on=["find"],
                code=exe.CodeStep(code="len(inputs['x'])", inputs={"x": "{{steps.find.output}}"}),
            ),
            exe.Step(
                name="say",
                depends_on=["find", "count"],
                generate=exe.GenerateStep(
                    prompt="Sum it up.",
                    model="",
                    tier=common_pb2.MODEL_TIER_SMALL,
                    parameters=generation(),
                    context_steps=["find"],
                ),
            ),
            exe.Step(name="models", tool=exe.ToolStep(tool="list_models")),
        ],
    )


def document() -> rag_pb2.Document:
    return rag_pb2.Document(
        document_id="doc-1", collection="conformance", metadata={"team": "people"}, text="Hi."
    )


VALID: dict[str, Callable[[], Any]] = {
    "switchboard.inference.v1.InferenceService.Generate": lambda: inf.GenerateRequest(
        model="",
        tier=common_pb2.MODEL_TIER_SMALL,
        prompt="What do cats do?",
        context=[inf.Passage(source_id="p1", text="Cats purr.")],
        parameters=generation(),
        session_id="s-1",
        priority=common_pb2.PRIORITY_INTERACTIVE,
    ),
    "switchboard.inference.v1.InferenceService.Embed": lambda: inf.EmbedRequest(texts=["a cat"]),
    "switchboard.inference.v1.InferenceService.ListModels": inf.ListModelsRequest,
    "switchboard.admission.v1.AdmissionService.Admit": admit_request,
    "switchboard.admission.v1.AdmissionService.AdmitStream": lambda: adm.AdmitStreamRequest(
        request=admit_request()
    ),
    "switchboard.admission.v1.AdmissionService.AdmitSession": lambda: adm.AdmitSessionRequest(
        request=admit_request()
    ),
    "switchboard.admission.v1.AdmissionService.Release": lambda: adm.ReleaseRequest(
        lease_id="lease-1",
        actual_usage=common_pb2.TokenUsage(prompt_tokens=1, completion_tokens=1, total_tokens=2),
    ),
    "switchboard.admission.v1.AdmissionService.GetQuota": lambda: adm.GetQuotaRequest(
        tenant_id=TENANT, user_id="u"
    ),
    "switchboard.admission.v1.AdmissionService.GetPolicy": lambda: adm.GetPolicyRequest(
        tenant_id=TENANT, user_id="u"
    ),
    "switchboard.admission.v1.AdmissionService.UpdatePolicy": lambda: adm.UpdatePolicyRequest(
        policy=adm.Policy(
            tenant_id=TENANT,
            user_id="u",
            requests_per_second=5,
            request_burst=5,
            tokens_per_minute=1000,
            token_burst=1000,
            max_in_flight=5,
            weight=2,
            max_queued=5,
            etag="e",
        ),
        update_mask=field_mask_pb2.FieldMask(paths=["weight"]),
    ),
    "switchboard.admission.v1.AdmissionService.ListPolicies": lambda: adm.ListPoliciesRequest(
        tenant_id=TENANT, page_size=10
    ),
    "switchboard.admission.v1.AdmissionService.DeletePolicy": lambda: adm.DeletePolicyRequest(
        tenant_id=TENANT, user_id="u"
    ),
    "switchboard.rag.v1.RagService.IngestDocuments": lambda: rag_pb2.IngestDocumentsRequest(
        document=document(),
        chunking=rag_pb2.ChunkingOptions(chunk_tokens=64, overlap_tokens=8),
    ),
    "switchboard.rag.v1.RagService.IngestDocument": lambda: rag_pb2.IngestDocumentRequest(
        document=document(),
        chunking=rag_pb2.ChunkingOptions(chunk_tokens=64, overlap_tokens=8),
    ),
    "switchboard.rag.v1.RagService.Retrieve": lambda: rag_pb2.RetrieveRequest(
        collection="conformance",
        query="hi",
        top_k=3,
        mode=rag_pb2.RETRIEVAL_MODE_HYBRID,
        metadata_filter={"team": "people"},
    ),
    "switchboard.rag.v1.RagService.DeleteDocument": lambda: rag_pb2.DeleteDocumentRequest(
        collection="conformance", document_id="doc-1"
    ),
    "switchboard.rag.v1.RagService.ListCollections": lambda: rag_pb2.ListCollectionsRequest(
        page_size=10
    ),
    "switchboard.execution.v1.ExecutionService.SubmitTask": task,
    "switchboard.execution.v1.ExecutionService.SubmitTasks": lambda: exe.SubmitTasksRequest(
        tasks=[task()]
    ),
    "switchboard.execution.v1.ExecutionService.GetTask": lambda: exe.GetTaskRequest(
        task_id=SOME_ID
    ),
    "switchboard.execution.v1.ExecutionService.ListTasks": lambda: exe.ListTasksRequest(
        state=exe.TASK_STATE_COMPLETED, labels={"team": "core"}, page_size=10
    ),
    "switchboard.execution.v1.ExecutionService.WatchTask": lambda: exe.WatchTaskRequest(
        task_id=SOME_ID, after_sequence=1
    ),
    "switchboard.execution.v1.ExecutionService.CancelTask": lambda: exe.CancelTaskRequest(
        task_id=SOME_ID
    ),
    "switchboard.execution.v1.ExecutionService.RunCode": lambda: exe.RunCodeRequest(
        code="6 * 7",
        stdin="",
        files=[exe.SandboxFile(path="data.txt", content=b"x")],
        timeout=duration(5),
    ),
    "switchboard.chat.v1.ChatService.Converse": lambda: chat.ConverseRequest(
        message=chat.UserMessage(client_message_id="m-1", text="Hello")
    ),
    "switchboard.chat.v1.ChatService.CreateSession": lambda: chat.CreateSessionRequest(
        title="t", settings=settings()
    ),
    "switchboard.chat.v1.ChatService.GetSession": lambda: chat.GetSessionRequest(
        session_id=SOME_ID
    ),
    "switchboard.chat.v1.ChatService.ListSessions": lambda: chat.ListSessionsRequest(page_size=10),
    "switchboard.chat.v1.ChatService.UpdateSession": lambda: chat.UpdateSessionRequest(
        session=chat.Session(session_id=SOME_ID, title="t", settings=settings()),
        update_mask=field_mask_pb2.FieldMask(paths=["title"]),
    ),
    "switchboard.chat.v1.ChatService.DeleteSession": lambda: chat.DeleteSessionRequest(
        session_id=SOME_ID
    ),
    "switchboard.chat.v1.ChatService.ListMessages": lambda: chat.ListMessagesRequest(
        session_id=SOME_ID, page_size=10
    ),
    "switchboard.chat.v1.ChatService.SendMessage": lambda: chat.SendMessageRequest(
        session_id=SOME_ID, message=chat.UserMessage(client_message_id="m-1", text="Hello")
    ),
    "switchboard.chat.v1.ChatService.CancelTurn": lambda: chat.CancelTurnRequest(
        session_id=SOME_ID, assistant_message_id="a-1"
    ),
    "switchboard.chat.v1.ChatService.StreamEvents": lambda: chat.StreamEventsRequest(
        session_id=SOME_ID, after_event_id="e-1"
    ),
    "switchboard.auth.v1.KeyService.CreateKey": lambda: keys.CreateKeyRequest(
        tenant_id=TENANT, name="conformance"
    ),
    "switchboard.auth.v1.KeyService.ListKeys": lambda: keys.ListKeysRequest(
        tenant_id=TENANT, page_size=10
    ),
    "switchboard.auth.v1.KeyService.RevokeKey": lambda: keys.RevokeKeyRequest(
        key_id="0123456789ab"
    ),
    "switchboard.auth.v1.KeyService.ListTenants": lambda: keys.ListTenantsRequest(page_size=10),
}
"""A request each RPC accepts as valid (it need not succeed: only its broken copies are
sent), with every field that has rules set."""

# Converse frames other than the first are answered one by one; the first (open, resume)
# ends the stream. These are the extra valid frames to break, beyond VALID's message.
ADMIT_SESSION_FRAMES = (
    lambda: adm.AdmitSessionRequest(reserve=adm.SliceRequest(shape=admit_request(), count=2)),
    lambda: adm.AdmitSessionRequest(claim="lease-1"),
    lambda: adm.AdmitSessionRequest(give_back=adm.SliceReturn(lease_ids=["lease-1"])),
)
"""AdmitSession's other frames (one frame carries one of them)."""

CONVERSE_FRAMES = (
    lambda: chat.ConverseRequest(open=chat.OpenSession(session_id=SOME_ID)),
    lambda: chat.ConverseRequest(resume=chat.ResumeSession(session_id=SOME_ID, last_event_id="1")),
    lambda: chat.ConverseRequest(cancel=chat.CancelTurn(assistant_message_id="a-1")),
    lambda: chat.ConverseRequest(
        settings=chat.ChangeSettings(
            settings=settings(), update_mask=field_mask_pb2.FieldMask(paths=["system_prompt"])
        )
    ),
)


def metadata_for(method: Any) -> tuple[tuple[str, str], ...]:
    if Principal.TENANT in method_contract(method.full_name).principals:
        return as_tenant(TENANT)
    return as_operator(TENANT)


def test_every_rpc_has_a_valid_request():
    assert set(VALID) == {m.full_name for m in every_method()}
    for name, make in VALID.items():
        assert request_violations(make()) == [], name
    for make in (*CONVERSE_FRAMES, *ADMIT_SESSION_FRAMES):
        assert request_violations(make()) == []


def test_every_rule_is_reached_from_a_valid_request():
    """The valid requests set every field with rules (or a broken rule could hide in a
    message none of them carries)."""
    pool = descriptor_pool.Default()
    frames = (*CONVERSE_FRAMES, *ADMIT_SESSION_FRAMES)
    reached = {v.site for make in (*VALID.values(), *frames) for v in violations(make())}
    reached |= {v.site for v in violations(task())}
    missing = set()
    for name in VALID:
        method = pool.FindMethodByName(name)
        missing |= rule_sites(method.input_type) - reached
    assert not missing, sorted(missing)


# -- sending one broken request, and reading its refusal --------------------------------


async def outcome(channel: grpc.aio.Channel, method: Any, request: Any) -> ErrorDetails | None:
    """How the service answered `request`: a call's status, or the status of the item the
    request carried; None when it was accepted."""
    metadata = metadata_for(method)
    name = method.full_name
    if name == "switchboard.rag.v1.RagService.IngestDocuments":
        stub = rag_service_pb2_grpc.RagServiceStub(channel)

        async def one() -> AsyncIterator[Any]:
            yield request

        try:
            reply = await stub.IngestDocuments(one(), metadata=metadata, timeout=TIMEOUT)
        except grpc.aio.AioRpcError as err:  # a rule of the stream as a whole
            return error_details(err)
        (result,) = reply.results
        return error_details(result.error) if result.error.code else None
    if name == "switchboard.admission.v1.AdmissionService.AdmitSession":
        stub = admission_service_pb2_grpc.AdmissionServiceStub(channel)
        session = stub.AdmitSession(metadata=metadata, timeout=TIMEOUT)
        await session.write(request)
        await session.done_writing()  # a frame answered by nothing: the stream just ends
        reply = await session.read()
        session.cancel()
        if reply is grpc.aio.EOF or not reply.HasField("refused"):
            return None
        return error_details(reply.refused)
    if name == "switchboard.chat.v1.ChatService.Converse":
        return await _converse_outcome(channel, request, metadata)
    if name == "switchboard.execution.v1.ExecutionService.SubmitTasks":
        stub = execution_service_pb2_grpc.ExecutionServiceStub(channel)
        try:
            reply = await stub.SubmitTasks(request, metadata=metadata, timeout=TIMEOUT)
        except grpc.aio.AioRpcError as err:  # a rule of the batch as a whole
            return error_details(err)
        (result,) = reply.results
        return error_details(result.error) if result.HasField("error") else None
    return await _call_outcome(channel, method, request, metadata)


async def _call_outcome(
    channel: Any, method: Any, request: Any, metadata: Any
) -> ErrorDetails | None:
    path = f"/{method.containing_service.full_name}/{method.name}"
    response = message_factory.GetMessageClass(method.output_type)
    options = {
        "request_serializer": type(request).SerializeToString,
        "response_deserializer": response.FromString,
    }
    try:
        if method.server_streaming:
            call = channel.unary_stream(path, **options)
            async for _ in call(request, metadata=metadata, timeout=TIMEOUT):
                pass
        else:
            await channel.unary_unary(path, **options)(request, metadata=metadata, timeout=TIMEOUT)
    except grpc.aio.AioRpcError as err:
        return error_details(err)
    return None


async def _converse_outcome(channel: Any, frame: Any, metadata: Any) -> ErrorDetails | None:
    stub = chat_service_pb2_grpc.ChatServiceStub(channel)
    first = frame.WhichOneof("frame") in ("open", "resume")
    stream = stub.Converse(metadata=metadata, timeout=TIMEOUT)
    try:
        if not first:  # a session to talk on, then the broken frame
            session = await stub.CreateSession(
                chat.CreateSessionRequest(), metadata=metadata, timeout=TIMEOUT
            )
            await stream.write(
                chat.ConverseRequest(open=chat.OpenSession(session_id=session.session.session_id))
            )
        await stream.write(frame)
        if not first:  # a frame with an answer of its own: the frame before it was taken
            await stream.write(SENTINEL)
        while True:
            try:
                reply = await stream.read()
            except grpc.aio.AioRpcError as err:
                return error_details(err)
            if reply is grpc.aio.EOF:
                return None
            if reply.HasField("error"):
                return error_details(reply.error.status)
            if reply.WhichOneof("frame") in ACCEPTED_FRAME_REPLIES:
                return None
    finally:
        stream.cancel()


ACCEPTED_FRAME_REPLIES = {"turn_started", "settings_changed", "turn_completed"}
"""Replies that show a frame after the opening one was taken."""
SENTINEL = chat.ConverseRequest(
    settings=chat.ChangeSettings(
        settings=chat.SessionSettings(system_prompt="Be brief."),
        update_mask=field_mask_pb2.FieldMask(paths=["system_prompt"]),
    )
)
"""Sent after the frame under test: its `settings_changed` comes after any error frame
of the one before (a cancel of an unknown answer, for one, has no reply of its own)."""

CHECKED_BY_MEANING = {
    "page_token": "an opaque token: one of the right length that no response gave out is "
    "INVALID_ARGUMENT on page_token all the same",
    "tool.tool": "a tool name of the right length that is not registered is refused",
    "chunking.overlap_tokens": "at most half the chunk size actually used",
    "files[0].path": "each part of a sandbox file's path is a file name, at most 255 bytes "
    "(the longest path is made of several)",
    "request_id": "Release takes exactly one of lease_id and request_id (the valid "
    "request sets lease_id)",
}
"""Fields whose value at the edge of its length or range can still be refused, naming
the field, for what the value means (each documented in its field's comment)."""


def by_meaning(field: str) -> str | None:
    return next((k for k in CHECKED_BY_MEANING if field.endswith(k)), None)


def _cases(make_cases: Callable[[Any], Any]) -> list[tuple[str, Violation]]:
    cases = []
    for name, make in VALID.items():
        cases += [(name, v) for v in make_cases(make())]
    submit_tasks = "switchboard.execution.v1.ExecutionService.SubmitTasks"
    for v in make_cases(task()):  # each task of a batch is checked on its own
        batch = exe.SubmitTasksRequest(tasks=[v.request])
        cases.append((submit_tasks, Violation(v.field, v.rule, batch, v.site)))
    converse = "switchboard.chat.v1.ChatService.Converse"
    for make in CONVERSE_FRAMES:
        cases += [(converse, v) for v in make_cases(make())]
    admit_session = "switchboard.admission.v1.AdmissionService.AdmitSession"
    for make in ADMIT_SESSION_FRAMES:
        cases += [(admit_session, v) for v in make_cases(make())]
    return cases


async def test_every_broken_rule_is_refused_with_its_field(envoy_target):
    pool = descriptor_pool.Default()
    cases = _cases(violations)
    assert len(cases) >= 150
    problems: list[str] = []
    reasons: set[str] = set()
    async with grpc.aio.insecure_channel(
        envoy_target, options=[("grpc.max_send_message_length", 16 << 20)]
    ) as channel:
        for name, violation in cases:
            method = pool.FindMethodByName(name)
            where = f"{name} {violation.field} ({violation.rule})"
            details = await outcome(channel, method, violation.request)
            if details is None:
                problems.append(f"{where}: accepted")
                continue
            fields = [v.field for v in details.field_violations]
            if details.error_info is not None:
                reasons.add(details.error_info.reason)
            if (
                details.code != grpc.StatusCode.INVALID_ARGUMENT
                or details.error_info_count != 1
                or details.error_info.reason != "INVALID_REQUEST"
                or not reported(violation.field, fields)
            ):
                reason = details.error_info.reason if details.error_info else None
                problems.append(f"{where}: {details.code.name} {reason} {fields}")
    assert not problems, "\n".join(problems)
    assert reasons <= REASONS


async def test_values_at_the_edges_are_taken_and_never_fail(envoy_target):
    """A value at the edge of its rule (and an integer without rules at its type's
    extremes: a cursor at 2^64-1, a page size of -2^31) is not refused for that field,
    and nothing answers INTERNAL or UNKNOWN: whatever else the service says about it
    (not found, over a quota, too long for a model) is a documented refusal."""
    pool = descriptor_pool.Default()
    cases = _cases(at_bounds)
    assert len(cases) >= 60
    problems: list[str] = []
    meant: set[str] = set()
    async with grpc.aio.insecure_channel(
        envoy_target, options=[("grpc.max_send_message_length", 16 << 20)]
    ) as channel:
        for name, edge in cases:
            method = pool.FindMethodByName(name)
            details = await outcome(channel, method, edge.request)
            if details is None:
                continue
            where = f"{name} {edge.field} ({edge.rule}): {details.code.name}"
            if details.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                problems.append(f"{where} {details.message}")
            elif details.error_info is None or details.error_info.reason not in REASONS:
                problems.append(f"{where} without a catalogued reason: {details.message}")
            elif "extreme" not in edge.rule and reported(
                edge.field, [v.field for v in details.field_violations]
            ):
                if by_meaning(edge.field):
                    meant.add(by_meaning(edge.field))
                    continue
                problems.append(f"{where} refuses a value its rule allows: {details.message}")
    assert not problems, "\n".join(problems)
    assert meant == set(CHECKED_BY_MEANING), "an entry of CHECKED_BY_MEANING is stale"
