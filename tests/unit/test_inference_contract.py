"""InferenceService's contract: the request rules its annotations state, and the errors
its comments promise (wrong kind of model, a model outside the pinned tier, a call
without a tenant, a backend failing mid-stream)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from switchboard.common.v1 import common_pb2
from switchboard.inference.v1 import inference_pb2 as pb

from services.inference.breaker import BackendBreaker
from services.inference.config import InferenceConfig
from services.inference.policy import Choice, ModelPolicy
from services.inference.router import GenerateInput, GenerateResult, Router
from services.inference.servicer import InferenceServicer
from services.inference.triton import BackendFailure, StreamedToken
from services.runtime import (
    InvalidArgument,
    NotFound,
    Unauthenticated,
    _context,
    request_violations,
    validate_request,
)
from services.runtime._interceptors import _Method

POLICY = ModelPolicy.load(Path("services/inference/models.yaml"))
PROMPT_MAX = 256 * 1024


def _generate(**fields) -> pb.GenerateRequest:
    fields.setdefault("prompt", "What does Envoy do?")
    return pb.GenerateRequest(**fields)


def _sampling(**fields) -> pb.GenerateRequest:
    return _generate(parameters=pb.GenerationParameters(**fields))


def _passages(*passages: pb.Passage) -> pb.GenerateRequest:
    return _generate(context=passages)


def _fields(request) -> list[str]:
    return sorted(v.field for v in request_violations(request))


# -- the annotations ---------------------------------------------------------------------


def test_a_full_valid_generate_request_breaks_no_rule():
    request = pb.GenerateRequest(
        model="m" * 128,
        tier=common_pb2.MODEL_TIER_LARGE,
        prompt="p" * PROMPT_MAX,
        context=[pb.Passage(source_id="s" * 512, text="passage")] * 64,
        parameters=pb.GenerationParameters(max_tokens=4096, temperature=2.0),
        session_id="s" * 256,
        priority=common_pb2.PRIORITY_BATCH,
        report_queue_position=True,
    )
    assert request_violations(request) == []
    zero = _generate(parameters=pb.GenerationParameters(max_tokens=0, temperature=0.0))
    assert request_violations(zero) == []


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.GenerateRequest(prompt=""), "prompt"),
        (_generate(prompt="p" * (PROMPT_MAX + 1)), "prompt"),
        (_generate(model="m" * 129), "model"),
        (_generate(tier=99), "tier"),
        (_generate(priority=99), "priority"),
        (_passages(*[pb.Passage(text="t")] * 65), "context"),
        (_passages(pb.Passage(text="a"), pb.Passage(text="b"), pb.Passage()), "context[2].text"),
        (_passages(pb.Passage(text="t" * (PROMPT_MAX + 1))), "context[0].text"),
        (_passages(pb.Passage(text="t"), pb.Passage(source_id="s" * 513, text="t")),
         "context[1].source_id"),
        (_sampling(max_tokens=-1), "parameters.max_tokens"),
        (_sampling(max_tokens=4097), "parameters.max_tokens"),
        (_sampling(temperature=-0.01), "parameters.temperature"),
        (_sampling(temperature=2.01), "parameters.temperature"),
        (_sampling(temperature=float("nan")), "parameters.temperature"),
        (_sampling(temperature=float("inf")), "parameters.temperature"),
        (_generate(session_id="s" * 257), "session_id"),
        (pb.EmbedRequest(), "texts"),
        (pb.EmbedRequest(texts=["t"] * 513), "texts"),
        (pb.EmbedRequest(texts=["t", ""]), "texts[1]"),
        (pb.EmbedRequest(texts=["t" * 32769]), "texts[0]"),
        (pb.EmbedRequest(texts=["t"], model="m" * 129), "model"),
    ],
)  # fmt: skip
def test_each_rule_names_its_field(request_, field):
    assert _fields(request_) == [field]


def test_a_full_valid_embed_request_breaks_no_rule():
    assert request_violations(pb.EmbedRequest(texts=["t" * 32768] * 512, model="m" * 128)) == []
    assert request_violations(pb.ListModelsRequest()) == []


def test_unknown_tier_and_priority_are_refused_before_the_handler_runs():
    generate = _Method("/switchboard.inference.v1.InferenceService/Generate")
    for request in (_generate(tier=99), _generate(priority=3)):
        with pytest.raises(InvalidArgument) as refused:
            generate.admit(request)
        assert refused.value.reason == "INVALID_REQUEST"
        assert len(refused.value.field_violations) == 1
    with pytest.raises(InvalidArgument) as refused:
        validate_request(_generate(tier=99, priority=99))
    assert sorted(v.field for v in refused.value.field_violations) == ["priority", "tier"]
    generate.admit(_generate(tier=common_pb2.MODEL_TIER_SMALL, priority=common_pb2.PRIORITY_BATCH))


# -- models of the wrong kind or tier ----------------------------------------------------


def _model_violation(error: pytest.ExceptionInfo) -> str:
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.reason == "INVALID_REQUEST"
    (violation,) = error.value.field_violations
    assert violation.field == "model"
    return violation.description


def test_a_generator_named_in_embed_is_invalid_not_missing():
    with pytest.raises(InvalidArgument) as error:
        POLICY.embedder_name("generator_small")
    assert "generator" in _model_violation(error)
    with pytest.raises(NotFound) as missing:
        POLICY.embedder_name("no-such-embedder")
    assert missing.value.reason == "MODEL_NOT_FOUND"
    assert POLICY.embedder_name("embedder_unbatched") == "embedder_unbatched"
    assert POLICY.embedder_name("") == "embedder"


def test_an_embedder_named_in_generate_is_invalid_not_missing():
    with pytest.raises(InvalidArgument) as error:
        POLICY.choose(
            prompt_tokens=10, complexity_score=0, requested_max_tokens=0, model="embedder"
        )
    assert "embedder" in _model_violation(error)


def test_a_model_outside_the_pinned_tier_is_refused():
    with pytest.raises(InvalidArgument) as error:
        POLICY.choose(
            prompt_tokens=10,
            complexity_score=0,
            requested_max_tokens=0,
            model="generator_small",
            tier="large",
        )
    assert "'small'" in _model_violation(error) and "'large'" in _model_violation(error)
    same = POLICY.choose(
        prompt_tokens=10,
        complexity_score=0,
        requested_max_tokens=0,
        model="generator_large",
        tier="large",
    )
    assert same.model.name == "generator_large"


# -- the servicer ------------------------------------------------------------------------


class _Router:
    """Stands in for the router: a fixed choice and a fixed answer."""

    policy = POLICY

    def __init__(self) -> None:
        self.asked: list[GenerateInput] = []

    def choose(self, request: GenerateInput) -> Choice:
        self.asked.append(request)
        return Choice(POLICY.generators[0], 5, 0.1, 8)

    async def generate(
        self, request: GenerateInput, result: GenerateResult
    ) -> AsyncIterator[StreamedToken]:
        result.backend = "triton-a"
        for text in ("Envoy ", "routes."):
            token = StreamedToken(text, -1)
            result.add(token)
            yield token


async def _replies(servicer: InferenceServicer, request: pb.GenerateRequest, tenant: str):
    token = _context.tenant_id.set(tenant)
    try:
        return [r async for r in servicer.Generate(request, None)]  # type: ignore[arg-type]
    finally:
        _context.tenant_id.reset(token)


async def test_generate_without_a_tenant_is_unauthenticated():
    router = _Router()
    servicer = InferenceServicer(router)  # type: ignore[arg-type]
    with pytest.raises(Unauthenticated) as refused:
        await _replies(servicer, _generate(), tenant="")
    assert refused.value.reason == "TENANT_MISSING"
    assert router.asked == [], "refused before any routing"
    replies = await _replies(servicer, _generate(tier=common_pb2.MODEL_TIER_LARGE), tenant="acme")
    assert [r.token.text for r in replies[:-1]] == ["Envoy ", "routes."]
    assert replies[-1].complete.backend == "triton-a"
    assert router.asked[0].tier == "large"


# -- a backend failing after the first token ---------------------------------------------


class _Backend:
    """A Triton replica that streams `tokens` tokens, then fails if `fail`."""

    def __init__(self, name: str, *, tokens: int, fail: bool) -> None:
        self.name, self.address, self.outstanding = name, name, 0
        self.breaker = BackendBreaker(name, fail_max=3)
        self.calls = 0
        self._tokens, self._fail = tokens, fail

    def accepting(self) -> bool:
        return True

    async def generate(self, model, prompt, passages, max_tokens, *, timeout):
        self.calls += 1
        for i in range(self._tokens):
            yield StreamedToken(f"t{i} ", -1)
        if self._fail:
            raise BackendFailure(f"backend {self.name}: lost", metadata={"backend": self.name})


async def test_a_backend_failing_mid_stream_ends_it_with_backend_unavailable():
    broken = _Backend("triton-a", tokens=2, fail=True)
    spare = _Backend("triton-b", tokens=5, fail=False)
    spare.outstanding = 1  # the broken one is tried first
    router = Router(policy=POLICY, backends=[broken, spare])  # type: ignore[list-item]
    request = GenerateInput(prompt="hi", passages=[])
    result = GenerateResult(choice=router.choose(request))
    received = []
    with pytest.raises(BackendFailure) as failure:
        async for token in router.generate(request, result):
            received.append(token.text)
    assert received == ["t0 ", "t1 "]
    assert failure.value.code == grpc.StatusCode.UNAVAILABLE
    assert failure.value.reason == "BACKEND_UNAVAILABLE"
    assert failure.value.metadata == {"backend": "triton-a"}
    assert spare.calls == 0, "tokens were sent: no other backend may start over"


async def test_a_backend_failing_before_the_first_token_falls_back():
    broken = _Backend("triton-a", tokens=0, fail=True)
    spare = _Backend("triton-b", tokens=3, fail=False)
    spare.outstanding = 1
    router = Router(policy=POLICY, backends=[broken, spare])  # type: ignore[list-item]
    request = GenerateInput(prompt="hi", passages=[])
    result = GenerateResult(choice=router.choose(request))
    assert len([t async for t in router.generate(request, result)]) == 3
    assert result.backend == "triton-b"


# -- the configured embed cap ------------------------------------------------------------


def test_the_embed_cap_is_configurable_below_the_contracts_bound():
    assert InferenceConfig(triton_urls=("t:1",)).embed_max_texts == 512
    assert InferenceConfig(triton_urls=("t:1",), embed_max_texts=64).embed_max_texts == 64
    for bad in (0, 513):
        with pytest.raises(ValueError, match="SWITCHBOARD_EMBED_MAX_TEXTS"):
            InferenceConfig(triton_urls=("t:1",), embed_max_texts=bad)
