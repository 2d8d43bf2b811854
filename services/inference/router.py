"""The routing core: picks model and backend, falls back on failure.

The requests' static bounds (lengths, ranges, counts, enums) are the contract's
`buf.validate` annotations, checked by the runtime before a handler runs; what is
checked here is only what those cannot say (blank text, the configured embed cap).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np

from services.inference.balancer import Balancer
from services.inference.policy import Choice, GeneratorModel, ModelPolicy, complexity
from services.inference.triton import BackendFailure, StreamedToken, TritonBackend
from services.inference.upstream import OpenAIBackend
from services.runtime import (
    FieldViolation,
    Unavailable,
    count_tokens,
    invalid,
    outbound_timeout,
    tracing,
)

logger = logging.getLogger(__name__)

EMBED_TEXTS_HARD_MAX = 512
"""EmbedRequest.texts' `max_items` in the contract: the configured cap is at most this."""
RETRY_AFTER = timedelta(seconds=2)


@dataclass
class GenerateInput:
    prompt: str
    passages: Sequence[str]
    max_tokens: int = 0
    temperature: float = 0.0
    model: str = ""
    tier: str = ""
    session_id: str = ""


@dataclass
class GenerateResult:
    """What the stream ended with (filled in as tokens arrive)."""

    choice: Choice
    backend: str = ""
    completion_tokens: int = 0
    first_token_s: float | None = None
    segments: list[tuple[int, str]] = field(default_factory=list)
    """Quoted spans: (passage index, text), one per sentence the model took from it."""

    def add(self, token: StreamedToken) -> None:
        self.completion_tokens += 1
        if token.passage < 0:
            return
        if self.segments:
            passage, text = self.segments[-1]
            if passage == token.passage and not text.rstrip().endswith((".", "!", "?")):
                self.segments[-1] = (passage, text + token.text)
                return
        self.segments.append((token.passage, token.text))

    @property
    def finished_by_length(self) -> bool:
        return self.completion_tokens >= self.choice.max_tokens


def validate_generate(request: GenerateInput) -> None:
    """What the contract's annotations cannot say about a (validated) GenerateRequest:
    the prompt and the passages must not be blank.

    Raises:
        InvalidArgument: `INVALID_REQUEST`, with a field violation per blank text.
    """
    problems = []
    if not request.prompt.strip():
        problems.append(FieldViolation("prompt", "must not be empty"))
    for i, passage in enumerate(request.passages):
        if not passage.strip():
            problems.append(FieldViolation(f"context[{i}].text", "must not be empty"))
    if problems:
        raise invalid(problems, what="GenerateRequest")


def validate_embed(texts: Sequence[str], *, max_texts: int = EMBED_TEXTS_HARD_MAX) -> None:
    """What the contract's annotations cannot say about a (validated) EmbedRequest: no
    blank text, and at most the configured `max_texts` texts.

    Raises:
        InvalidArgument: `INVALID_REQUEST`, with a field violation per problem.
    """
    problems = []
    if len(texts) > max_texts:
        problems.append(FieldViolation("texts", f"at most {max_texts} texts per call"))
    for i, text in enumerate(texts):
        if not text.strip():
            problems.append(FieldViolation(f"texts[{i}]", "must not be blank"))
    if problems:
        raise invalid(problems[:20], what="EmbedRequest")


def _backend_span(
    operation: str, backend: TritonBackend | OpenAIBackend, model: str, *, fallback: bool
) -> tracing.AnySpan:
    """A client span of one call to a backend (Triton, or an OpenAI-compatible upstream):
    which one, its breaker's state, and whether it serves a fallback tier."""
    return tracing.start_span(
        f"{operation} {model}",
        kind=tracing.SpanKind.CLIENT,
        attributes={
            "gen_ai.operation.name": "embeddings"
            if operation == "embeddings"
            else "text_completion",
            "gen_ai.request.model": model,
            "gen_ai.system": "triton" if isinstance(backend, TritonBackend) else "openai",
            "switchboard.backend": backend.name,
            "switchboard.breaker": backend.breaker.state.name.lower(),
            "switchboard.fallback": fallback,
        },
    )


def _all_down(model: str, tier: str = "") -> Unavailable:
    return Unavailable(
        f"no inference backend can serve {model} now; retry shortly",
        reason="BACKENDS_UNAVAILABLE",
        retry_after=RETRY_AFTER,
        metadata={"model": model, "tier": tier},
    )


