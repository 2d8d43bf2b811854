"""Prometheus metrics every service exports, and the HTTP endpoint serving them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

RPC_STARTED = Counter("switchboard_rpc_started_total", "RPCs started.", ["service", "method"])
RPC_HANDLED = Counter(
    "switchboard_rpc_handled_total", "RPCs finished, by status code.", ["service", "method", "code"]
)
RPC_LATENCY = Histogram(
    "switchboard_rpc_duration_seconds",
    "Time from the start of an RPC to its status.",
    ["service", "method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RPC_IN_FLIGHT = Gauge("switchboard_rpc_in_flight", "RPCs being handled.", ["service"])


def serve_metrics(port: int, host: str = "127.0.0.1") -> None:
    """Starts the `/metrics` endpoint in a background thread."""
    start_http_server(port, addr=host)
    logger.info("metrics endpoint listening", extra={"port": port})


class _LoopTasks(Collector):
    """The tasks alive on the process's event loop, read at each scrape (a leak of tasks
    shows as growth here)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "switchboard_asyncio_tasks",
            "Tasks alive on the process's event loop.",
            value=len(asyncio.all_tasks(self._loop)),
        )


def watch_event_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Exports `switchboard_asyncio_tasks` for `loop` (once per process)."""
    REGISTRY.register(_LoopTasks(loop))
