"""Streaming latency of /v1/chat/completions through the gateway next to the same
workload sent straight to Triton's /v2/models/M/generate_stream, in one run.

    .venv/bin/python -m bench.openai_stream [--requests 200] [--concurrency 1]
    .venv/bin/python -m bench.openai_stream --gateway http://H:P --triton http://H:P

Without --gateway/--triton it starts its own fleet (``--servers`` tritonserver
processes on model_repository/) and a ``meshgate serve`` in front of it, and stops
both at the end. Three targets take turns in rounds, so drift on a shared machine hits
them alike:

- ``gateway/openai``: the official async ``openai`` client, as users would call it;
- ``gateway/aiohttp``: the same requests with the client used for Triton below, so
  the difference to ``triton/aiohttp`` is the gateway alone;
- ``triton/aiohttp``: ``generate_stream`` on the Triton servers, round-robin.

Each request is the same prompt (the gateway's default chat template applied to one
user message, sent to Triton as ``text_input``), ``max_tokens``, temperature 1 and a
seed per request index. TTFT is the time to the first chunk carrying text;
inter-token latency (ITL) is the gap between successive chunks carrying text.
Prints a table and writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import openai

from bench.measure import percentile
from bench.peers import local_fleet_and_gateway
from bench.record import write_record
from gateway.chat_template import DEFAULT_TEMPLATE, ChatTemplate
from gateway.local_triton import TritonFleet
from tests.e2e.conftest import Gateway, stop_gateway

CONTENT = "We hold these truths"


@dataclass
class Sample:
    """One streamed request as the client saw it (seconds)."""

    ttft: float
    itl: list[float]
    total: float
    pieces: int


@dataclass
class Target:
    name: str
    # request index -> that request, streamed and timed
    stream: Callable[[int], Awaitable[Sample]]
    samples: list[Sample] = field(default_factory=list)


def sample_from(start: float, arrivals: list[float]) -> Sample:
    if not arrivals:
        raise RuntimeError("a stream carried no text")
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    return Sample(arrivals[0] - start, gaps, arrivals[-1] - start, len(arrivals))


async def sse_json(response: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    async for line in response.content:
        if line.startswith(b"data: {"):
            yield json.loads(line[len(b"data: ") :])


def targets(args: argparse.Namespace, session: aiohttp.ClientSession) -> list[Target]:
    prompt = ChatTemplate(DEFAULT_TEMPLATE).render([{"role": "user", "content": CONTENT}])
    client = openai.AsyncOpenAI(base_url=args.gateway + "/v1", api_key="unused", max_retries=0)
    messages: Any = [{"role": "user", "content": CONTENT}]
    chat_body = {"model": args.model, "messages": messages, "max_tokens": args.max_tokens}
    chat_body |= {"temperature": 1.0, "stream": True}
    tritons = itertools.cycle(args.triton)

    async def via_openai(i: int) -> Sample:
        start, arrivals = time.perf_counter(), []
        stream = await client.chat.completions.create(
            model=args.model,
            messages=messages,
            max_tokens=args.max_tokens,
            temperature=1.0,
            seed=i,
            stream=True,
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals.append(time.perf_counter())
        return sample_from(start, arrivals)

    async def via_gateway(i: int) -> Sample:
        start, arrivals = time.perf_counter(), []
        url = args.gateway + "/v1/chat/completions"
        async with session.post(url, json={**chat_body, "seed": i}) as r:
            r.raise_for_status()
            async for event in sse_json(r):
                if event["choices"] and event["choices"][0]["delta"].get("content"):
                    arrivals.append(time.perf_counter())
        return sample_from(start, arrivals)

    async def direct(i: int) -> Sample:
        body = {"text_input": prompt, "max_tokens": args.max_tokens, "temperature": 1.0}
        body |= {"seed": i, "stream": True}
        start, arrivals = time.perf_counter(), []
        url = f"{next(tritons)}/v2/models/{args.model}/generate_stream"
        async with session.post(url, json=body) as r:
            r.raise_for_status()
            async for event in sse_json(r):
                if event.get("text_output"):
                    arrivals.append(time.perf_counter())
        return sample_from(start, arrivals)

    return [
        Target("gateway/openai", via_openai),
        Target("gateway/aiohttp", via_gateway),
        Target("triton/aiohttp", direct),
    ]


async def run_batch(target: Target, indexes: range, concurrency: int) -> list[Sample]:
    """``indexes`` requests, at most ``concurrency`` in flight."""
    todo = iter(indexes)
    samples: list[Sample] = []

    async def worker() -> None:
        for i in todo:
            samples.append(await target.stream(i))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples


def summary(target: Target) -> dict[str, Any]:
    ttft = [s.ttft for s in target.samples]
    itl = [gap for s in target.samples for gap in s.itl]
    return {
        "requests": len(target.samples),
        "ttft_ms": {f"p{q}": percentile(ttft, q) * 1e3 for q in (50, 99)},
        "itl_ms": {f"p{q}": percentile(itl, q) * 1e3 for q in (50, 99)},
        "itl_mean_ms": statistics.fmean(itl) * 1e3,
        "pieces_per_request": statistics.fmean(s.pieces for s in target.samples),
    }


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        plan = targets(args, session)
        for target in plan:  # warm connections, the model, the gateway's routes
            await run_batch(target, range(args.concurrency * 2), args.concurrency)
        per_round = max(1, args.requests // args.rounds)
        for round_no in range(args.rounds):
            first = round_no * per_round
            for target in plan:
                batch = range(first, first + per_round)
                target.samples += await run_batch(target, batch, args.concurrency)
    return {t.name: summary(t) for t in plan}


def print_table(results: dict[str, Any]) -> None:
    print(f"{'target':<18}{'n':>5}{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>10}{'ITL p99':>10}")
    for name, r in results.items():
        ttft, itl = r["ttft_ms"], r["itl_ms"]
        print(
            f"{name:<18}{r['requests']:>5}{ttft['p50']:>10.2f}{ttft['p99']:>10.2f}"
            f"{itl['p50']:>10.2f}{itl['p99']:>10.2f}"
        )
    print("(milliseconds)")


def own_setup(args: argparse.Namespace, run_dir: Path) -> tuple[TritonFleet, Gateway]:
    return local_fleet_and_gateway(args.servers, run_dir, args.model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gateway", help="gateway base URL (default: start one)")
    parser.add_argument("--triton", action="append", help="Triton HTTP base URL (repeatable)")
    parser.add_argument("--servers", type=int, default=1, help="servers to start (default 1)")
    parser.add_argument("--model", default="tiny_lm")
    parser.add_argument("--requests", type=int, default=200, help="per target (default 200)")
    parser.add_argument("--rounds", type=int, default=5, help="turns per target (default 5)")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    if (args.gateway is None) != (args.triton is None):
        parser.error("give both --gateway and --triton, or neither")

    run_dir = Path(".run/bench-openai-stream")
    run_dir.mkdir(parents=True, exist_ok=True)
    fleet = gateway = None
    if args.gateway is None:
        fleet, gateway = own_setup(args, run_dir)
        args.gateway, args.triton = gateway.url, [s.http_url for s in fleet.servers]
    try:
        results = asyncio.run(measure(args))
    finally:
        if gateway is not None:
            stop_gateway(gateway)
        if fleet is not None:
            fleet.stop()

    print_table(results)
    workload = {
        k: getattr(args, k) for k in ("model", "requests", "rounds", "concurrency", "max_tokens")
    }
    fields = {"workload": workload | {"triton_servers": len(args.triton)}, "results": results}
    write_record("openai_stream", f"openai_stream-c{args.concurrency}", fields)


if __name__ == "__main__":
    main()
