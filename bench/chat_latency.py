"""Chat latency: time to first token and inter-token latency of a Converse turn, against
Triton's streaming API called directly with the same prompt and context.

One client, one call at a time, persistent grpc.aio channels, one CPU Triton replica (so
every arm reaches the same Triton process). Two sessions are created through Envoy, both
pinned to `generator_small` with the same `max_tokens`, and a Converse stream is opened
on each and kept open for the whole run; every round sends one user message (the same
question every time) on the open stream:

- RAG off: a session without a collection. The chat service sends the model no
  passages, so the direct arm sends none either (ModelStreamInfer with PROMPT and
  MAX_TOKENS only, as the router builds it).
- RAG on: a session whose collection holds the handbook's first documents, ingested
  first. The direct arm sends the passages the chat's retrieval returned (the Citations
  frame of a warm-up turn lists them, in the order they were given to the model); every
  measured turn checks its Citations still list the same passages. This block has a
  third arm, RagService.Retrieve through Envoy with the same query and top_k, to show
  how much of the added time is retrieval (a query embedding on Triton plus pgvector).

TTFT on the chat arms runs from writing the user-message frame to reading the first
`token` frame (the turn's TurnStarted and any QueuePosition come before it); the turn is
read to its TurnCompleted, which must say COMPLETED. TTFT on the direct arm runs from
starting ModelStreamInfer to the first response carrying an output; it is read to the
final response, as the router reads it. ITL is every gap between two consecutive tokens
of one answer, pooled over the answers of an arm. Each turn's text must equal the direct
answer's, so both sides did the same work.

Within a block every round makes each arm's call once, in a freshly shuffled order, so
the arms share the same moments of a noisy machine. The blocks run one after the other:
RAG embeds the query on Triton, whose forward pass leaves the CPU busy for a while, and
only the RAG block should pay for that.

The calls act for tenant `bench-chat` with its API key (so the chat arms include
Envoy's external-authorization check), after giving it an admission policy above any
rate the benchmark reaches (the default policy allows 10 requests/s).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from switchboard.admission.v1 import admission_service_pb2_grpc
from switchboard.chat.v1 import chat_pb2, chat_service_pb2_grpc
from switchboard.inference.v1 import inference_pb2
from switchboard.rag.v1 import rag_pb2, rag_service_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from bench._common import (
    api_key_metadata,
    give_tenant_room,
    ms,
    operator_metadata,
    percentile,
    print_table,
    running_mesh,
    unlimited_policy,
    write_result,
)
from services.demo import handbook
from services.inference.triton import decode_bytes, generate_request

NAME = "chat-latency"
WARMUP = 20
"""Rounds before measuring (each makes every call of its block once), at most WARMUP_S."""
WARMUP_S = 15.0
ROUNDS = 200
BUDGET_S = 90.0
"""A block stops after this long even if fewer rounds are done (the notes say how many)."""
SEED = 3
TIMEOUT_S = 30.0

MODEL = "generator_small"
MAX_TOKENS = 64
QUESTION = "How long is an on-call shift and when does it hand over?"
DOCUMENTS = 6
COLLECTION = "handbook"
TOP_K = 5

TENANT = "bench-chat"
Metadata = tuple[tuple[str, str], ...]
BENCH_POLICY = unlimited_policy(TENANT, in_flight=4096)


@dataclass
class Sample:
    """One answer as the client saw it."""

    ttft: float
    gaps: list[float]
    text: str
    started: float = 0.0
    """Chat arms: from writing the user message to reading TurnStarted (sent once the
    turn's first call is on its way: the generation itself, with RAG off)."""


Arm = Callable[[], Awaitable[Sample]]


@dataclass
class Block:
    samples: dict[str, list[Sample]]
    rounds: int = 0
    seconds: float = 0.0
    retrieve: list[float] = field(default_factory=list)


# -- the direct arm --------------------------------------------------------------------------


def triton_request(prompt: str, passages: Sequence[str]) -> service_pb2.ModelInferRequest:
    """The request the router sends to Triton for this prompt and context."""
    return generate_request(MODEL, prompt, passages, MAX_TOKENS)


def direct_arm(stub: service_pb2_grpc.GRPCInferenceServiceStub, passages: Sequence[str]) -> Arm:
    request = triton_request(QUESTION, passages)

    async def call() -> Sample:
        started = time.perf_counter()
        stamps: list[float] = []
        words: list[str] = []
        async for reply in stub.ModelStreamInfer(iter([request]), timeout=TIMEOUT_S):
            if reply.error_message:
                raise RuntimeError(f"Triton: {reply.error_message}")
            response = reply.infer_response
            if response.outputs:
                stamps.append(time.perf_counter())
                names = [o.name for o in response.outputs]
                raw = dict(zip(names, response.raw_output_contents, strict=True))
                words.append(b"".join(decode_bytes(raw["TEXT"])).decode(errors="replace"))
            final = response.parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                break
        if not stamps:
            raise RuntimeError("Triton streamed no token")
        return Sample(stamps[0] - started, _gaps(stamps), "".join(words))

    return call


# -- the chat arm ----------------------------------------------------------------------------


class Stream:
    """An open Converse stream on one session, driven turn by turn."""

    def __init__(self, stub: chat_service_pb2_grpc.ChatServiceStub, metadata: Metadata) -> None:
        self._stub = stub
        self._metadata = metadata
        self.call: Any = None
        self.passages: list[rag_pb2.RetrievedChunk] = []
        """The passages of the latest turn's Citations frame."""

    async def open(self, session_id: str) -> None:
        self.call = self._stub.Converse(metadata=self._metadata)
        await self.call.write(
            chat_pb2.ConverseRequest(open=chat_pb2.OpenSession(session_id=session_id))
        )
        frame = await self._read()
        if frame.WhichOneof("frame") != "opened":
            raise RuntimeError(f"expected SessionOpened, got {frame.WhichOneof('frame')}")

    async def _read(self) -> chat_pb2.ConverseResponse:
        # a timeout scope, not wait_for: no extra task per frame read
        async with asyncio.timeout(TIMEOUT_S):
            frame = await self.call.read()
        if frame is grpc.aio.EOF:
            raise RuntimeError(f"the Converse stream ended: {await self.call.code()}")
        return frame

    async def turn(self) -> Sample:
        message = chat_pb2.ConverseRequest(
            message=chat_pb2.UserMessage(client_message_id=uuid.uuid4().hex, text=QUESTION)
        )
        started = time.perf_counter()
        await self.call.write(message)
        stamps: list[float] = []
        words: list[str] = []
        turn_started = 0.0
        while True:
            frame = await self._read()
            kind = frame.WhichOneof("frame")
            if kind == "turn_started":
                turn_started = time.perf_counter() - started
            elif kind == "token":
                stamps.append(time.perf_counter())
                words.append(frame.token.text)
            elif kind == "citations":
                self.passages = list(frame.citations.passages)
            elif kind == "error":
                raise RuntimeError(f"ErrorFrame: {frame.error.status.message}")
            elif kind == "turn_completed":
                status = frame.turn_completed.status
                if status != chat_pb2.MESSAGE_STATUS_COMPLETED:
                    raise RuntimeError(f"turn ended {chat_pb2.MessageStatus.Name(status)}")
                break
        if not stamps:
            raise RuntimeError("the turn streamed no token")
        return Sample(stamps[0] - started, _gaps(stamps), "".join(words), turn_started)

    async def close(self) -> None:
        await self.call.done_writing()
        while await self.call.read() is not grpc.aio.EOF:
            pass


def chat_arm(stream: Stream, expected: Sequence[str] | None = None) -> Arm:
    async def call() -> Sample:
        sample = await stream.turn()
        if expected is not None and [p.chunk_id for p in stream.passages] != list(expected):
            raise RuntimeError("retrieval returned other passages than in the warm-up")
        return sample

    return call


def _gaps(stamps: Sequence[float]) -> list[float]:
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


# -- set-up ----------------------------------------------------------------------------------


async def _ingest(stub: rag_service_pb2_grpc.RagServiceStub, metadata: Metadata) -> None:
    requests = handbook(COLLECTION, DOCUMENTS)
    reply = await stub.IngestDocuments(iter(requests), metadata=metadata, timeout=120)
    if reply.documents_ingested != len(requests) or reply.documents_failed:
        raise RuntimeError(f"ingestion failed: {reply}")


async def create_session(
    stub: chat_service_pb2_grpc.ChatServiceStub, metadata: Metadata, *, collection: str = ""
) -> str:
    settings = chat_pb2.SessionSettings(
        model=MODEL,
        collection=collection,
        retrieval_top_k=TOP_K if collection else 0,
        parameters=inference_pb2.GenerationParameters(max_tokens=MAX_TOKENS),
    )
    reply = await stub.CreateSession(
        chat_pb2.CreateSessionRequest(title="bench", settings=settings),
        metadata=metadata,
        timeout=10,
    )
    return reply.session.session_id


def _retrieve_arm(stub: rag_service_pb2_grpc.RagServiceStub, metadata: Metadata, into: list):
    request = rag_pb2.RetrieveRequest(collection=COLLECTION, query=QUESTION, top_k=TOP_K)

    async def call() -> None:
        started = time.perf_counter()
        await stub.Retrieve(request, metadata=metadata, timeout=TIMEOUT_S)
        into.append(time.perf_counter() - started)

    return call


async def _block(
    arms: dict[str, Arm], extra: Callable[[], Awaitable[None]] | None, rng: random.Random
) -> Block:
    """Warm-up, then up to ROUNDS rounds, each arm once per round in shuffled order; the
    chat and direct answers of a round must have the same text."""
    calls: dict[str, Callable[[], Awaitable[Any]]] = dict(arms)
    if extra is not None:
        calls["retrieve"] = extra
    names = list(calls)
    warming = time.perf_counter()
    for _ in range(WARMUP):
        for name in names:
            await calls[name]()
        if time.perf_counter() - warming > WARMUP_S:
            break
    block = Block({name: [] for name in arms})
    started = time.perf_counter()
    while block.rounds < ROUNDS and time.perf_counter() - started < BUDGET_S:
        rng.shuffle(names)
        got = {}
        for name in names:
            got[name] = await calls[name]()
        if got["chat"].text != got["direct"].text:
            raise RuntimeError(
                f"chat and direct answers differ:\n  chat:   {got['chat'].text!r}\n"
                f"  direct: {got['direct'].text!r}"
            )
        for name in arms:
            block.samples[name].append(got[name])
        block.rounds += 1
    block.seconds = time.perf_counter() - started
    return block


async def _measure(mesh: Any) -> tuple[dict[str, Block], int]:
    metadata = api_key_metadata(mesh, TENANT)
    rng = random.Random(SEED)
    async with (
        grpc.aio.insecure_channel(mesh.triton_urls[0]) as triton_channel,
        grpc.aio.insecure_channel(mesh.envoy_address) as envoy_channel,
    ):
        triton = service_pb2_grpc.GRPCInferenceServiceStub(triton_channel)
        chat = chat_service_pb2_grpc.ChatServiceStub(envoy_channel)
        rag = rag_service_pb2_grpc.RagServiceStub(envoy_channel)
        await give_tenant_room(
            admission_service_pb2_grpc.AdmissionServiceStub(envoy_channel),
            operator_metadata(mesh),
            BENCH_POLICY,
        )
        await _ingest(rag, metadata)
        plain, with_rag = Stream(chat, metadata), Stream(chat, metadata)
        await plain.open(await create_session(chat, metadata))
        await with_rag.open(await create_session(chat, metadata, collection=COLLECTION))

        await with_rag.turn()  # the passages retrieval returns for the question
        passages = list(with_rag.passages)
        if not passages:
            raise RuntimeError("retrieval returned no passages")
        blocks = {}
        blocks["off"] = await _block(
            {"chat": chat_arm(plain), "direct": direct_arm(triton, [])}, None, rng
        )
        print(f"  RAG off: {blocks['off'].rounds} rounds in {blocks['off'].seconds:.0f}s")
        retrieve: list[float] = []
        blocks["rag"] = await _block(
            {
                "chat": chat_arm(with_rag, [p.chunk_id for p in passages]),
                "direct": direct_arm(triton, [p.text for p in passages]),
            },
            _retrieve_arm(rag, metadata, retrieve),
            rng,
        )
        blocks["rag"].retrieve = retrieve[-blocks["rag"].rounds :]
        print(f"  RAG on: {blocks['rag'].rounds} rounds in {blocks['rag'].seconds:.0f}s")
        await plain.close()
        await with_rag.close()
        return blocks, len(passages)


def run() -> dict:
    with running_mesh(triton_replicas=1) as mesh:
        blocks, passages = asyncio.run(_measure(mesh))

    def ttft(block: str, arm: str, q: float) -> float:
        return ms(percentile([s.ttft for s in blocks[block].samples[arm]], q))

    def itl(block: str, arm: str, q: float) -> float:
        return ms(percentile([g for s in blocks[block].samples[arm] for g in s.gaps], q))

    rows = []
    for block, label in (("off", "RAG off"), ("rag", "RAG on")):
        for arm in ("chat", "direct"):
            samples = blocks[block].samples[arm]
            rows.append(
                (
                    f"{label} {arm}",
                    f"{ttft(block, arm, 50):.2f}",
                    f"{ttft(block, arm, 99):.2f}",
                    f"{itl(block, arm, 50):.3f}",
                    f"{itl(block, arm, 99):.3f}",
                    len(samples[0].gaps) + 1,
                    len(samples),
                )
            )
    retrieve = blocks["rag"].retrieve
    print_table(
        "latency (ms)", ("arm", "ttft p50", "ttft p99", "itl p50", "itl p99", "tokens", "n"), rows
    )
    print(
        f"  RagService.Retrieve via Envoy: p50 {ms(percentile(retrieve, 50)):.2f} ms, "
        f"p99 {ms(percentile(retrieve, 99)):.2f} ms"
    )

    metrics: dict[str, float] = {
        "added_ttft_p50_ms": ttft("off", "chat", 50) - ttft("off", "direct", 50),
        "added_ttft_p99_ms": ttft("off", "chat", 99) - ttft("off", "direct", 99),
        "added_ttft_p50_ms_rag": ttft("rag", "chat", 50) - ttft("rag", "direct", 50),
        "added_ttft_p99_ms_rag": ttft("rag", "chat", 99) - ttft("rag", "direct", 99),
    }
    for block, suffix in (("off", ""), ("rag", "_rag")):
        for arm in ("chat", "direct"):
            for q in (50, 99):
                metrics[f"{arm}_ttft_p{q}_ms{suffix}"] = ttft(block, arm, q)
        for arm in ("chat", "direct"):
            metrics[f"{arm}_itl_p50_ms{suffix}"] = itl(block, arm, 50)
    for block, suffix in (("off", ""), ("rag", "_rag")):
        started = [s.started for s in blocks[block].samples["chat"]]
        metrics[f"chat_turn_started_p50_ms{suffix}"] = ms(percentile(started, 50))
    metrics["retrieve_p50_ms"] = ms(percentile(retrieve, 50))
    off, rag = blocks["off"], blocks["rag"]
    tokens_off = len(off.samples["chat"][0].gaps) + 1
    tokens_rag = len(rag.samples["chat"][0].gaps) + 1
    notes = (
        f"concurrency 1, one open Converse stream per session; after up to {WARMUP} warm-up "
        f"rounds, {off.rounds} RAG-off rounds ({off.seconds:.0f}s) then {rag.rounds} RAG-on "
        f"rounds ({rag.seconds:.0f}s), each round's arms in shuffled order; one CPU Triton "
        f"replica. chat = Envoy (API key, ext_authz) -> chat (history in PostgreSQL) -> "
        f"[RAG: Envoy -> rag -> Envoy -> inference.Embed -> Triton, pgvector] -> the "
        f"router chat embeds, Generate in-process (admission from its slice, or -> Envoy -> "
        f"admission) -> Triton; TTFT from writing the user message "
        f"frame to the first token frame. direct = raw grpc.aio ModelStreamInfer, same "
        f"{MODEL} prompt ({len(QUESTION)} chars), same context (none / the {passages} "
        f"passages retrieval returned, top_k {TOP_K} over {DOCUMENTS} handbook documents), "
        f"max_tokens {MAX_TOKENS}; answers checked identical ({tokens_off} / {tokens_rag} "
        "tokens; the model sleeps 1 ms between tokens). added = chat pXX - direct pXX; "
        "chat_turn_started = from writing the message to the TurnStarted frame (sent once "
        "the turn's first call, Generate or Retrieve, is on its way; the user message is "
        "stored meanwhile); "
        "ITL = gaps between consecutive tokens of an answer, pooled. retrieve = "
        "RagService.Retrieve through Envoy with the same query (a third arm of the RAG "
        f"block). Tenant {TENANT!r} with an admission policy above any rate reached"
    )
    targets = {"added_ttft_p50_ms": "<= 3"}
    return write_result(NAME, metrics, targets, notes)
