"""Malformed requests never break the gateway: a seeded mutation fuzzer.

Every case starts from a valid request of one endpoint (/v2 infer in JSON and binary,
generate, generate_stream, metadata, config, ready, repository index, health; /v1 chat
and text completions, models; /admin) and applies one to three random mutations: a
JSON node replaced by a hostile value or removed, bytes truncated or replaced with
invalid UTF-8, a lying ``Inference-Header-Content-Length`` or ``binary_data_size``,
hostile header values, odd paths and methods. Cases are drawn from
``random.Random(SEED + index)``, so a failing index reproduces on its own. Things an
HTTP client refuses to send (invalid UTF-8 in the request line and headers, absurd
header sizes, broken framing) go over raw sockets.

A seeded generator instead of one Hypothesis example per request: 10,000 requests
must fit in seconds on two shared cores, and this needs no per-example overhead.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import json
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np
import pytest
from yarl import URL

from tests.e2e.conftest import GATEWAY_MAX_BODY, Gateway

pytestmark = pytest.mark.e2e

SEED = 20261122
CASES = 10_000
CONCURRENCY = 16
# Generous: the slowest legitimate case is a short generation queued behind others.
CLIENT_TIMEOUT_S = 20.0
# tiny_lm serves one sequence at a time; a fuzzed huge max_tokens must not hold it long.
GENERATION_DEADLINE_MS = "500"
TIMEOUT_HEADER = "x-meshgate-timeout-ms"

Json = Any


@dataclass
class Case:
    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None

    def describe(self) -> str:
        body = self.body[:300] if self.body is not None else None
        return f"{self.method} {self.path} headers={self.headers} body={body!r}"


# -- valid requests, one per endpoint -----------------------------------------------------


def _bytes_tail(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def _binary(header: Json, tail: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + tail, {"Inference-Header-Content-Length": str(len(head))}


EMBED_ROW = np.linspace(-1.0, 1.0, 384, dtype=np.float32)
GENERATE = {"text_input": "We hold these truths", "max_tokens": 4, "temperature": 0.5}
CHAT = {"model": "tiny_lm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def templates() -> list[Case]:
    """One valid request per endpoint and body kind; the fuzzer mutates copies."""
    embed_json = {
        "inputs": [
            {"name": "INPUT", "datatype": "FP32", "shape": [1, 384], "data": EMBED_ROW.tolist()}
        ],
        "outputs": [{"name": "OUTPUT", "parameters": {"binary_data": False}}],
    }
    embed_bin, embed_headers = _binary(
        {
            "inputs": [
                {
                    "name": "INPUT",
                    "datatype": "FP32",
                    "shape": [1, 384],
                    "parameters": {"binary_data_size": EMBED_ROW.nbytes},
                }
            ],
            "parameters": {"binary_data_output": True},
        },
        EMBED_ROW.tobytes(),
    )
    texts = [b"h\xc3\xa9llo", b"", b"nul\x00"]
    tokenize_tail = _bytes_tail(texts)
    tokenize_bin, tokenize_headers = _binary(
        {
            "id": "fuzz",
            "inputs": [
                {
                    "name": "TEXT",
                    "datatype": "BYTES",
                    "shape": [len(texts)],
                    "parameters": {"binary_data_size": len(tokenize_tail)},
                }
            ],
        },
        tokenize_tail,
    )
    tokenize_json = {
        "inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [2], "data": ["ab", "ç"]}]
    }
    deadline = {TIMEOUT_HEADER: GENERATION_DEADLINE_MS}
    post = "POST"
    return [
        Case(post, "/v2/models/embed/infer", {}, _dumps(embed_json)),
        Case(post, "/v2/models/embed/infer", embed_headers, embed_bin),
        Case(post, "/v2/models/tokenize/versions/1/infer", {}, _dumps(tokenize_json)),
        Case(post, "/v2/models/tokenize/infer", tokenize_headers, tokenize_bin),
        Case(post, "/v2/models/tiny_lm/generate", deadline, _dumps(GENERATE)),
        Case(post, "/v2/models/tiny_lm/generate_stream", deadline, _dumps(GENERATE)),
        Case(post, "/v2/models/embed/generate", {}, _dumps({"INPUT": 0.5})),
        Case(post, "/v2/repository/index", {}, _dumps({"ready": True})),
        Case("GET", "/v2/models/embed"),
        Case("GET", "/v2/models/tiny_lm/versions/1/config"),
        Case("GET", "/v2/models/tokenize/ready"),
        Case("GET", "/v2"),
        Case("GET", "/v2/health/ready"),
        Case(post, "/v1/chat/completions", deadline, _dumps(CHAT)),
        Case(post, "/v1/chat/completions", deadline, _dumps({**CHAT, "stream": True})),
        Case(
            post,
            "/v1/completions",
            deadline,
            _dumps({"model": "tiny_lm", "prompt": "We", "max_tokens": 3, "stream": True}),
        ),
        Case("GET", "/v1/models"),
        Case("GET", "/v1/models/tiny_lm"),
        Case("GET", "/admin/fleet", {"Authorization": "Bearer wrong"}),
        Case(post, "/admin/deltas", {}, _dumps({"deltas": []})),
    ]


def _dumps(value: Json) -> bytes:
    return json.dumps(value).encode()


# -- mutations ----------------------------------------------------------------------------

HOSTILE_VALUES: list[Json] = [
    None,
    True,
    0,
    -1,
    2**31,
    -(2**63) - 1,
    2**64,
    10**30,
    1e308,
    -0.0,
    "",
    "x" * 10_000,
    "\ud800",  # a lone surrogate: JSON escapes can carry it, UTF-8 cannot
    "\x00",
    "FP64",
    "BYTES",
    [],
    [-1],
    [2**40, 2**40],
    [0, 384],
    [-5, 384],
    [1, 384, 1, 1, 1, 1, 1, 1, 1, 1],
    {},
    {"binary_data_size": -3},
    {"shared_memory_region": "r"},
    json.loads("[" * 40 + "1" + "]" * 40),
    [None, "a", 1.5, {}],
]
HOSTILE_HEADER_VALUES = ["", "-1", "0", "abc", "1", "99999999999999999999999", "1e3", " 7 "]
HOSTILE_SEGMENTS = [
    "",
    "no_such_model",
    "%2e%2e",
    "%00",
    "%ff%fe",
    "embed%2Fversions%2F1",
    "x" * 4000,
    "%F0%9F%92%A9",
    "-1",
    "99999999999999999999",
    "tiny_lm;x=1",
]


def _json_paths(value: Json, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Paths to every node; long arrays (tensor data) count as one leaf."""
    paths = [path]
    if isinstance(value, dict):
        for key, child in value.items():
            paths += _json_paths(child, (*path, key))
    elif isinstance(value, list) and len(value) <= 8:
        for index, child in enumerate(value):
            paths += _json_paths(child, (*path, index))
    return paths


