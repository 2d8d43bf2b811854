"""`make demo`: the main job end to end. Start the mesh; create an API key for tenant
`demo`; then through Envoy with that key: list the models, compare a few embeddings, ingest
the sample handbook, hold a chat session over one Converse stream (answers streamed with
their sources, a sandboxed code step with its progress), print the session's stored
transcript, submit and watch a multi-step task; print the chat page's address; and stop
everything the demo started."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from importlib import resources

import grpc
import numpy as np
from google.protobuf import json_format
from switchboard.chat.v1 import chat_pb2, chat_service_pb2_grpc
from switchboard.common.v1 import common_pb2
from switchboard.events.v1 import events_pb2
from switchboard.execution.v1 import execution_pb2, execution_service_pb2_grpc
from switchboard.inference.v1 import inference_pb2 as pb
from switchboard.inference.v1 import inference_service_pb2_grpc
from switchboard.rag.v1 import rag_pb2, rag_service_pb2_grpc

from services.launcher import LaunchError, Mesh, chat, load_launcher_config

logger = logging.getLogger(__name__)

HANDBOOK = resources.files("services") / "demo_data" / "handbook.jsonl"
"""The sample corpus, shipped with the package: a fictional company's handbook (also the
tests' retrieval quality set, whose labelled questions live in `tests/data/`)."""
TENANT = "demo"
Metadata = tuple[tuple[str, str], ...]
HANDBOOK_QUESTIONS = [
    "How do I get into a red zone of the warehouse?",
    "What should I do when I lose my office badge?",
]
CODE_MESSAGE = (
    "/code\n"
    "rotation = ['Ana', 'Ben', 'Chen', 'Dee']\n"
    "print('on-call weeks per person each year:', {p: 52 // len(rotation) for p in rotation})"
)
TASK = {
    "idempotency_key": "demo-task-1",
    "steps": [
        {
            "name": "find",
            "retrieve": {"collection": "handbook", "query": "firmware rollout waves", "top_k": 2},
        },
        {
            "name": "measure",
            "depends_on": ["find"],
            "code": {
                "code": "import json\nchunks = json.loads(inputs['found'])\n"
                "sum(len(c['text'].split()) for c in chunks)",
                "inputs": {"found": "{{steps.find.output.chunks}}"},
            },
        },
        {
            "name": "answer",
            "depends_on": ["find", "measure"],
            "generate": {
                "prompt": "How is firmware rolled out to the fleet?",
                "context_steps": ["find"],
            },
        },
    ],
}

SENTENCES = [
    "The cat is sleeping on the sofa.",
    "A kitten naps on the couch.",
    "Envoy routes gRPC calls by service name.",
    "The proxy forwards each RPC according to its service.",
]


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


async def _show(target: str, key: Metadata) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
        models = await stub.ListModels(pb.ListModelsRequest(), metadata=key, timeout=10)
        print(f"\nModels behind {target}:")
        for m in models.models:
            tier = common_pb2.ModelTier.Name(m.tier).removeprefix("MODEL_TIER_").lower()
            print(
                f"  {m.name:<18} tier={tier:<12} context={m.context_tokens:<6} "
                f"cost={m.relative_cost:<4} backends={len(m.backends)} healthy={m.healthy}"
            )

        reply = await stub.Embed(pb.EmbedRequest(texts=SENTENCES), metadata=key, timeout=30)
        vectors = np.array([e.values for e in reply.embeddings])
        print(
            f"\nEmbeddings: {len(vectors)} x {reply.dimensions} ({reply.model}); cosine similarity:"
        )
        sims = vectors @ vectors.T
        for i, text in enumerate(SENTENCES):
            row = " ".join(f"{s:5.2f}" for s in sims[i])
            print(f"  {row}   {text}")
        await _ingest(channel, key)
        await _chat(channel, key)
        await _task(channel, key)
        print()


def handbook(collection: str, count: int | None = None) -> list[rag_pb2.IngestDocumentsRequest]:
    """IngestDocuments requests for the handbook's first `count` documents (all of them
    by default) into `collection`: the demo's, and the tests' and benchmarks' corpus."""
    lines = HANDBOOK.read_text().splitlines()[:count]
    return [
        rag_pb2.IngestDocumentsRequest(
            document=rag_pb2.Document(
                document_id=d["document_id"],
                collection=collection,
                metadata=d["metadata"],
                text=d["text"],
            )
        )  # fmt: skip
        for d in map(json.loads, lines)
    ]


async def _ingest(channel: grpc.aio.Channel, key: Metadata) -> None:
    rag = rag_service_pb2_grpc.RagServiceStub(channel)
    started = time.perf_counter()
    reply = await rag.IngestDocuments(iter(handbook("handbook")), metadata=key, timeout=300)
    print(
        f"\nIngested {reply.documents_ingested} handbook documents as {reply.chunks_ingested} "
        f"chunks in {time.perf_counter() - started:.1f}s (tenant 'demo', collection 'handbook')"
    )


