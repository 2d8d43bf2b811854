"""The public port for browsers, over plain HTTP/1.1 as a browser speaks it: the chat
page, gRPC-Web calls behind the same API-key check, and CORS for configured origins
only (tests/integration/test_browser_chat.py drives the page in a real browser)."""

from __future__ import annotations

import struct
import urllib.error
import urllib.request

from switchboard.chat.v1 import chat_pb2 as pb

from services.launcher._envoy_web import CONTENT_SECURITY_POLICY, EXPOSED_HEADERS
from tests.integration.conftest import WEB_ORIGIN, as_tenant

LIST_SESSIONS = "/switchboard.chat.v1.ChatService/ListSessions"


def request(envoy_target: str, path: str, *, method: str = "GET", headers=(), body=None):
    """(status, headers, body) of one HTTP/1.1 request to the public port."""
    call = urllib.request.Request(
        f"http://{envoy_target}{path}", data=body, method=method, headers=dict(headers)
    )
    try:
        with urllib.request.urlopen(call, timeout=30) as reply:  # noqa: S310 - the test mesh
            return reply.status, reply.headers, reply.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def grpc_web(envoy_target: str, message, headers=()) -> tuple[int, dict[str, str], bytes]:
    """A gRPC-Web unary call: (HTTP status, grpc trailers or headers, first message)."""
    payload = message.SerializeToString()
    status, head, body = request(
        envoy_target,
        LIST_SESSIONS,
        method="POST",
        headers={"content-type": "application/grpc-web+proto", "x-grpc-web": "1", **dict(headers)},
        body=b"\x00" + struct.pack(">I", len(payload)) + payload,
    )
    trailers = {k.lower(): v for k, v in head.items() if k.lower().startswith("grpc-")}
    first = b""
    while body:
        flag, size = body[0], struct.unpack(">I", body[1:5])[0]
        frame, body = body[5 : 5 + size], body[5 + size :]
        if flag & 0x80:
            for line in frame.decode().split("\r\n"):
                if line:
                    name, _, value = line.partition(":")
                    trailers[name.strip().lower()] = value.strip()
        elif not first:
            first = frame
    return status, trailers, first


def test_the_chat_page_is_served_without_a_key(envoy_target):
    status, headers, body = request(envoy_target, "/")
    assert status == 200 and b'src="/app.js"' in body
    assert headers["content-type"].startswith("text/html")
    assert headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    status, headers, body = request(envoy_target, "/app.js")
    assert status == 200 and headers["content-type"].startswith("text/javascript")
    assert b"switchboard.session" in body and len(body) > 10_000  # the bundled page


def test_grpc_web_calls_need_a_key_and_then_reach_the_service(envoy_target):
    _, refused, _ = grpc_web(envoy_target, pb.ListSessionsRequest())
    assert refused["grpc-status"] == "16"  # UNAUTHENTICATED, from the edge
    assert "grpc-status-details-bin" in refused
    status, trailers, first = grpc_web(
        envoy_target, pb.ListSessionsRequest(page_size=5), headers=as_tenant("web-edge")
    )
    assert (status, trailers["grpc-status"]) == (200, "0")
    assert pb.ListSessionsResponse.FromString(first) == pb.ListSessionsResponse()


def preflight(envoy_target: str, origin: str):
    return request(
        envoy_target,
        LIST_SESSIONS,
        method="OPTIONS",
        headers={
            "origin": origin,
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization,content-type,x-grpc-web",
        },
    )


def test_a_configured_origin_passes_the_preflight_without_a_key(envoy_target):
    status, headers, _ = preflight(envoy_target, WEB_ORIGIN)
    assert status == 200 and headers["access-control-allow-origin"] == WEB_ORIGIN
    assert "authorization" in headers["access-control-allow-headers"]
    # and its call sees the gRPC status headers
    _, head, _ = request(
        envoy_target,
        LIST_SESSIONS,
        method="POST",
        headers={
            "origin": WEB_ORIGIN,
            "content-type": "application/grpc-web+proto",
            **dict(as_tenant("web-edge")),
        },
        body=b"\x00\x00\x00\x00\x00",
    )
    exposed = {h.strip() for h in head["access-control-expose-headers"].split(",")}
    assert set(EXPOSED_HEADERS) <= exposed


def test_another_origin_is_refused(envoy_target):
    status, headers, _ = preflight(envoy_target, "https://evil.example")
    assert status != 200 and "access-control-allow-origin" not in headers
