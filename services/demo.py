"""`make demo`: start the mesh, stream a generation and embeddings through Envoy, stop it."""

from __future__ import annotations

import asyncio
import logging
import sys
import time

import grpc
import numpy as np
from switchboard.common.v1 import common_pb2
from switchboard.inference.v1 import inference_pb2 as pb
from switchboard.inference.v1 import inference_service_pb2_grpc

from services.launcher._config import load_launcher_config
from services.launcher._mesh import LaunchError, Mesh

logger = logging.getLogger(__name__)

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


async def _show(target: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
        models = await stub.ListModels(pb.ListModelsRequest(), timeout=10)
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

        reply = await stub.Embed(pb.EmbedRequest(texts=SENTENCES), timeout=30)
        vectors = np.array([e.values for e in reply.embeddings])
        print(
            f"\nEmbeddings: {len(vectors)} x {reply.dimensions} ({reply.model}); cosine similarity:"
        )
        sims = vectors @ vectors.T
        for i, text in enumerate(SENTENCES):
            row = " ".join(f"{s:5.2f}" for s in sims[i])
            print(f"  {row}   {text}")
        print()


def main() -> int:
    mesh = Mesh(load_launcher_config(), progress=_say)
    started = False
    try:
        started = mesh.up()
        asyncio.run(_show(mesh.envoy_address))
    except LaunchError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    finally:
        if started:
            _say("stopping everything the demo started")
            mesh.down()
        else:
            _say("leaving the mesh that was already running as it was (make down stops it)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
