"""The Envoy edge config the launcher renders: routes, clusters, limits, consistency."""

from __future__ import annotations

import copy
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.launcher._envoy import (
    BASE_CONFIG,
    REFLECTION_CLUSTER,
    UNKNOWN_SERVICE_MESSAGE,
    Upstream,
    render_envoy_config,
)
from services.launcher._envoy_checks import check_consistency
from services.launcher._envoy_process import count_healthy_hosts, envoy_command, write_envoy_config
from services.launcher._envoy_shape import AUTHZ_CLUSTER

INFERENCE = "switchboard.inference.v1.InferenceService"
ADMISSION = "switchboard.admission.v1.AdmissionService"
RAG = "switchboard.rag.v1.RagService"

UPSTREAMS = (
    Upstream(name="inference", services=(INFERENCE,), endpoints=(("127.0.0.1", 7051),)),
    Upstream(
        name="admission",
        services=(ADMISSION,),
        endpoints=(("127.0.0.1", 7061), ("127.0.0.1", 7062)),
        hash_header="x-tenant-id",
    ),
    # shares a process with inference: its endpoint appears once in the reflection cluster
    Upstream(name="rag", services=(RAG,), endpoints=(("127.0.0.1", 7051),)),
)


AUTHZ = Upstream(
    name=AUTHZ_CLUSTER,
    services=("envoy.service.auth.v3.Authorization",),
    endpoints=(("127.0.0.1", 7058),),
)
EXT_AUTHZ = "envoy.filters.http.ext_authz"
SKIPPING = (
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
)


def render(**overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "listen_host": "0.0.0.0",
        "listen_port": 8080,
        "admin_port": 9901,
        "upstreams": UPSTREAMS,
    }
    args.update(overrides)
    return render_envoy_config(**args)


def guarded() -> dict[str, Any]:
    """The launcher's edge: keys checked on the public listener, an internal one."""
    return render(authz=AUTHZ, internal_port=8081)


def listener(config: dict[str, Any], name: str = "public") -> dict[str, Any]:
    (found,) = [x for x in config["static_resources"]["listeners"] if x["name"] == name]
    return found


def hcm(config: dict[str, Any], name: str = "public") -> dict[str, Any]:
    return listener(config, name)["filter_chains"][0]["filters"][0]["typed_config"]


def routes(config: dict[str, Any], name: str = "public") -> list[dict[str, Any]]:
    return hcm(config, name)["route_config"]["virtual_hosts"][0]["routes"]


def route_for(config: dict[str, Any], service: str, name: str = "public") -> dict[str, Any]:
    (route,) = [r for r in routes(config, name) if r["match"].get("prefix") == f"/{service}/"]
    return route


def clusters(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in config["static_resources"]["clusters"]}


def endpoints(cluster: dict[str, Any]) -> list[tuple[str, int]]:
    return [
        (
            e["endpoint"]["address"]["socket_address"]["address"],
            e["endpoint"]["address"]["socket_address"]["port_value"],
        )
        for group in cluster["load_assignment"]["endpoints"]
        for e in group["lb_endpoints"]
    ]


def test_every_service_is_routed_by_its_name_to_its_cluster() -> None:
    config = render()
    for upstream in UPSTREAMS:
        for service in upstream.services:
            assert route_for(config, service)["route"]["cluster"] == upstream.name
    assert set(clusters(config)) == {"inference", "admission", "rag", REFLECTION_CLUSTER}


def test_reflection_and_health_reach_a_cluster_of_every_endpoint() -> None:
    config = render()
    for service in (
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.health.v1.Health",
    ):
        assert route_for(config, service)["route"]["cluster"] == REFLECTION_CLUSTER
    reflection = clusters(config)[REFLECTION_CLUSTER]
    assert endpoints(reflection) == [
        ("127.0.0.1", 7051),
        ("127.0.0.1", 7061),
        ("127.0.0.1", 7062),
    ]
    assert reflection["health_checks"][0]["grpc_health_check"] == {"service_name": ""}


