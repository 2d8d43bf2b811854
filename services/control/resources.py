"""Envoy's dynamic resources (xDS v3) made from the config the launcher renders.

The launcher's renderer (`render_envoy_config`, `add_browser_access`) stays the one place
that decides what the edge does; this module only moves its output from a static
bootstrap to the four resource types Envoy fetches over ADS, so the two cannot drift:

- each cluster becomes `type: EDS` (its endpoints fetched over ADS) and loses its static
  `load_assignment`; the endpoints are given separately, as they are now, and become
  one `ClusterLoadAssignment` per cluster: a replica draining before it stops is sent as
  DRAINING, which takes it out of Envoy's load balancing while its streams finish;
- each HTTP connection manager gets `rds` instead of its inline `route_config`, which
  becomes a `RouteConfiguration` named after the listener, so a route change reaches
  Envoy without touching (and draining) the listener;
- what stays in Envoy's bootstrap (`bootstrap`) is only what cannot change while it runs:
  its node, the admin API, how to reach the control plane, and the bootstrap-level parts
  of `envoy/base.yaml` (the overload manager).

A cluster with no entry in `endpoints` gets an empty `ClusterLoadAssignment` (zero
endpoints): a service with no healthy replica yet is normal while the mesh starts, and
Envoy answers its routes with UNAVAILABLE instead of refusing the whole config. An entry
in `endpoints` naming no cluster is a mistake (a typo would otherwise silently leave the
real cluster empty), so it raises ValueError.

The typed messages come from `xds-protos`; `json_format.ParseDict` resolves the
`typed_config` `Any` fields through the default descriptor pool, which is why the
extension modules the renderer uses are imported below for their side effect.
"""

from __future__ import annotations

import copy
import ipaddress
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

# Imported for the descriptor pool: every `@type` the rendered config may carry.
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
from envoy.config.listener.v3.listener_pb2 import Listener
from envoy.config.route.v3.route_pb2 import RouteConfiguration
from envoy.config.trace.v3 import opentelemetry_pb2  # noqa: F401
from envoy.extensions.access_loggers.file.v3 import file_pb2  # noqa: F401
from envoy.extensions.access_loggers.stream.v3 import stream_pb2  # noqa: F401
from envoy.extensions.filters.http.cors.v3 import cors_pb2  # noqa: F401
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2  # noqa: F401
from envoy.extensions.filters.http.grpc_web.v3 import grpc_web_pb2  # noqa: F401
from envoy.extensions.filters.http.health_check.v3 import health_check_pb2  # noqa: F401
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt_authn_pb2  # noqa: F401
from envoy.extensions.filters.http.lua.v3 import lua_pb2  # noqa: F401
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2  # noqa: F401
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2,
)
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2  # noqa: F401
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
from google.protobuf import json_format
from google.protobuf.message import Message

logger = logging.getLogger(__name__)

CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
TYPE_URLS: tuple[str, ...] = (CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE)
"""In the order a new snapshot reaches Envoy: clusters, endpoints, listeners, routes."""

XDS_CLUSTER = "xds"
"""The bootstrap's one static cluster: the control plane's gRPC address (ADS, and the
OTLP export of Envoy's spans)."""
XDS_CONNECT_TIMEOUT = "1s"

_HCM = "envoy.filters.network.http_connection_manager"
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_ADS_SOURCE: dict[str, Any] = {"ads": {}, "resource_api_version": "V3"}
_OWN_BOOTSTRAP_KEYS = frozenset({"node", "admin", "static_resources", "dynamic_resources"})
"""Keys of base.yaml that `bootstrap` writes itself; every other top-level key (the
overload manager, and whatever bootstrap-level setting is added there later) is kept."""


@dataclass(frozen=True)
class Endpoint:
    """One replica as Envoy sees it: an IP address (EDS does not resolve names), a port,
    and whether it is draining (no new calls; its open streams finish)."""

    host: str
    port: int
    draining: bool = False

    def __post_init__(self) -> None:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            raise ValueError(
                f"endpoint host {self.host!r} must be an IP address: Envoy's EDS does not "
                "resolve names"
            ) from None
        if not 0 < self.port < 65536:
            raise ValueError(f"endpoint {self.host}:{self.port}: bad port")


