"""adapters.triton_runtime against one real tritonserver.

tiny_lm serves one request at a time (one instance, generation inside ``execute``), so
concurrent requests queue in Triton; the adapter must see that queue through the
metrics endpoint while it exists, see it empty afterwards, and derive the queue time
those requests suffered from Triton's cumulative counters.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from aiohttp import web

from adapters.deltas import Delta, GpuStateDelta, ModelStateDelta
from adapters.triton_runtime import ScrapeError, TritonRuntimeAdapter
from gateway.local_triton import TritonFleet, TritonServer, find_free_port_base
from tests.conftest import free_port

MODEL_REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
CONCURRENT = 6
TOKENS = 40  # at tiny_lm's 5 ms per token: ~0.2 s per request, ~1.2 s for the burst


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    fleet = TritonFleet(
        count=1,
        port_base=find_free_port_base(1),
        model_repository=MODEL_REPOSITORY,
        log_dir=tmp_path_factory.mktemp("runtime-adapter"),
    )
    with fleet:
        yield fleet.servers[0]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


def fold(state: dict[str, dict[str, Any]], deltas: list[Delta]) -> None:
    """Apply model deltas the way the fleet does: overwrite the changed fields."""
    for delta in deltas:
        if isinstance(delta, ModelStateDelta):
            state.setdefault(delta.model, {}).update(delta.changes())


async def generate(client: grpcaio.InferenceServerClient, index: int) -> None:
    prompt = grpcclient.InferInput("text_input", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([f"We the people {index}".encode()], dtype=np.object_))
    max_tokens = grpcclient.InferInput("max_tokens", [1], "INT32")
    max_tokens.set_data_from_numpy(np.array([TOKENS], dtype=np.int32))

    async def one_request() -> AsyncIterator[dict[str, Any]]:
        yield {"model_name": "tiny_lm", "inputs": [prompt, max_tokens]}

    # stream=false: one response; the stream ends once it has been sent.
    async for _result, error in client.stream_infer(one_request()):
        assert error is None, error


@pytest.mark.e2e
async def test_queue_depth_rises_during_a_burst_and_falls_after(
    triton: TritonServer, session: aiohttp.ClientSession
) -> None:
    adapter = TritonRuntimeAdapter("b0", triton.metrics_url, session, interval=0.05)
    state: dict[str, dict[str, Any]] = {}
    fold(state, await adapter.scrape_once())
    assert state["tiny_lm"]["ready"] is True
    assert state["tiny_lm"]["queue_depth"] == 0
    assert {"embed", "tokenize"} <= state.keys()
    execs_before = state["tiny_lm"]["exec_count"]

    client = grpcaio.InferenceServerClient(triton.grpc_url)
    try:
        burst = asyncio.gather(*(generate(client, i) for i in range(CONCURRENT)))
        depths: list[int] = []
        queue_times: list[float] = []
        while not burst.done():
            fold(state, await adapter.scrape_once())
            depths.append(state["tiny_lm"]["queue_depth"])
            queue_times.append(state["tiny_lm"]["queue_time_s"] or 0.0)
            await asyncio.sleep(0.05)
        await asyncio.wait_for(burst, timeout=30)
    finally:
        await client.close()
    assert max(depths) > 0, depths

    fold(state, await adapter.scrape_once())
    tiny_lm = state["tiny_lm"]
    assert tiny_lm["queue_depth"] == 0
    assert tiny_lm["exec_count"] == execs_before + CONCURRENT
    # Every request but the first waited behind at least one ~0.2 s generation. Queue
    # time is the average over the requests completed between two scrapes, so it shows
    # in the scrapes that saw completions (the last one may have seen none: then 0 s).
    queue_times.append(tiny_lm["queue_time_s"] or 0.0)
    assert 0.05 < max(queue_times) < 30, (queue_times, tiny_lm)
    assert tiny_lm["ready"] is True
    assert state["embed"]["queue_depth"] == 0


@pytest.mark.e2e
async def test_quiet_scrape_is_a_heartbeat_with_no_changes(
    triton: TritonServer, session: aiohttp.ClientSession
) -> None:
    adapter = TritonRuntimeAdapter("b0", triton.metrics_url, session, interval=0.25)
    first = {d.model: d for d in await adapter.scrape_once() if isinstance(d, ModelStateDelta)}
    second = {d.model: d for d in await adapter.scrape_once() if isinstance(d, ModelStateDelta)}
    assert first.keys() == second.keys() >= {"tiny_lm", "embed", "tokenize"}
    assert first["tiny_lm"].max_age == 1.0
    # Scraped more often, a reading is still trusted for a second (a floor), not 4 x 0.1 s.
    fast = TritonRuntimeAdapter("b0", triton.metrics_url, session, interval=0.1)
    assert {d.max_age for d in await fast.scrape_once()} == {1.0}
    slow = TritonRuntimeAdapter("b0", triton.metrics_url, session, interval=0.5)
    assert {d.max_age for d in await slow.scrape_once()} == {2.0}
    # Nothing ran between the scrapes: nothing queued, so the recent queue time is 0.
    assert second["tiny_lm"].changes() == {"queue_time_s": 0.0}
    assert second["embed"].observed_at >= first["embed"].observed_at
    # A CPU-only Triton exports no GPU metrics, so there are no GPU deltas.
    assert all(isinstance(d, ModelStateDelta) for d in await adapter.scrape_once())


async def test_unreachable_endpoint_raises_and_run_emits_nothing(
    session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"http://127.0.0.1:{free_port()}/metrics"
    adapter = TritonRuntimeAdapter("b9", url, session, interval=0.02)
    with pytest.raises(ScrapeError, match="ClientConnectorError"):
        await adapter.scrape_once()

    stop = asyncio.Event()
    received: list[Delta] = []
    asyncio.get_running_loop().call_later(0.3, stop.set)
    await asyncio.wait_for(adapter.run(received.append, stop), timeout=5)
    assert received == []
    failures = [r for r in caplog.records if "metrics scrape failed" in r.getMessage()]
    assert len(failures) == 1


# -- families a CPU-only Triton does not export (no Triton process) ------------------------
# Shaped like the metrics of a GPU Triton running the TensorRT-LLM backend, served over a
# real socket by a local aiohttp server whose text each test sets.

TRTLLM_GPU_TEXT = """\
# HELP nv_inference_pending_request_count Instantaneous number of pending requests.
# TYPE nv_inference_pending_request_count gauge
nv_inference_pending_request_count{model="trtllm",version="1"} 2
nv_inference_pending_request_count{model="ensemble",version="1"} 0
nv_inference_exec_count{model="trtllm",version="1"} 120
nv_inference_queue_duration_us{model="trtllm",version="1"} 5000000
nv_inference_request_success{model="trtllm",version="1"} 100
nv_inference_queue_duration_us{model="ensemble",version="1"} 0
nv_inference_request_success{model="ensemble",version="1"} 0
nv_trt_llm_request_metrics{model="trtllm",request_type="waiting",version="1"} 3
nv_trt_llm_request_metrics{model="trtllm",request_type="active",version="1"} 7
nv_trt_llm_request_metrics{model="trtllm",request_type="max",version="1"} 512
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction",model="trtllm",version="1"} 0.6
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="used",model="trtllm",version="1"} 2000
nv_gpu_utilization{gpu_uuid="GPU-c06bbf33"} 0.870000
nv_gpu_memory_total_bytes{gpu_uuid="GPU-c06bbf33"} 42949672960.000000
nv_gpu_memory_used_bytes{gpu_uuid="GPU-c06bbf33"} 33763098624.000000
"""


@pytest.fixture
async def metrics_server() -> AsyncIterator[tuple[str, dict[str, str]]]:
    page = {"text": TRTLLM_GPU_TEXT}

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=page["text"])

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/metrics", page
    finally:
        await runner.cleanup()


async def test_trtllm_and_gpu_families(
    metrics_server: tuple[str, dict[str, str]], session: aiohttp.ClientSession
) -> None:
    url, page = metrics_server
    adapter = TritonRuntimeAdapter("b0", url, session, interval=0.25)
    deltas = await adapter.scrape_once()
    models = {d.model: d.changes() for d in deltas if isinstance(d, ModelStateDelta)}
    assert models["trtllm"] == {
        "queue_depth": 2,
        "in_flight": 7,
        "exec_count": 120,
        "ready": True,
        "kv_cache_fraction": 0.6,
        "waiting_requests": 3,
    }
    # A family a model does not export (here exec count) stays unmeasured, not zero.
    assert models["ensemble"] == {"queue_depth": 0, "ready": True}
    (gpu,) = [d for d in deltas if isinstance(d, GpuStateDelta)]
    assert (gpu.backend, gpu.gpu) == ("b0", "GPU-c06bbf33")
    assert gpu.changes() == {
        "vram_used_bytes": 33763098624,
        "vram_total_bytes": 42949672960,
        "utilization": 0.87,
    }
    # Triton refreshes GPU metrics every 2 s: their max age follows that, not the scrape.
    assert gpu.max_age == 8.0
    assert all(d.max_age == 1.0 for d in deltas if isinstance(d, ModelStateDelta))

    # 20 more requests completed, having queued 2 s more in total: 0.1 s each.
    page["text"] = (
        TRTLLM_GPU_TEXT.replace("} 5000000", "} 7000000")
        .replace("} 100", "} 120")
        .replace('count{model="ensemble",version="1"} 0', 'count{model="ensemble",version="1"} 1')
    )
    again = {
        d.model: d.changes() for d in await adapter.scrape_once() if isinstance(d, ModelStateDelta)
    }
    assert again["trtllm"] == {"queue_time_s": pytest.approx(0.1)}
    # Nothing completed for ensemble and one is queued: its queue time is not known.
    assert again["ensemble"] == {"queue_depth": 1}


async def test_unloaded_model_becomes_not_ready_and_counter_reset_skips_a_window(
    metrics_server: tuple[str, dict[str, str]], session: aiohttp.ClientSession
) -> None:
    url, page = metrics_server
    adapter = TritonRuntimeAdapter("b0", url, session, interval=0.25)
    await adapter.scrape_once()
    # ensemble unloaded; Triton restarted, so trtllm's counters start again.
    page["text"] = "\n".join(
        line.replace("} 5000000", "} 10").replace("} 100", "} 1")
        for line in TRTLLM_GPU_TEXT.splitlines()
        if "ensemble" not in line
    )
    deltas = {
        d.model: d.changes() for d in await adapter.scrape_once() if isinstance(d, ModelStateDelta)
    }
    assert deltas["ensemble"] == {"ready": False}
    assert "queue_time_s" not in deltas["trtllm"]
    # ensemble stays unready without repeating itself; when loaded again it is ready.
    assert "ensemble" not in {
        d.model for d in await adapter.scrape_once() if isinstance(d, ModelStateDelta)
    }
    page["text"] = TRTLLM_GPU_TEXT
    back = {
        d.model: d.changes() for d in await adapter.scrape_once() if isinstance(d, ModelStateDelta)
    }
    assert back["ensemble"]["ready"] is True
