"""The edge's tracing config (`_envoy_tracing`): Envoy's OpenTelemetry tracer on every
HTTP connection manager, exporting to the control plane's cluster, as the control
plane serves it over xDS; nothing of it when sampling is 0."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.trace.v3.opentelemetry_pb2 import OpenTelemetryConfig
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2,
)

from services.control.resources import XDS_CLUSTER, resources_from_static
from services.launcher._envoy_tracing import (
    OTEL_TRACER,
    REQUEST_ID_TAG,
    Tracing,
    add_tracing,
)
from tests.unit.test_envoy_config import guarded, hcm

HttpConnectionManager = http_connection_manager_pb2.HttpConnectionManager


def typed_hcms(config: dict[str, Any]) -> dict[str, HttpConnectionManager]:
    """Each listener's connection manager as Envoy receives it over LDS."""
    listeners = resources_from_static(config, {}).listeners
    hcms = {}
    for name, listener in listeners.items():
        hcms[name] = HttpConnectionManager()
        listener.filter_chains[0].filters[0].typed_config.Unpack(hcms[name])
    return hcms


def test_the_public_listener_traces_with_opentelemetry_to_the_control_plane() -> None:
    config = add_tracing(guarded(), Tracing(collector_cluster=XDS_CLUSTER, sampling=0.25))

    hcms = typed_hcms(config)
    assert set(hcms) == {"public", "internal"}
    # between services, the caller's and the callee's spans suffice: Envoy passes on
    assert not hcms["internal"].HasField("tracing")
    for tracing in (h.tracing for name, h in hcms.items() if name == "public"):
        assert tracing.random_sampling.value == pytest.approx(25.0)
        assert not tracing.spawn_upstream_span.value
        assert tracing.provider.name == OTEL_TRACER
        otel = OpenTelemetryConfig()
        assert tracing.provider.typed_config.Unpack(otel)
        assert otel.grpc_service.envoy_grpc.cluster_name == XDS_CLUSTER
        assert otel.service_name == "envoy"
        (tag,) = tracing.custom_tags
        assert (tag.tag, tag.request_header.name) == (REQUEST_ID_TAG, "x-request-id")


def test_sampling_zero_leaves_tracing_out() -> None:
    config = add_tracing(guarded(), Tracing(collector_cluster=XDS_CLUSTER, sampling=0))
    assert "tracing" not in hcm(config) and "tracing" not in hcm(config, "internal")
    assert config == guarded()


def test_the_original_config_is_not_changed() -> None:
    original = guarded()
    add_tracing(original, Tracing(collector_cluster=XDS_CLUSTER, sampling=1))
    assert "tracing" not in hcm(original)


@pytest.mark.parametrize("sampling", [-0.1, 1.01])
def test_sampling_is_a_share(sampling: float) -> None:
    with pytest.raises(ValueError, match="within 0..1"):
        Tracing(collector_cluster=XDS_CLUSTER, sampling=sampling)
