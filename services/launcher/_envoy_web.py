"""The edge's browser part: gRPC-Web and CORS on the public listener, and the chat page.

Browsers cannot speak gRPC (no HTTP/2 trailers, no client streams), so the public
listener also takes gRPC-Web (`envoy.filters.http.grpc_web`): a `application/grpc-web*`
call is translated to gRPC before anything else sees it, so the API-key check
(ext_authz), the routes and the services treat it exactly as a gRPC call, and its
answer (trailers included) is translated back. The key travels as it does for gRPC,
in `authorization` (or `x-api-key`), a header the page sets itself.

Cross-origin calls (a web app served elsewhere) are allowed only from the configured
origins (`SWITCHBOARD_WEB_ORIGINS`), by `envoy.filters.http.cors`, which comes first:
it answers an allowed origin's preflight (OPTIONS, which carries no key) itself, and
exposes `grpc-status`, `grpc-message` and `grpc-status-details-bin` to the caller's
script. Any other origin's preflight goes on to ext_authz and is refused there
(401, without CORS headers), which the browser reports as a CORS failure: nothing of
the call is sent. The page on the port itself is same-origin and needs no entry.

The chat page (`clients/web/`, built by `make web` into `clients/web/dist/`) is served
by Envoy itself: one `direct_response` route per file, the body read from the file when
Envoy loads its config (so a rebuilt page needs an Envoy restart, `switchboard up`),
without a key (the page holds no data; every call it makes carries the key pasted into
it), with a content security policy that lets its script talk to this origin only.
Without a built page, `/` says how to build it.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from services.launcher._envoy_checks import check_consistency
from services.launcher._envoy_shape import KEY_HEADERS, hcm_of, hcms_of, public_listener, skip_authz

logger = logging.getLogger(__name__)

PAGE_DIR = Path(__file__).resolve().parents[2] / "clients" / "web" / "dist"
"""Where `make web` puts the built chat page."""
PAGE_FILES: dict[str, tuple[str, str]] = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/app.css": ("app.css", "text/css; charset=utf-8"),
}
"""Path on the port → (file in PAGE_DIR, its content type)."""
PAGE_NOT_BUILT = "the chat page is not built: run `make web`, then restart the mesh\n"
GRPC_WEB = "envoy.filters.http.grpc_web"
CORS = "envoy.filters.http.cors"
_GRPC_WEB_TYPE = "type.googleapis.com/envoy.extensions.filters.http.grpc_web.v3.GrpcWeb"
_CORS_TYPE = "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"
_CORS_POLICY_TYPE = "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy"
EXPOSED_HEADERS = ("grpc-status", "grpc-message", "grpc-status-details-bin")
ALLOWED_HEADERS = (
    "content-type",
    "x-grpc-web",
    "x-user-agent",
    "grpc-timeout",
    "x-request-id",
    *KEY_HEADERS,
)
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def check_origin(origin: str) -> str:
    """An origin as a browser sends it (`scheme://host[:port]`, no path), or ValueError."""
    scheme, sep, rest = origin.partition("://")
    if (
        scheme not in ("http", "https")
        or not sep
        or not rest
        or any(c in rest for c in "/?#* ")
        or origin != origin.strip()
    ):
        raise ValueError(f"{origin!r} is not a browser origin (scheme://host[:port])")
    return origin


def parse_origins(text: str) -> tuple[str, ...]:
    """`SWITCHBOARD_WEB_ORIGINS`: comma-separated origins; empty = none."""
    return tuple(check_origin(o.strip()) for o in text.split(",") if o.strip())


def add_browser_access(
    config: Mapping[str, Any],
    *,
    origins: Sequence[str] = (),
    page_dir: Path | None = PAGE_DIR,
    allow_empty: bool = False,
) -> dict[str, Any]:
    """A copy of an edge bootstrap (`render_envoy_config`) that also serves browsers:
    gRPC-Web and CORS for `origins` on the public listener, and the chat page from
    `page_dir` (None: no page routes at all). Checked like the rest of the config
    (`allow_empty` as there).

    Raises:
        ValueError: a bad origin, or the result is inconsistent.
    """
    config = copy.deepcopy(dict(config))
    for origin in origins:
        check_origin(origin)
    hcm = hcm_of(public_listener(config))
    hcm["http_filters"] = [
        {"name": CORS, "typed_config": {"@type": _CORS_TYPE}},
        {"name": GRPC_WEB, "typed_config": {"@type": _GRPC_WEB_TYPE}},
        *hcm["http_filters"],
    ]
    route_config = hcm["route_config"]
    (vhost,) = route_config["virtual_hosts"]
    if origins:
        vhost.setdefault("typed_per_filter_config", {})[CORS] = cors_policy(origins)
    if page_dir is not None:
        routes, largest = page_routes(page_dir)
        catch_all = next(i for i, r in enumerate(vhost["routes"]) if r["match"] == {"prefix": "/"})
        vhost["routes"][catch_all:catch_all] = routes
        route_config["max_direct_response_body_size_bytes"] = max(4096, largest)
    check_browser_access(config)
    check_consistency(config, allow_empty=allow_empty)
    return config


def cors_policy(origins: Sequence[str]) -> dict[str, Any]:
    return {
        "@type": _CORS_POLICY_TYPE,
        "allow_origin_string_match": [{"exact": origin} for origin in origins],
        "allow_methods": "POST, OPTIONS",
        "allow_headers": ", ".join(ALLOWED_HEADERS),
        "expose_headers": ", ".join(EXPOSED_HEADERS),
        "max_age": "600",
    }


def page_routes(page_dir: Path) -> tuple[list[dict[str, Any]], int]:
    """The page's routes, and its largest file's size; a note on `/` when not built."""
    files = {path: (page_dir / name, kind) for path, (name, kind) in PAGE_FILES.items()}
    if not all(file.is_file() for file, _ in files.values()):
        route = {
            "name": "page-not-built",
            "match": {"path": "/"},
            "direct_response": {"status": 404, "body": {"inline_string": PAGE_NOT_BUILT}},
        }
        skip_authz(route)
        return [route], 0
    routes = []
    for path, (file, kind) in files.items():
        route = {
            "name": f"page{path if path != '/' else '/index'}",
            "match": {"path": path, "headers": [_method("GET")]},
            "direct_response": {"status": 200, "body": {"filename": str(file.resolve())}},
            "response_headers_to_add": [
                _header("content-type", kind),
                _header("cache-control", "no-cache"),
                _header("x-content-type-options", "nosniff"),
                _header("content-security-policy", CONTENT_SECURITY_POLICY),
            ],
        }
        skip_authz(route)  # the page holds no data: its calls carry the key
        routes.append(route)
    return routes, max(file.stat().st_size for file, _ in files.values())


def check_browser_access(config: Mapping[str, Any]) -> None:
    """On every listener with gRPC-Web: CORS comes first (a preflight carries no key) and
    gRPC-Web before ext_authz and the router (they see a gRPC call); a CORS policy
    exposes the gRPC status headers; a page route serves a file Envoy may send whole.

    Raises:
        ValueError: listing every problem found.
    """
    problems: list[str] = []
    for listener in config.get("static_resources", {}).get("listeners", []):
        for hcm in hcms_of(listener):
            names = [f.get("name") for f in hcm.get("http_filters", [])]
            if GRPC_WEB not in names:
                continue
            if names[:2] != [CORS, GRPC_WEB]:
                problems.append(f"{listener.get('name')}: cors, then grpc_web, must come first")
            route_config = hcm.get("route_config", {})
            limit = route_config.get("max_direct_response_body_size_bytes", 4096)
            for vhost in route_config.get("virtual_hosts", []):
                policy = vhost.get("typed_per_filter_config", {}).get(CORS)
                exposed = [h.strip() for h in (policy or {}).get("expose_headers", "").split(",")]
                if policy and not set(EXPOSED_HEADERS) <= set(exposed):
                    problems.append(f"{vhost.get('name')}: CORS hides the gRPC status headers")
                for route in vhost.get("routes", []):
                    body = route.get("direct_response", {}).get("body", {})
                    if "filename" in body:
                        file = Path(body["filename"])
                        if not file.is_file() or file.stat().st_size > limit:
                            problems.append(f"route {route.get('name')!r}: {file} missing or big")
    if problems:
        raise ValueError("inconsistent Envoy config: " + "; ".join(problems))


def _header(key: str, value: str) -> dict[str, Any]:
    return {"header": {"key": key, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}


def _method(method: str) -> dict[str, Any]:
    return {"name": ":method", "string_match": {"exact": method}}
