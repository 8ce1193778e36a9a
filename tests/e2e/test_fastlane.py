"""The fast lane over real sockets: hot routes served by it, everything else handed to
aiohttp on the same connection, answers identical to Triton's own.

Which server answered is visible: aiohttp adds a ``Server`` header, the fast lane not.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from gateway.local_triton import TritonFleet
from tests.e2e.conftest import Gateway, start_gateway, stop_gateway

pytestmark = pytest.mark.e2e


def _infer_body(rows: int, seed: int) -> tuple[bytes, int]:
    x = np.random.default_rng(seed).standard_normal((rows, 384), dtype=np.float32)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "INPUT",
                    "datatype": "FP32",
                    "shape": [rows, 384],
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": "OUTPUT", "parameters": {"binary_data": True}}],
        }
    ).encode()
    return header + x.tobytes(), len(header)


def _bytes_infer_request(count: int, size: int, seed: int) -> bytes:
    """tokenize's ECHO of ``count`` random byte strings of ``size`` bytes, binary both ways."""
    rng = np.random.default_rng(seed)
    tail = b"".join(
        len(item).to_bytes(4, "little") + item for item in (rng.bytes(size) for _ in range(count))
    )
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "TEXT",
                    "datatype": "BYTES",
                    "shape": [count],
                    "parameters": {"binary_data_size": len(tail)},
                }
            ],
            "outputs": [{"name": "ECHO", "parameters": {"binary_data": True}}],
        }
    ).encode()
    return _request(
        "POST",
        "/v2/models/tokenize/infer",
        header + tail,
        {"Inference-Header-Content-Length": str(len(header))},
    )


