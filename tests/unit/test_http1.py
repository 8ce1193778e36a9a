"""fastpath.http1: both twins parse request and reply heads alike (the fast lane's own
cases are in test_fastlane.py, through whichever twin is selected)."""

from __future__ import annotations

import random
from types import ModuleType
from typing import Any

import pytest

from fastpath import http1

TWINS = [http1.http1_py] + ([http1.http1_c] if http1.http1_c is not None else [])
IDS = [twin.__name__ for twin in TWINS]

REQUEST = (
    b"POST /v2/models/embed/infer HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
    b"Content-Length: 12\r\nInference-Header-Content-Length: 5\r\nX-Empty:\r\n"
    b"Connection: keep-alive\r\nX-Utf8: caf\xc3\xa9 \xff\t \r\nUser-Agent:  a b  "
)
REPLY = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
    b"Inference-Header-Content-Length: 144\r\nContent-Length: 1680\r\nNo-Colon\r\n"
    b"X-Spaces:   v  \t"
)


def _outcome(parse: Any, head: bytes) -> tuple[str, Any]:
    try:
        return "ok", parse(head)
    except ValueError:
        return "error", None


@pytest.mark.parametrize("twin", TWINS, ids=IDS)
def test_a_request_head_is_parsed(twin: ModuleType) -> None:
    method, target, raw, headers, length, close = twin.parse_request_head(REQUEST)
    assert (method, target, length, close) == ("POST", "/v2/models/embed/infer", 12, False)
    assert raw[-2:] == [(b"X-Utf8", b"caf\xc3\xa9 \xff"), (b"User-Agent", b"a b")]
    assert headers[-2] == ("X-Utf8", "café \udcff")  # aiohttp's surrogateescape
    assert (b"X-Empty", b"") in raw
    assert twin.parse_request_head(b"GET /v2/health/ready HTTP/1.1") == (
        "GET", "/v2/health/ready", [], [], 0, False,
    )  # fmt: skip


@pytest.mark.parametrize("twin", TWINS, ids=IDS)
def test_a_reply_head_is_parsed(twin: ModuleType) -> None:
    status, headers = twin.parse_reply_head(REPLY)
    assert status == 200
    assert headers[b"content-length"] == b"1680"
    assert headers[b"inference-header-content-length"] == b"144"
    assert headers[b"no-colon"] == b""
    assert headers[b"x-spaces"] == b"v"


@pytest.mark.parametrize("twin", TWINS, ids=IDS)
@pytest.mark.parametrize(
    "line", [b"HTTP/1.1 OK", b"HTTP/1.1", b"HTTP/1.1  200 OK", b"HTTP/1.1 2x0 OK", b""]
)
def test_a_reply_without_a_numeric_status_is_refused(twin: ModuleType, line: bytes) -> None:
    with pytest.raises(ValueError):
        twin.parse_reply_head(line + b"\r\nContent-Length: 0")


@pytest.mark.parametrize(
    "head",
    [
        REQUEST.replace(b"12", b"1234567890123456789"),  # more digits than any body
        REQUEST.replace(b"12", b"123456789012345678"),
        REQUEST.replace(b"keep-alive", b"ClOsE"),
        REQUEST.replace(b"POST", b"P\xc3\xb6ST"),
        REQUEST.replace(b"/v2/models", b"/v2/mod\x7fels"),
        REQUEST.replace(b"\r\nHost", b"\rHost"),
        REQUEST.replace(b"Host: ", b"Host: \x00"),
        REQUEST + b"\r\n",
    ],
)
def test_twins_agree_on_edge_cases(head: bytes) -> None:
    assert len({repr(twin.parse_request_head(head)) for twin in TWINS}) == 1


def test_twins_agree_on_mutated_heads() -> None:
    """Random byte edits of a request and a reply head: the same result or the same
    refusal from each twin (what the compiled one may not drift from)."""
    rng = random.Random(7)
    alphabet = b"\r\n \t:/.%-aZ09\x00\x7f\xc3\xff"
    for seed_head in (REQUEST, REPLY):
        for _ in range(3000):
            head = bytearray(seed_head)
            for _ in range(rng.randint(1, 3)):
                at = rng.randrange(len(head))
                edit = rng.choice(("replace", "insert", "delete"))
                if edit == "replace":
                    head[at] = rng.choice(alphabet)
                elif edit == "insert":
                    head.insert(at, rng.choice(alphabet))
                else:
                    del head[at]
            data = bytes(head)
            for parse in ("parse_request_head", "parse_reply_head"):
                outcomes = {repr(_outcome(getattr(twin, parse), data)) for twin in TWINS}
                assert len(outcomes) == 1, (parse, data, outcomes)


@pytest.mark.parametrize("twin", TWINS, ids=IDS)
def test_one_byte_header_names_leave_shared_bytes_alone(twin: ModuleType) -> None:
    """CPython shares one object per one-byte bytes value: lower-casing a header name
    in place once turned every b"C" in the process into b"c"."""
    _, headers = twin.parse_reply_head(b"HTTP/1.1 200 OK\r\nC: 1\r\nN:2")
    assert headers == {b"c": b"1", b"n": b"2"}
    assert bytes([67])[0] == 67 and bytes([78])[0] == 78
