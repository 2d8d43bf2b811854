"""The edge's plain-HTTP routes (the OpenAI-compatible API): routed by path prefix on the
public listener behind ext_authz, to an HTTP/1.1 cluster checked over HTTP, with Envoy's
own failures there in the API's JSON shape; and how the launcher runs the gateway."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from services.launcher import LauncherConfig, service_processes
from services.launcher._envoy import REFLECTION_CLUSTER, render_envoy_config
from services.launcher._envoy_checks import check_consistency
from services.launcher._envoy_http import HttpUpstream
from services.runtime import HTTP_HEALTH_PATH, catalogue, http_prefixes
from tests.unit.test_envoy_config import (
    AUTHZ,
    EXT_AUTHZ,
    UPSTREAMS,
    clusters,
    endpoints,
    hcm,
    routes,
)

GATEWAY = HttpUpstream(
    name="gateway",
    prefixes=("/v1/",),
    endpoints=(("127.0.0.1", 7059),),
    health_path="/healthz",
)


def render(**overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "listen_host": "127.0.0.1",
        "listen_port": 8080,
        "admin_port": 9901,
        "upstreams": UPSTREAMS,
        "authz": AUTHZ,
        "internal_port": 8081,
        "http_upstreams": (GATEWAY,),
    }
    args.update(overrides)
    return render_envoy_config(**args)


def test_the_api_prefix_is_routed_on_the_public_listener_behind_ext_authz() -> None:
    config = render()
    table = routes(config)
    (route,) = [r for r in table if r["match"].get("prefix") == "/v1/"]
    assert route["route"]["cluster"] == "gateway"
    assert route["route"]["timeout"] == "0s"  # an SSE stream lasts as long as it streams
    assert "typed_per_filter_config" not in route  # the API key is checked
    assert "x-tenant-id" not in route.get("request_headers_to_remove", [])
    assert table.index(route) < len(table) - 1  # before the catch-all 404
    assert EXT_AUTHZ in [f["name"] for f in hcm(config)["http_filters"]]
    internal = routes(config, "internal")
    assert not [r for r in internal if r["match"].get("prefix") == "/v1/"]


def test_the_gateway_cluster_speaks_http1_and_is_checked_over_http() -> None:
    config = render()
    cluster = clusters(config)["gateway"]
    assert endpoints(cluster) == [("127.0.0.1", 7059)]
    (options,) = cluster["typed_extension_protocol_options"].values()
    assert options["explicit_http_config"] == {"http_protocol_options": {}}
    assert options["common_http_protocol_options"]["idle_timeout"] == "30s"
    (check,) = cluster["health_checks"]
    assert check["http_health_check"] == {"path": "/healthz"}
    assert "grpc_health_check" not in check
    # not a gRPC server: no reflection or health calls go to it
    assert ("127.0.0.1", 7059) not in endpoints(clusters(config)[REFLECTION_CLUSTER])
    check_consistency(config)


def test_envoys_own_failures_on_the_api_paths_are_json_errors() -> None:
    config = render()
    (mapper,) = hcm(config)["local_reply_config"]["mappers"]
    header, flags = mapper["filter"]["and_filter"]["filters"]
    assert header["header_filter"]["header"] == {
        "name": ":path",
        "string_match": {"prefix": "/v1/"},
    }
    assert {"UH", "UF"} <= set(flags["response_flag_filter"]["flags"])
    error = mapper["body_format_override"]["json_format"]["error"]
    assert error["code"] == "DEPENDENCY_UNAVAILABLE" and error["type"] == "server_error"
    assert "local_reply_config" not in hcm(config, "internal")
    assert "local_reply_config" not in hcm(render(http_upstreams=()))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prefixes": ()}, "serves no path"),
        ({"prefixes": ("v1/",)}, "bad path prefix"),
        ({"prefixes": ("/v1",)}, "bad path prefix"),
        ({"health_path": "healthz"}, "bad health path"),
        ({"endpoints": (("127.0.0.1", 0),)}, "bad endpoint"),
        ({"name": "a b"}, "non-empty word"),
    ],
)
def test_http_upstream_refuses_bad_values(fields: dict[str, Any], message: str) -> None:
    values = {
        "name": "gateway",
        "prefixes": ("/v1/",),
        "endpoints": (("127.0.0.1", 7059),),
        "health_path": "/healthz",
        **fields,
    }
    with pytest.raises(ValueError, match=message):
        HttpUpstream(**values)


def test_an_http_prefix_may_not_shadow_a_grpc_service() -> None:
    shadowing = HttpUpstream(
        name="gateway",
        prefixes=("/switchboard.inference.v1.InferenceService/",),
        endpoints=(("127.0.0.1", 7059),),
        health_path="/healthz",
    )
    with pytest.raises(ValueError, match="shadow"):
        render(http_upstreams=(shadowing,))


def test_the_launcher_runs_the_gateway_from_the_catalogue(tmp_path: Path) -> None:
    assert catalogue.GATEWAY in catalogue.MESH and catalogue.GATEWAY.http
    assert not catalogue.GATEWAY.grpc_services
    assert http_prefixes() == ("/v1/",) and HTTP_HEALTH_PATH == "/healthz"
    config = LauncherConfig(run_dir=tmp_path)
    (spec,) = [s for s, _ in service_processes(config) if s.name == "gateway"]
    assert spec.http and not spec.public and spec.module == "services.gateway"
    assert spec.port(config, 0) == config.gateway_port == 7059
