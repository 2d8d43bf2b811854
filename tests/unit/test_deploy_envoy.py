"""Envoy on Kubernetes: the chart's generated files are what the launcher's renderer makes
now, and they route, authenticate and balance exactly as the local edge does."""

from __future__ import annotations

from typing import Any

import yaml

from services.launcher import LauncherConfig
from services.launcher import kubernetes as k8s
from services.launcher._edge import CONTROL_SERVICE, edge_config
from services.launcher._envoy_shape import INTERNAL_LISTENER, LISTENER, hcm_of
from services.launcher._services import SERVICES


def test_chart_files_are_up_to_date() -> None:
    assert k8s.stale_files() == [], "run: .venv/bin/python -m services.launcher.kubernetes write"


def test_check_command_fails_on_a_stale_file(tmp_path: Any) -> None:
    assert k8s.main(["write", "--dir", str(tmp_path)]) == 0
    assert k8s.main(["check", "--dir", str(tmp_path)]) == 0
    (tmp_path / "envoy-edge.yaml").write_text("# edited by hand\n")
    assert k8s.main(["check", "--dir", str(tmp_path)]) == 1


def listener(config: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [x for x in config["static_resources"]["listeners"] if x["name"] == name]
    return found


def routes(config: dict[str, Any], name: str) -> list[tuple[str, Any, Any]]:
    """(name, match, cluster) of a listener's routes, page routes aside (the chat page is
    served locally only)."""
    (vhost,) = hcm_of(listener(config, name))["route_config"]["virtual_hosts"]
    return [
        (r["name"], r["match"], r.get("route", {}).get("cluster"))
        for r in vhost["routes"]
        if not r["name"].startswith("page")
    ]


def local_edge() -> dict[str, Any]:
    endpoints = {spec.name: [("127.0.0.1", 7000 + i)] for i, spec in enumerate(SERVICES)}
    return edge_config(LauncherConfig(), endpoints)


def test_same_routes_and_filters_as_the_local_edge() -> None:
    local = local_edge()
    for config in (
        k8s.envoy_config(listen_host="0.0.0.0"),
        k8s.envoy_config(listen_host="127.0.0.1"),
    ):
        assert routes(config, LISTENER) == routes(local, LISTENER)
        # the local internal listener also reaches the control plane, which has no
        # counterpart on Kubernetes (Deployments do its job)
        local_internal = [
            r for r in routes(local, INTERNAL_LISTENER) if CONTROL_SERVICE not in r[0]
        ]
        assert routes(config, INTERNAL_LISTENER) == local_internal
        for name in (LISTENER, INTERNAL_LISTENER):
            filters = [f["name"] for f in hcm_of(listener(config, name))["http_filters"]]
            assert filters == [f["name"] for f in hcm_of(listener(local, name))["http_filters"]]
        assert "envoy.filters.http.ext_authz" in [
            f["name"] for f in hcm_of(listener(config, LISTENER))["http_filters"]
        ]


def test_clusters_are_strict_dns_on_headless_services() -> None:
    config = k8s.envoy_config(listen_host="0.0.0.0")
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    assert set(clusters) == {c["name"] for c in local_edge()["static_resources"]["clusters"]} - {
        "control"
    }
    for cluster in clusters.values():
        assert cluster["type"] == "STRICT_DNS", cluster["name"]
        for group in cluster["load_assignment"]["endpoints"]:
            for lb in group["lb_endpoints"]:
                host = lb["endpoint"]["address"]["socket_address"]["address"]
                assert host.endswith(f".{k8s.NAMESPACE_TOKEN}.svc.{k8s.DOMAIN_TOKEN}")
    admission = clusters["admission"]
    assert admission["lb_policy"] == "RING_HASH"
    hashed = [
        r["route"]["hash_policy"]
        for r in hcm_of(listener(config, LISTENER))["route_config"]["virtual_hosts"][0]["routes"]
        if r.get("route", {}).get("cluster") == "admission"
    ]
    assert hashed and all(h == [{"header": {"header_name": "x-tenant-id"}}] for h in hashed)


def test_only_the_edge_listens_beyond_loopback() -> None:
    def addresses(config: dict[str, Any]) -> dict[str, str]:
        return {
            x["name"]: x["address"]["socket_address"]["address"]
            for x in config["static_resources"]["listeners"]
        }

    edge = addresses(k8s.envoy_config(listen_host="0.0.0.0"))
    sidecar = addresses(k8s.envoy_config(listen_host="127.0.0.1"))
    assert edge == {LISTENER: "0.0.0.0", INTERNAL_LISTENER: "127.0.0.1", "probe": "0.0.0.0"}
    assert sidecar == {LISTENER: "127.0.0.1", INTERNAL_LISTENER: "127.0.0.1", "probe": "0.0.0.0"}


def test_the_probe_listener_routes_nowhere() -> None:
    probe = listener(k8s.envoy_config(listen_host="0.0.0.0"), "probe")
    (vhost,) = hcm_of(probe)["route_config"]["virtual_hosts"]
    assert all("direct_response" in r and "route" not in r for r in vhost["routes"])


def test_the_catalogue_file_matches_the_launcher() -> None:
    mesh = yaml.safe_load((k8s.CHART_FILES / "mesh.yaml").read_text())
    assert [k["name"] for k in mesh["kinds"]] == [s.name for s in SERVICES]
    defaults = LauncherConfig()
    for kind, spec in zip(mesh["kinds"], SERVICES, strict=True):
        assert kind["port"] == spec.port(defaults, 0)
        assert kind["module"] == spec.module