def test_unknown_paths_get_a_404_that_grpc_clients_see_as_unimplemented() -> None:
    last = routes(render())[-1]
    assert last["match"] == {"prefix": "/"}
    assert last["direct_response"] == {
        "status": 404,
        "body": {"inline_string": UNKNOWN_SERVICE_MESSAGE},
    }


def test_hash_header_gives_ring_hash_and_a_route_hash_policy() -> None:
    config = render()
    assert clusters(config)["admission"]["lb_policy"] == "RING_HASH"
    assert route_for(config, ADMISSION)["route"]["hash_policy"] == [
        {"header": {"header_name": "x-tenant-id"}}
    ]
    assert clusters(config)["inference"]["lb_policy"] == "LEAST_REQUEST"
    assert "hash_policy" not in route_for(config, INFERENCE)["route"]


def test_admin_is_on_loopback_only() -> None:
    config = render(admin_port=19901)
    assert config["admin"]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": 19901,
    }
    listener = config["static_resources"]["listeners"][0]
    assert listener["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 8080}


def test_streams_have_no_route_timeout_only_an_idle_timeout() -> None:
    config = render(stream_idle_timeout=timedelta(minutes=10))
    manager = hcm(config)
    assert manager["request_timeout"] == "0s"
    assert manager["stream_idle_timeout"] == "600s"
    for route in routes(config):
        if "route" in route:
            assert route["route"]["timeout"] == "0s"
            assert route["route"]["idle_timeout"] == "600s"
            assert "max_stream_duration" not in route["route"]


def test_envoy_enforces_grpc_timeout_only_when_asked() -> None:
    route = route_for(render(enforce_grpc_deadlines=True), INFERENCE)
    assert route["route"]["max_stream_duration"] == {"grpc_timeout_header_max": "0s"}


def test_fractional_durations_are_written_as_envoy_durations() -> None:
    config = render(
        stream_idle_timeout=timedelta(milliseconds=1500),
        health_check_interval=timedelta(seconds=0.25),
    )
    assert hcm(config)["stream_idle_timeout"] == "1.5s"
    assert clusters(config)["rag"]["health_checks"][0]["interval"] == "0.25s"


def test_downstream_is_http2_capable_edge_with_request_ids_and_limits() -> None:
    manager = hcm(render(buffer_limit_bytes=256 << 10))
    assert manager["codec_type"] == "AUTO"
    assert manager["use_remote_address"] is True
    assert manager["generate_request_id"] is True
    assert manager["preserve_external_request_id"] is True
    assert 0 < manager["max_request_headers_kb"] <= 96
    assert manager["access_log"][0]["typed_config"]["log_format"]["json_format"]
    listener = render(buffer_limit_bytes=256 << 10)["static_resources"]["listeners"][0]
    assert listener["per_connection_buffer_limit_bytes"] == 256 << 10


def test_clusters_speak_http2_health_check_and_tolerate_load() -> None:
    for name, cluster in clusters(render()).items():
        options = cluster["typed_extension_protocol_options"][
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        ]
        assert options["explicit_http_config"]["http2_protocol_options"]["max_concurrent_streams"]
        check = cluster["health_checks"][0]
        assert check["interval"] == "2s"
        assert check["healthy_threshold"] == 1
        assert check["no_traffic_interval"] == check["interval"]
        if name != REFLECTION_CLUSTER:
            assert check["grpc_health_check"]["service_name"] == next(
                u.services[0] for u in UPSTREAMS if u.name == name
            )
        assert cluster["circuit_breakers"]["thresholds"][0]["max_requests"] >= 10_000
        # default panic threshold: a service whose backends are down still answers itself
        assert "healthy_panic_threshold" not in cluster.get("common_lb_config", {})
        assert cluster["type"] == "STATIC"
        # a replica gone from the endpoints is not routed to while its checks still pass
        assert cluster["ignore_health_on_host_removal"] is True


def test_host_names_give_strict_dns_clusters() -> None:
    upstream = Upstream(name="chat", services=("a.v1.Chat",), endpoints=(("localhost", 1),))
    (cluster,) = [
        c
        for c in render(upstreams=[upstream])["static_resources"]["clusters"]
        if c["name"] == "chat"
    ]
    assert cluster["type"] == "STRICT_DNS"


def test_extra_http_filters_go_before_the_router() -> None:
    auth = {"name": "envoy.filters.http.api_key_auth", "typed_config": {"@type": "x"}}
    names = [f["name"] for f in hcm(render(http_filters=[auth]))["http_filters"]]
    assert names == ["envoy.filters.http.api_key_auth", "envoy.filters.http.router"]


def test_a_service_served_by_two_upstreams_is_refused() -> None:
    twice = Upstream(name="other", services=(INFERENCE,), endpoints=(("127.0.0.1", 1),))
    with pytest.raises(ValueError, match="served by both"):
        render(upstreams=[*UPSTREAMS, twice])


def test_an_upstream_named_like_the_reflection_cluster_is_a_duplicate() -> None:
    clash = Upstream(name=REFLECTION_CLUSTER, services=("a.v1.A",), endpoints=(("127.0.0.1", 1),))
    with pytest.raises(ValueError, match="duplicate cluster 'reflection'"):
        render(upstreams=[*UPSTREAMS, clash])


def test_an_upstream_without_endpoints_is_refused() -> None:
    empty = Upstream(name="chat", services=("a.v1.Chat",), endpoints=())
    with pytest.raises(ValueError, match="cluster 'chat' has no endpoints"):
        render(upstreams=[*UPSTREAMS, empty])


def test_consistency_names_a_route_to_an_unknown_cluster() -> None:
    config = copy.deepcopy(render())
    route_for(config, INFERENCE)["route"]["cluster"] = "nowhere"
    with pytest.raises(ValueError, match="unknown cluster 'nowhere'"):
        check_consistency(config)


def test_consistency_refuses_a_public_admin_and_hashing_to_a_plain_cluster() -> None:
    config = copy.deepcopy(render())
    config["admin"]["address"]["socket_address"]["address"] = "0.0.0.0"
    clusters(config)["admission"]["lb_policy"] = "ROUND_ROBIN"
    with pytest.raises(ValueError) as error:
        check_consistency(config)
    assert "admin must listen on loopback" in str(error.value)
    assert "balances by ROUND_ROBIN" in str(error.value)


def test_consistency_catches_foreign_endpoints_and_duplicate_prefixes() -> None:
    config = copy.deepcopy(render())
    clusters(config)["rag"]["load_assignment"]["cluster_name"] = "inference"
    routes(config).insert(0, copy.deepcopy(route_for(config, RAG)))
    with pytest.raises(ValueError) as error:
        check_consistency(config)
    assert "carries the endpoints of 'inference'" in str(error.value)
    assert f"duplicate route prefix in 'switchboard' '/{RAG}/'" in str(error.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"services": ("NoPackage",)}, "not a fully-qualified"),
        ({"services": ("a.v1.A/B",)}, "not a fully-qualified"),
        ({"services": ()}, "serves no gRPC service"),
        ({"endpoints": (("127.0.0.1", 0),)}, "bad endpoint"),
        ({"hash_header": "X-Tenant-Id"}, "lower-case"),
        ({"name": "has space"}, "non-empty word"),
    ],
)
def test_upstream_refuses_bad_values(kwargs: dict[str, Any], message: str) -> None:
    values: dict[str, Any] = {
        "name": "x",
        "services": ("a.v1.A",),
        "endpoints": (("127.0.0.1", 1),),
        **kwargs,
    }
    with pytest.raises(ValueError, match=message):
        Upstream(**values)


