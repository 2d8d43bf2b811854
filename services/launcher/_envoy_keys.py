"""The edge's own check of API keys, so that a tenant's call costs no round trip to the
auth service.

A key is a JWT the mesh's signing key signed (`services.auth.keys`). On the public
listener, before ext_authz:

1. `jwt_authn` checks a presented token (`authorization: Bearer`, or `x-api-key`)
   against the signing key's public half (a JWKS in the config: nothing secret) and the
   tenant keys' issuer (an operator's credential has another), and records the claims
   of one it accepts as metadata. A missing or failing token is let on
   (`allow_missing_or_failed`): ext_authz decides.
2. `rbac`, in shadow mode (it refuses nothing), decides whether the call may skip the
   auth service: a checked token of `kind` `tenant` whose key id (`jti`) is not revoked,
   calling an RPC tenants may call (or the HTTP API). Its verdict is metadata.
3. ext_authz runs unless that verdict is `allowed` (`filter_enabled_metadata`,
   inverted: no verdict at all means the check runs, so the edge fails closed). It
   answers exactly as it always has: unknown, revoked or malformed keys, operators,
   older `sb_` keys, RPCs a tenant may not call.

A call that goes on with an accepted token has `x-tenant-id` set from its `sub` and
`x-switchboard-principal` from its `kind`, overwriting what the client sent, by its
route (`request_headers_to_add`, applied as it leaves for the service). Not by
jwt_authn's `claim_to_headers`: that removes those headers from every call, an
operator's too, whose `x-tenant-id` names the tenant it acts on. Where no token was
accepted the values are empty and nothing is set: ext_authz has set them.

The revoked key ids and the shadow policy are per virtual host (`RBACPerRoute`), so the
control plane pushes a revocation over RDS: no listener changes, no connection drained.
Until it has read them (`LocalKeys.revoked` None) there is no shadow policy, and every
call is checked by the auth service. The keys themselves never reach a service: the
virtual host removes both key headers (ext_authz removes them on its own path).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from google.protobuf import descriptor_pool

from services.auth.signing import ISSUER
from services.launcher._envoy_shape import (
    EXT_AUTHZ,
    KEY_HEADERS,
    PRINCIPAL_HEADER,
    TENANT_HEADER,
    hcm_of,
    public_listener,
    skips_authz,
)
from services.runtime import Principal, http_prefixes, method_contract, public_services

logger = logging.getLogger(__name__)

JWT_AUTHN = "envoy.filters.http.jwt_authn"
RBAC = "envoy.filters.http.rbac"
PROVIDER = "switchboard"
PAYLOAD = "payload"
"""Where jwt_authn puts an accepted token's claims in its metadata."""
LOCAL_POLICY = "local"
VERDICT = "shadow_engine_result"
"""The rbac filter's metadata key for its shadow verdict (`allowed` or `denied`)."""
CLAIM_HEADERS = ((TENANT_HEADER, "sub"), (PRINCIPAL_HEADER, "kind"))
"""The headers a call with an accepted token gets from its claims."""
JWT_CACHE_SIZE = 10_000
"""Tokens whose signature Envoy remembers having checked (per worker thread)."""

_JWT_TYPE = "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication"
_RBAC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
_RBAC_PER_ROUTE_TYPE = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute"


@dataclass(frozen=True)
class LocalKeys:
    jwks: str
    """The signing key's public half (a JWKS document)."""
    revoked: frozenset[str] | None
    """Ids of revoked keys; None while not known (then no call skips the auth service)."""


def tenant_paths() -> tuple[str, ...]:
    """The gRPC paths of every public RPC whose contract lets a tenant call it."""
    pool = descriptor_pool.Default()
    paths = []
    for name in public_services():
        for method in pool.FindServiceByName(name).methods:
            path = f"/{name}/{method.name}"
            contract = method_contract(path)
            if contract is not None and Principal.TENANT in contract.principals:
                paths.append(path)
    return tuple(sorted(paths))