def _mutate_json(rng: random.Random, value: Json) -> Json:
    path = rng.choice(_json_paths(value))
    if not path:
        return copy.deepcopy(rng.choice(HOSTILE_VALUES))
    parent = value
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    roll = rng.random()
    if roll < 0.2:
        del parent[last]
    elif roll < 0.3 and isinstance(parent, dict):
        parent[rng.choice(["__proto__", "binary_data_size", "data", "id", "stream"])] = parent[last]
    else:
        parent[last] = copy.deepcopy(rng.choice(HOSTILE_VALUES))
    return value


def _json_length(case: Case) -> int:
    """Bytes of the body that are JSON: the declared header length when it is sane."""
    body = case.body or b""
    declared = case.headers.get("Inference-Header-Content-Length", "")
    if declared.isdigit() and int(declared) <= len(body):
        return int(declared)
    return len(body)


def mutate_body_json(rng: random.Random, case: Case) -> None:
    """Mutate the JSON part (all of it, or the binary header), keeping the binary tail."""
    if case.body is None:
        case.body = _dumps(rng.choice(HOSTILE_VALUES))
        return
    head_length = _json_length(case)
    try:
        value = json.loads(case.body[:head_length])
    except (ValueError, RecursionError):
        return  # already garbage: another mutation made it so
    head = _dumps(_mutate_json(rng, value))
    case.body = head + case.body[head_length:]
    if "Inference-Header-Content-Length" in case.headers:
        case.headers["Inference-Header-Content-Length"] = str(len(head))


def mutate_body_bytes(rng: random.Random, case: Case) -> None:
    body = bytearray(case.body or b"{}")
    roll = rng.random()
    if roll < 0.3:
        del body[rng.randrange(len(body) + 1) :]  # truncated: a cut JSON or binary tail
    elif roll < 0.6:
        at = rng.randrange(len(body) + 1)
        body[at:at] = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"])
    elif roll < 0.8 and body:
        for _ in range(rng.randint(1, 8)):
            body[rng.randrange(len(body))] = rng.randrange(256)
    elif roll < 0.98:
        body = bytearray(rng.randbytes(rng.randint(0, 512)))
    else:
        body = bytearray(b"[" * 100_000)  # deep nesting in a small body
    case.body = bytes(body)


def mutate_binary_framing(rng: random.Random, case: Case) -> None:
    """Lie about the split between JSON header and binary tail, or about element sizes."""
    length = len(case.body or b"")
    base = _json_length(case)
    case.headers["Inference-Header-Content-Length"] = rng.choice(
        [
            str(base + rng.randint(-20, 20)),
            str(length + 1),
            "0",
            "-1",
            str(2**64),
            "",
            "12abc",
            "0x10",
            str(length),
        ]
    )
    if case.body and rng.random() < 0.5:
        cut = rng.randint(0, min(40, len(case.body)))
        case.body = case.body[: len(case.body) - cut]  # a truncated binary tail


