"""Pure routing logic: model policy, complexity, balancing, circuit breaking, validation."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from services.inference.balancer import Balancer
from services.inference.breaker import BackendBreaker
from services.inference.policy import ModelPolicy, complexity
from services.inference.router import (
    EMBED_TEXTS_HARD_MAX,
    GenerateInput,
    validate_embed,
    validate_generate,
)
from services.runtime import FailedPrecondition, InvalidArgument, NotFound, count_tokens

POLICY = ModelPolicy.load(Path("services/inference/models.yaml"))


def test_policy_is_sorted_cheapest_first():
    assert [g.tier for g in POLICY.generators] == ["small", "large"]
    assert POLICY.embedder.dimensions == 384


def test_count_tokens_counts_words_and_punctuation():
    assert count_tokens("Hello, world!") == 4
    assert count_tokens("") == 0


def test_complexity_orders_easy_below_hard():
    easy = complexity("What is the capital of France?")
    hard = complexity(
        "Explain why the algorithm's amortised complexity differs, compare the trade-offs "
        "step by step, and derive f(n) = 2*f(n/2) + n?"
    )
    assert 0 <= easy < 0.45 < hard <= 1


def test_short_simple_prompt_goes_to_the_small_tier():
    choice = POLICY.choose(prompt_tokens=20, complexity_score=0.1, requested_max_tokens=0)
    assert choice.model.tier == "small"
    assert choice.max_tokens == choice.model.default_max_tokens


def test_complex_prompt_goes_to_the_large_tier():
    choice = POLICY.choose(prompt_tokens=20, complexity_score=0.9, requested_max_tokens=0)
    assert choice.model.tier == "large"


def test_long_prompt_goes_to_the_large_tier():
    choice = POLICY.choose(prompt_tokens=1500, complexity_score=0.1, requested_max_tokens=64)
    assert choice.model.tier == "large"


def test_explicit_model_and_pinned_tier_win():
    assert (
        POLICY.choose(
            prompt_tokens=10, complexity_score=0.9, requested_max_tokens=0, model="generator_small"
        ).model.name
        == "generator_small"
    )
    assert (
        POLICY.choose(
            prompt_tokens=10, complexity_score=0.0, requested_max_tokens=0, tier="large"
        ).model.name
        == "generator_large"
    )


def test_unknown_model_is_not_found():
    with pytest.raises(NotFound) as err:
        POLICY.choose(prompt_tokens=10, complexity_score=0, requested_max_tokens=0, model="gpt-9")
    assert err.value.reason == "MODEL_NOT_FOUND"


def test_prompt_longer_than_every_context_is_a_clear_error():
    with pytest.raises(FailedPrecondition) as err:
        POLICY.choose(prompt_tokens=100_000, complexity_score=0, requested_max_tokens=0)
    assert err.value.reason == "PROMPT_TOO_LONG"
    assert err.value.metadata["max_context_tokens"] == "8192"


def test_fallbacks_exclude_the_chosen_model_and_too_small_contexts():
    small, large = POLICY.generators
    assert POLICY.fallbacks(small, 100) == [large]
    assert POLICY.fallbacks(large, 4000) == []


def test_generate_validation_refuses_blank_text_the_contract_cannot_see():
    with pytest.raises(InvalidArgument) as err:
        validate_generate(GenerateInput(prompt="  \n", passages=["ok", "\t "]))
    fields = {v.field for v in err.value.field_violations}
    assert fields == {"prompt", "context[1].text"}
    validate_generate(GenerateInput(prompt="hi", passages=["ok"]))


def test_embed_validation_refuses_blank_texts_and_more_than_the_configured_cap():
    with pytest.raises(InvalidArgument) as err:
        validate_embed(["ok", " "])
    assert [v.field for v in err.value.field_violations] == ["texts[1]"]
    with pytest.raises(InvalidArgument) as err:
        validate_embed(["a", "b", "c"], max_texts=2)
    assert [v.field for v in err.value.field_violations] == ["texts"]
    assert "at most 2 texts" in err.value.field_violations[0].description
    validate_embed(["fine"] * EMBED_TEXTS_HARD_MAX)


class FakeBackend:
    """Stands in for a Triton backend in pure balancing tests."""

    def __init__(self, name: str, outstanding: int = 0, up: bool = True) -> None:
        self.name, self.outstanding, self.up = name, outstanding, up

    def accepting(self) -> bool:
        return self.up


def test_least_outstanding_first():
    a, b, c = FakeBackend("a", 3), FakeBackend("b", 0), FakeBackend("c", 1)
    assert [x.name for x in Balancer([a, b, c]).order()] == ["b", "c", "a"]


def test_unavailable_backends_are_skipped():
    a, b = FakeBackend("a", 0, up=False), FakeBackend("b", 5)
    assert [x.name for x in Balancer([a, b]).order()] == ["b"]
    assert Balancer([FakeBackend("x", up=False)]).order() == []


def test_session_affinity_sticks_until_the_slack_is_exceeded():
    a, b = FakeBackend("a", 0), FakeBackend("b", 0)
    balancer = Balancer([a, b], affinity_slack=2)
    home = balancer.order("s1")[0]
    other = b if home is a else a
    home.outstanding = 2  # within slack: stays
    assert balancer.order("s1")[0] is home
    home.outstanding = 3  # hot: this call goes to the least loaded
    assert balancer.order("s1")[0] is other
    home.outstanding = 0  # cooled down: back home
    other.outstanding = 1
    assert balancer.order("s1")[0] is home


def test_every_replica_of_the_service_picks_the_same_home():
    """No memory: two inference replicas (two balancers) agree for every session."""
    names = ["triton-0", "triton-1", "triton-2"]
    one = Balancer([FakeBackend(n) for n in names])
    two = Balancer([FakeBackend(n) for n in reversed(names)])
    homes = {f"s{i}": one.order(f"s{i}")[0].name for i in range(300)}
    assert homes == {f"s{i}": two.order(f"s{i}")[0].name for i in range(300)}
    assert set(homes.values()) == set(names)  # spread over every backend


def test_affinity_moves_when_its_backend_goes_down_and_only_its_sessions_move():
    backends = {n: FakeBackend(n) for n in ("a", "b", "c")}
    balancer = Balancer(list(backends.values()))
    homes = {f"s{i}": balancer.order(f"s{i}")[0].name for i in range(300)}
    backends["a"].up = False
    after = {s: balancer.order(s)[0].name for s in homes}
    assert all(after[s] != "a" for s in homes)
    assert {s for s in homes if after[s] != homes[s]} == {s for s in homes if homes[s] == "a"}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_fail_max_and_recovers_after_a_good_probe():
    clock = Clock()
    breaker = BackendBreaker("b", fail_max=2, reset=timedelta(seconds=5), clock=clock)
    assert breaker.allow() and breaker.state == "closed"
    breaker.record_failure()
    assert breaker.state == "closed"
    breaker.record_failure()
    assert breaker.state == "open" and not breaker.allow()
    clock.now += 5
    assert breaker.state == "half-open"
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # only one probe at a time
    breaker.record_success()
    assert breaker.state == "closed" and breaker.allow()


def test_breaker_failed_probe_reopens():
    clock = Clock()
    breaker = BackendBreaker("b", fail_max=1, reset=timedelta(seconds=5), clock=clock)
    breaker.record_failure()
    clock.now += 5
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state == "open"


def test_success_resets_the_failure_count():
    breaker = BackendBreaker("b", fail_max=2, reset=timedelta(seconds=5))
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    assert breaker.state == "closed"


def test_quoted_segments_split_per_sentence_and_passage():
    from services.inference.policy import Choice
    from services.inference.router import GenerateResult
    from services.inference.triton import StreamedToken

    result = GenerateResult(choice=Choice(POLICY.generators[0], 10, 0.1, 100))
    for text, passage in [
        ("B ", 1),
        ("two. ", 1),
        ("A ", 1),
        ("one. ", 1),
        ("x ", 0),
        ("note ", -1),
    ]:
        result.add(StreamedToken(text, passage))
    assert result.completion_tokens == 6
    assert result.segments == [(1, "B two. "), (1, "A one. "), (0, "x ")]
