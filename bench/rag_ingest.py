"""RAG ingestion throughput, end to end, with the embedder's dynamic batching on vs off.

Clients stream handbook-sized documents (about 4 chunks each) through Envoy to
RagService.IngestDocuments, which chunks them, embeds the chunks through Envoy ->
InferenceService.Embed -> Triton, and stores each document in its own transaction.
The two arms differ only in the Triton model RAG asks for: `embedder` (dynamic
batching) or `embedder_unbatched` (the same weights, batching off); the RAG service is
restarted with `SWITCHBOARD_RAG_EMBEDDING_MODEL` between rounds, and the arms alternate.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import grpc
from switchboard.rag.v1 import rag_pb2, rag_service_pb2_grpc

from bench._common import api_key_metadata, print_table, running_mesh, write_result
from services.demo import HANDBOOK

NAME = "rag-ingest"
STREAMS = 2
"""Concurrent IngestDocuments streams (each is ingested 4 documents at a time)."""
DOCUMENTS_PER_STREAM = 60
ROUNDS = 3
"""Rounds per arm; the arms alternate, the first arm changing each round."""
ARMS = {"batched": "embedder", "unbatched": "embedder_unbatched"}


def _documents(round_: int, stream: int, count: int) -> list[rag_pb2.IngestDocumentsRequest]:
    """Distinct documents: the handbook's, each opened with a line naming its copy."""
    handbook = [json.loads(line) for line in HANDBOOK.read_text().splitlines()]
    requests = []
    for i in range(count):
        source = handbook[(i + stream * 7) % len(handbook)]
        requests.append(
            rag_pb2.IngestDocumentsRequest(
                document=rag_pb2.Document(
                    document_id=f"r{round_}-s{stream}-d{i}",
                    collection="handbook",
                    metadata=source["metadata"],
                    text=f"Copy {i} of round {round_}, stream {stream}.\n\n{source['text']}",
                )
            )
        )
    return requests


async def _round(
    mesh: Any, round_: int, per_stream: int = DOCUMENTS_PER_STREAM
) -> tuple[int, float]:
    """Chunks stored and seconds taken by STREAMS concurrent streams, for a fresh tenant."""
    metadata = api_key_metadata(mesh, f"bench-{uuid.uuid4().hex[:8]}")

    async def stream(stub, index: int) -> int:
        async def requests():
            for request in _documents(round_, index, per_stream):
                yield request

        reply = await stub.IngestDocuments(requests(), metadata=metadata, timeout=600)
        if reply.documents_failed:
            raise RuntimeError(f"{reply.documents_failed} documents failed: {reply.results}")
        return int(reply.chunks_ingested)

    async with grpc.aio.insecure_channel(mesh.envoy_address) as channel:
        stub = rag_service_pb2_grpc.RagServiceStub(channel)
        started = time.perf_counter()
        chunks = await asyncio.gather(*(stream(stub, i) for i in range(STREAMS)))
        return sum(chunks), time.perf_counter() - started


def run() -> dict:
    totals = {arm: [0, 0.0] for arm in ARMS}
    rows = []
    with running_mesh(triton_replicas=1) as mesh:
        current = "embedder"
        asyncio.run(_round(mesh, -1, 8))  # warm-up: first passes, pool, plans
        for round_ in range(ROUNDS):
            order = list(ARMS) if round_ % 2 == 0 else list(reversed(ARMS))
            for arm in order:
                if ARMS[arm] != current:
                    mesh.start_service("rag", env={"SWITCHBOARD_RAG_EMBEDDING_MODEL": ARMS[arm]})
                    current = ARMS[arm]
                    asyncio.run(_round(mesh, -1 - round_, 8))  # warm it up
                chunks, seconds = asyncio.run(_round(mesh, round_))
                totals[arm][0] += chunks
                totals[arm][1] += seconds
                rows.append((round_ + 1, arm, chunks, f"{seconds:.2f}", f"{chunks / seconds:.1f}"))
                print(f"  round {round_ + 1} {arm}: {chunks / seconds:.1f} chunks/s", flush=True)
    print_table("rounds", ("round", "arm", "chunks", "seconds", "chunks_per_s"), rows)
    batched = totals["batched"][0] / totals["batched"][1]
    unbatched = totals["unbatched"][0] / totals["unbatched"][1]
    metrics = {
        "chunks_per_s": batched,
        "chunks_per_s_unbatched": unbatched,
        "speedup": batched / unbatched,
        "chunks": totals["batched"][0] + totals["unbatched"][0],
    }
    notes = (
        f"{STREAMS} concurrent IngestDocuments streams x {DOCUMENTS_PER_STREAM} handbook "
        f"documents (~4 chunks of 160 tokens each) per round, {ROUNDS} alternating rounds per "
        "arm; Envoy -> rag -> Envoy -> inference Embed -> one CPU Triton, stored in "
        "PostgreSQL + pgvector (HNSW index maintained on insert); unbatched = the same "
        "weights with Triton's dynamic batching off; everything shares the 2 cores"
    )
    return write_result(NAME, metrics, {}, notes)


if __name__ == "__main__":
    run()