def test_upstream_health_service_defaults() -> None:
    one = Upstream(name="x", services=("a.v1.A",), endpoints=())
    two = Upstream(name="x", services=("a.v1.A", "a.v1.B"), endpoints=())
    chosen = Upstream(name="x", services=("a.v1.A",), endpoints=(), health_service="")
    assert (one.health_check_service, two.health_check_service) == ("a.v1.A", "")
    assert chosen.health_check_service == ""


def test_base_config_is_a_consistent_skeleton() -> None:
    base = yaml.safe_load(BASE_CONFIG.read_text())
    assert base["static_resources"]["clusters"] == []
    check_consistency(base)


def test_write_yaml_and_json_round_trip(tmp_path: Path) -> None:
    config = render()
    write_envoy_config(tmp_path / "envoy.yaml", config)
    write_envoy_config(tmp_path / "envoy.json", config)
    assert yaml.safe_load((tmp_path / "envoy.yaml").read_text()) == config
    assert json.loads((tmp_path / "envoy.json").read_text()) == config
    assert sorted(p.name for p in tmp_path.iterdir()) == ["envoy.json", "envoy.yaml"]


def test_envoy_command(tmp_path: Path) -> None:
    argv = envoy_command(config_path=tmp_path / "e.yaml", base_id=17, log_path=tmp_path / "e.log")
    assert Path(argv[0]).name == "envoy"
    text = " ".join(argv)
    assert f"-c {tmp_path / 'e.yaml'}" in text
    assert "--base-id 17" in text and "--disable-hot-restart" in text
    assert "--concurrency 2" in text and f"--log-path {tmp_path / 'e.log'}" in text
    assert "--log-path" not in envoy_command(config_path=Path("e"), base_id=1, log_path=None)