def add_local_keys(config: dict[str, Any], keys: LocalKeys) -> dict[str, Any]:
    """`config` with the public listener checking key tokens itself (a copy)."""
    config = copy.deepcopy(config)
    hcm = hcm_of(public_listener(config))
    filters = hcm["http_filters"]
    names = [f["name"] for f in filters]
    if EXT_AUTHZ not in names:
        return config  # nothing guards the listener: nothing to skip
    at = names.index(EXT_AUTHZ)
    filters[at]["typed_config"]["filter_enabled_metadata"] = {
        "filter": RBAC,
        "path": [{"key": VERDICT}],
        "value": {"string_match": {"exact": "allowed"}},
        "invert": True,
    }
    filters[at:at] = [_jwt_filter(keys.jwks), {"name": RBAC, "typed_config": {"@type": _RBAC_TYPE}}]
    for host in hcm["route_config"]["virtual_hosts"]:
        host["request_headers_to_remove"] = [
            *host.get("request_headers_to_remove", []),
            *(h for h in KEY_HEADERS if h not in host.get("request_headers_to_remove", [])),
        ]
        for route in host["routes"]:
            if "route" in route and not skips_authz(route):
                route["request_headers_to_add"] = [
                    *route.get("request_headers_to_add", []),
                    *(_from_claim(header, claim) for header, claim in CLAIM_HEADERS),
                ]
        if keys.revoked is not None:
            host.setdefault("typed_per_filter_config", {})[RBAC] = {
                "@type": _RBAC_PER_ROUTE_TYPE,
                "rbac": {"shadow_rules": _shadow_rules(keys.revoked)},
            }
    return config


def _jwt_filter(jwks: str) -> dict[str, Any]:
    return {
        "name": JWT_AUTHN,
        "typed_config": {
            "@type": _JWT_TYPE,
            "providers": {
                PROVIDER: {
                    "issuer": ISSUER,
                    "local_jwks": {"inline_string": jwks},
                    "from_headers": [
                        {"name": "authorization", "value_prefix": "Bearer "},
                        {"name": "x-api-key"},
                    ],
                    # kept for ext_authz, which needs the key when it decides; removed
                    # before the call goes upstream (the virtual host's header removal)
                    "forward": True,
                    "payload_in_metadata": PAYLOAD,
                    "jwt_cache_config": {"jwt_cache_size": JWT_CACHE_SIZE},
                }
            },
            "rules": [
                {
                    "match": {"prefix": "/"},
                    "requires": {
                        "requires_any": {
                            "requirements": [
                                {"provider_name": PROVIDER},
                                {"allow_missing_or_failed": {}},
                            ]
                        }
                    },
                }
            ],
        },
    }


def _from_claim(header: str, claim: str) -> dict[str, Any]:
    """Sets `header` to the accepted token's `claim`; with no token accepted the value is
    empty, and an empty value sets nothing."""
    return {
        "header": {
            "key": header,
            "value": f"%DYNAMIC_METADATA({JWT_AUTHN}:{PAYLOAD}:{claim})%",
        },
        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
        "keep_empty_value": False,
    }


def _shadow_rules(revoked: Iterable[str]) -> dict[str, Any]:
    """ALLOW `local`: a tenant's checked, unrevoked token, on a path tenants may call."""
    ids: list[dict[str, Any]] = [_claim("kind", {"exact": Principal.TENANT.header_value})]
    revoked = sorted(revoked)
    if revoked:
        # key ids are 12 hex digits (checked where they are made): nothing to escape
        ids.append({"not_id": _claim("jti", {"safe_regex": {"regex": "|".join(revoked)}})})
    permissions = [{"url_path": {"path": {"exact": path}}} for path in tenant_paths()]
    permissions += [{"url_path": {"path": {"prefix": prefix}}} for prefix in http_prefixes()]
    return {
        "action": "ALLOW",
        "policies": {
            LOCAL_POLICY: {
                "permissions": [{"or_rules": {"rules": permissions}}],
                "principals": [{"and_ids": {"ids": ids}}],
            }
        },
    }


def _claim(name: str, match: dict[str, Any]) -> dict[str, Any]:
    """A principal matching one claim of the token jwt_authn accepted."""
    return {
        "sourced_metadata": {
            "metadata_matcher": {
                "filter": JWT_AUTHN,
                "path": [{"key": PAYLOAD}, {"key": name}],
                "value": {"string_match": match},
            }
        }
    }


__all__ = ["JWT_AUTHN", "RBAC", "LocalKeys", "add_local_keys", "tenant_paths"]
