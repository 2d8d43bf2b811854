"""Renders the Envoy edge's bootstrap config from `envoy/base.yaml` (`_envoy_process` runs
it).

The edge is one public HTTP/2 listener that routes each gRPC call by its service name
(`/<package.Service>/<Method>`) to the cluster of the processes serving it. Reflection
and health go to a `reflection` cluster made of every service's endpoints: each
Switchboard service's reflection advertises the whole public catalogue, so any live one
can answer, and active gRPC health checks drop the dead or draining ones.

Tenants are authenticated at the edge. The public listener asks the auth service
(`envoy.filters.http.ext_authz`, gRPC, before the router) about every call: a call with a
valid API key goes on with `x-tenant-id` overwritten by the key's tenant and the key
removed; any other call is answered by Envoy with UNAUTHENTICATED and reaches no service.
Health checks and reflection (and the catch-all 404) skip the check, so `grpcurl list`
works without a key; those routes strip `x-tenant-id` and the key headers instead.
Route-level header removal runs in the router, after ext_authz, which is why it is only
used on the routes that skip the check: elsewhere it would remove the tenant ext_authz set.

A second, internal listener (loopback only) has the same routes and clusters but no
ext_authz: it trusts the `x-tenant-id` it is sent, and removes `x-switchboard-principal`
(a call on it is a tenant's, never an operator's). The services use it for their calls
to each other (the tenant of the call they are handling travels with them); clients
never do.

What the edge does about request size (see also the top of `envoy/base.yaml`): a gRPC
stream is one HTTP/2 body holding any number of length-prefixed messages, so Envoy's
whole-body limits (the buffer and body_size_limit filters) do not fit: they buffer the
stream or cut a long session after N bytes in total, and their 413 reaches a gRPC client
as UNKNOWN. Envoy 1.40 has no per-message limit for proxied gRPC. The edge therefore
bounds its own memory (header limits, per-connection buffer limits, HTTP/2 flow-control
windows; a large message streams through under back-pressure) and the services enforce
the per-message limit with grpc's `max_receive_message_length`: the client gets
RESOURCE_EXHAUSTED from the service, passed through Envoy unchanged.

Routes have no timeout (streams last as long as the call) and a stream idle timeout; a
call's deadline travels as `grpc-timeout` to the service, and the client's cancellation
at its deadline is passed upstream (see `enforce_grpc_deadlines` for Envoy's own timer).

A call to a service no route knows ends in a catch-all 404 whose body names the problem:
Envoy's local reply turns it into `grpc-status: 12` (UNIMPLEMENTED) with that body as
`grpc-message` for gRPC clients, and a plain HTTP client gets an ordinary 404. An unknown
method of a known service reaches that service, whose grpc answers UNIMPLEMENTED too.
"""

from __future__ import annotations

import copy
import ipaddress
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import descriptor_pb2, descriptor_pool

from services.launcher._envoy_checks import check_consistency
from services.launcher._envoy_http import (
    HttpUpstream,
    as_http_cluster,
    http_routes,
    local_reply_mappers,
)
from services.launcher._envoy_shape import (
    EXT_AUTHZ,
    EXT_AUTHZ_TYPE,
    HTTP_OPTIONS,
    HTTP_OPTIONS_TYPE,
    INTERNAL_LISTENER,
    LISTENER,
    OPERATOR,
    PRINCIPAL_HEADER,
    REQUEST_ID_HEADER,
    ROUTER,
    envoy_duration,
    hcm_of,
    public_listener,
    skip_authz,
)

logger = logging.getLogger(__name__)

BASE_CONFIG = Path(__file__).resolve().parents[2] / "envoy" / "base.yaml"
"""The static skeleton the renderer fills in."""

HEALTH_TRIES_AT_LEAST = 16
"""Retries of a health check through the reflection cluster, at the least."""
_CONTROL_IDLE_TIMEOUT = "3600s"
"""The control plane's routes' idle timeout: a rollout of every service answers when done."""
REFLECTION_CLUSTER = "reflection"
REFLECTION_SERVICES: tuple[str, ...] = (
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
)
HEALTH_SERVICE = "grpc.health.v1.Health"
UNKNOWN_SERVICE_MESSAGE = "unknown service: no Switchboard service serves this path"


