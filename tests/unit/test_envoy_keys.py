"""The edge's own check of key tokens: where its filters go, that the auth service is
skipped only on the shadow policy's `allowed` (fail closed), who that policy allows, and
that the config converts to typed xDS resources."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from services.auth.signing import SigningKey
from services.control.resources import resources_from_static
from services.launcher._envoy_keys import (
    JWT_AUTHN,
    RBAC,
    LocalKeys,
    add_local_keys,
    tenant_paths,
)
from services.launcher._envoy_shape import skips_authz
from tests.unit.test_envoy_config import EXT_AUTHZ, guarded, hcm

GENERATE = "/switchboard.inference.v1.InferenceService/Generate"
CREATE_KEY = "/switchboard.auth.v1.KeyService/CreateKey"


@pytest.fixture(scope="module")
def jwks(tmp_path_factory: pytest.TempPathFactory) -> str:
    return SigningKey.ensure(tmp_path_factory.mktemp("keys") / "key.pem").jwks()


def filters(config: dict[str, Any], name: str = "public") -> list[dict[str, Any]]:
    return hcm(config, name)["http_filters"]


def names(config: dict[str, Any], name: str = "public") -> list[str]:
    return [f["name"] for f in filters(config, name)]


def shadow(config: dict[str, Any]) -> dict[str, Any] | None:
    (host,) = hcm(config, "public")["route_config"]["virtual_hosts"]
    per_route = host.get("typed_per_filter_config", {}).get(RBAC)
    return None if per_route is None else per_route["rbac"]["shadow_rules"]


def test_the_token_check_comes_just_before_ext_authz_on_the_public_listener_only(jwks):
    before = guarded()
    config = add_local_keys(before, LocalKeys(jwks, frozenset()))
    at = names(config).index(EXT_AUTHZ)
    assert names(config)[at - 2 : at] == [JWT_AUTHN, RBAC]
    assert JWT_AUTHN not in names(config, "internal")
    assert names(before) == [EXT_AUTHZ, "envoy.filters.http.router"]  # not changed in place


def test_ext_authz_is_skipped_only_on_an_allowed_verdict_so_no_verdict_means_checked(jwks):
    config = add_local_keys(guarded(), LocalKeys(jwks, frozenset()))
    (authz,) = [f for f in filters(config) if f["name"] == EXT_AUTHZ]
    enabled = authz["typed_config"]["filter_enabled_metadata"]
    assert enabled == {
        "filter": RBAC,
        "path": [{"key": "shadow_engine_result"}],
        "value": {"string_match": {"exact": "allowed"}},
        "invert": True,
    }


def test_until_revocations_are_known_no_call_skips_the_auth_service(jwks):
    assert shadow(add_local_keys(guarded(), LocalKeys(jwks, None))) is None


def test_the_shadow_policy_allows_unrevoked_tenant_tokens_on_tenant_rpcs(jwks):
    rules = shadow(add_local_keys(guarded(), LocalKeys(jwks, frozenset({"bbb", "aaa"}))))
    assert rules["action"] == "ALLOW"
    (policy,) = rules["policies"].values()
    (principal,) = policy["principals"]
    kind, revoked = principal["and_ids"]["ids"]
    assert kind["sourced_metadata"]["metadata_matcher"]["path"][-1] == {"key": "kind"}
    assert kind["sourced_metadata"]["metadata_matcher"]["value"] == {
        "string_match": {"exact": "tenant"}
    }
    matcher = revoked["not_id"]["sourced_metadata"]["metadata_matcher"]
    assert matcher["path"][-1] == {"key": "jti"}
    assert matcher["value"]["string_match"]["safe_regex"]["regex"] == "aaa|bbb"
    (permission,) = policy["permissions"]
    paths = {r["url_path"]["path"].get("exact") for r in permission["or_rules"]["rules"]}
    assert GENERATE in paths and CREATE_KEY not in paths


def test_without_revocations_the_policy_has_no_revoked_clause(jwks):
    rules = shadow(add_local_keys(guarded(), LocalKeys(jwks, frozenset())))
    (policy,) = rules["policies"].values()
    assert len(policy["principals"][0]["and_ids"]["ids"]) == 1


def test_tenant_paths_follow_the_contracts():
    paths = tenant_paths()
    assert GENERATE in paths
    assert CREATE_KEY not in paths  # operators only
    assert all(p.startswith("/switchboard.") for p in paths)


def test_key_headers_never_go_upstream_and_tokens_set_the_tenant_from_claims(jwks):
    config = add_local_keys(guarded(), LocalKeys(jwks, frozenset()))
    (host,) = hcm(config, "public")["route_config"]["virtual_hosts"]
    assert {"authorization", "x-api-key"} <= set(host["request_headers_to_remove"])
    (jwt_filter,) = [f for f in filters(config) if f["name"] == JWT_AUTHN]
    (provider,) = jwt_filter["typed_config"]["providers"].values()
    # not claim_to_headers: it would strip an operator's x-tenant-id from every call
    assert "claim_to_headers" not in provider
    guarded_routes = [r for r in host["routes"] if "route" in r and not skips_authz(r)]
    assert guarded_routes
    for route in guarded_routes:
        added = {
            h["header"]["key"]: (h["header"]["value"], h["append_action"])
            for h in route["request_headers_to_add"]
        }
        assert added["x-tenant-id"] == (
            f"%DYNAMIC_METADATA({JWT_AUTHN}:payload:sub)%",
            "OVERWRITE_IF_EXISTS_OR_ADD",
        )
        assert added["x-switchboard-principal"][0].endswith(":payload:kind)%")
    for route in host["routes"]:  # health, reflection: the route strips the tenant instead
        if skips_authz(route):
            assert "x-tenant-id" not in str(route.get("request_headers_to_add", []))
    (public,) = json.loads(provider["local_jwks"]["inline_string"])["keys"]
    assert set(public) == {"kty", "crv", "x", "y", "kid", "alg", "use"}  # no private "d"
    (rule,) = jwt_filter["typed_config"]["rules"]
    assert {"allow_missing_or_failed": {}} in rule["requires"]["requires_any"]["requirements"]


def test_the_config_converts_to_typed_resources(jwks):
    config = add_local_keys(guarded(), LocalKeys(jwks, frozenset({"0123456789ab"})))
    resources = resources_from_static(config, {})
    assert resources.listeners and resources.routes


def test_a_listener_without_ext_authz_is_left_alone(jwks, tmp_path: Path):
    config = guarded()
    for f in list(filters(config)):
        if f["name"] == EXT_AUTHZ:
            filters(config).remove(f)
    assert add_local_keys(config, LocalKeys(jwks, frozenset())) == config
