"""What the latency benchmarks share: KServe v2 request bodies, one request (or one
streamed request) over a kept-alive ``http.client`` connection, and percentiles.

``http.client`` is the client of the concurrency-1 measurements because it is the
leanest one here: on 2 shared cores every client microsecond is noise on the proxy's.
"""

from __future__ import annotations

import http.client
import itertools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

JSON_HEADERS = {"Content-Type": "application/json"}


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (0-100) of a non-empty sequence."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def binary_infer_body(
    inputs: list[tuple[str, str, list[int], bytes]], outputs: list[str]
) -> tuple[bytes, dict[str, str]]:
    """A binary-tensor ``infer`` request (inputs as ``(name, datatype, shape, raw bytes)``,
    outputs asked as binary) and its headers."""
    header = json.dumps(
        {
            "inputs": [
                {"name": n, "datatype": d, "shape": s, "parameters": {"binary_data_size": len(b)}}
                for n, d, s, b in inputs
            ],
            "outputs": [{"name": o, "parameters": {"binary_data": True}} for o in outputs],
        }
    ).encode()
    headers = {
        "Inference-Header-Content-Length": str(len(header)),
        "Content-Type": "application/octet-stream",
    }
    return header + b"".join(b for *_, b in inputs), headers


def json_infer_body(
    inputs: list[tuple[str, str, list[int], list[Any]]], outputs: list[str]
) -> tuple[bytes, dict[str, str]]:
    """A JSON ``infer`` request (inputs as ``(name, datatype, shape, flat data)``, outputs
    asked as JSON) and its headers."""
    body = {
        "inputs": [{"name": n, "datatype": d, "shape": s, "data": v} for n, d, s, v in inputs],
        "outputs": [{"name": o} for o in outputs],
    }
    return json.dumps(body).encode(), JSON_HEADERS


def post(
    conn: http.client.HTTPConnection, path: str, body: bytes, headers: dict[str, str]
) -> bytes:
    """POST and read the whole answer; AssertionError on a status other than 200."""
    conn.request("POST", path, body=body, headers=headers)
    reply = conn.getresponse()
    data = reply.read()
    if reply.status != 200:
        raise AssertionError(f"{reply.status}: {data[:200]!r}")
    return data


@dataclass(frozen=True)
class StreamSample:
    """One streamed request as the client saw it (seconds from sending the request)."""

    ttft: float
    gaps: list[float]  # between successive events carrying text
    pieces: int  # events carrying text: one per token for tiny_lm


def generate_event_text(event: dict[str, Any]) -> bool:
    """True for a Triton ``generate_stream`` event that carries text."""
    return bool(event.get("text_output"))


def chat_chunk_text(event: dict[str, Any]) -> bool:
    """True for an OpenAI ``chat.completion.chunk`` that carries text."""
    choices = event.get("choices")
    return bool(choices and choices[0].get("delta", {}).get("content"))


def timed_stream(
    conn: http.client.HTTPConnection,
    path: str,
    body: bytes,
    carries_text: Callable[[dict[str, Any]], bool],
) -> StreamSample:
    """POST a streaming request, read its SSE events to the end, time those carrying text."""
    start = time.perf_counter()
    conn.request("POST", path, body=body, headers=JSON_HEADERS)
    reply = conn.getresponse()
    if reply.status != 200:
        raise AssertionError(f"{reply.status}: {reply.read()[:200]!r}")
    arrivals = []
    while line := reply.readline():
        if line.startswith(b"data: {"):
            now = time.perf_counter()
            event = json.loads(line[len(b"data: ") :])
            if "error" in event:
                raise AssertionError(f"error event: {line[:200]!r}")
            if carries_text(event):
                arrivals.append(now)
    if not arrivals:
        raise AssertionError("the stream carried no text")
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    return StreamSample(arrivals[0] - start, gaps, len(arrivals))