def mutate_headers(rng: random.Random, case: Case) -> None:
    name = rng.choice(
        [
            TIMEOUT_HEADER,
            "x-meshgate-priority",
            "x-meshgate-session",
            "Content-Type",
            "Content-Encoding",
            "Accept",
            "Authorization",
        ]
    )
    values = {
        "x-meshgate-priority": ["critical", "sheddable", "CRITICAL ", "vip", ""],
        "x-meshgate-session": ["", "s" * 6000, "sess-1"],
        "Content-Type": ["application/octet-stream", "text/plain; charset=utf-16", "x/y"],
        "Content-Encoding": ["gzip", "deflate", "br", "identity", "bogus"],
        "Accept": ["text/event-stream", "*/*", "\t"],
        "Authorization": ["Bearer ", "Basic Zm9vOmJhcg==", "Bearer " + "t" * 5000],
    }.get(name, HOSTILE_HEADER_VALUES)
    case.headers[name] = rng.choice(values)


def mutate_path(rng: random.Random, case: Case) -> None:
    segments = case.path.split("/")
    at = rng.randrange(1, len(segments))
    roll = rng.random()
    if roll < 0.6:
        segments[at] = rng.choice(HOSTILE_SEGMENTS)
    elif roll < 0.8:
        segments.insert(at, rng.choice(["versions", "1", "..", "generate", "infer"]))
    else:
        del segments[at:]
    case.path = "/".join(segments) or "/"


def mutate_method(rng: random.Random, case: Case) -> None:
    case.method = rng.choice(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])


MUTATIONS: list[tuple[float, Callable[[random.Random, Case], None]]] = [
    (0.35, mutate_body_json),
    (0.2, mutate_body_bytes),
    (0.15, mutate_binary_framing),
    (0.15, mutate_headers),
    (0.1, mutate_path),
    (0.05, mutate_method),
]


def make_case(index: int, valid: list[Case]) -> Case:
    rng = random.Random(SEED + index)
    case = copy.deepcopy(rng.choice(valid))
    weights = [w for w, _ in MUTATIONS]
    for mutation in rng.choices([m for _, m in MUTATIONS], weights, k=rng.randint(1, 3)):
        mutation(rng, case)
    if rng.random() < 0.0005:
        case.body = b"{" * (GATEWAY_MAX_BODY + 1)  # over the body limit: 413, rarely
    return case


# -- checking answers ---------------------------------------------------------------------


def parser_level(case: Case) -> bool:
    """A body whose Content-Encoding does not decode may be refused by aiohttp's HTTP
    parser before any gateway code runs: a text/plain 400, and the connection closed."""
    return "Content-Encoding" in case.headers


def verdict(case: Case, status: int, content_type: str, body: bytes) -> str | None:
    """Why this answer is wrong, or None."""
    if status >= 500:
        # Every backend is up and serves every model: no 503 is genuine here.
        if status == 504 and TIMEOUT_HEADER in case.headers:
            return None  # the client asked for a deadline
        return f"{status} {body[:300]!r}"
    if status < 400 or case.method == "HEAD":
        return None
    if status == 400 and content_type.startswith("text/plain") and parser_level(case):
        return None
    if not content_type.startswith("application/json"):
        return f"{status} error with content type {content_type!r}: {body[:200]!r}"
    try:
        error = json.loads(body)
    except ValueError:
        return f"{status} error body is not JSON: {body[:200]!r}"
    if not isinstance(error, dict) or "error" not in error:
        return f"{status} error body has no 'error': {body[:200]!r}"
    return None


async def send(session: aiohttp.ClientSession, base: str, case: Case) -> tuple[int, str, bytes]:
    async with session.request(
        case.method,
        URL(base + case.path, encoded=True),
        headers=case.headers,
        data=case.body,
        # The gateway decides what the encoding header means; the client must not.
        auto_decompress=False,
        allow_redirects=False,
    ) as reply:
        return reply.status, reply.headers.get("Content-Type", ""), await reply.read()


