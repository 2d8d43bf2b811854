"""InferenceService servicer: proto in, router call, proto out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta

import grpc
from switchboard.common.v1 import common_pb2
from switchboard.inference.v1 import inference_pb2, inference_service_pb2_grpc

from services.inference import metrics
from services.inference.admission import AdmissionGate, Ask
from services.inference.policy import Choice
from services.inference.router import GenerateInput, GenerateResult, Router
from services.inference.stops import StopMatcher
from services.inference.triton import TritonBackend
from services.inference.upstream import OpenAIBackend
from services.runtime import TIER_VALUES, TIERS, count_tokens, require_tenant, tracing

logger = logging.getLogger(__name__)

_BREAKER_STATES = {
    "closed": inference_pb2.BACKEND_STATE_HEALTHY,
    "open": inference_pb2.BACKEND_STATE_OPEN,
    "half-open": inference_pb2.BACKEND_STATE_HALF_OPEN,
}


def _citations(
    request: GenerateInput, result: GenerateResult, sources: list[str]
) -> list[common_pb2.Citation]:
    """One citation per quoted sentence, with its character span in the passage."""
    citations, seen = [], set()
    for index, text in result.segments:
        quoted = text.strip()
        if (index, quoted) in seen or not quoted:
            continue
        seen.add((index, quoted))
        passage = request.passages[index] if index < len(request.passages) else ""
        start = passage.find(quoted)
        citations.append(
            common_pb2.Citation(
                passage_index=index,
                source_id=sources[index] if index < len(sources) else "",
                start_char=max(start, 0),
                end_char=start + len(quoted) if start >= 0 else 0,
                text=quoted,
            )
        )
    return citations


class InferenceServicer(inference_service_pb2_grpc.InferenceServiceServicer):
    def __init__(self, router: Router, *, admission: AdmissionGate | None = None) -> None:
        self._router = router
        self._admission = admission

    async def Generate(  # noqa: N802 - gRPC method name
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        # every generation is admitted and charged to a tenant: none, no generation
        tenant = require_tenant()
        params = GenerateInput(
            prompt=request.prompt,
            passages=[p.text for p in request.context],
            max_tokens=request.parameters.max_tokens,
            temperature=request.parameters.temperature,
            model=request.model,
            # the contract refuses a tier outside the enum before this runs
            tier=TIERS[request.tier] if request.tier else "",
            session_id=request.session_id,
        )
        result = GenerateResult(choice=self._router.choose(params))
        _trace_choice(result.choice, request.parameters.max_tokens)
        if self._admission is None:
            async for reply in self._generate(request, params, result):
                yield reply
            return
        choice = result.choice
        ask = Ask(
            tenant_id=tenant,
            tier=choice.model.tier,
            prompt_tokens=choice.prompt_tokens,
            max_tokens=choice.max_tokens,
            priority=request.priority or common_pb2.PRIORITY_INTERACTIVE,
        )
        span = tracing.start_span(
            "admission.admit",
            attributes={"switchboard.priority": ask.priority, "switchboard.tier": ask.tier},
        )
        queued = 0
        try:
            if request.report_queue_position:
                lease_id = ""
                async for update in self._admission.admit_stream(ask):
                    if isinstance(update, str):
                        lease_id = update
                    else:
                        queued += 1
                        span.set_attribute("switchboard.admission.position", update.position)
                        yield inference_pb2.GenerateResponse(queued=update)
            else:
                lease_id = await self._admission.admit(ask)
        except BaseException as exc:
            span.set_attribute("switchboard.admission.decision", "refused")
            tracing.fail(span, exc)
            raise
        else:
            span.set_attribute("switchboard.admission.decision", "admitted")
        finally:
            span.set_attribute("switchboard.admission.queued", queued > 0)
            span.end()
        try:
            async for reply in self._generate(request, params, result):
                yield reply
                # the gate's bookkeeping frames (claim, ask for more) go out once the
                # first reply has, not on the way to it
                self._admission.flush()
        finally:
            self._admission.release(
                lease_id,
                tenant_id=tenant,
                prompt=choice.prompt_tokens,
                completion=result.completion_tokens,
            )

    async def _generate(
        self,
        request: inference_pb2.GenerateRequest,
        params: GenerateInput,
        result: GenerateResult,
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        started = time.perf_counter()
        outcome = "error"
        stops = StopMatcher(request.parameters.stop)
        try:
            index = 0
            finish = inference_pb2.FINISH_REASON_STOP
            passage = -1
            async with contextlib.aclosing(self._router.generate(params, result)) as tokens:
                async for token in tokens:
                    fed = stops.feed(token.text)
                    passage = token.passage
                    if fed.text:
                        yield _delta(fed.text, index, passage)
                        index += 1
                    if fed.stopped:
                        break  # leaving the block closes the generation: Triton stops
            if held := stops.flush():
                yield _delta(held, index, passage)
            outcome = "stop"
            if result.finished_by_length and not stops.stopped:
                finish = inference_pb2.FINISH_REASON_LENGTH
                outcome = "length"
            model = result.choice.model
            complete = inference_pb2.GenerationComplete(
                usage=common_pb2.TokenUsage(
                    prompt_tokens=result.choice.prompt_tokens,
                    completion_tokens=result.completion_tokens,
                    total_tokens=result.choice.prompt_tokens + result.completion_tokens,
                ),
                model=common_pb2.ModelRef(name=model.name, tier=TIER_VALUES[model.tier]),
                backend=result.backend,
                finish_reason=finish,
                citations=_citations(params, result, [p.source_id for p in request.context]),
            )
            if result.first_token_s is not None:
                complete.time_to_first_token.FromTimedelta(timedelta(seconds=result.first_token_s))
            _trace_completion(complete, result.first_token_s)
            yield inference_pb2.GenerateResponse(complete=complete)
        except (asyncio.CancelledError, GeneratorExit):
            if outcome == "error":  # not once the answer is complete
                outcome = "cancelled"
            raise
        finally:
            metrics.record_generation(
                model=result.choice.model.name,
                tier=result.choice.model.tier,
                reason=outcome,
                input_tokens=result.choice.prompt_tokens,
                output_tokens=result.completion_tokens,
                first_token_s=result.first_token_s,
                duration_s=time.perf_counter() - started,
            )

    async def Embed(  # noqa: N802 - gRPC method name
        self, request: inference_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.EmbedResponse:
        model = self._router.policy.embedder_name(request.model)
        vectors = await self._router.embed(list(request.texts), model=model)
        tokens = sum(count_tokens(t) for t in request.texts)
        span = tracing.current_span()
        if span.is_recording():
            span.set_attributes(
                {
                    "gen_ai.operation.name": "embeddings",
                    "gen_ai.request.model": model,
                    "gen_ai.usage.input_tokens": tokens,
                }
            )
        return inference_pb2.EmbedResponse(
            embeddings=[inference_pb2.Embedding(values=row) for row in vectors.tolist()],
            model=model,
            dimensions=int(vectors.shape[1]),
            usage=common_pb2.TokenUsage(prompt_tokens=tokens, total_tokens=tokens),
        )

    async def ListModels(  # noqa: N802 - gRPC method name
        self, request: inference_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ListModelsResponse:
        policy = self._router.policy
        models = [
            inference_pb2.ModelInfo(
                name=g.name,
                tier=TIER_VALUES[g.tier],
                context_tokens=g.context_tokens,
                relative_cost=g.relative_cost,
                kind=inference_pb2.MODEL_KIND_GENERATOR,
                healthy=_healthy(self._router.backends_of(g.name)),
                backends=_backend_infos(self._router.backends_of(g.name)),
            )
            for g in policy.generators
        ]
        models.extend(
            inference_pb2.ModelInfo(
                name=name,
                kind=inference_pb2.MODEL_KIND_EMBEDDER,
                context_tokens=256,
                relative_cost=0.1,
                healthy=_healthy(self._router.backends),
                backends=_backend_infos(self._router.backends),
            )
            for name in policy.embedder.names
        )
        return inference_pb2.ListModelsResponse(models=models)


def _trace_choice(choice: Choice, requested_max_tokens: int) -> None:
    """The generation's span (the Generate call's) names the model chosen and why."""
    span = tracing.current_span()
    if span.is_recording():
        span.set_attributes(
            {
                "gen_ai.operation.name": "text_completion",
                "gen_ai.request.model": choice.model.name,
                "gen_ai.request.max_tokens": choice.max_tokens,
                "switchboard.tier": choice.model.tier,
                "switchboard.route.prompt_tokens": choice.prompt_tokens,
                "switchboard.route.complexity": round(choice.complexity, 3),
                "switchboard.route.requested_max_tokens": requested_max_tokens,
            }
        )


def _trace_completion(
    complete: inference_pb2.GenerationComplete, first_token_s: float | None
) -> None:
    span = tracing.current_span()
    if span.is_recording():
        span.set_attributes(
            {
                "gen_ai.response.model": complete.model.name,
                "gen_ai.usage.input_tokens": complete.usage.prompt_tokens,
                "gen_ai.usage.output_tokens": complete.usage.completion_tokens,
                "gen_ai.response.finish_reasons": [
                    inference_pb2.FinishReason.Name(complete.finish_reason)
                    .removeprefix("FINISH_REASON_")
                    .lower()
                ],
                "switchboard.backend": complete.backend,
            }
        )
        if first_token_s is not None:
            span.set_attribute("gen_ai.server.time_to_first_token", first_token_s)


def _delta(text: str, index: int, passage: int) -> inference_pb2.GenerateResponse:
    return inference_pb2.GenerateResponse(
        token=inference_pb2.TokenDelta(text=text, index=index, passage_index=passage)
    )


def _healthy(backends: Sequence[TritonBackend | OpenAIBackend]) -> bool:
    return any(b.ready and b.accepting() for b in backends)


def _backend_infos(
    backends: Sequence[TritonBackend | OpenAIBackend],
) -> list[inference_pb2.BackendInfo]:
    return [
        inference_pb2.BackendInfo(
            name=b.name,
            address=b.address,
            outstanding=b.outstanding,
            state=_BREAKER_STATES[b.breaker.state],
        )
        for b in backends
    ]