# Envoy → service HTTP/2. Envoy opens another connection when one has this many streams.
_UPSTREAM_HTTP2 = {
    "max_concurrent_streams": 1024,
    "initial_stream_window_size": 1 << 20,
    "initial_connection_window_size": 16 << 20,
}
# High enough that load tests measure the services, not Envoy's defaults (1024).
_CIRCUIT_BREAKERS = {
    "thresholds": [
        {
            "priority": "DEFAULT",
            "max_connections": 10_000,
            "max_pending_requests": 10_000,
            "max_requests": 10_000,
            "max_retries": 10,
        }
    ]
}
# Light: only failures Envoy itself sees (connect failures, resets, timeouts) eject a
# host. HTTP-level "5xx" would include gRPC statuses the services return on purpose
# (UNAVAILABLE with RetryInfo, INTERNAL, DEADLINE_EXCEEDED), so it is not enforced.
_OUTLIER_DETECTION = {
    "interval": "5s",
    "base_ejection_time": "15s",
    "max_ejection_percent": 50,
    "split_external_local_origin_errors": True,
    "consecutive_local_origin_failure": 5,
    "enforcing_consecutive_local_origin_failure": 100,
    "enforcing_local_origin_success_rate": 0,
    "enforcing_consecutive_5xx": 0,
    "enforcing_consecutive_gateway_failure": 0,
    "enforcing_success_rate": 0,
}
# Retried only when the request cannot have reached a service, so never twice executed.
# A retry goes to another host: least-request balancing favours a dead replica (it holds
# no requests), so with two replicas a pick is that host 3 times in 4; after 16 picks (all
# of them that host about once in 100) Envoy tries the last one anyway.
_SAFE_RETRIES = {
    "retry_on": "connect-failure,refused-stream,reset-before-request",
    "num_retries": 2,
    "retry_host_predicate": [
        {
            "name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {
                "@type": "type.googleapis.com/"
                "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
            },
        }
    ],
    "host_selection_retry_max_attempts": 16,
}
# A read-only call (a unary method its contract marks `idempotency_level =
# NO_SIDE_EFFECTS`) may run twice: it is also retried when its replica reset it (killed
# with the request already on Envoy's connection to it) or answered UNAVAILABLE.
_READ_ONLY_RETRIES = {
    **_SAFE_RETRIES,
    "retry_on": f"{_SAFE_RETRIES['retry_on']},reset,unavailable",
}
# Health checks reach the reflection cluster, whose hosts are every service's replicas:
# one that does not serve the named service answers NOT_FOUND (grpc-status 5), and the
# check (read-only) is tried on another host until one knows the service.
_HEALTH_RETRIES = {
    **_SAFE_RETRIES,
    "retry_on": f"{_SAFE_RETRIES['retry_on']},retriable-headers",
    "retriable_headers": [{"name": "grpc-status", "string_match": {"exact": "5"}}],
}


@dataclass(frozen=True, kw_only=True)
class Upstream:
    """Replicas of one process kind, and the public gRPC services they serve.

    Attributes:
        name: the Envoy cluster name, e.g. "inference".
        services: fully-qualified gRPC service names routed here, e.g.
            "switchboard.inference.v1.InferenceService".
        endpoints: (host, port) of each replica; IP literals give a STATIC cluster,
            host names a STRICT_DNS one.
        hash_header: when set, calls are spread by a consistent hash (ring hash) of this
            request header, so one value (a tenant id) always reaches the same healthy
            replica. Calls without the header go to a random replica.
        health_service: the grpc.health.v1 service name checked on each replica; by
            default the only service when there is one, else "" (the whole server).
    """

    name: str
    services: tuple[str, ...]
    endpoints: tuple[tuple[str, int], ...]
    hash_header: str | None = None
    health_service: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "services", tuple(self.services))
        object.__setattr__(self, "endpoints", tuple((str(h), int(p)) for h, p in self.endpoints))
        if not self.name or any(c.isspace() or c in "/:" for c in self.name):
            raise ValueError(f"upstream name {self.name!r} must be a non-empty word")
        if not self.services:
            raise ValueError(f"upstream {self.name!r} serves no gRPC service")
        for service in self.services:
            _check_service_name(service)
        for host, port in self.endpoints:
            if not host or not 0 < port < 65536:
                raise ValueError(f"upstream {self.name!r}: bad endpoint {host}:{port}")
        if self.hash_header is not None and (
            not self.hash_header or self.hash_header != self.hash_header.lower()
        ):
            raise ValueError(
                f"upstream {self.name!r}: hash_header must be a lower-case header name"
            )

    @property
    def health_check_service(self) -> str:
        if self.health_service is not None:
            return self.health_service
        return self.services[0] if len(self.services) == 1 else ""