def test_count_healthy_hosts_reads_the_admin_clusters_answer() -> None:
    def host(**status: Any) -> dict[str, Any]:
        return {"health_status": {"eds_health_status": "HEALTHY", **status}}

    answer = {
        "cluster_statuses": [
            {"name": "admission", "host_statuses": [host(), host(failed_active_health_check=True)]},
            {"name": "inference", "host_statuses": [host(failed_outlier_check=True)]},
            {"name": "rag", "host_statuses": [host(pending_active_hc=True)]},
        ]
    }
    assert count_healthy_hosts(answer) == {"admission": 1, "inference": 0, "rag": 0}


def test_a_health_check_is_retried_on_hosts_that_do_not_know_the_service() -> None:
    policy = route_for(render(), "grpc.health.v1.Health")["route"]["retry_policy"]
    assert "retriable-headers" in policy["retry_on"]
    assert policy["retriable_headers"] == [{"name": "grpc-status", "string_match": {"exact": "5"}}]
    assert policy["num_retries"] >= len(endpoints(clusters(render())[REFLECTION_CLUSTER])) - 1
    # every other route retries only what cannot have reached a service, elsewhere: enough
    # picks that least-request balancing, which favours an idle dead host, finds another
    retries = route_for(render(), INFERENCE)["route"]["retry_policy"]
    assert "retriable-headers" not in retries["retry_on"]
    assert retries["retry_host_predicate"][0]["name"].endswith("previous_hosts")
    assert retries["host_selection_retry_max_attempts"] >= 16


def test_a_read_only_method_is_also_retried_when_reset_or_unavailable() -> None:
    config = render(authz=AUTHZ, internal_port=8081, control=CONTROL)
    for name in ("public", "internal"):
        table = routes(config, name)
        paths = {r["match"]["path"]: r for r in table if "path" in r["match"]}
        # the methods whose contract says NO_SIDE_EFFECTS, each before its service's route
        embed = paths.pop(f"/{INFERENCE}/Embed")
        assert table.index(embed) < table.index(route_for(config, INFERENCE, name))
        assert embed["route"]["retry_policy"]["retry_on"] == (
            "connect-failure,refused-stream,reset-before-request,reset,unavailable"
        )
        assert embed["route"]["cluster"] == "inference"
        assert f"/{INFERENCE}/ListModels" in paths
        # never a method that changes something, nor a stream
        assert f"/{INFERENCE}/Generate" not in paths
        assert not [p for p in paths if p.endswith(("/SubmitTask", "/IngestDocuments"))]
    control = routes(config, "internal")
    (replicas,) = [r for r in control if r["match"].get("path", "").endswith("/ListReplicas")]
    assert replicas["request_headers_to_add"][0]["header"]["value"] == "operator"


# ---- API keys at the edge: ext_authz on the public listener, an internal one without ----


def test_without_authz_there_is_one_listener_and_no_ext_authz() -> None:
    config = render()
    assert [x["name"] for x in config["static_resources"]["listeners"]] == ["public"]
    assert EXT_AUTHZ not in [f["name"] for f in hcm(config)["http_filters"]]


