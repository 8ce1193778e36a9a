"""The gateway's gRPC client (gateway/grpc_h2.py) against grpc.aio, on the same Triton.

Both send the same wire bytes from one uvloop event loop in this process, one call at a
time: ``ModelInfer`` of a 1x384 FP32 tensor to ``embed`` (Triton answers in well under a
millisecond, so the client's own cost shows) and a 1-token ``ModelStreamInfer`` of
``tiny_lm`` (the shape of ``/v2 generate`` and ``/v1`` without streaming). This
process's CPU per call, every thread (grpc.aio runs its calls on its own), is recorded
in ``extra_info``. Run with ``pytest bench/test_bench_grpc_client.py --benchmark-only``.
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import uvloop
from tritonclient.grpc import service_pb2 as pb

from bench.peers import run_time_ns
from gateway.grpc_h2 import H2Channel
from gateway.local_triton import TritonFleet

SERVICE = "/inference.GRPCInferenceService/"
INFER, STREAM = SERVICE + "ModelInfer", SERVICE + "ModelStreamInfer"
LIMIT = 64 << 20


def infer_request() -> bytes:
    request = pb.ModelInferRequest(model_name="embed")
    request.inputs.add(name="INPUT", datatype="FP32", shape=[1, 384])  # data: raw contents
    request.raw_input_contents.append(np.ones((1, 384), np.float32).tobytes())
    return request.SerializeToString()


def generate_request() -> bytes:
    prompt = b"We hold these truths"
    request = pb.ModelInferRequest(model_name="tiny_lm")
    for name, datatype, data in (
        ("text_input", "BYTES", struct.pack("<I", len(prompt)) + prompt),
        ("max_tokens", "INT32", np.array([1], np.int32).tobytes()),
        ("stream", "BOOL", np.array([False]).tobytes()),
    ):
        request.inputs.add(name=name, datatype=datatype, shape=[1])
        request.raw_input_contents.append(data)
    return request.SerializeToString()


class AioClient:
    """grpc.aio, as the gateway used it (and still does for TLS): wire bytes, no
    serializers. Each call returns the replies' total size, so a client that got
    nothing cannot pass for a fast one."""

    async def start(self, target: str) -> None:  # grpc.aio wants a running loop
        self.channel = grpc.aio.insecure_channel(target)
        self.unary = self.channel.unary_unary(INFER)
        self.stream = self.channel.stream_stream(STREAM)

    async def infer(self, request: bytes) -> int:
        reply: bytes = await self.unary(request, timeout=10.0)
        return len(reply)

    async def generate(self, request: bytes) -> int:
        return sum([len(reply) async for reply in self.stream(iter((request,)), timeout=10.0)])

    async def close(self) -> None:
        await self.channel.close()


class H2Client:
    """The gateway's own client (gateway/grpc_h2.py); calls return as AioClient's do."""

    async def start(self, target: str) -> None:
        self.channel = H2Channel(target, LIMIT)

    async def infer(self, request: bytes) -> int:
        return len(await (await self.channel.call(INFER.encode(), request, 10.0, ())).reply())

    async def generate(self, request: bytes) -> int:
        call = await self.channel.call(STREAM.encode(), request, 10.0, ())
        return sum([len(reply) async for reply in call])

    async def close(self) -> None:
        self.channel.close()


Client = AioClient | H2Client
CLIENTS: dict[str, type[Client]] = {"grpc.aio": AioClient, "grpc_h2": H2Client}


@pytest.fixture(params=list(CLIENTS))
def client(
    request: pytest.FixtureRequest, triton_fleet: TritonFleet
) -> Iterator[tuple[asyncio.AbstractEventLoop, Client]]:
    loop = uvloop.new_event_loop()
    one: Client = CLIENTS[request.param]()
    loop.run_until_complete(one.start(triton_fleet.servers[0].grpc_url))
    yield loop, one
    loop.run_until_complete(one.close())
    loop.close()


def measure(
    benchmark: Callable[..., object],
    loop: asyncio.AbstractEventLoop,
    call: Callable[[], Coroutine[Any, Any, int]],
    rounds: int,
) -> None:
    def once() -> int:
        return loop.run_until_complete(call())

    assert once() > 0  # warms the connection and the model; an answer came back
    before = run_time_ns(os.getpid())  # this process only: the Tritons are its children
    benchmark.pedantic(once, rounds=rounds, warmup_rounds=0)  # type: ignore[attr-defined]
    per_call_ns = (run_time_ns(os.getpid()) - before) / rounds
    benchmark.extra_info["client_cpu_us_per_call"] = round(per_call_ns / 1e3, 1)  # type: ignore[attr-defined]


@pytest.mark.benchmark(group="gRPC client: ModelInfer embed 1x384 FP32")
def test_model_infer(
    benchmark: Callable[..., object], client: tuple[asyncio.AbstractEventLoop, Client]
) -> None:
    loop, one = client
    request = infer_request()
    measure(benchmark, loop, lambda: one.infer(request), 1000)


@pytest.mark.benchmark(group="gRPC client: ModelStreamInfer tiny_lm, 1 token")
def test_model_stream_infer(
    benchmark: Callable[..., object], client: tuple[asyncio.AbstractEventLoop, Client]
) -> None:
    loop, one = client
    request = generate_request()
    measure(benchmark, loop, lambda: one.generate(request), 150)
