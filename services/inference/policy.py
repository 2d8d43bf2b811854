"""Model routing policy: which generator tier serves a prompt, by size and complexity."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from services.inference.upstream import Upstream
from services.runtime import TIERS as TIER_NAMES
from services.runtime import FailedPrecondition, FieldViolation, InvalidArgument, NotFound, invalid

logger = logging.getLogger(__name__)

_HARD_WORDS = re.compile(
    r"\b(why|how|explain|compare|contrast|analy[sz]e|derive|prove|trade-?offs?|evaluate|"
    r"design|reason|implications?|step[- ]by[- ]step|difference)\b",
    re.IGNORECASE,
)
_CODE_OR_MATH = re.compile(r"[{}();=<>^∑∫√]|```|\bdef\b|\bclass\b|\d+\s*[-+*/]\s*\d+")
TIERS = tuple(TIER_NAMES.values())
"""The tiers' names, cheapest first (the catalogue's)."""


def complexity(prompt: str) -> float:
    """A 0..1 estimate of how hard a prompt is to answer well.

    Signals: reasoning verbs (why/how/compare/explain...), several questions in one,
    code or maths, long words, and sheer length. Cheap and deterministic on purpose:
    it runs on every request.
    """
    words = re.findall(r"\w+", prompt)
    if not words:
        return 0.0
    reasoning = min(len(_HARD_WORDS.findall(prompt)), 3) / 3
    questions = min(prompt.count("?"), 3) / 3
    technical = 1.0 if _CODE_OR_MATH.search(prompt) else 0.0
    long_words = sum(len(w) >= 9 for w in words) / len(words)
    length = min(math.log10(len(words) + 1) / 3, 1.0)
    score = (
        0.40 * reasoning + 0.15 * questions + 0.15 * technical + 0.15 * long_words + 0.15 * length
    )
    return round(min(score, 1.0), 4)


def _wrong_model(description: str, *, what: str) -> InvalidArgument:
    """A model that exists but cannot serve this call: a field violation on `model`."""
    return invalid([FieldViolation("model", description)], what=what)


@dataclass(frozen=True)
class GeneratorModel:
    name: str
    tier: str
    context_tokens: int
    relative_cost: float
    default_max_tokens: int
    auto_max_prompt_tokens: int | None
    auto_max_complexity: float | None
    upstream: Upstream | None = None
    """Served by this OpenAI-compatible endpoint instead of Triton."""


@dataclass(frozen=True)
class EmbedderModel:
    name: str
    dimensions: int
    max_batch: int
    variants: tuple[str, ...] = ()
    """Other Triton names serving the same weights (e.g. without dynamic batching)."""

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.variants)


@dataclass(frozen=True)
class Choice:
    model: GeneratorModel
    prompt_tokens: int
    complexity: float
    max_tokens: int


@dataclass(frozen=True)
class ModelPolicy:
    """The generators (cheapest first) and the embedder the service routes to."""

    generators: tuple[GeneratorModel, ...]
    embedder: EmbedderModel

    @classmethod
    def load(cls, path: Path) -> ModelPolicy:
        raw = yaml.safe_load(path.read_text())
        generators = []
        for item in raw["generators"]:
            auto = item.get("auto") or {}
            if item["tier"] not in TIERS:
                raise ValueError(f"{path}: unknown tier {item['tier']!r} (use {TIERS})")
            generators.append(
                GeneratorModel(
                    name=item["name"],
                    tier=item["tier"],
                    context_tokens=int(item["context_tokens"]),
                    relative_cost=float(item["relative_cost"]),
                    default_max_tokens=int(item.get("default_max_tokens", 128)),
                    auto_max_prompt_tokens=auto.get("max_prompt_tokens"),
                    auto_max_complexity=auto.get("max_complexity"),
                    upstream=(
                        Upstream.parse(item["upstream"], generator=item["name"])
                        if item.get("upstream")
                        else None
                    ),
                )
            )
        if not generators:
            raise ValueError(f"{path}: no generators")
        generators.sort(key=lambda g: g.relative_cost)
        emb = raw["embedder"]
        return cls(
            tuple(generators),
            EmbedderModel(
                emb["name"],
                int(emb["dimensions"]),
                int(emb.get("max_batch", 64)),
                tuple(emb.get("variants") or ()),
            ),
        )

    @property
    def triton_models(self) -> tuple[str, ...]:
        """The models every Triton replica must serve: the embedder and the generators
        without an upstream of their own."""
        return (self.embedder.name, *(g.name for g in self.generators if g.upstream is None))

    def embedder_name(self, requested: str) -> str:
        """The embedder an Embed call asks for ("" = the default).

        Raises:
            InvalidArgument: `INVALID_REQUEST`, `requested` names a generator.
            NotFound: `MODEL_NOT_FOUND`, no model has that name.
        """
        if not requested:
            return self.embedder.name
        if requested in self.embedder.names:
            return requested
        if any(g.name == requested for g in self.generators):
            raise _wrong_model(
                f"{requested!r} is a generator; Embed takes an embedder "
                f"({', '.join(self.embedder.names)})",
                what="EmbedRequest",
            )
        raise NotFound(
            f"embedder {requested!r} does not exist (embedders: {', '.join(self.embedder.names)})",
            reason="MODEL_NOT_FOUND",
            metadata={"model": requested},
        )

    def generator(self, name: str, *, tier: str = "") -> GeneratorModel:
        """The generator a Generate call names, which must belong to `tier` when one is
        pinned.

        Raises:
            InvalidArgument: `INVALID_REQUEST`, `name` is an embedder's, or a generator
                of another tier than `tier`.
            NotFound: `MODEL_NOT_FOUND`, no model has that name.
        """
        for model in self.generators:
            if model.name == name:
                if tier and model.tier != tier:
                    raise _wrong_model(
                        f"{name!r} belongs to tier {model.tier!r}, not to the pinned tier {tier!r}",
                        what="GenerateRequest",
                    )
                return model
        if name in self.embedder.names:
            raise _wrong_model(
                f"{name!r} is an embedder; Generate takes a generator", what="GenerateRequest"
            )
        raise NotFound(
            f"model {name!r} does not exist; ListModels shows the models served",
            reason="MODEL_NOT_FOUND",
            metadata={"model": name},
        )

    def choose(
        self,
        *,
        prompt_tokens: int,
        complexity_score: float,
        requested_max_tokens: int,
        model: str = "",
        tier: str = "",
    ) -> Choice:
        """Picks the generator for a request (explicit model, pinned tier, or automatic).

        Raises:
            InvalidArgument: the named model is not a generator of the pinned tier.
            NotFound: the named model does not exist.
            FailedPrecondition: no candidate's context holds the prompt and completion.
        """
        if model:
            candidates: Sequence[GeneratorModel] = [self.generator(model, tier=tier)]
        elif tier:
            candidates = [g for g in self.generators if g.tier == tier]
            if not candidates:
                raise NotFound(
                    f"no model serves tier {tier!r}",
                    reason="MODEL_NOT_FOUND",
                    metadata={"tier": tier},
                )
        else:
            candidates = self._automatic(prompt_tokens, complexity_score)
        for candidate in candidates:
            max_tokens = requested_max_tokens or candidate.default_max_tokens
            if prompt_tokens + max_tokens <= candidate.context_tokens:
                return Choice(candidate, prompt_tokens, complexity_score, max_tokens)
        largest = max(c.context_tokens for c in candidates)
        raise FailedPrecondition(
            f"prompt of {prompt_tokens} tokens plus the completion does not fit any "
            f"model's context (largest: {largest} tokens)",
            reason="PROMPT_TOO_LONG",
            metadata={"prompt_tokens": str(prompt_tokens), "max_context_tokens": str(largest)},
        )

    def _automatic(self, prompt_tokens: int, score: float) -> list[GeneratorModel]:
        """Cheapest tier whose auto limits admit the prompt first, then every larger one."""
        fits = [
            g
            for g in self.generators
            if (g.auto_max_prompt_tokens is None or prompt_tokens <= g.auto_max_prompt_tokens)
            and (g.auto_max_complexity is None or score <= g.auto_max_complexity)
        ]
        start = self.generators.index(fits[0]) if fits else len(self.generators) - 1
        return list(self.generators[start:])

    def fallbacks(self, chosen: GeneratorModel, total_tokens: int) -> list[GeneratorModel]:
        """Other tiers able to serve the request if every backend of `chosen` fails."""
        return [g for g in self.generators if g is not chosen and total_tokens <= g.context_tokens]