def render_envoy_config(
    *,
    listen_host: str,
    listen_port: int,
    admin_port: int,
    upstreams: Sequence[Upstream],
    authz: Upstream | None = None,
    internal_port: int | None = None,
    control: Upstream | None = None,
    http_upstreams: Sequence[HttpUpstream] = (),
    reflection_services: Sequence[str] = REFLECTION_SERVICES,
    stream_idle_timeout: timedelta = timedelta(minutes=5),
    buffer_limit_bytes: int = 1 << 20,
    health_check_interval: timedelta = timedelta(seconds=2),
    authz_timeout: timedelta = timedelta(seconds=1),
    http_filters: Sequence[Mapping[str, Any]] = (),
    enforce_grpc_deadlines: bool = False,
    allow_empty: bool = False,
    base_path: Path = BASE_CONFIG,
) -> dict[str, Any]:
    """The full Envoy bootstrap for the edge, checked with `check_consistency`.

    Args:
        listen_host: address of the public listener (e.g. "127.0.0.1" or "0.0.0.0").
        listen_port: the public port (8080 by default in the launcher).
        admin_port: the admin API's port; it is always bound to 127.0.0.1.
        upstreams: the services' clusters; a gRPC service may appear in one only.
        authz: the auth service (`envoy.service.auth.v3.Authorization`), a cluster of
            its own (the launcher names it AUTHZ_CLUSTER): when given, the public listener
            asks it about every call except health and reflection (module docstring).
            None leaves the public listener open, trusting the client's `x-tenant-id`
            (only for tests of the config itself).
        internal_port: when given, a second listener on 127.0.0.1 with the same routes
            and no ext_authz, for the services' calls to each other. It trusts the
            `x-tenant-id` it is sent, so it is on loopback only, always.
        control: the control plane (ControlService), routed on the internal listener
            only, each call marked an operator's (whoever reaches loopback runs the
            machine); the public listener has no route to it.
        http_upstreams: plain-HTTP processes (the OpenAI-compatible API), routed by path
            prefix on the public listener only, behind ext_authz like every service
            (`_envoy_http`).
        reflection_services: reflection service names routed to the reflection cluster.
        stream_idle_timeout: a stream with no traffic for this long is reset; there is
            no timeout on a stream's whole duration (clients' gRPC deadlines are honoured).
        buffer_limit_bytes: how much Envoy buffers per connection, downstream and
            upstream, before applying back-pressure. Not a message-size limit (module
            docstring).
        health_check_interval: active gRPC health check period per replica.
        authz_timeout: how long Envoy waits for the auth service's answer; without one
            in time (or with the auth service down) the call fails with UNAVAILABLE
            (HTTP 503): the edge fails closed.
        http_filters: extra HTTP filters for the public listener, in order, placed after
            ext_authz and before the router.
        enforce_grpc_deadlines: also let Envoy end a call when its `grpc-timeout`
            expires (`max_stream_duration.grpc_timeout_header_max: 0s`). Off by
            default: deadlines are honoured end to end without it (the header reaches
            the service, which enforces it, and the client's cancel at its deadline is
            passed upstream), while Envoy's timer races the client's and on a stream
            already answering it resets with RST_STREAM INTERNAL_ERROR, so a client
            sometimes sees INTERNAL instead of DEADLINE_EXCEEDED (measured: 8 of 40
            server streams).
            Worth it only for clients that send a deadline without enforcing it.
        allow_empty: accept clusters without endpoints (the control plane's config,
            while every replica of a service is down); a static config must have some.
        base_path: the static skeleton to fill in.

    Raises:
        ValueError: the upstreams do not make a consistent config.
    """
    if not upstreams:
        raise ValueError("no upstreams: the edge would route nothing")
    if buffer_limit_bytes < 16 << 10:
        raise ValueError("buffer_limit_bytes below 16 KiB would starve HTTP/2 frames")
    for service in reflection_services:
        _check_service_name(service)
    owner: dict[str, str] = {}
    for upstream in upstreams:
        for service in upstream.services:
            if service in owner:
                raise ValueError(
                    f"gRPC service {service} is served by both {owner[service]!r} "
                    f"and {upstream.name!r}: a service has one cluster"
                )
            owner[service] = upstream.name
    clash = set(owner) & ({*reflection_services, HEALTH_SERVICE})
    if clash:
        raise ValueError(f"{sorted(clash)} are routed to the reflection cluster already")
    if internal_port is not None and internal_port == listen_port:
        raise ValueError("the internal listener needs a port of its own")
    for http_upstream in http_upstreams:
        for prefix in http_upstream.prefixes:
            if any(prefix.startswith(f"/{service}/") for service in owner) or prefix == "/":
                raise ValueError(f"HTTP prefix {prefix!r} would shadow gRPC routes")

    config: dict[str, Any] = yaml.safe_load(base_path.read_text())
    config["admin"]["address"]["socket_address"] = {
        "address": "127.0.0.1",
        "port_value": admin_port,
    }
    public = public_listener(config)
    public["per_connection_buffer_limit_bytes"] = buffer_limit_bytes
    idle = envoy_duration(stream_idle_timeout)
    hcm = hcm_of(public)
    hcm["stream_idle_timeout"] = idle
    router = [f for f in hcm["http_filters"] if f["name"] == ROUTER]
    every_endpoint = tuple(dict.fromkeys(e for u in upstreams for e in u.endpoints))

    def routes(*, edge_auth: bool, http: bool = False) -> list[dict[str, Any]]:
        table: list[dict[str, Any]] = []
        if control is not None and not edge_auth and not http:
            for service in control.services:
                for route in _service_routes(
                    service,
                    control.name,
                    # a rollout of every service answers when it is done: many minutes
                    idle_timeout=_CONTROL_IDLE_TIMEOUT,
                    hash_header=None,
                    enforce_deadline=enforce_grpc_deadlines,
                ):
                    route["request_headers_to_add"] = [
                        {
                            "header": {"key": PRINCIPAL_HEADER, "value": OPERATOR},
                            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                        }
                    ]
                    table.append(route)
        if http:
            table += http_routes(http_upstreams, idle_timeout=idle, retries=_SAFE_RETRIES)
        for upstream in upstreams:
            for service in upstream.services:
                table += _service_routes(
                    service,
                    upstream.name,
                    idle_timeout=idle,
                    hash_header=upstream.hash_header,
                    enforce_deadline=enforce_grpc_deadlines,
                )
        for service in (*reflection_services, HEALTH_SERVICE):
            route = _route(
                service,
                REFLECTION_CLUSTER,
                idle_timeout=idle,
                hash_header=None,
                enforce_deadline=enforce_grpc_deadlines,
            )
            if service == HEALTH_SERVICE:
                retries = route["route"]["retry_policy"] = copy.deepcopy(_HEALTH_RETRIES)
                # at least a try per replica the set may grow to between two configs
                # (a control plane's config counts those serving as it is rendered)
                tries = max(len(every_endpoint), HEALTH_TRIES_AT_LEAST)
                retries["num_retries"] = tries
                retries["host_selection_retry_max_attempts"] = 10 * tries
            if edge_auth:
                skip_authz(route)
            table.append(route)
        unknown: dict[str, Any] = {
            "name": "unknown-service",
            "match": {"prefix": "/"},
            "direct_response": {"status": 404, "body": {"inline_string": UNKNOWN_SERVICE_MESSAGE}},
        }
        if edge_auth:
            skip_authz(unknown)  # answered by Envoy itself: nothing to protect
        table.append(unknown)
        return table

    # The internal listener: a copy of the public one before ext_authz goes in.
    internal = copy.deepcopy(public)
    public["address"]["socket_address"] = {"address": listen_host, "port_value": listen_port}
    hcm["http_filters"] = [
        *([_ext_authz_filter(authz.name, envoy_duration(authz_timeout))] if authz else []),
        *(copy.deepcopy(dict(f)) for f in http_filters),
        *router,
    ]
    hcm["route_config"]["virtual_hosts"] = [
        {
            "name": "switchboard",
            "domains": ["*"],
            "routes": routes(edge_auth=bool(authz), http=True),
        }
    ]
    if http_upstreams:
        hcm["local_reply_config"] = {"mappers": local_reply_mappers(http_upstreams)}
    _access_log_field(hcm, "listener", LISTENER)

    if internal_port is not None:
        internal["name"] = INTERNAL_LISTENER
        internal["address"]["socket_address"] = {
            "address": "127.0.0.1",
            "port_value": internal_port,
        }
        inner = hcm_of(internal)
        inner["stat_prefix"] = INTERNAL_LISTENER
        inner["http_filters"] = copy.deepcopy(router)
        inner["route_config"]["name"] = f"switchboard-{INTERNAL_LISTENER}"
        inner_routes = routes(edge_auth=False)
        for route in inner_routes:
            if route.get("route", {}).get("cluster") != (control.name if control else None):
                # a service's call is a tenant's, whatever it says: no operator authority
                # travels inward (per route: the control plane's route sets it instead)
                route["request_headers_to_remove"] = [PRINCIPAL_HEADER]
        inner["route_config"]["virtual_hosts"] = [
            {"name": "switchboard", "domains": ["*"], "routes": inner_routes}
        ]
        _access_log_field(inner, "listener", INTERNAL_LISTENER)
        config["static_resources"]["listeners"].append(internal)

    interval = envoy_duration(health_check_interval)
    clusters = [
        _cluster(
            u.name,
            u.endpoints,
            health_service=u.health_check_service,
            ring_hash=u.hash_header is not None,
            interval=interval,
            buffer_limit_bytes=buffer_limit_bytes,
        )
        for u in upstreams
    ]
    clusters.append(
        _cluster(
            REFLECTION_CLUSTER,
            every_endpoint,
            health_service="",
            ring_hash=False,
            interval=interval,
            buffer_limit_bytes=buffer_limit_bytes,
        )
    )
    for extra in (authz, control):
        if extra is None:
            continue
        clusters.append(
            _cluster(
                extra.name,
                extra.endpoints,
                health_service=extra.health_check_service,
                ring_hash=False,
                interval=interval,
                buffer_limit_bytes=buffer_limit_bytes,
            )
        )
    clusters += [
        as_http_cluster(
            _cluster(
                u.name,
                u.endpoints,
                health_service="",
                ring_hash=False,
                interval=interval,
                buffer_limit_bytes=buffer_limit_bytes,
            ),
            u,
        )
        for u in http_upstreams
    ]
    config["static_resources"]["clusters"] = clusters

    check_consistency(config, allow_empty=allow_empty)
    return config


