"""The launcher's rendered edge config as xDS resources: everything converts, every
cluster is EDS, every listener takes its routes over RDS, and nothing dangles."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.core.v3.health_check_pb2 import HealthStatus
from envoy.extensions.resource_monitors.downstream_connections.v3 import (
    downstream_connections_pb2,  # noqa: F401 - base.yaml's overload manager
)
from google.protobuf import json_format

from services.control.resources import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    XDS_CLUSTER,
    Endpoint,
    bootstrap,
    eds_name,
    resources_from_static,
    route_clusters,
    route_names,
)
from services.control.xds import check_snapshot
from services.launcher import LauncherConfig, isolated_config
from services.launcher._edge import edge_config
from services.launcher._envoy import BASE_CONFIG
from services.launcher._services import SERVICES


def mesh_config(config: LauncherConfig) -> dict[str, Any]:
    """The edge config as the control plane renders it, every replica `up` starts in."""
    config = dataclasses.replace(config, web_origins="http://app.example")
    return edge_config(
        config,
        {
            spec.name: [(config.host, spec.port(config, i)) for i in range(spec.replicas(config))]
            for spec in SERVICES
        },
    )


@pytest.fixture
def rendered(tmp_path: Path) -> dict[str, Any]:
    return mesh_config(isolated_config(tmp_path))


def static_endpoints(config: dict[str, Any]) -> dict[str, list[Endpoint]]:
    """Each cluster's endpoints as the static config lists them."""
    return {
        cluster["name"]: [
            Endpoint(
                e["endpoint"]["address"]["socket_address"]["address"],
                e["endpoint"]["address"]["socket_address"]["port_value"],
            )
            for group in cluster["load_assignment"]["endpoints"]
            for e in group["lb_endpoints"]
        ]
        for cluster in config["static_resources"]["clusters"]
    }


def test_the_mesh_config_converts_whole_and_consistent(rendered: dict[str, Any]) -> None:
    static = rendered["static_resources"]
    resources = resources_from_static(rendered, static_endpoints(rendered))

    assert set(resources.of(CLUSTER_TYPE)) == {c["name"] for c in static["clusters"]}
    assert set(resources.of(LISTENER_TYPE)) == {"public", "internal"}
    assert set(resources.of(ROUTE_TYPE)) == {"public", "internal"}
    assert set(resources.of(ENDPOINT_TYPE)) == set(resources.clusters)
    check_snapshot(resources)  # routes name existing clusters, listeners existing routes
    for name, route_config in resources.routes.items():
        assert route_clusters(route_config) <= set(resources.clusters), name
    for listener in resources.listeners.values():
        assert route_names(listener) == [listener.name]


def test_clusters_become_eds_with_everything_else_kept(rendered: dict[str, Any]) -> None:
    resources = resources_from_static(rendered, static_endpoints(rendered))
    by_name = {c["name"]: c for c in rendered["static_resources"]["clusters"]}

    for name, cluster in resources.clusters.items():
        assert cluster.type == Cluster.EDS
        assert eds_name(cluster) == name
        assert cluster.eds_cluster_config.eds_config.HasField("ads")
        assert not cluster.HasField("load_assignment")
        assert len(cluster.health_checks) == len(by_name[name]["health_checks"])
        assert cluster.lb_policy == Cluster.LbPolicy.Value(by_name[name]["lb_policy"])
        assert cluster.typed_extension_protocol_options  # HTTP/2 or HTTP/1.1, as rendered


def test_route_tables_move_to_rds_unchanged(rendered: dict[str, Any]) -> None:
    resources = resources_from_static(rendered, static_endpoints(rendered))
    public = next(x for x in rendered["static_resources"]["listeners"] if x["name"] == "public")
    hcm = public["filter_chains"][0]["filters"][0]["typed_config"]
    routes = [r["name"] for r in hcm["route_config"]["virtual_hosts"][0]["routes"]]

    converted = resources.routes["public"].virtual_hosts[0].routes
    assert [r.name for r in converted] == routes
    assert "route_config" in hcm  # the caller's config is not changed


def test_endpoints_carry_draining(rendered: dict[str, Any]) -> None:
    resources = resources_from_static(
        rendered,
        {"inference": [Endpoint("127.0.0.1", 7001), Endpoint("127.0.0.1", 7002, draining=True)]},
    )

    (group,) = resources.endpoints["inference"].endpoints
    assert [e.health_status for e in group.lb_endpoints] == [
        HealthStatus.HEALTHY,
        HealthStatus.DRAINING,
    ]
    assert not resources.endpoints["rag"].endpoints  # no entry: zero endpoints


def test_endpoints_of_an_unknown_cluster_are_refused(rendered: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="inferense"):
        resources_from_static(rendered, {"inferense": [Endpoint("127.0.0.1", 7001)]})


def test_an_endpoint_is_an_ip_address() -> None:
    with pytest.raises(ValueError, match="IP address"):
        Endpoint("localhost", 7001)


def test_bootstrap_holds_only_what_cannot_change() -> None:
    config = bootstrap(
        node_id="edge-1",
        cluster="switchboard",
        admin_port=9901,
        ads_host="127.0.0.1",
        ads_port=7000,
    )

    message = json_format.ParseDict(config, bootstrap_pb2.Bootstrap())
    assert message.node.id == "edge-1"
    assert message.admin.address.socket_address.address == "127.0.0.1"
    assert [c.name for c in message.static_resources.clusters] == [XDS_CLUSTER]
    assert not message.static_resources.listeners
    ads = message.dynamic_resources.ads_config
    assert ads.set_node_on_first_message_only
    assert ads.grpc_services[0].envoy_grpc.cluster_name == XDS_CLUSTER
    assert message.dynamic_resources.cds_config.HasField("ads")
    assert message.dynamic_resources.lds_config.HasField("ads")
    base = yaml.safe_load(BASE_CONFIG.read_text())
    assert config["overload_manager"] == base["overload_manager"]
