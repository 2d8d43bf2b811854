"""Prometheus metrics every service exports, and the HTTP endpoint serving them."""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

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