# -- building blocks ----------------------------------------------------------------------


def _route(
    service: str,
    cluster: str,
    *,
    idle_timeout: str,
    hash_header: str | None,
    enforce_deadline: bool,
) -> dict[str, Any]:
    action: dict[str, Any] = {
        "cluster": cluster,
        # No route timeout: streams last as long as the call; deadlines bound unary calls.
        "timeout": "0s",
        "idle_timeout": idle_timeout,
        "retry_policy": copy.deepcopy(_SAFE_RETRIES),
    }
    if enforce_deadline:
        # Envoy ends the stream when the client's grpc-timeout expires, uncapped.
        action["max_stream_duration"] = {"grpc_timeout_header_max": "0s"}
    if hash_header is not None:
        action["hash_policy"] = [{"header": {"header_name": hash_header}}]
    return {
        "name": service,
        "match": {"prefix": f"/{service}/"},
        "route": action,
    }


def _service_routes(service: str, cluster: str, **options: Any) -> list[dict[str, Any]]:
    """The service's route (`_route`), after one per read-only method of it, whose calls
    are retried on more failures (`_READ_ONLY_RETRIES`)."""
    table = []
    for method in _read_only_methods(service):
        route = _route(service, cluster, **options)
        route["name"] = f"{service}/{method}"
        route["match"] = {"path": f"/{service}/{method}"}
        route["route"]["retry_policy"] = copy.deepcopy(_READ_ONLY_RETRIES)
        table.append(route)
    return [*table, _route(service, cluster, **options)]


