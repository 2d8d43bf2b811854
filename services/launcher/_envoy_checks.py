"""Checks a rendered Envoy bootstrap for internal consistency before anything runs it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from services.launcher._envoy_shape import (
    CONTROL_CLUSTER,
    EXT_AUTHZ,
    HTTP_OPTIONS,
    INTERNAL_LISTENER,
    OPERATOR,
    PRINCIPAL_HEADER,
    ROUTER,
    TENANT_HEADER,
    hcms_of,
    is_loopback,
    skips_authz,
)

_HASHING_LB_POLICIES = frozenset({"RING_HASH", "MAGLEV"})


def check_consistency(config: Mapping[str, Any], *, allow_empty: bool = False) -> None:
    """Check a bootstrap is internally consistent before anyone runs it.

    Every cluster a route names exists, every cluster has at least one endpoint and its
    endpoint set is its own, names (listeners, clusters, virtual hosts, route prefixes)
    are unique, routes that hash go to a hashing cluster, gRPC health checks have an
    HTTP/2 cluster, and the admin API listens on loopback only. Where ext_authz guards a
    listener: its cluster exists, it runs before the router, and every route that skips
    it strips `x-tenant-id`; the internal listener (which trusts `x-tenant-id`) is on
    loopback.

    Raises:
        ValueError: listing every problem found.
    """
    problems: list[str] = []
    admin_host = config.get("admin", {}).get("address", {}).get("socket_address", {})
    if not is_loopback(str(admin_host.get("address", ""))):
        problems.append(f"admin must listen on loopback, not {admin_host.get('address')!r}")

    static = config.get("static_resources", {})
    clusters: list[Mapping[str, Any]] = static.get("clusters", [])
    listeners: list[Mapping[str, Any]] = static.get("listeners", [])
    problems += _duplicates("listener", [str(x.get("name")) for x in listeners])
    problems += _duplicates("cluster", [str(c.get("name")) for c in clusters])

    by_name = {c.get("name"): c for c in clusters}
    for cluster in clusters:
        name = cluster.get("name")
        assignment = cluster.get("load_assignment", {})
        if assignment.get("cluster_name") != name:
            problems.append(
                f"cluster {name!r} carries the endpoints of {assignment.get('cluster_name')!r}"
            )
        count = sum(len(g.get("lb_endpoints", [])) for g in assignment.get("endpoints", []))
        if count == 0 and not allow_empty:
            problems.append(f"cluster {name!r} has no endpoints")
        if any("grpc_health_check" in hc for hc in cluster.get("health_checks", [])):
            options = cluster.get("typed_extension_protocol_options", {}).get(HTTP_OPTIONS, {})
            if "http2_protocol_options" not in options.get("explicit_http_config", {}):
                problems.append(f"cluster {name!r} has gRPC health checks but no HTTP/2")

    for listener in listeners:
        if listener.get("name") == INTERNAL_LISTENER:
            address = listener.get("address", {}).get("socket_address", {}).get("address", "")
            if not is_loopback(str(address)):
                problems.append(
                    f"the internal listener trusts {TENANT_HEADER} and must listen on "
                    f"loopback, not {address!r}"
                )
            for hcm in hcms_of(listener):
                for vhost in hcm.get("route_config", {}).get("virtual_hosts", []):
                    for route in vhost.get("routes", []):
                        if "route" in route and _passes_principal_on(route):
                            problems.append(
                                f"the internal listener's route {route.get('name')!r} passes"
                                f" a caller's {PRINCIPAL_HEADER} on"
                            )
        elif any(
            route.get("route", {}).get("cluster") == CONTROL_CLUSTER
            for hcm in hcms_of(listener)
            for vhost in hcm.get("route_config", {}).get("virtual_hosts", [])
            for route in vhost.get("routes", [])
        ):
            problems.append(f"listener {listener.get('name')!r} routes to the control plane")
        for hcm in hcms_of(listener):
            filters = [f.get("name") for f in hcm.get("http_filters", [])]
            guarded = EXT_AUTHZ in filters
            if guarded:
                problems += _authz_problems(hcm, filters, by_name)
            hosts = hcm.get("route_config", {}).get("virtual_hosts", [])
            problems += _duplicates("virtual host", [str(v.get("name")) for v in hosts])
            for vhost in hosts:
                prefixes = [
                    r["match"]["prefix"]
                    for r in vhost.get("routes", [])
                    if "prefix" in r.get("match", {})
                ]
                problems += _duplicates(f"route prefix in {vhost.get('name')!r}", prefixes)
                for route in vhost.get("routes", []):
                    problems += _route_problems(route, by_name)
                    if guarded and skips_authz(route) and "route" in route:
                        removed = route.get("request_headers_to_remove", [])
                        for header in (TENANT_HEADER, PRINCIPAL_HEADER):
                            if header not in removed:
                                problems.append(
                                    f"route {route.get('name')!r} skips ext_authz but passes "
                                    f"a client's {header} on"
                                )

    if problems:
        raise ValueError("inconsistent Envoy config: " + "; ".join(problems))


def _passes_principal_on(route: Mapping[str, Any]) -> bool:
    """Whether an internal listener's route lets a caller's principal header through:
    every route must strip it but the control plane's, which names the caller an
    operator instead."""
    if route.get("route", {}).get("cluster") == CONTROL_CLUSTER:
        return not any(
            h.get("header", {}) == {"key": PRINCIPAL_HEADER, "value": OPERATOR}
            and h.get("append_action") == "OVERWRITE_IF_EXISTS_OR_ADD"
            for h in route.get("request_headers_to_add", [])
        )
    return PRINCIPAL_HEADER not in route.get("request_headers_to_remove", [])


def _authz_problems(
    hcm: Mapping[str, Any], filters: Sequence[Any], clusters: Mapping[Any, Any]
) -> list[str]:
    problems = []
    if ROUTER in filters and filters.index(EXT_AUTHZ) > filters.index(ROUTER):
        problems.append("ext_authz must come before the router")
    for http_filter in hcm.get("http_filters", []):
        if http_filter.get("name") == EXT_AUTHZ:
            grpc_service = http_filter.get("typed_config", {}).get("grpc_service", {})
            cluster = grpc_service.get("envoy_grpc", {}).get("cluster_name")
            if cluster not in clusters:
                problems.append(f"ext_authz names unknown cluster {cluster!r}")
    return problems


def _route_problems(route: Mapping[str, Any], clusters: Mapping[Any, Any]) -> list[str]:
    action = route.get("route")
    if action is None:
        return []
    where = f"route {route.get('name') or route.get('match')!r}"
    names = (
        [action["cluster"]]
        if "cluster" in action
        else [w["name"] for w in action.get("weighted_clusters", {}).get("clusters", [])]
    )
    problems = [f"{where} names unknown cluster {n!r}" for n in names if n not in clusters]
    if action.get("hash_policy"):
        for n in names:
            policy = clusters.get(n, {}).get("lb_policy", "ROUND_ROBIN")
            if n in clusters and policy not in _HASHING_LB_POLICIES:
                problems.append(f"{where} hashes but cluster {n!r} balances by {policy}")
    return problems


def _duplicates(kind: str, names: Sequence[str]) -> list[str]:
    return [f"duplicate {kind} {n!r}" for n, k in Counter(names).items() if k > 1]