async def _chat(channel: grpc.aio.Channel, key: Metadata) -> None:
    """One session, one Converse stream: the handbook questions, then a code step."""
    stub = chat_service_pb2_grpc.ChatServiceStub(channel)
    settings = chat_pb2.SessionSettings(
        system_prompt="Answer from the handbook and cite it.",
        collection="handbook",
        retrieval_top_k=3,
        code_enabled=True,
    )
    session = (
        await stub.CreateSession(
            chat_pb2.CreateSessionRequest(title="make demo", settings=settings),
            metadata=key,
            timeout=10,
        )
    ).session
    said = [*HANDBOOK_QUESTIONS, CODE_MESSAGE]
    print(f"\nChat session {session.session_id} (collection 'handbook', code enabled):")

    async def frames():
        yield chat_pb2.ConverseRequest(open=chat_pb2.OpenSession(session_id=session.session_id))
        for i, text in enumerate(said):
            yield chat_pb2.ConverseRequest(
                message=chat_pb2.UserMessage(client_message_id=f"demo-{i}", text=text)
            )  # half-close after the last one: the server ends the stream when all are answered

    async for frame in stub.Converse(frames(), metadata=key, timeout=120):
        if frame.HasField("turn_started"):
            text = said[int(frame.turn_started.client_message_id.removeprefix("demo-"))]
            print(f"\nyou> {text}\nassistant> ", end="")
        print(chat.render(frame), end="", flush=True)

    history = await stub.ListMessages(
        chat_pb2.ListMessagesRequest(session_id=session.session_id), metadata=key, timeout=10
    )
    print(f"\nThe session's stored history ({len(history.messages)} messages, in order):")
    for m in history.messages:
        role = chat_pb2.MessageRole.Name(m.role).removeprefix("MESSAGE_ROLE_").lower()
        status = chat_pb2.MessageStatus.Name(m.status).removeprefix("MESSAGE_STATUS_").lower()
        if m.HasField("tool_call"):
            body = f"{m.tool_call.tool} as task {m.tool_call.task_id}"
        elif m.HasField("tool_result"):
            body = json_format.MessageToJson(m.tool_result.output, indent=None)
        else:
            body = m.text
        body = " ⏎ ".join(body.splitlines())
        body = body if len(body) <= 90 else body[:87] + "..."
        print(f"  {m.sequence:>2} {role:<11} {status:<9} {body}")


async def _task(channel: grpc.aio.Channel, key: Metadata) -> None:
    execution = execution_service_pb2_grpc.ExecutionServiceStub(channel)
    request = json_format.ParseDict(TASK, execution_pb2.SubmitTaskRequest())
    reply = await execution.SubmitTask(request, metadata=key, timeout=10)
    task_id = reply.task.task_id
    print(f"\nTask {task_id} (retrieve -> sandboxed Python -> generate), its events:")
    async for event in execution.WatchTask(
        execution_pb2.WatchTaskRequest(task_id=task_id), metadata=key, timeout=120
    ):
        if event.HasField("step_event"):
            e = event.step_event
            kind = events_pb2.StepEventType.Name(e.type).removeprefix("STEP_EVENT_TYPE_")
            print(f"  #{e.sequence:<4} {e.step_name:<8} {kind.lower()}")
        else:
            kind = events_pb2.TaskEventType.Name(event.task_event.type)
            kind = kind.removeprefix("TASK_EVENT_TYPE_").lower()
            print(f"  #{event.task_event.sequence:<4} task     {kind}")
    done = await execution.GetTask(
        execution_pb2.GetTaskRequest(task_id=task_id), metadata=key, timeout=10
    )
    outputs = {s.name: json_format.MessageToDict(s.output) for s in done.task.step_statuses}
    print(f"  words retrieved (computed in the sandbox): {outputs['measure'].get('result')}")
    print(f"  answer: {outputs['answer'].get('text', '')}")


async def _create_key(mesh: Mesh) -> tuple[str, str]:
    """A new API key for the demo tenant, as `switchboard keys create --tenant demo`
    makes it: (key id, key)."""
    store = mesh.key_store()
    await store.open()
    try:
        return await store.create(TENANT, "make demo")
    finally:
        await store.close()


async def _revoke_key(mesh: Mesh, key_id: str) -> None:
    store = mesh.key_store()
    await store.open()
    try:
        await store.revoke(key_id)
    finally:
        await store.close()


def main() -> int:
    mesh = Mesh(load_launcher_config(), progress=_say)
    started = False
    key_id = ""
    try:
        started = mesh.up()
        key_id, token = asyncio.run(_create_key(mesh))
        _say(f"created API key {key_id} for tenant {TENANT!r}; the calls below send it")
        asyncio.run(_show(mesh.envoy_address, (("authorization", f"Bearer {token}"),)))
        _say(
            f"the chat page: http://{mesh.envoy_address}/ (gRPC-Web on the same port; keep the"
            " mesh up with `make up` and paste a key from `switchboard keys create --tenant T`)"
        )
    except LaunchError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    finally:
        if key_id:
            asyncio.run(_revoke_key(mesh, key_id))
        if started:
            _say("stopping everything the demo started")
            mesh.down()
        else:
            _say("leaving the mesh that was already running as it was (make down stops it)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
