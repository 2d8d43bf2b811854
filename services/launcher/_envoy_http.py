"""The edge's plain-HTTP part: path prefixes routed to HTTP/1.1 processes of the mesh
(the OpenAI-compatible API), behind the same ext_authz API-key check as every gRPC call.

Such a process is no gRPC server: its cluster speaks HTTP/1.1 and is health-checked over
HTTP, and it is not among the reflection cluster's hosts. A request on its paths that
Envoy answers itself because the process cannot be reached gets the API's JSON error
shape (`local_reply_mappers`) instead of Envoy's plain text.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

UPSTREAM_IDLE_TIMEOUT = "30s"
"""Envoy closes an idle upstream HTTP/1.1 connection first, well before the server's
own keep-alive timeout (aiohttp: 75 s), so Envoy never sends a request on a connection
the server is closing."""
UNREACHABLE_FLAGS = ("UH", "UF", "UO", "URX", "NC")
"""Envoy's response flags for a request it could not deliver: no healthy host, connect
failure, overflow, retries exhausted, no cluster."""
UNREACHABLE_REASON = "DEPENDENCY_UNAVAILABLE"


@dataclass(frozen=True, kw_only=True)
class HttpUpstream:
    """Replicas of an HTTP process kind and the path prefixes routed to them.

    Attributes:
        name: the Envoy cluster name, e.g. "gateway".
        prefixes: path prefixes routed here, e.g. "/v1/"; each starts and ends with "/".
        endpoints: (host, port) of each replica.
        health_path: the path that answers 200 while a replica is ready.
    """

    name: str
    prefixes: tuple[str, ...]
    endpoints: tuple[tuple[str, int], ...]
    health_path: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefixes", tuple(self.prefixes))
        object.__setattr__(self, "endpoints", tuple((str(h), int(p)) for h, p in self.endpoints))
        if not self.name or any(c.isspace() or c in "/:" for c in self.name):
            raise ValueError(f"upstream name {self.name!r} must be a non-empty word")
        if not self.prefixes:
            raise ValueError(f"HTTP upstream {self.name!r} serves no path")
        for prefix in self.prefixes:
            if len(prefix) < 3 or not (prefix.startswith("/") and prefix.endswith("/")):
                raise ValueError(f"HTTP upstream {self.name!r}: bad path prefix {prefix!r}")
        if not self.health_path.startswith("/"):
            raise ValueError(f"HTTP upstream {self.name!r}: bad health path")
        for host, port in self.endpoints:
            if not host or not 0 < port < 65536:
                raise ValueError(f"upstream {self.name!r}: bad endpoint {host}:{port}")


def http_routes(
    upstreams: Sequence[HttpUpstream], *, idle_timeout: str, retries: dict[str, Any]
) -> list[dict[str, Any]]:
    """One route per prefix; no route timeout (a stream lasts as long as it streams)."""
    return [
        {
            "name": f"{upstream.name}{prefix.rstrip('/')}",
            "match": {"prefix": prefix},
            "route": {
                "cluster": upstream.name,
                "timeout": "0s",
                "idle_timeout": idle_timeout,
                "retry_policy": copy.deepcopy(retries),
            },
        }
        for upstream in upstreams
        for prefix in upstream.prefixes
    ]


def as_http_cluster(cluster: dict[str, Any], upstream: HttpUpstream) -> dict[str, Any]:
    """A cluster built for gRPC, made HTTP/1.1 and health-checked over HTTP."""
    cluster = copy.deepcopy(cluster)
    cluster["typed_extension_protocol_options"] = {
        key: {
            "@type": options["@type"],
            "common_http_protocol_options": {"idle_timeout": UPSTREAM_IDLE_TIMEOUT},
            "explicit_http_config": {"http_protocol_options": {}},
        }
        for key, options in cluster["typed_extension_protocol_options"].items()
    }
    for check in cluster.get("health_checks", []):
        check.pop("grpc_health_check", None)
        check["http_health_check"] = {"path": upstream.health_path}
    return cluster


def local_reply_mappers(upstreams: Sequence[HttpUpstream]) -> list[dict[str, Any]]:
    """Envoy's own replies on the HTTP API's paths when its process cannot be reached,
    as the API's JSON error (`{"error": {"message", "type", "code"}}`)."""
    return [
        {
            "filter": {
                "and_filter": {
                    "filters": [
                        {
                            "header_filter": {
                                "header": {
                                    "name": ":path",
                                    "string_match": {"prefix": prefix},
                                }
                            }
                        },
                        {"response_flag_filter": {"flags": list(UNREACHABLE_FLAGS)}},
                    ]
                }
            },
            "body_format_override": {
                "json_format": {
                    "error": {
                        "message": f"the {upstream.name} is unavailable: %LOCAL_REPLY_BODY%",
                        "type": "server_error",
                        "code": UNREACHABLE_REASON,
                    }
                }
            },
        }
        for upstream in upstreams
        for prefix in upstream.prefixes
    ]