@dataclass(frozen=True)
class Resources:
    """One consistent set of Envoy resources, each keyed by its name.

    The mappings are read-only views; the messages in them must not be changed after the
    set is built (a published set is shared by every Envoy stream).
    """

    clusters: Mapping[str, Cluster] = field(default_factory=dict)
    endpoints: Mapping[str, ClusterLoadAssignment] = field(default_factory=dict)
    listeners: Mapping[str, Listener] = field(default_factory=dict)
    routes: Mapping[str, RouteConfiguration] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("clusters", "endpoints", "listeners", "routes"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))

    def of(self, type_url: str) -> Mapping[str, Message]:
        """The resources of one xDS type URL (one of TYPE_URLS)."""
        by_type: dict[str, Mapping[str, Message]] = {
            CLUSTER_TYPE: self.clusters,
            ENDPOINT_TYPE: self.endpoints,
            LISTENER_TYPE: self.listeners,
            ROUTE_TYPE: self.routes,
        }
        try:
            return by_type[type_url]
        except KeyError:
            raise ValueError(f"unknown xDS type URL {type_url!r}") from None


def resources_from_static(
    config: Mapping[str, Any], endpoints: Mapping[str, Sequence[Endpoint]]
) -> Resources:
    """The dynamic resources equivalent to a rendered static bootstrap.

    Args:
        config: what `render_envoy_config` (and `add_browser_access`) return; only its
            `static_resources` are read.
        endpoints: cluster name → its endpoints now. A cluster without an entry gets
            zero endpoints (module docstring).

    Raises:
        ValueError: `endpoints` names a cluster the config lacks, or a piece of the config
            is not a valid Envoy message.
    """
    static = config.get("static_resources", {})
    clusters = [_eds_cluster(c) for c in static.get("clusters", [])]
    known = {c.name for c in clusters}
    unknown = sorted(set(endpoints) - known)
    if unknown:
        raise ValueError(
            f"endpoints given for unknown cluster(s) {unknown}; known: {sorted(known)}"
        )
    listeners: dict[str, Listener] = {}
    routes: dict[str, RouteConfiguration] = {}
    for rendered in static.get("listeners", []):
        listener, own_routes = _rds_listener(rendered)
        listeners[listener.name] = listener
        routes.update(own_routes)
    return Resources(
        clusters={c.name: c for c in clusters},
        endpoints={name: load_assignment(name, endpoints.get(name, ())) for name in known},
        listeners=listeners,
        routes=routes,
    )


def load_assignment(cluster: str, endpoints: Sequence[Endpoint]) -> ClusterLoadAssignment:
    """A cluster's endpoints as EDS sends them: HEALTHY, or DRAINING while draining."""
    return _parse(
        {
            "cluster_name": cluster,
            # one locality, or none at all for a cluster with no endpoints now
            "endpoints": [{"lb_endpoints": [_lb_endpoint(e) for e in endpoints]}]
            if endpoints
            else [],
        },
        ClusterLoadAssignment(),
    )


def _lb_endpoint(endpoint: Endpoint) -> dict[str, Any]:
    address = {"socket_address": {"address": endpoint.host, "port_value": endpoint.port}}
    return {
        "endpoint": {"address": address},
        "health_status": "DRAINING" if endpoint.draining else "HEALTHY",
    }


def bootstrap(
    *,
    node_id: str,
    cluster: str,
    admin_port: int,
    ads_host: str,
    ads_port: int,
    base_path: Path | None = None,
) -> dict[str, Any]:
    """Envoy's bootstrap when everything else comes from the control plane over ADS.

    Args:
        node_id: this Envoy's identity on its ADS stream (one snapshot stream per node).
        cluster: the node's service cluster (Envoy's `--service-cluster`).
        admin_port: the admin API's port, on 127.0.0.1 always.
        ads_host: the control plane's gRPC address (an IP literal: a STATIC cluster).
        ads_port: its port.
        base_path: the skeleton whose bootstrap-level settings are kept; by default the
            launcher's `envoy/base.yaml`.
    """
    if base_path is None:
        # here, not at the top: the launcher imports this module
        from services.launcher._envoy import BASE_CONFIG

        base_path = BASE_CONFIG
    base: dict[str, Any] = yaml.safe_load(base_path.read_text())
    kept = {k: copy.deepcopy(v) for k, v in base.items() if k not in _OWN_BOOTSTRAP_KEYS}
    return {
        "node": {"id": node_id, "cluster": cluster},
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        **kept,
        "static_resources": {"clusters": [_xds_cluster(ads_host, ads_port)]},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [
                    {
                        "envoy_grpc": {
                            "cluster_name": XDS_CLUSTER,
                            # Reconnect quickly after a control plane restart (Envoy keeps
                            # its config meanwhile); the default starts at 0.5 s up to 30 s.
                            "retry_policy": {
                                "retry_back_off": {"base_interval": "0.1s", "max_interval": "2s"}
                            },
                        }
                    }
                ],
            },
            "cds_config": copy.deepcopy(_ADS_SOURCE),
            "lds_config": copy.deepcopy(_ADS_SOURCE),
        },
    }