class Router:
    """Routes generations and embeddings over a set of Triton backends, and the
    generators that have an OpenAI-compatible upstream of their own over theirs."""

    def __init__(
        self,
        *,
        policy: ModelPolicy,
        backends: Sequence[TritonBackend],
        upstreams: Mapping[str, Sequence[OpenAIBackend]] | None = None,
        affinity_slack: int = 4,
        embed_max_texts: int = EMBED_TEXTS_HARD_MAX,
    ) -> None:
        if not 1 <= embed_max_texts <= EMBED_TEXTS_HARD_MAX:
            raise ValueError(f"embed_max_texts must be 1..{EMBED_TEXTS_HARD_MAX}")
        self.policy = policy
        self.backends = list(backends)
        self.upstreams = {name: list(served) for name, served in (upstreams or {}).items()}
        self.embed_max_texts = embed_max_texts
        self.balancer = Balancer(self.backends, affinity_slack=affinity_slack)
        self._upstream_balancers = {
            name: Balancer(served, affinity_slack=affinity_slack)
            for name, served in self.upstreams.items()
        }

    def backends_of(self, model: str) -> list[TritonBackend] | list[OpenAIBackend]:
        """The backends serving `model`: its upstream's, or the Triton replicas."""
        return self.upstreams.get(model, self.backends)

    @property
    def every_backend(self) -> list[TritonBackend | OpenAIBackend]:
        return [*self.backends, *(b for served in self.upstreams.values() for b in served)]

    async def refresh(self) -> bool:
        """Re-checks every backend's readiness; True when at least one Triton replica
        (which the embedder needs) is ready."""
        models = self.policy.triton_models
        results = await asyncio.gather(
            *(b.check_ready(models) for b in self.backends),
            *(b.check_ready() for served in self.upstreams.values() for b in served),
        )
        return any(results[: len(self.backends)])

    def _order(self, model: GeneratorModel, session_id: str) -> list:
        balancer = self._upstream_balancers.get(model.name, self.balancer)
        return balancer.order(session_id)

    def _models(self, chosen: GeneratorModel, total_tokens: int) -> Iterator[GeneratorModel]:
        """The chosen model, then (only once its backends have all failed) the fallbacks."""
        yield chosen
        yield from self.policy.fallbacks(chosen, total_tokens)

    def choose(self, request: GenerateInput) -> Choice:
        validate_generate(request)
        prompt_tokens = count_tokens(request.prompt) + sum(map(count_tokens, request.passages))
        return self.policy.choose(
            prompt_tokens=prompt_tokens,
            complexity_score=complexity(request.prompt),
            requested_max_tokens=request.max_tokens,
            model=request.model,
            tier=request.tier,
        )

    async def generate(
        self, request: GenerateInput, result: GenerateResult
    ) -> AsyncIterator[StreamedToken]:
        """Streams tokens, trying backends then fallback tiers until one starts streaming.

        Once a token has been sent, a failure ends the stream with that error: tokens
        cannot be taken back, so there is no silent retry mid-answer.
        """
        started = time.perf_counter()
        chosen = result.choice.model
        for model in self._models(chosen, result.choice.prompt_tokens + result.choice.max_tokens):
            for backend in self._order(model, request.session_id):
                if not backend.breaker.allow():
                    continue
                span = _backend_span("generate", backend, model.name, fallback=model is not chosen)
                stream = backend.generate(
                    model.name,
                    request.prompt,
                    request.passages,
                    result.choice.max_tokens,
                    timeout=outbound_timeout(None),
                )
                try:
                    async for token in stream:
                        if result.first_token_s is None:
                            result.first_token_s = time.perf_counter() - started
                            result.backend = backend.name
                            if model is not result.choice.model:
                                result.choice = Choice(
                                    model,
                                    result.choice.prompt_tokens,
                                    result.choice.complexity,
                                    result.choice.max_tokens,
                                )
                        result.add(token)
                        yield token
                except BackendFailure as failure:
                    backend.breaker.record_failure()
                    tracing.fail(span, failure.message)
                    if result.first_token_s is not None:
                        raise
                    logger.warning(
                        "backend failed; trying the next",
                        extra={
                            "backend": backend.name,
                            "model": model.name,
                            "error": failure.message,
                        },
                    )
                    continue
                finally:
                    await stream.aclose()
                    span.set_attribute("gen_ai.usage.output_tokens", result.completion_tokens)
                    span.end()
                backend.breaker.record_success()
                if result.first_token_s is None:
                    result.backend = backend.name
                return
        raise _all_down(result.choice.model.name, result.choice.model.tier)

    async def embed(self, texts: Sequence[str], *, model: str = "") -> np.ndarray:
        """Embeds `texts` in Triton-sized batches, concurrently, on the least loaded backends,
        with `model` (a validated embedder name; "" = the default)."""
        validate_embed(texts, max_texts=self.embed_max_texts)
        model = model or self.policy.embedder.name
        size = self.policy.embedder.max_batch
        if len(texts) <= size:
            return await self._embed_chunk(texts, model)
        chunks = [texts[i : i + size] for i in range(0, len(texts), size)]
        parts = await asyncio.gather(*(self._embed_chunk(chunk, model) for chunk in chunks))
        return np.concatenate(parts, axis=0)

    async def _embed_chunk(self, texts: Sequence[str], model: str) -> np.ndarray:
        for backend in self.balancer.order():
            if not backend.breaker.allow():
                continue
            span = _backend_span("embeddings", backend, model, fallback=False)
            span.set_attribute("switchboard.embed.texts", len(texts))
            try:
                vectors = await backend.embed(model, texts, timeout=outbound_timeout(None))
            except BackendFailure as failure:
                backend.breaker.record_failure()
                tracing.fail(span, failure.message)
                continue
            finally:
                span.end()
            backend.breaker.record_success()
            return vectors
        raise _all_down(model)
