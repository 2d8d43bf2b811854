"""The routing core: validates requests, picks model and backend, falls back on failure."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np

from services.inference.balancer import Balancer
from services.inference.policy import Choice, ModelPolicy, complexity
from services.inference.triton import BackendFailure, StreamedToken, TritonBackend
from services.runtime import (
    FieldViolation,
    Unavailable,
    count_tokens,
    invalid,
    outbound_timeout,
)

logger = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 256 * 1024
MAX_PASSAGES = 64
MAX_TOKENS_CAP = 4096
MAX_EMBED_TEXTS = 512
MAX_EMBED_TEXT_CHARS = 32 * 1024
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
    problems = []
    if not request.prompt.strip():
        problems.append(FieldViolation("prompt", "must not be empty"))
    elif len(request.prompt) > MAX_PROMPT_CHARS:
        problems.append(FieldViolation("prompt", f"longer than {MAX_PROMPT_CHARS} characters"))
    if len(request.passages) > MAX_PASSAGES:
        problems.append(FieldViolation("context", f"more than {MAX_PASSAGES} passages"))
    for i, passage in enumerate(request.passages):
        if not passage.strip():
            problems.append(FieldViolation(f"context[{i}].text", "must not be empty"))
    if not 0 <= request.max_tokens <= MAX_TOKENS_CAP:
        problems.append(
            FieldViolation(
                "parameters.max_tokens", f"must be within 0..{MAX_TOKENS_CAP} (0: model default)"
            )
        )
    if not (math.isfinite(request.temperature) and 0.0 <= request.temperature <= 2.0):
        problems.append(FieldViolation("parameters.temperature", "must be within 0..2"))
    if len(request.session_id) > 256:
        problems.append(FieldViolation("session_id", "longer than 256 characters"))
    if problems:
        raise invalid(problems, what="GenerateRequest")


def validate_embed(texts: Sequence[str]) -> None:
    problems = []
    if not texts:
        problems.append(FieldViolation("texts", "at least one text is required"))
    if len(texts) > MAX_EMBED_TEXTS:
        problems.append(FieldViolation("texts", f"at most {MAX_EMBED_TEXTS} texts per call"))
    for i, text in enumerate(texts):
        if not text.strip():
            problems.append(FieldViolation(f"texts[{i}]", "must not be empty"))
        elif len(text) > MAX_EMBED_TEXT_CHARS:
            problems.append(
                FieldViolation(f"texts[{i}]", f"longer than {MAX_EMBED_TEXT_CHARS} characters")
            )
    if problems:
        raise invalid(problems[:20], what="EmbedRequest")


def _all_down(model: str, tier: str = "") -> Unavailable:
    return Unavailable(
        f"no inference backend can serve {model} now; retry shortly",
        reason="BACKENDS_UNAVAILABLE",
        retry_after=RETRY_AFTER,
        metadata={"model": model, "tier": tier},
    )


class Router:
    """Routes generations and embeddings over a set of Triton backends."""

    def __init__(
        self, *, policy: ModelPolicy, backends: Sequence[TritonBackend], affinity_slack: int = 4
    ) -> None:
        self.policy = policy
        self.backends = list(backends)
        self.balancer = Balancer(self.backends, affinity_slack=affinity_slack)

    @property
    def required_models(self) -> tuple[str, ...]:
        return (self.policy.embedder.name, *(g.name for g in self.policy.generators))

    async def refresh(self) -> bool:
        """Re-checks every backend's readiness; True when at least one is ready."""
        results = await asyncio.gather(
            *(b.check_ready(self.required_models) for b in self.backends)
        )
        return any(results)

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
        total = result.choice.prompt_tokens + result.choice.max_tokens
        models = [result.choice.model, *self.policy.fallbacks(result.choice.model, total)]
        for model in models:
            for backend in self.balancer.order(request.session_id):
                if not backend.breaker.allow():
                    continue
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
                backend.breaker.record_success()
                if result.first_token_s is None:
                    result.backend = backend.name
                return
        raise _all_down(result.choice.model.name, result.choice.model.tier)

    async def embed(self, texts: Sequence[str], *, model: str = "") -> np.ndarray:
        """Embeds `texts` in Triton-sized batches, concurrently, on the least loaded backends,
        with `model` (a validated embedder name; "" = the default)."""
        validate_embed(texts)
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
            try:
                vectors = await backend.embed(model, texts, timeout=outbound_timeout(None))
            except BackendFailure:
                backend.breaker.record_failure()
                continue
            backend.breaker.record_success()
            return vectors
        raise _all_down(model)
