"""The fast lane's request-head parser, its route matcher and the fixed-size body buffer."""

from __future__ import annotations

import pytest

from gateway import fastlane
from gateway.app import create_app
from gateway.config import GatewayConfig, parse_backends
from gateway.fastlane import HotRoutes, parse_head

PLAIN = (
    b"POST /v2/models/embed/infer HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
    b"Content-Length: 12\r\nInference-Header-Content-Length: 5\r\nX-Empty:\r\n"
    b"Connection: keep-alive"
)


def test_a_plain_request_head_is_parsed() -> None:
    head = parse_head(PLAIN)
    assert head is not None
    assert (head.method, head.target, head.content_length, head.close) == (
        "POST",
        "/v2/models/embed/infer",
        12,
        False,
    )
    assert (b"Inference-Header-Content-Length", b"5") in head.raw_headers
    assert (b"X-Empty", b"") in head.raw_headers


def test_connection_close_is_honoured() -> None:
    head = parse_head(PLAIN.replace(b"keep-alive", b"close"))
    assert head is not None and head.close


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b"HTTP/1.1\r\nHost", b"HTTP/1.0\r\nHost"),  # HTTP/1.0: aiohttp's keep-alive rules
        (b"Content-Length: 12", b"Transfer-Encoding: chunked"),
        (b"Content-Length: 12", b"Content-Length: 12\r\nContent-Length: 12"),
        (b"Content-Length: 12", b"Content-Length: +12"),
        (b"Content-Length: 12", b"Content-Length: 12\r\nExpect: 100-continue"),
        (b"Content-Length: 12", b"Content-Length: 12\r\nContent-Encoding: gzip"),
        (b"Connection: keep-alive", b"Connection: upgrade"),
        (b"/v2/models/embed/infer", b"/v2/models/em%62ed/infer"),  # escapes: aiohttp decodes
        (b"/v2/models/embed/infer", b"/v2/models/../models/embed/infer"),  # dot segments
        (b"/v2/models/embed/infer", b"//v2/models/embed/infer"),
        (b"/v2/models/embed/infer", b"http://x/v2/models/embed/infer"),  # absolute form
        (b"Host: 127", b" folded\r\nHost: 127"),  # obsolete line folding
        (b"X-Empty:", b"X Empty:"),  # not a token
        (b"X-Empty:", b"X-Empty: a\x01b"),  # a control character
        (b"POST /v2", b"POST  /v2"),
    ],
)
def test_anything_unusual_is_left_to_aiohttp(old: bytes, new: bytes) -> None:
    assert old in PLAIN  # the case really changes the head
    assert parse_head(PLAIN.replace(old, new, 1)) is None


def _routes() -> HotRoutes:
    backends, _ = parse_backends(["grpc://127.0.0.1:1"])
    return HotRoutes(create_app(GatewayConfig(backends=backends)))


@pytest.mark.parametrize(
    ("method", "path", "canonical", "values"),
    [
        ("POST", "/v2/models/m/infer", "/v2/models/{model}/infer", {"model": "m"}),
        (
            "POST",
            "/v2/models/m/versions/3/infer",
            "/v2/models/{model}/versions/{version}/infer",
            {"model": "m", "version": "3"},
        ),
        ("POST", "/v2/models/m/generate", "/v2/models/{model}/generate", {"model": "m"}),
        (
            "POST",
            "/v2/models/m/generate_stream",
            "/v2/models/{model}/generate_stream",
            {"model": "m"},
        ),
        ("GET", "/v2/models/m/ready", "/v2/models/{model}/ready", {"model": "m"}),
        ("GET", "/v2/health/ready", "/v2/health/ready", {}),
        ("POST", "/v1/chat/completions", "/v1/chat/completions", {}),
        ("POST", "/v1/completions", "/v1/completions", {}),
    ],
)
def test_hot_routes_match_with_their_variables(
    method: str, path: str, canonical: str, values: dict[str, str]
) -> None:
    matched = _routes().match(method, path)
    assert matched is not None
    route, match_info = matched
    assert route.aiohttp_route.resource is not None
    assert route.aiohttp_route.resource.canonical == canonical
    assert dict(match_info) == values
    assert match_info.route is route.aiohttp_route


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v2/models/m/infer"),  # wrong method
        ("POST", "/v2/models//infer"),  # empty variable
        ("GET", "/v2/models/m"),
        ("GET", "/v2/models/m/config"),
        ("GET", "/v1/models"),
        ("GET", "/v1/chat/completions"),
        ("GET", "/v2/health/ready/x"),
        ("POST", "/v2/modelz/m/infer"),
    ],
)
def test_other_routes_do_not_match(method: str, path: str) -> None:
    assert _routes().match(method, path) is None


def test_remembered_matches_stay_right_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fastlane, "_MATCH_CACHE_SIZE", 8)
    routes = _routes()
    for i in range(20):  # more distinct paths than are remembered
        for _ in range(2):  # the second time from what was remembered
            matched = routes.match("POST", f"/v2/models/m{i}/infer")
            assert matched is not None and dict(matched[1]) == {"model": f"m{i}"}
            assert routes.match("GET", f"/v2/models/m{i}/infer") is None
        assert len(routes._matched) <= 8
    first, second = (
        routes.match("POST", "/v2/models/a/infer"),
        routes.match("POST", "/v2/models/a/infer"),
    )
    assert first is not None and second is not None
    assert first[1] is not second[1]  # each request has its own match_info