def _read_only_methods(service: str) -> list[str]:
    """The unary methods `service`'s contract marks NO_SIDE_EFFECTS; none for a service
    whose descriptors this process has not loaded."""
    try:
        descriptor = descriptor_pool.Default().FindServiceByName(service)
    except KeyError:
        return []
    return [
        method.name
        for method in descriptor.methods
        if method.GetOptions().idempotency_level == descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS
        and not (method.client_streaming or method.server_streaming)
    ]


def _cluster(
    name: str,
    endpoints: Sequence[tuple[str, int]],
    *,
    health_service: str,
    ring_hash: bool,
    interval: str,
    buffer_limit_bytes: int,
) -> dict[str, Any]:
    static = all(_is_ip(host) for host, _ in endpoints)
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC" if static else "STRICT_DNS",
        "connect_timeout": "1s",
        "per_connection_buffer_limit_bytes": buffer_limit_bytes,
        "typed_extension_protocol_options": {
            HTTP_OPTIONS: {
                "@type": HTTP_OPTIONS_TYPE,
                "explicit_http_config": {"http2_protocol_options": dict(_UPSTREAM_HTTP2)},
            }
        },
        "lb_policy": "RING_HASH" if ring_hash else "LEAST_REQUEST",
        # Envoy's default panic threshold (50%): when most replicas fail their checks,
        # route to all of them anyway, so a service whose own dependencies are down still
        # answers with its precise status (e.g. UNAVAILABLE + RetryInfo) instead of the
        # edge's bare "no healthy upstream".
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {"socket_address": {"address": host, "port_value": port}}
                            }
                        }
                        for host, port in endpoints
                    ]
                }
            ],
        },
        "health_checks": [
            {
                "timeout": "1s",
                "interval": interval,
                # Without traffic Envoy would check only once a minute; a service that
                # becomes SERVING after Envoy starts must be seen promptly.
                "no_traffic_interval": interval,
                "unhealthy_threshold": 2,
                "healthy_threshold": 1,
                "grpc_health_check": {"service_name": health_service},
            }
        ],
        "circuit_breakers": copy.deepcopy(_CIRCUIT_BREAKERS),
        "outlier_detection": dict(_OUTLIER_DETECTION),
        # A replica the control plane's endpoints no longer list (it died, or stopped)
        # leaves the balancing at once; by default Envoy keeps routing to it until its
        # health checks fail (two, seconds later).
        "ignore_health_on_host_removal": True,
    }
    if ring_hash:
        cluster["ring_hash_lb_config"] = {"minimum_ring_size": 1024}
    if not static:
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    return cluster


