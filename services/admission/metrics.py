"""Prometheus metrics of the admission service, read from the controller at scrape time."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import REGISTRY, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["Collector", "ControllerCollector", "observe_wait", "register", "unregister"]

from services.admission.controller import AdmissionController
from services.admission.limits import Priority

logger = logging.getLogger(__name__)

WAIT_SECONDS = Histogram(
    "switchboard_admission_wait_seconds",
    "Time admitted requests waited in the admission queue.",
    ["priority"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


_waits: dict[Priority, Histogram] = {}
"""WAIT_SECONDS' child of each class, looked up once (on every admission it is hot)."""


def observe_wait(tenant_id: str, priority: Priority, seconds: float) -> None:
    """The controller's wait observer."""
    child = _waits.get(priority)
    if child is None:
        child = _waits[priority] = WAIT_SECONDS.labels(priority.label)
    child.observe(seconds)


class ControllerCollector(Collector):
    """admitted/queued/refused per tenant and class, queue depth and leases in flight."""

    def __init__(self, controller: AdmissionController) -> None:
        self._controller = controller

    def collect(self) -> Iterator[Metric]:
        admitted = CounterMetricFamily(
            "switchboard_admission_admitted",
            "Requests admitted, by tenant and priority class.",
            labels=["tenant", "priority"],
        )
        queued = CounterMetricFamily(
            "switchboard_admission_queued",
            "Requests that entered the admission queue, by tenant and priority class.",
            labels=["tenant", "priority"],
        )
        refused = CounterMetricFamily(
            "switchboard_admission_refused",
            "Requests refused, by tenant, priority class and reason.",
            labels=["tenant", "priority", "reason"],
        )
        # The scrape runs on the metrics thread: copy first, retry if the dict moved.
        for _ in range(3):
            try:
                stats = [
                    (k, c.admitted, c.queued, dict(c.refused))
                    for k, c in list(self._controller.stats.items())
                ]
                break
            except RuntimeError:
                continue
        else:
            stats = []
        for (tenant, priority), n_admitted, n_queued, by_reason in stats:
            admitted.add_metric([tenant, priority.label], n_admitted)
            queued.add_metric([tenant, priority.label], n_queued)
            for reason, count in by_reason.items():
                refused.add_metric([tenant, priority.label, reason], count)
        depth = GaugeMetricFamily(
            "switchboard_admission_queue_depth",
            "Requests waiting in the admission queue, by priority class.",
            labels=["priority"],
        )
        for priority, waiting in self._controller.queue_depth().items():
            depth.add_metric([priority.label], waiting)
        leases = GaugeMetricFamily(
            "switchboard_admission_leases", "Leases held (requests admitted and running)."
        )
        leases.add_metric([], self._controller.in_flight())
        yield from (admitted, queued, refused, depth, leases)


def register(controller: AdmissionController) -> Collector:
    collector = ControllerCollector(controller)
    REGISTRY.register(collector)
    return collector


def unregister(collector: Collector) -> None:
    REGISTRY.unregister(collector)