def test_ext_authz_asks_the_auth_cluster_before_the_router_and_fails_closed() -> None:
    config = render(authz=AUTHZ, authz_timeout=timedelta(milliseconds=750))
    filters = hcm(config)["http_filters"]
    assert [f["name"] for f in filters] == [EXT_AUTHZ, "envoy.filters.http.router"]
    authz = filters[0]["typed_config"]
    assert authz["@type"].endswith("envoy.extensions.filters.http.ext_authz.v3.ExtAuthz")
    assert authz["transport_api_version"] == "V3"
    assert authz["failure_mode_allow"] is False
    assert authz["grpc_service"]["timeout"] == "0.75s"
    assert authz["grpc_service"]["envoy_grpc"] == {"cluster_name": AUTHZ_CLUSTER}
    # a check is read-only: retried on another replica when one is gone (by the gRPC
    # service's policy: envoy_grpc's applies to xDS streams only); each try may take the
    # whole timeout (Envoy times a try by the back-off's longest interval); a replica's
    # UNAVAILABLE is its answer (its key store is down), passed on with its reason
    retries = authz["grpc_service"]["retry_policy"]
    assert retries["retry_on"] == "connect-failure,refused-stream,reset"
    assert retries["retry_back_off"]["max_interval"] == "0.75s"
    assert retries["num_retries"] == 2
    assert (
        retries["retry_host_predicate"][0]["name"] == "envoy.retry_host_predicates.previous_hosts"
    )
    assert "with_request_body" not in authz  # streams are never buffered for the check
    cluster = clusters(config)[AUTHZ_CLUSTER]
    assert endpoints(cluster) == [("127.0.0.1", 7058)]
    assert cluster["health_checks"][0]["grpc_health_check"] == {
        "service_name": "envoy.service.auth.v3.Authorization"
    }
    # the auth service is asked by Envoy, never routed to or reflected
    assert not [r for r in routes(config) if r.get("route", {}).get("cluster") == AUTHZ_CLUSTER]
    assert ("127.0.0.1", 7058) not in endpoints(clusters(config)[REFLECTION_CLUSTER])


def test_extra_filters_go_after_ext_authz() -> None:
    extra = {"name": "envoy.filters.http.api_key_auth", "typed_config": {"@type": "x"}}
    names = [f["name"] for f in hcm(render(authz=AUTHZ, http_filters=[extra]))["http_filters"]]
    assert names == [EXT_AUTHZ, "envoy.filters.http.api_key_auth", "envoy.filters.http.router"]


def test_health_and_reflection_skip_ext_authz_and_strip_the_tenant_header() -> None:
    config = guarded()
    for service in SKIPPING:
        route = route_for(config, service)
        per_route = route["typed_per_filter_config"][EXT_AUTHZ]
        assert per_route["@type"].endswith("ext_authz.v3.ExtAuthzPerRoute")
        assert per_route["disabled"] is True
        assert route["request_headers_to_remove"] == [
            "x-tenant-id",
            "x-switchboard-principal",
            "authorization",
            "x-api-key",
        ]
    unknown = routes(config)[-1]
    assert unknown["typed_per_filter_config"][EXT_AUTHZ]["disabled"] is True


def test_service_routes_are_checked_and_keep_the_tenant_ext_authz_sets() -> None:
    # Route-level header removal runs in the router, after ext_authz: removing
    # x-tenant-id here would drop the tenant ext_authz has just set.
    config = guarded()
    for upstream in UPSTREAMS:
        for service in upstream.services:
            route = route_for(config, service)
            assert "typed_per_filter_config" not in route
            assert "x-tenant-id" not in route.get("request_headers_to_remove", [])


