"""`make demo`: start the mesh, then through Envoy, with an API key for tenant `demo`: list
the models, stream answers with citations, ingest the sample handbook and answer from what
retrieval finds, run a multi-step task while watching its events, and stop everything the
demo started."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from pathlib import Path

import grpc
import numpy as np
from google.protobuf import json_format
from switchboard.common.v1 import common_pb2
from switchboard.events.v1 import events_pb2
from switchboard.execution.v1 import execution_pb2, execution_service_pb2_grpc
from switchboard.inference.v1 import inference_pb2 as pb
from switchboard.inference.v1 import inference_service_pb2_grpc
from switchboard.rag.v1 import rag_pb2, rag_service_pb2_grpc

from services.auth import KeyStore
from services.launcher._config import load_launcher_config
from services.launcher._mesh import LaunchError, Mesh

logger = logging.getLogger(__name__)

HANDBOOK = Path(__file__).parents[1] / "tests" / "data" / "handbook.jsonl"
"""The sample corpus: a fictional company's handbook (also the retrieval quality set)."""
TENANT = "demo"
Metadata = tuple[tuple[str, str], ...]
HANDBOOK_QUESTIONS = [
    "How do I get into a red zone of the warehouse?",
    "What should I do when I lose my office badge?",
]
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

PASSAGES = [
    pb.Passage(
        source_id="handbook/edge",
        text=(
            "Every call enters Switchboard through one Envoy port. Envoy routes each gRPC call to "
            "a service by the service name in its path. Streaming routes have no overall timeout, "
            "only an idle timeout."
        ),
    ),
    pb.Passage(
        source_id="handbook/routing",
        text=(
            "The inference service picks a model tier by prompt length and complexity. Short, "
            "simple prompts go to the small tier; long or complex prompts go to the large tier. "
            "Backends are chosen by least outstanding work, and a session sticks to its backend "
            "so cached state can be reused."
        ),
    ),
    pb.Passage(
        source_id="handbook/batching",
        text=(
            "Triton batches concurrent embedding requests dynamically. Dynamic batching combines "
            "requests that arrive within a short window into one model execution, which raises "
            "throughput on the same hardware."
        ),
    ),
]
QUESTIONS = [
    "How does Switchboard choose a backend for a session?",
    "Explain why dynamic batching raises throughput, and compare it with handling each "
    "request alone?",
]
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

        for question in QUESTIONS:
            print(f"\nQ: {question}\nA: ", end="", flush=True)
            started = time.perf_counter()
            async for reply in stub.Generate(
                pb.GenerateRequest(prompt=question, context=PASSAGES, session_id="demo-session"),
                metadata=key,
                timeout=60,
            ):
                if reply.HasField("token"):
                    sys.stdout.write(reply.token.text)
                    sys.stdout.flush()
                    continue
                done = reply.complete
                print(
                    f"\n   model={done.model.name} backend={done.backend} "
                    f"ttft={done.time_to_first_token.ToMilliseconds()}ms "
                    f"total={1000 * (time.perf_counter() - started):.0f}ms "
                    f"tokens={done.usage.prompt_tokens}+{done.usage.completion_tokens}"
                )
                for c in done.citations:
                    print(f"   [{c.passage_index}] {c.source_id} chars {c.start_char}-{c.end_char}")

        reply = await stub.Embed(pb.EmbedRequest(texts=SENTENCES), metadata=key, timeout=30)
        vectors = np.array([e.values for e in reply.embeddings])
        print(
            f"\nEmbeddings: {len(vectors)} x {reply.dimensions} ({reply.model}); cosine similarity:"
        )
        sims = vectors @ vectors.T
        for i, text in enumerate(SENTENCES):
            row = " ".join(f"{s:5.2f}" for s in sims[i])
            print(f"  {row}   {text}")
        await _rag(channel, key)
        await _task(channel, key)
        print()


async def _stream_answer(stub, request: pb.GenerateRequest, key: Metadata) -> None:
    async for reply in stub.Generate(request, metadata=key, timeout=60):
        if reply.HasField("token"):
            sys.stdout.write(reply.token.text)
            sys.stdout.flush()
        else:
            cited = sorted(
                {request.context[c.passage_index].source_id for c in reply.complete.citations}
            )
            print(f"\n   cited: {', '.join(cited) or 'nothing'}")


async def _rag(channel: grpc.aio.Channel, key: Metadata) -> None:
    rag = rag_service_pb2_grpc.RagServiceStub(channel)
    inference = inference_service_pb2_grpc.InferenceServiceStub(channel)
    documents = [json.loads(line) for line in HANDBOOK.read_text().splitlines()]

    async def stream():
        for d in documents:
            yield rag_pb2.IngestDocumentsRequest(
                document=rag_pb2.Document(
                    document_id=d["document_id"], collection="handbook",
                    metadata=d["metadata"], text=d["text"],
                )
            )  # fmt: skip

    started = time.perf_counter()
    reply = await rag.IngestDocuments(stream(), metadata=key, timeout=300)
    print(
        f"\nIngested {reply.documents_ingested} handbook documents as {reply.chunks_ingested} "
        f"chunks in {time.perf_counter() - started:.1f}s (tenant 'demo', collection 'handbook')"
    )
    for question in HANDBOOK_QUESTIONS:
        found = await rag.Retrieve(
            rag_pb2.RetrieveRequest(collection="handbook", query=question, top_k=3),
            metadata=key,
            timeout=10,
        )
        passages = [
            pb.Passage(source_id=f"{c.document_id}#{c.chunk_index}", text=c.text)
            for c in found.chunks
        ]
        print(
            f"\nQ: {question}\n   retrieved: {', '.join(p.source_id for p in passages)}\nA: ",
            end="",
        )
        await _stream_answer(inference, pb.GenerateRequest(prompt=question, context=passages), key)


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


async def _create_key(database_url: str) -> tuple[str, str]:
    """A new API key for the demo tenant, as `switchboard keys create --tenant demo`
    makes it: (key id, key)."""
    store = KeyStore(database_url)
    await store.open()
    try:
        return await store.create(TENANT, "make demo")
    finally:
        await store.close()


async def _revoke_key(database_url: str, key_id: str) -> None:
    store = KeyStore(database_url)
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
        key_id, token = asyncio.run(_create_key(mesh.database_url))
        _say(f"created API key {key_id} for tenant {TENANT!r}; the calls below send it")
        asyncio.run(_show(mesh.envoy_address, (("authorization", f"Bearer {token}"),)))
    except LaunchError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    finally:
        if key_id:
            asyncio.run(_revoke_key(mesh.database_url, key_id))
        if started:
            _say("stopping everything the demo started")
            mesh.down()
        else:
            _say("leaving the mesh that was already running as it was (make down stops it)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