async def fuzz_http(gateway: Gateway) -> tuple[collections.Counter[int], list[str]]:
    """Send CASES mutated requests; return the status counts and the failures."""
    valid = templates()
    statuses: collections.Counter[int] = collections.Counter()
    failures: list[str] = []
    indexes = iter(range(CASES))
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)

    async def worker(pooled: aiohttp.ClientSession, one_shot: aiohttp.ClientSession) -> None:
        for index in indexes:
            case = make_case(index, valid)
            # A connection the gateway may close must not be reused by the next case.
            session = one_shot if parser_level(case) else pooled
            try:
                status, content_type, body = await send(session, gateway.url, case)
            except TimeoutError:
                failures.append(f"case {index} hung: {case.describe()}")
                continue
            except aiohttp.ClientError as exc:
                failures.append(f"case {index} {type(exc).__name__} {exc}: {case.describe()}")
                continue
            statuses[status] += 1
            wrong = verdict(case, status, content_type, body)
            if wrong:
                failures.append(f"case {index}: {wrong}: {case.describe()}")

    async with (
        aiohttp.ClientSession(timeout=timeout) as pooled,
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True), timeout=timeout
        ) as one_shot,
    ):
        await asyncio.gather(*(worker(pooled, one_shot) for _ in range(CONCURRENCY)))
    return statuses, failures


# -- raw sockets: what an HTTP client library will not send -------------------------------

RAW_REQUESTS: list[bytes] = [
    b"GARBAGE\r\n\r\n",
    b"GET /v2/models/\xff\xfe/ready HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v2/models/embed HTTP/1.1\r\nHost: x\r\nx-meshgate-priority: \xff\xfe\r\n\r\n",
    b"POST /v2/models/tiny_lm/generate HTTP/1.1\r\nHost: x\r\nx-meshgate-session: \xc3\x28\r\n"
    b"Content-Length: 2\r\n\r\n{}",
    b"GET /v2 HTTP/1.1\r\nHost: x\r\n\xff\xfe: y\r\n\r\n",
    b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
    b"GET /v2 HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(500)) + b"\r\n",
    b"GET /" + b"v" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /v2/models/embed/infer HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n{}",
    b"POST /v2/models/embed/infer HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}",
    b"POST /v2/models/embed/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
    b"Content-Length: 3\r\n\r\n{}",
    b"POST /v2/models/embed/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"zz\r\n{}\r\n0\r\n\r\n",
    b"POST /v2/models/embed/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Length: 5\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    b"POST /v2/models/embed/infer HTTP/1.1\r\nHost: x\r\nInference-Header-Content-Length: "
    + b"9" * 5000
    + b"\r\nContent-Length: 2\r\n\r\n{}",
    # A body shorter than announced, then the client stops sending.
    b'POST /v2/models/embed/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"inp',
    b"FOOBAR /v2 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v2 HTTP/9.9\r\nHost: x\r\n\r\n",
    b"GET /v2\r\n\r\n",
    b"GET /v2/health/live HTTP/1.0\r\n\r\n",
    b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b\r\n\r\n",
    b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Nul: a\x00b\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64),  # a TLS ClientHello
]


async def raw_exchange(host: str, port: int, request: bytes) -> int | None:
    """Send raw bytes, stop sending, read what comes back; the status or None."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        writer.write_eof()
        async with asyncio.timeout(CLIENT_TIMEOUT_S):
            answer = await reader.read()
    finally:
        writer.close()
    if not answer.startswith(b"HTTP/"):
        return None  # the gateway hung up without an answer: fine for garbage
    return int(answer.split(b" ", 2)[1])


# -- the tests ----------------------------------------------------------------------------


async def assert_serves_valid_infer(gateway: Gateway) -> None:
    body = {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": ["ok"]}]}
    async with aiohttp.ClientSession() as session:
        async with session.post(gateway.url + "/v2/models/tokenize/infer", json=body) as r:
            assert r.status == 200, await r.text()
            outputs = {o["name"]: o["data"] for o in (await r.json())["outputs"]}
    assert outputs["ECHO"] == ["ok"]


def gateway_log_since(gateway: Gateway, offset: int) -> str:
    with gateway.log_path.open("rb") as log:
        log.seek(offset)
        return log.read().decode(errors="replace")


async def test_malformed_requests_never_break_the_gateway(gateway: Gateway) -> None:
    log_offset = gateway.log_path.stat().st_size
    statuses, failures = await fuzz_http(gateway)
    print(f"\n{sum(statuses.values())} fuzzed requests, statuses: {sorted(statuses.items())}")
    assert not failures, f"{len(failures)} bad answers, first ones:\n" + "\n".join(failures[:20])
    assert sum(statuses.values()) == CASES
    assert gateway.process.poll() is None
    new_log = gateway_log_since(gateway, log_offset)
    assert "Traceback" not in new_log, new_log[-3000:]
    await assert_serves_valid_infer(gateway)


@pytest.mark.parametrize("index", range(len(RAW_REQUESTS)))
async def test_raw_malformed_http_never_breaks_the_gateway(gateway: Gateway, index: int) -> None:
    host, port = gateway.host_port.split(":")
    status = await raw_exchange(host, int(port), RAW_REQUESTS[index])
    assert status is None or status < 500, status
    assert gateway.process.poll() is None
    await assert_serves_valid_infer(gateway)
