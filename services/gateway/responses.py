"""InferenceService replies → OpenAI response bodies (pure: no I/O).

Besides OpenAI's fields, a finished completion carries `switchboard`: the model and tier
that served it, the backend, and the citations of the context passages (messages) its
answer drew on. OpenAI's clients keep unknown fields and ignore them.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from switchboard.common.v1 import common_pb2
from switchboard.inference.v1 import inference_pb2

from services.runtime import TIERS

logger = logging.getLogger(__name__)

OWNER = "switchboard"
"""`owned_by` of every model."""
MODEL_HEADER = "x-switchboard-model"
TIER_HEADER = "x-switchboard-tier"
BACKEND_HEADER = "x-switchboard-backend"
_FINISH = {
    inference_pb2.FINISH_REASON_LENGTH: "length",
}
"""OpenAI's finish_reason of each FinishReason; any other ending is `stop`."""
_KINDS = {
    inference_pb2.MODEL_KIND_GENERATOR: "generator",
    inference_pb2.MODEL_KIND_EMBEDDER: "embedder",
}
_STATES = {
    inference_pb2.BACKEND_STATE_HEALTHY: "healthy",
    inference_pb2.BACKEND_STATE_OPEN: "open",
    inference_pb2.BACKEND_STATE_HALF_OPEN: "half_open",
}


def usage(tokens: common_pb2.TokenUsage) -> dict[str, int]:
    return {
        "prompt_tokens": tokens.prompt_tokens,
        "completion_tokens": tokens.completion_tokens,
        "total_tokens": tokens.total_tokens,
    }


def finish_reason(complete: inference_pb2.GenerationComplete) -> str:
    return _FINISH.get(complete.finish_reason, "stop")


def provenance(complete: inference_pb2.GenerationComplete) -> dict[str, Any]:
    """The `switchboard` field: what served the completion and what it cites."""
    return {
        "model": complete.model.name,
        "tier": TIERS.get(complete.model.tier, ""),
        "backend": complete.backend,
        "citations": [
            {
                "passage_index": c.passage_index,
                "source_id": c.source_id,
                "start_char": c.start_char,
                "end_char": c.end_char,
                "text": c.text,
            }
            for c in complete.citations
        ],
    }


def provenance_headers(complete: inference_pb2.GenerationComplete) -> dict[str, str]:
    """The serving model, tier and backend as response headers (non-streaming answers:
    a stream's headers go out before they are known)."""
    return {
        MODEL_HEADER: complete.model.name,
        TIER_HEADER: TIERS.get(complete.model.tier, ""),
        BACKEND_HEADER: complete.backend,
    }


@dataclass(frozen=True)
class Completion:
    """Identifies one completion across its chunks."""

    id: str
    created: int
    model: str
    """The model as requested; the serving model replaces it once known."""


class ChatShape:
    """`chat.completion` and `chat.completion.chunk` bodies."""

    id_prefix = "chatcmpl-"

    def whole(
        self, c: Completion, text: str, complete: inference_pb2.GenerationComplete
    ) -> dict[str, Any]:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": None,
            "finish_reason": finish_reason(complete),
        }
        return {
            **_head(c, "chat.completion", complete.model.name),
            "choices": [choice],
            "usage": usage(complete.usage),
            "switchboard": provenance(complete),
        }

    def first(self, c: Completion) -> dict[str, Any]:
        return self._chunk(c, c.model, {"role": "assistant", "content": ""})

    def piece(self, c: Completion, text: str) -> dict[str, Any]:
        return self._chunk(c, c.model, {"content": text})

    def last(self, c: Completion, complete: inference_pb2.GenerationComplete) -> dict[str, Any]:
        return {
            **self._chunk(c, complete.model.name, {}, finish_reason(complete)),
            "switchboard": provenance(complete),
        }

    def usage_chunk(
        self, c: Completion, complete: inference_pb2.GenerationComplete
    ) -> dict[str, Any]:
        return {
            **_head(c, "chat.completion.chunk", complete.model.name),
            "choices": [],
            "usage": usage(complete.usage),
        }

    def _chunk(
        self, c: Completion, model: str, delta: Mapping[str, Any], finish: str | None = None
    ) -> dict[str, Any]:
        choice = {"index": 0, "delta": dict(delta), "logprobs": None, "finish_reason": finish}
        return {**_head(c, "chat.completion.chunk", model), "choices": [choice]}


class TextShape:
    """`text_completion` bodies (the legacy completions API), whole and streamed."""

    id_prefix = "cmpl-"

    def whole(
        self, c: Completion, text: str, complete: inference_pb2.GenerationComplete
    ) -> dict[str, Any]:
        return {
            **_head(c, "text_completion", complete.model.name),
            "choices": [self._choice(text, finish_reason(complete))],
            "usage": usage(complete.usage),
            "switchboard": provenance(complete),
        }

    def first(self, c: Completion) -> dict[str, Any] | None:
        return None

    def piece(self, c: Completion, text: str) -> dict[str, Any]:
        return {**_head(c, "text_completion", c.model), "choices": [self._choice(text, None)]}

    def last(self, c: Completion, complete: inference_pb2.GenerationComplete) -> dict[str, Any]:
        return {
            **_head(c, "text_completion", complete.model.name),
            "choices": [self._choice("", finish_reason(complete))],
            "switchboard": provenance(complete),
        }

    def usage_chunk(
        self, c: Completion, complete: inference_pb2.GenerationComplete
    ) -> dict[str, Any]:
        return {
            **_head(c, "text_completion", complete.model.name),
            "choices": [],
            "usage": usage(complete.usage),
        }

    @staticmethod
    def _choice(text: str, finish: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}


Shape = ChatShape | TextShape


def _head(c: Completion, kind: str, model: str) -> dict[str, Any]:
    return {"id": c.id, "object": kind, "created": c.created, "model": model}


def embeddings(reply: inference_pb2.EmbedResponse, *, as_base64: bool) -> dict[str, Any]:
    """`POST /v1/embeddings`' answer; base64 is of little-endian float32 values."""

    def encoded(values: Any) -> Any:
        if as_base64:
            return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode()
        return list(values)

    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encoded(e.values)}
            for i, e in enumerate(reply.embeddings)
        ],
        "model": reply.model,
        "usage": {
            "prompt_tokens": reply.usage.prompt_tokens,
            "total_tokens": reply.usage.total_tokens,
        },
    }


def model(info: inference_pb2.ModelInfo) -> dict[str, Any]:
    """One `model` object, with the router's view of it in `switchboard`."""
    return {
        "id": info.name,
        "object": "model",
        "created": 0,
        "owned_by": OWNER,
        "switchboard": {
            "kind": _KINDS.get(info.kind, ""),
            "tier": TIERS.get(info.tier, ""),
            "context_tokens": info.context_tokens,
            "relative_cost": info.relative_cost,
            "healthy": info.healthy,
            # the serving process's own router: its circuits and calls in flight
            "backends": [
                {
                    "name": b.name,
                    "state": _STATES.get(b.state, "unknown"),
                    "outstanding": b.outstanding,
                }
                for b in info.backends
            ],
        },
    }


def models(reply: inference_pb2.ListModelsResponse) -> dict[str, Any]:
    return {"object": "list", "data": [model(m) for m in reply.models]}
