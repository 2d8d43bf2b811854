"""The edge's whole config for the mesh's replicas of the moment: which cluster each
service's replicas form, the auth service's ext_authz cluster, the control plane's
internal-only route, the HTTP API and browser access. The control plane renders it on
every change of the replica set and serves it to Envoy over ADS."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from switchboard.control.v1 import control_service_pb2

from services.launcher import _envoy, _envoy_http, _envoy_web
from services.launcher._config import LauncherConfig
from services.launcher._envoy_shape import AUTHZ_CLUSTER, CONTROL_CLUSTER
from services.launcher._services import AUTH, AUTHORIZATION, SERVICES
from services.runtime import HTTP_HEALTH_PATH

logger = logging.getLogger(__name__)

CONTROL_SERVICE = control_service_pb2.DESCRIPTOR.services_by_name["ControlService"].full_name
Endpoints = Mapping[str, Sequence[tuple[str, int]]]
"""A service's name (`inference`) → the (host, port) of each replica Envoy may use."""


def edge_config(config: LauncherConfig, endpoints: Endpoints) -> dict[str, Any]:
    """The edge's config (a static bootstrap, checked for consistency) routing to
    `endpoints`; a service with none keeps its cluster, empty."""

    def of(name: str) -> tuple[tuple[str, int], ...]:
        return tuple(endpoints.get(name, ()))

    upstreams = [
        _envoy.Upstream(
            name=spec.name,
            services=spec.grpc_services,
            endpoints=of(spec.name),
            hash_header=spec.hash_header,
        )
        for spec in SERVICES
        if spec.public
    ]
    authz = _envoy.Upstream(name=AUTHZ_CLUSTER, services=(AUTHORIZATION,), endpoints=of(AUTH.name))
    control = _envoy.Upstream(
        name=CONTROL_CLUSTER,
        services=(CONTROL_SERVICE,),
        endpoints=((config.host, config.control_port),),
    )
    http_upstreams = [
        _envoy_http.HttpUpstream(
            name=spec.name,
            prefixes=spec.service.http_prefixes,
            endpoints=of(spec.name),
            health_path=HTTP_HEALTH_PATH,
        )
        for spec in SERVICES
        if spec.http
    ]
    rendered = _envoy.render_envoy_config(
        listen_host=config.host,
        listen_port=config.envoy_port,
        admin_port=config.envoy_admin_port,
        upstreams=upstreams,
        authz=authz,
        internal_port=config.envoy_internal_port,
        control=control,
        http_upstreams=http_upstreams,
        allow_empty=True,
    )
    return _envoy_web.add_browser_access(
        rendered, origins=_envoy_web.parse_origins(config.web_origins), allow_empty=True
    )