def test_the_internal_listener_has_the_same_routes_on_loopback_without_ext_authz() -> None:
    config = guarded()  # the public listener on 0.0.0.0
    internal = listener(config, "internal")
    assert internal["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 8081}
    manager = hcm(config, "internal")
    assert [f["name"] for f in manager["http_filters"]] == ["envoy.filters.http.router"]
    assert manager["stat_prefix"] == "internal"
    assert manager["access_log"][0]["typed_config"]["log_format"]["json_format"]["listener"] == (
        "internal"
    )

    def table(name: str) -> list[tuple[dict[str, str], str | None]]:
        return [(r["match"], r.get("route", {}).get("cluster")) for r in routes(config, name)]

    assert table("internal") == table("public")
    for route in routes(config, "internal"):
        assert "typed_per_filter_config" not in route
        if "route" in route:
            # no operator authority travels inward: the principal header is dropped
            assert route["request_headers_to_remove"] == ["x-switchboard-principal"]
    assert route_for(config, ADMISSION, "internal")["route"]["hash_policy"] == [
        {"header": {"header_name": "x-tenant-id"}}
    ]


CONTROL = Upstream(
    name="control",
    services=("switchboard.control.v1.ControlService",),
    endpoints=(("127.0.0.1", 7050),),
)


def test_the_control_plane_is_routed_on_the_internal_listener_only_as_an_operator() -> None:
    config = render(authz=AUTHZ, internal_port=8081, control=CONTROL)
    prefix = "/switchboard.control.v1.ControlService/"
    (route,) = [r for r in routes(config, "internal") if r["match"].get("prefix") == prefix]
    assert route["route"]["cluster"] == "control"
    assert route["request_headers_to_add"] == [
        {
            "header": {"key": "x-switchboard-principal", "value": "operator"},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
        }
    ]
    assert "request_headers_to_remove" not in route
    # the public port has no route to it: its calls fall to the catch-all 404
    assert not [r for r in routes(config, "public") if r["match"].get("prefix") == prefix]


def test_consistency_refuses_a_public_route_to_the_control_plane() -> None:
    config = copy.deepcopy(render(authz=AUTHZ, internal_port=8081, control=CONTROL))
    internal_route = [
        r for r in routes(config, "internal") if r.get("route", {}).get("cluster") == "control"
    ][0]
    routes(config, "public").insert(0, copy.deepcopy(internal_route))
    with pytest.raises(ValueError, match="listener 'public' routes to the control plane"):
        check_consistency(config)


def test_consistency_refuses_an_internal_listener_passing_the_principal_on() -> None:
    config = copy.deepcopy(guarded())
    del routes(config, "internal")[0]["request_headers_to_remove"]
    with pytest.raises(ValueError, match="internal listener's route .* passes a caller's x-sw"):
        check_consistency(config)


def test_the_internal_listener_needs_its_own_port() -> None:
    with pytest.raises(ValueError, match="port of its own"):
        render(internal_port=8080)


def test_consistency_keeps_the_trusting_listener_on_loopback() -> None:
    config = copy.deepcopy(guarded())
    listener(config, "internal")["address"]["socket_address"]["address"] = "0.0.0.0"
    with pytest.raises(ValueError, match="internal listener trusts x-tenant-id"):
        check_consistency(config)


def test_consistency_refuses_a_skipping_route_that_passes_the_tenant_on() -> None:
    config = copy.deepcopy(guarded())
    del route_for(config, "grpc.health.v1.Health")["request_headers_to_remove"]
    with pytest.raises(ValueError, match="skips ext_authz but passes a client's x-tenant-id"):
        check_consistency(config)
    config = copy.deepcopy(guarded())
    route_for(config, "grpc.health.v1.Health")["request_headers_to_remove"].remove(
        "x-switchboard-principal"
    )
    with pytest.raises(ValueError, match="passes a client's x-switchboard-principal"):
        check_consistency(config)


def test_consistency_refuses_ext_authz_after_the_router_or_without_its_cluster() -> None:
    config = copy.deepcopy(guarded())
    hcm(config)["http_filters"].reverse()
    config["static_resources"]["clusters"] = [
        c for c in config["static_resources"]["clusters"] if c["name"] != AUTHZ_CLUSTER
    ]
    with pytest.raises(ValueError) as error:
        check_consistency(config)
    assert "ext_authz must come before the router" in str(error.value)
    assert "ext_authz names unknown cluster 'ext-authz'" in str(error.value)
