"""The edge's browser part: gRPC-Web and CORS filters in the right order, the CORS policy
for the configured origins, the chat page's routes, and their consistency checks."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from services.launcher._envoy_web import (
    CORS,
    EXPOSED_HEADERS,
    GRPC_WEB,
    PAGE_FILES,
    PAGE_NOT_BUILT,
    add_browser_access,
    check_browser_access,
    parse_origins,
)
from tests.unit.test_envoy_config import EXT_AUTHZ, guarded, hcm, routes

ORIGIN = "https://app.example.com"


@pytest.fixture
def page(tmp_path: Path) -> Path:
    for name, _ in PAGE_FILES.values():
        (tmp_path / name).write_text("x" * (10_000 if name == "app.js" else 100))
    return tmp_path


def filters(config: dict[str, Any], name: str = "public") -> list[str]:
    return [f["name"] for f in hcm(config, name)["http_filters"]]


def test_cors_then_grpc_web_come_before_the_key_check_on_the_public_listener_only(page):
    config = add_browser_access(guarded(), origins=[ORIGIN], page_dir=page)
    assert filters(config)[:3] == [CORS, GRPC_WEB, EXT_AUTHZ]
    assert filters(config)[-1] == "envoy.filters.http.router"
    assert GRPC_WEB not in filters(config, "internal")


def test_only_configured_origins_are_allowed_and_see_the_grpc_status(page):
    config = add_browser_access(guarded(), origins=[ORIGIN], page_dir=page)
    (vhost,) = hcm(config)["route_config"]["virtual_hosts"]
    policy = vhost["typed_per_filter_config"][CORS]
    assert policy["allow_origin_string_match"] == [{"exact": ORIGIN}]
    assert set(EXPOSED_HEADERS) <= {h.strip() for h in policy["expose_headers"].split(",")}
    assert {"authorization", "x-grpc-web", "content-type"} <= {
        h.strip() for h in policy["allow_headers"].split(",")
    }
    # no origin configured: no CORS policy, so no cross-origin page may call
    alone = add_browser_access(guarded(), page_dir=page)
    assert "typed_per_filter_config" not in hcm(alone)["route_config"]["virtual_hosts"][0]


def test_the_page_is_served_without_a_key_before_the_catch_all(page):
    config = add_browser_access(guarded(), page_dir=page)
    table = routes(config)
    served = [r for r in table if r.get("name", "").startswith("page")]
    assert [r["match"]["path"] for r in served] == list(PAGE_FILES)
    for route in served:
        assert route["typed_per_filter_config"][EXT_AUTHZ]["disabled"] is True
        assert Path(route["direct_response"]["body"]["filename"]).parent == page.resolve()
        headers = {
            h["header"]["key"]: h["header"]["value"] for h in route["response_headers_to_add"]
        }
        assert "connect-src 'self'" in headers["content-security-policy"]
    assert table.index(served[-1]) < len(table) - 1 and table[-1]["match"] == {"prefix": "/"}
    assert hcm(config)["route_config"]["max_direct_response_body_size_bytes"] >= 10_000


def test_an_unbuilt_page_is_a_note_on_the_root(tmp_path):
    config = add_browser_access(guarded(), page_dir=tmp_path)
    (note,) = [r for r in routes(config) if r.get("name") == "page-not-built"]
    assert note["direct_response"]["body"]["inline_string"] == PAGE_NOT_BUILT


def test_the_input_config_is_left_alone(page):
    before = guarded()
    kept = copy.deepcopy(before)
    add_browser_access(before, origins=[ORIGIN], page_dir=page)
    assert before == kept


@pytest.mark.parametrize(
    "text", ["app.example.com", "https://app.example.com/", "https://*.example.com", "ftp://x"]
)
def test_origins_must_be_browser_origins(text):
    with pytest.raises(ValueError, match="not a browser origin"):
        parse_origins(text)


def test_origins_are_comma_separated():
    assert parse_origins(f" {ORIGIN}, http://localhost:3000 ,") == (ORIGIN, "http://localhost:3000")
    assert parse_origins("") == ()


def test_consistency_refuses_filters_out_of_order_or_hidden_status_or_missing_files(page):
    config = add_browser_access(guarded(), origins=[ORIGIN], page_dir=page)
    reordered = copy.deepcopy(config)
    chain = hcm(reordered)["http_filters"]
    chain[1], chain[2] = chain[2], chain[1]
    with pytest.raises(ValueError, match="must come first"):
        check_browser_access(reordered)
    hidden = copy.deepcopy(config)
    policy = hcm(hidden)["route_config"]["virtual_hosts"][0]["typed_per_filter_config"][CORS]
    policy["expose_headers"] = "grpc-status"
    with pytest.raises(ValueError, match="hides the gRPC status"):
        check_browser_access(hidden)
    (page / "app.js").unlink()
    with pytest.raises(ValueError, match="missing or big"):
        check_browser_access(config)