def _ext_authz_filter(cluster: str, timeout: str) -> dict[str, Any]:
    """Every call asks the auth service first; no answer in time means no call (503)."""
    return {
        "name": EXT_AUTHZ,
        "typed_config": {
            "@type": EXT_AUTHZ_TYPE,
            "transport_api_version": "V3",
            "grpc_service": {
                "envoy_grpc": {"cluster_name": cluster},
                # A check changes nothing, so it is safe to ask another replica when one
                # is gone (killed, or drained before Envoy's config said so): the gRPC
                # service's retry policy (envoy_grpc's applies to xDS streams only).
                # Envoy makes its back-off's longest interval each try's timeout too, so
                # that is the check's whole timeout: a slow answer (a check waiting on a
                # key store that is down) is waited for, not cut and tried again. Not on
                # UNAVAILABLE: that is a live replica's answer, passed on with its reason.
                "retry_policy": {
                    **copy.deepcopy(_SAFE_RETRIES),
                    "retry_on": "connect-failure,refused-stream,reset",
                    "retry_back_off": {"base_interval": "0.01s", "max_interval": timeout},
                },
                "timeout": timeout,
                # The call's request id reaches the auth service as gRPC metadata too
                # (the check carries it among the request's headers), so its logs and
                # spans name the call as every other hop does.
                "initial_metadata": [
                    {"key": REQUEST_ID_HEADER, "value": f"%REQ({REQUEST_ID_HEADER})%"}
                ],
            },
            "failure_mode_allow": False,
            "status_on_error": {"code": "ServiceUnavailable"},
        },
    }


def _access_log_field(hcm: dict[str, Any], key: str, value: str) -> None:
    for log in hcm.get("access_log", []):
        log_format = log.get("typed_config", {}).get("log_format", {})
        if "json_format" in log_format:
            log_format["json_format"] = {key: value, **log_format["json_format"]}


def _check_service_name(service: str) -> None:
    parts = service.split(".")
    if len(parts) < 2 or not all(p.isidentifier() for p in parts):
        raise ValueError(f"{service!r} is not a fully-qualified gRPC service name")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