def _request(
    method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if "Transfer-Encoding" not in (headers or {}):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _infer_request(body: bytes, header_length: int) -> bytes:
    return _request(
        "POST",
        "/v2/models/embed/infer",
        body,
        {"Inference-Header-Content-Length": str(header_length)},
    )


class Reader:
    """Reads HTTP/1.1 responses (Content-Length or chunked bodies) off one socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def response(self) -> tuple[int, dict[str, str], bytes]:
        status, headers = self._head()
        length = int(headers["content-length"])
        while len(self.buffer) < length:
            self._more()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return status, headers, body

    def chunked_response(self) -> tuple[int, dict[str, str], bytes]:
        """A response with a chunked body, de-chunked."""
        status, headers = self._head()
        assert headers["transfer-encoding"] == "chunked", headers
        body = b""
        while True:
            while b"\r\n" not in self.buffer:
                self._more()
            size_line, _, self.buffer = self.buffer.partition(b"\r\n")
            size = int(size_line, 16)
            while len(self.buffer) < size + 2:
                self._more()
            body, self.buffer = body + self.buffer[:size], self.buffer[size + 2 :]
            if size == 0:
                return status, headers, body

    def _head(self) -> tuple[int, dict[str, str]]:
        """The status and the headers (lower-case names) of the next response."""
        while b"\r\n\r\n" not in self.buffer:
            self._more()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(lines[0].split()[1]), headers

    def _more(self) -> None:
        chunk = self.sock.recv(1 << 20)
        assert chunk, "connection closed"
        self.buffer += chunk


def _connect(host_port: str) -> tuple[socket.socket, Reader]:
    host, port = host_port.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=30)
    return sock, Reader(sock)


def _direct(fleet: TritonFleet, raw: bytes) -> bytes:
    """The body Triton itself answers ``raw`` with (each server has the same model)."""
    sock, reader = _connect(f"127.0.0.1:{fleet.servers[0].http_port}")
    with sock:
        sock.sendall(raw)
        status, _, body = reader.response()
    assert status == 200
    return body


def test_hot_routes_then_an_other_route_on_one_connection(
    gateway: Gateway, triton_fleet: TritonFleet
) -> None:
    body, header_length = _infer_body(1, seed=1)
    raw = _infer_request(body, header_length)
    expected = _direct(triton_fleet, raw)
    sock, reader = _connect(gateway.host_port)
    with sock:
        sock.sendall(raw)
        status, headers, answer = reader.response()
        assert (status, answer) == (200, expected)
        assert "server" not in headers  # the fast lane answered
        assert headers["x-request-id"]
        assert headers["inference-header-content-length"]

        sock.sendall(_request("GET", "/v2/health/ready"))
        status, headers, _ = reader.response()
        assert status == 200 and "server" not in headers

        sock.sendall(_request("GET", "/v2/models/embed"))  # not hot: handed to aiohttp
        status, headers, answer = reader.response()
        assert status == 200 and "aiohttp" in headers["server"]
        assert json.loads(answer)["name"] == "embed"

        sock.sendall(raw)  # the connection stays with aiohttp, same answer
        status, headers, answer = reader.response()
        assert (status, answer) == (200, expected)
        assert "aiohttp" in headers["server"]


def test_pipelined_requests_are_answered_in_order(
    gateway: Gateway, triton_fleet: TritonFleet
) -> None:
    requests = [_infer_request(*_infer_body(1, seed)) for seed in (2, 3, 4)]
    expected = [_direct(triton_fleet, raw) for raw in requests]
    sock, reader = _connect(gateway.host_port)
    with sock:
        sock.sendall(b"".join(requests))
        answers = [reader.response() for _ in requests]
    assert [(status, body) for status, _, body in answers] == [(200, body) for body in expected]
    assert all("server" not in headers for _, headers, _ in answers)


def test_a_large_body_sent_slowly_arrives_whole(
    gateway: Gateway, triton_fleet: TritonFleet
) -> None:
    raw = _bytes_infer_request(1024, 4096, seed=5)  # a 4 MiB tensor, and its echo
    expected = _direct(triton_fleet, raw)
    assert len(expected) > 4 * 2**20
    sock, reader = _connect(gateway.host_port)
    with sock:
        for start in range(0, len(raw), 256 * 1024):
            sock.sendall(raw[start : start + 256 * 1024])
            time.sleep(0.002)
        status, headers, answer = reader.response()
        assert (status, answer) == (200, expected)
        assert "server" not in headers
        sock.sendall(raw)  # and the next request on the connection too
        assert reader.response()[2] == expected


def test_errors_on_the_fast_lane_are_json_and_keep_the_connection(
    gateway: Gateway, triton_fleet: TritonFleet
) -> None:
    body, header_length = _infer_body(1, seed=6)
    expected = _direct(triton_fleet, _infer_request(body, header_length))
    sock, reader = _connect(gateway.host_port)
    with sock:
        for bad, status, kind in [
            (_request("POST", "/v2/models/embed/infer", b"{oops"), 400, "invalid_request"),
            (_request("POST", "/v2/models/nope/infer", b"{}"), 404, "not_found"),
            (
                _request("POST", "/v2/models/embed/infer", b"{}", {"x-meshgate-timeout-ms": "x"}),
                400,
                "invalid_request",
            ),
        ]:
            sock.sendall(bad)
            got, headers, answer = reader.response()
            assert (got, json.loads(answer)["type"]) == (status, kind)
            assert headers["content-type"] == "application/json"
            assert "server" not in headers and headers["x-request-id"]
        sock.sendall(_infer_request(body, header_length))
        assert reader.response()[::2] == (200, expected)


@pytest.mark.parametrize("framing", [{"Transfer-Encoding": "chunked"}, {"Expect": "100-continue"}])
def test_chunked_and_expect_requests_are_served_by_aiohttp(
    gateway: Gateway, triton_fleet: TritonFleet, framing: dict[str, str]
) -> None:
    body, header_length = _infer_body(1, seed=7)
    expected = _direct(triton_fleet, _infer_request(body, header_length))
    headers = {"Inference-Header-Content-Length": str(header_length), **framing}
    payload = (
        f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
        if framing.get("Transfer-Encoding")
        else body
    )
    sock, reader = _connect(gateway.host_port)
    with sock:
        sock.sendall(_request("POST", "/v2/models/embed/infer", payload, headers))
        if "Expect" in framing:
            continue_line = b"HTTP/1.1 100 Continue\r\n\r\n"
            while len(reader.buffer) < len(continue_line):
                reader._more()
            assert reader.buffer.startswith(continue_line)
            reader.buffer = reader.buffer[len(continue_line) :]
        status, answer_headers, answer = reader.response()
    assert (status, answer) == (200, expected)
    assert "aiohttp" in answer_headers["server"]


def test_a_content_type_triton_chokes_on_neither_fails_nor_ejects(
    gateway: Gateway, triton_fleet: TritonFleet
) -> None:
    """Triton's HTTP server drops the connection on a binary body labelled as a form
    (curl's default): the gateway labels what it forwards itself, so one client's
    header cannot take backends out of rotation."""
    raw = _bytes_infer_request(4, 16, seed=8)
    expected = _direct(triton_fleet, raw)
    labelled = raw.replace(
        b"Host: 127.0.0.1\r\n",
        b"Host: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n",
    )
    sock, reader = _connect(gateway.host_port)
    with sock:
        for _ in range(4):  # more than there are backends
            sock.sendall(labelled)
            assert reader.response()[::2] == (200, expected)


def test_a_stream_is_the_same_on_both_fronts(gateway: Gateway) -> None:
    """generate_stream relayed on the fast lane and served by aiohttp (after a hand-over)
    carry the same events, token by token (a seeded generation) and the same headers
    (the fast lane makes its head while Triton works), and the connection stays usable
    after either."""
    body = json.dumps(
        {"text_input": "We hold these truths", "max_tokens": 12, "seed": 7, "stream": True}
    ).encode()
    request_id = "stream-head-check"
    raw = _request(
        "POST",
        "/v2/models/tiny_lm/generate_stream",
        body,
        {"Content-Type": "application/json", "X-Request-Id": request_id},
    )
    answers = {}
    for front in ("fast lane", "aiohttp"):
        sock, reader = _connect(gateway.host_port)
        with sock:
            if front == "aiohttp":
                sock.sendall(_request("GET", "/v2/models/tiny_lm"))  # hands the connection over
                assert reader.response()[0] == 200
            sock.sendall(raw)
            status, headers, events = reader.chunked_response()
            assert status == 200 and headers["content-type"].startswith("text/event-stream")
            assert ("server" in headers) == (front == "aiohttp")
            assert headers["x-request-id"] == request_id  # from on_response_prepare
            assert headers["cache-control"] == "no-cache"
            sock.sendall(_request("GET", "/v2/health/ready"))
            assert reader.response()[0] == 200
        answers[front] = [
            json.loads(line[len(b"data: ") :])
            for line in events.split(b"\n")
            if line.startswith(b"data: ")
        ]
    assert len(answers["fast lane"]) == 12
    assert [e["completion_tokens"] for e in answers["fast lane"]] == list(range(1, 13))
    assert [e["text_output"] for e in answers["fast lane"]] == [
        e["text_output"] for e in answers["aiohttp"]
    ]
    assert answers["fast lane"][-1]["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("start", "status", "dialect"),
    [
        (b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nX-Big: ", 431, "triton"),
        (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Big: ", 431, "openai"),
        (b"GET /v2/models/", 414, "triton"),  # the request line itself never ends
    ],
)
def test_an_over_long_head_is_answered_while_the_client_still_sends(
    gateway: Gateway, start: bytes, status: int, dialect: str
) -> None:
    """The answer is JSON and reaches the client whole: the gateway reads and drops what
    is still coming instead of closing on it (which would reset the connection)."""
    sock, reader = _connect(gateway.host_port)
    with sock:
        sock.sendall(start + b"a" * 20_000)  # over max_header_bytes (16 KiB), head unfinished
        got, headers, answer = reader.response()
        for _ in range(16):  # 1 MiB more, as a client that does not read while sending
            sock.sendall(b"a" * 65536)
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1024) == b""  # an orderly end after the answer, not a reset
    assert (got, headers["content-type"], headers["connection"]) == (
        status,
        "application/json",
        "close",
    )
    error = json.loads(answer)["error"]
    message = error["message"] if dialect == "openai" else error
    assert "over the limit of 16384 bytes" in message


def test_a_client_sending_while_its_stream_runs_is_held_back(gateway: Gateway) -> None:
    """Bytes pipelined behind a request in flight are buffered up to a bound, then the
    gateway stops reading (the client's sends block) until the answer is done; the
    answer itself is whole."""
    body = json.dumps({"text_input": "We hold", "max_tokens": 600, "stream": True}).encode()
    sock, reader = _connect(gateway.host_port)  # tiny_lm: 5 ms a token, ~3 s in all
    with sock:
        sock.sendall(_request("POST", "/v2/models/tiny_lm/generate_stream", body))
        sock.settimeout(0.5)
        sent_mib = 0
        with pytest.raises(TimeoutError):
            while sent_mib < 256:  # without the bound, all of it goes into the gateway
                sock.sendall(b"x" * (1 << 20))
                sent_mib += 1
        # Loopback socket buffers hold a few MiB; the gateway holds 256 KiB of the rest.
        assert sent_mib < 32, f"{sent_mib} MiB taken while the stream ran"
        sock.settimeout(30)
        status, _, events = reader.chunked_response()
    assert status == 200
    finals = [json.loads(line[6:]) for line in events.split(b"\n") if line.startswith(b"data: ")]
    assert len(finals) == 600 and finals[-1]["finish_reason"] == "length"


IDLE_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def impatient_gateway(triton_fleet: TritonFleet, run_dir: Path) -> Iterator[Gateway]:
    config = run_dir / "impatient.toml"
    config.write_text(f"[gateway]\nclient_idle_timeout_s = {IDLE_TIMEOUT_S}\n")
    gateway = start_gateway(
        [s.backend_url for s in triton_fleet.servers],
        run_dir / "impatient-gateway.log",
        "--config",
        str(config),
    )
    yield gateway
    stop_gateway(gateway)


def _closed_after(sock: socket.socket) -> float:
    """Seconds until the gateway closes ``sock`` (at most 10)."""
    start = time.monotonic()
    sock.settimeout(10)
    assert sock.recv(1024) == b""
    return time.monotonic() - start


@pytest.mark.parametrize(
    "sent",
    [
        b"",  # an idle keep-alive
        b"POST /v2/models/embed/infer HTTP/1.1\r\nHost: x\r\n",  # a head that stops
        # A body received in place (over 64 KiB) that stops a quarter of the way.
        _request("POST", "/v2/models/embed/infer", b"x" * (1 << 20))[: 1 << 18],
    ],
    ids=["idle", "head", "body"],
)
def test_a_connection_the_client_stops_sending_on_is_closed(
    impatient_gateway: Gateway, sent: bytes
) -> None:
    sock, _ = _connect(impatient_gateway.host_port)
    with sock:
        sock.sendall(sent)
        # The sweep runs every fifth of the timeout.
        assert _closed_after(sock) < IDLE_TIMEOUT_S * 1.2 + 1


def test_slow_clients_and_long_answers_are_not_cut(
    impatient_gateway: Gateway, triton_fleet: TritonFleet
) -> None:
    """A head, or a body received in place, that keeps arriving, however slowly, is
    served, and so is an answer that takes longer than the timeout; the connection then
    idles out."""
    upload = _bytes_infer_request(256, 4096, seed=9)  # 1 MiB
    expected = _direct(triton_fleet, upload)
    sock, reader = _connect(impatient_gateway.host_port)
    with sock:
        for raw in (_request("GET", "/v2/health/ready"), upload):
            third = len(raw) // 3
            for piece in (raw[:third], raw[third : 2 * third], raw[2 * third :]):
                sock.sendall(piece)
                time.sleep(IDLE_TIMEOUT_S * 0.7)
            assert reader.response()[::2] == (200, expected if raw is upload else b"")
        body = json.dumps({"text_input": "We hold", "max_tokens": 400, "stream": True})
        started = time.monotonic()
        sock.sendall(_request("POST", "/v2/models/tiny_lm/generate_stream", body.encode()))
        status, _, events = reader.chunked_response()  # 5 ms a token: ~2 s
        assert time.monotonic() - started > IDLE_TIMEOUT_S * 1.5
        assert status == 200 and events.count(b"data: ") == 400
        assert _closed_after(sock) < IDLE_TIMEOUT_S * 1.2 + 1
