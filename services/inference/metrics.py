"""Prometheus metrics of the inference service: GenAI usage and latency per model (after
OpenTelemetry's GenAI semantic conventions), how generations ended, and the backends'
circuit breakers, read at scrape time.

Labels stay bounded: models and tiers come from the model policy, backends from the
configured Triton replicas and upstreams, reasons from `OUTCOMES`; never a tenant or a
session.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.runtime import CircuitBreaker, CircuitState

logger = logging.getLogger(__name__)

__all__ = [
    "ADMISSIONS",
    "BREAKER_VALUES",
    "BreakerCollector",
    "Collector",
    "GENERATIONS",
    "OUTCOMES",
    "TIME_PER_OUTPUT_TOKEN",
    "TIME_TO_FIRST_TOKEN",
    "TOKENS",
    "record_generation",
    "register",
    "unregister",
]

TOKENS = Counter(
    "switchboard_genai_tokens",
    "Model tokens used by finished generations, by model, tier and type (input: the prompt"
    " with its context; output: the tokens generated).",
    ["model", "tier", "type"],
)
TIME_TO_FIRST_TOKEN = Histogram(
    "switchboard_genai_time_to_first_token_seconds",
    "Time from routing a generation to its first token (after admission), by model.",
    ["model"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30),
)
TIME_PER_OUTPUT_TOKEN = Histogram(
    "switchboard_genai_time_per_output_token_seconds",
    "Mean time between a generation's output tokens after the first, by model.",
    ["model"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1),
)
GENERATIONS = Counter(
    "switchboard_genai_generations",
    "Generations that ended, by model, tier and reason: `stop` or `length` (finished),"
    " `cancelled` (the caller left), `error` (failed after routing).",
    ["model", "tier", "reason"],
)
OUTCOMES = ("stop", "length", "cancelled", "error")
ADMISSIONS = Counter(
    "switchboard_inference_admissions",
    "Generations admitted, by how: `slice` (a lease of this replica's slice of the"
    " tenant's quota, no round trip) or `round_trip` (decided by the admission service).",
    ["how"],
)

BREAKER_VALUES = {CircuitState.CLOSED: 0, CircuitState.HALF_OPEN: 1, CircuitState.OPEN: 2}
"""switchboard_inference_breaker_state's value for each state."""


def record_generation(
    *,
    model: str,
    tier: str,
    reason: str,
    input_tokens: int,
    output_tokens: int,
    first_token_s: float | None,
    duration_s: float,
) -> None:
    """Counts one generation that ended (`reason` one of `OUTCOMES`) and its timings."""
    assert reason in OUTCOMES, reason
    GENERATIONS.labels(model, tier, reason).inc()
    TOKENS.labels(model, tier, "input").inc(input_tokens)
    TOKENS.labels(model, tier, "output").inc(output_tokens)
    if first_token_s is None:
        return
    TIME_TO_FIRST_TOKEN.labels(model).observe(first_token_s)
    if output_tokens > 1:
        per_token = max(duration_s - first_token_s, 0.0) / (output_tokens - 1)
        TIME_PER_OUTPUT_TOKEN.labels(model).observe(per_token)


class BreakerCollector(Collector):
    """`switchboard_inference_breaker_state{backend}`: 0 closed, 1 half-open, 2 open."""

    def __init__(self, breakers: Callable[[], Iterable[tuple[str, CircuitBreaker]]]) -> None:
        self._breakers = breakers

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "switchboard_inference_breaker_state",
            "Each inference backend's circuit breaker: 0 closed, 1 half-open, 2 open.",
            labels=["backend"],
        )
        for backend, breaker in self._breakers():
            family.add_metric([backend], BREAKER_VALUES[breaker.state])
        yield family


def register(breakers: Callable[[], Iterable[tuple[str, CircuitBreaker]]]) -> Collector:
    collector = BreakerCollector(breakers)
    REGISTRY.register(collector)
    return collector


def unregister(collector: Collector) -> None:
    REGISTRY.unregister(collector)
