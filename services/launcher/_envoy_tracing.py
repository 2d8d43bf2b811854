"""The edge's tracing: Envoy starts the trace of every sampled call it routes.

The public listener's HTTP connection managers trace with Envoy's OpenTelemetry tracer
(`envoy.tracers.opentelemetry`), which speaks W3C `traceparent`: a call that arrives
with one continues that trace (and its sampled flag decides), any other is sampled at
`random_sampling` and becomes a trace rooted in Envoy's server span. Its child is the
ext_authz check's client span (Envoy's gRPC client propagates the context to the auth
service); the routed service receives the server span's context in `traceparent`. The
`x-request-id` Envoy keeps or generates is the span's `switchboard.request_id`
attribute, the one the trace CLI looks calls up by.

The internal listener does not trace: a call between services already has the
caller's client span and the callee's server span, and Envoy passes `traceparent` on
unchanged. Nor does Envoy add a span per upstream attempt: at full sampling, those
spans cost more (Envoy's export, the control plane's writes) than they tell.

The spans go over OTLP/gRPC to a cluster of the bootstrap: the control plane's, which
writes them into the run directory's trace store (`services.control.traces`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from services.launcher._envoy_shape import (
    INTERNAL_LISTENER,
    REQUEST_ID_HEADER,
    envoy_duration,
    hcms_of,
)

logger = logging.getLogger(__name__)

OTEL_TRACER = "envoy.tracers.opentelemetry"
_OTEL_CONFIG_TYPE = "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig"
SERVICE_NAME = "envoy"
"""The spans' `service.name` (their `service` in the trace store)."""
REQUEST_ID_TAG = "switchboard.request_id"
SPAN_NAME = "%REQ(:PATH)%"
"""Envoy's server span is named after the path: `/<package.Service>/<Method>` for gRPC."""


@dataclass(frozen=True, kw_only=True)
class Tracing:
    """How the edge traces.

    Attributes:
        collector_cluster: the bootstrap cluster Envoy exports its spans to over OTLP/gRPC
            (`opentelemetry.proto.collector.trace.v1.TraceService`).
        sampling: the share of calls without a sampled `traceparent` that are traced
            (0..1); 0 leaves tracing out of the config altogether.
        service_name: the spans' service name.
        export_timeout: how long one export may take before Envoy drops its spans.
    """

    collector_cluster: str
    sampling: float
    service_name: str = SERVICE_NAME
    export_timeout: timedelta = timedelta(seconds=5)

    def __post_init__(self) -> None:
        if not 0.0 <= self.sampling <= 1.0:
            raise ValueError(f"trace sampling {self.sampling} is not within 0..1")
        if not self.collector_cluster:
            raise ValueError("tracing needs the collector's cluster name")


def add_tracing(config: Mapping[str, Any], tracing: Tracing) -> dict[str, Any]:
    """A copy of an edge bootstrap (`render_envoy_config`) whose public HTTP connection
    managers trace (module docstring); an unchanged copy when `tracing.sampling` is 0."""
    config = copy.deepcopy(dict(config))
    if tracing.sampling == 0:
        return config
    for listener in config.get("static_resources", {}).get("listeners", []):
        if listener.get("name") == INTERNAL_LISTENER:
            continue
        for hcm in hcms_of(listener):
            hcm["tracing"] = hcm_tracing(tracing)
    return config


def hcm_tracing(tracing: Tracing) -> dict[str, Any]:
    """An HTTP connection manager's `tracing` for `tracing` (sampling above 0)."""
    return {
        "random_sampling": {"value": round(tracing.sampling * 100, 6)},
        "spawn_upstream_span": False,
        "operation": SPAN_NAME,
        "custom_tags": [{"tag": REQUEST_ID_TAG, "request_header": {"name": REQUEST_ID_HEADER}}],
        "provider": {
            "name": OTEL_TRACER,
            "typed_config": {
                "@type": _OTEL_CONFIG_TYPE,
                "grpc_service": {
                    "envoy_grpc": {"cluster_name": tracing.collector_cluster},
                    "timeout": envoy_duration(tracing.export_timeout),
                },
                "service_name": tracing.service_name,
            },
        },
    }