def route_names(listener: Listener) -> list[str]:
    """The RDS route configurations a listener's HTTP connection managers name."""
    return [hcm.rds.route_config_name for hcm in _listener_hcms(listener) if hcm.HasField("rds")]


def route_clusters(route_config: RouteConfiguration) -> set[str]:
    """Every cluster a route configuration may send a request to."""
    names: set[str] = set()
    for vhost in route_config.virtual_hosts:
        for route in vhost.routes:
            if not route.HasField("route"):
                continue
            action = route.route
            if action.cluster:
                names.add(action.cluster)
            names.update(w.name for w in action.weighted_clusters.clusters)
            names.update(m.cluster for m in action.request_mirror_policies if m.cluster)
    return names


def eds_name(cluster: Cluster) -> str | None:
    """The ClusterLoadAssignment an EDS cluster asks for; None for other clusters."""
    if cluster.type != Cluster.EDS:
        return None
    return cluster.eds_cluster_config.service_name or cluster.name


# -- conversion ---------------------------------------------------------------------------


def _eds_cluster(rendered: Mapping[str, Any]) -> Cluster:
    cluster = copy.deepcopy(dict(rendered))
    cluster.pop("load_assignment", None)
    cluster.pop("dns_lookup_family", None)  # for DNS clusters only
    cluster["type"] = "EDS"
    cluster["eds_cluster_config"] = {"eds_config": copy.deepcopy(_ADS_SOURCE)}
    return _parse(cluster, Cluster())


def _rds_listener(rendered: Mapping[str, Any]) -> tuple[Listener, dict[str, RouteConfiguration]]:
    listener = copy.deepcopy(dict(rendered))
    name = str(listener["name"])
    routes: dict[str, RouteConfiguration] = {}
    for hcm in _rendered_hcms(listener):
        if "route_config" not in hcm:
            continue
        route_name = name if not routes else f"{name}-{len(routes)}"
        route_config = hcm.pop("route_config")
        route_config["name"] = route_name
        routes[route_name] = _parse(route_config, RouteConfiguration())
        hcm["rds"] = {"config_source": copy.deepcopy(_ADS_SOURCE), "route_config_name": route_name}
    return _parse(listener, Listener()), routes


def _rendered_hcms(listener: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    chains = [*listener.get("filter_chains", [])]
    if "default_filter_chain" in listener:
        chains.append(listener["default_filter_chain"])
    for chain in chains:
        for network_filter in chain.get("filters", []):
            if network_filter.get("name") == _HCM:
                yield network_filter["typed_config"]


def _xds_cluster(host: str, port: int) -> dict[str, Any]:
    ipaddress.ip_address(host)  # a STATIC cluster takes an IP literal only
    return {
        "name": XDS_CLUSTER,
        "type": "STATIC",
        "connect_timeout": XDS_CONNECT_TIMEOUT,
        "typed_extension_protocol_options": {
            _HTTP_OPTIONS: {
                "@type": f"type.googleapis.com/{_HTTP_OPTIONS}",
                "explicit_http_config": {
                    "http2_protocol_options": {
                        # a control plane that vanished without closing is noticed
                        "connection_keepalive": {"interval": "30s", "timeout": "5s"}
                    }
                },
            }
        },
        "load_assignment": {
            "cluster_name": XDS_CLUSTER,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {"socket_address": {"address": host, "port_value": port}}
                            }
                        }
                    ]
                }
            ],
        },
    }


def _listener_hcms(listener: Listener) -> Iterator[Any]:
    chains = [*listener.filter_chains]
    if listener.HasField("default_filter_chain"):
        chains.append(listener.default_filter_chain)
    for chain in chains:
        for network_filter in chain.filters:
            if network_filter.name == _HCM or network_filter.typed_config.Is(
                http_connection_manager_pb2.HttpConnectionManager.DESCRIPTOR
            ):
                hcm = http_connection_manager_pb2.HttpConnectionManager()
                network_filter.typed_config.Unpack(hcm)
                yield hcm


def _parse(value: Mapping[str, Any], message: Any) -> Any:
    try:
        return json_format.ParseDict(value, message)
    except json_format.ParseError as error:
        kind = type(message).__name__
        raise ValueError(f"not a valid {kind} {value.get('name', '')!r}: {error}") from error
