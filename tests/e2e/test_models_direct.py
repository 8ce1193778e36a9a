"""model_repository/ served by one real tritonserver, called with tritonclient.grpc directly.

No gateway here: these tests pin down what the models themselves do, which the
gateway's end-to-end tests then rely on.
"""

from __future__ import annotations

import queue
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from gateway.local_triton import TritonFleet, TritonServer, find_free_port_base
from tests.e2e.conftest import triton_metric

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
MODEL_REPOSITORY = REPO / "model_repository"
CORPUS = MODEL_REPOSITORY / "tiny_lm" / "1" / "corpus.txt"
TOKENS_METRIC = "tiny_lm_tokens_generated_total"
PENDING_METRIC = "nv_inference_pending_request_count"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonFleet]:
    fleet = TritonFleet(
        count=1,
        port_base=find_free_port_base(1),
        model_repository=MODEL_REPOSITORY,
        log_dir=tmp_path_factory.mktemp("triton-direct"),
    )
    with fleet:
        yield fleet


@pytest.fixture
def server(fleet: TritonFleet) -> TritonServer:
    return fleet.servers[0]


@pytest.fixture
def client(server: TritonServer) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    yield client
    client.close()


# --- tiny_lm -------------------------------------------------------------------------


@dataclass
class Chunk:
    arrived: float  # seconds since the request was sent
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def lm_inputs(prompt: bytes | str, **options: object) -> list[grpcclient.InferInput]:
    """tiny_lm inputs: the prompt plus any of its optional inputs by name."""
    types = {
        "max_tokens": ("INT32", np.int32),
        "stream": ("BOOL", np.bool_),
        "temperature": ("FP32", np.float32),
        "top_p": ("FP32", np.float32),
        "seed": ("UINT64", np.uint64),
        "stop_words": ("BYTES", np.object_),
    }
    raw = prompt.encode() if isinstance(prompt, str) else prompt
    values = {"text_input": ("BYTES", np.array([raw], dtype=np.object_))}
    for name, value in options.items():
        triton_type, dtype = types[name]
        items = [w.encode() for w in value] if isinstance(value, list) else [value]
        values[name] = (triton_type, np.array(items, dtype=dtype))
    inputs = []
    for name, (triton_type, array) in values.items():
        tensor = grpcclient.InferInput(name, list(array.shape), triton_type)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def _decode(result: grpcclient.InferResult) -> Chunk:
    def first(name: str) -> Any:
        return result.as_numpy(name).reshape(-1)[0]

    return Chunk(
        arrived=0.0,
        text=first("text_output").decode(),
        finish_reason=first("finish_reason").decode(),
        prompt_tokens=int(first("prompt_tokens")),
        completion_tokens=int(first("completion_tokens")),
    )


def generate(
    client: grpcclient.InferenceServerClient, prompt: bytes | str, **options: object
) -> list[Chunk]:
    """Every response of one tiny_lm request, in order; raises the model's error."""
    received: queue.Queue = queue.Queue()
    sent = time.monotonic()

    def on_response(result: grpcclient.InferResult, error: InferenceServerException | None) -> None:
        received.put((time.monotonic(), result, error))

    client.start_stream(callback=on_response)
    try:
        client.async_stream_infer("tiny_lm", lm_inputs(prompt, **options))
        chunks = []
        while True:
            arrived, result, error = received.get(timeout=30)
            if error is not None:
                raise error
            chunk = _decode(result)
            chunk.arrived = arrived - sent
            chunks.append(chunk)
            # The last response carries the finish reason; nothing follows it.
            if chunk.finish_reason:
                return chunks
    finally:
        client.stop_stream()


def text_of(chunks: list[Chunk]) -> str:
    return "".join(chunk.text for chunk in chunks)


def test_stream_sends_one_response_per_token_as_generated(client) -> None:
    chunks = generate(client, "We hold these truths", max_tokens=30, stream=True)

    assert len(chunks) == 30
    assert all(chunk.text.startswith(" ") and len(chunk.text) > 1 for chunk in chunks)
    assert [c.completion_tokens for c in chunks] == list(range(1, 31))
    assert [c.finish_reason for c in chunks] == [""] * 29 + ["length"]
    assert all(chunk.prompt_tokens == 4 for chunk in chunks)
    # 5 ms per token: the first token arrives long before the thirtieth is generated.
    assert chunks[-1].arrived - chunks[0].arrived > 0.1


@pytest.mark.parametrize("max_tokens", [0, 1, 7, 40])
def test_non_streaming_returns_the_whole_text_once(client, max_tokens: int) -> None:
    chunks = generate(client, "Four score", max_tokens=max_tokens)

    assert len(chunks) == 1
    (chunk,) = chunks
    assert chunk.finish_reason == "length"
    assert chunk.completion_tokens == max_tokens
    assert len(chunk.text.split()) == max_tokens
    assert chunk.prompt_tokens == 2


def test_default_max_tokens_is_16(client) -> None:
    (chunk,) = generate(client, "Liberty")
    assert chunk.completion_tokens == 16


def test_same_seed_same_text_and_streaming_concatenates_to_it(client) -> None:
    options = {"max_tokens": 40, "seed": 1234, "temperature": 1.0}
    first = text_of(generate(client, "the people", **options))
    assert text_of(generate(client, "the people", **options)) == first
    assert text_of(generate(client, "the people", stream=True, **options)) == first
    others = {text_of(generate(client, "the people", **{**options, "seed": s})) for s in (1, 2, 3)}
    assert others != {first}, "the seed must change the sampled text"


def test_greedy_continues_the_prompt_from_the_corpus(client) -> None:
    words = CORPUS.read_text().split()
    # The word that follows "these truths" in the corpus (it occurs once).
    successor = next(
        words[i + 2] for i in range(len(words) - 2) if words[i : i + 2] == ["these", "truths"]
    )
    chunks = generate(client, "We hold these truths", max_tokens=5, temperature=0.0)
    assert text_of(chunks).split()[0] == successor
    assert text_of(generate(client, "We hold these truths", max_tokens=5, temperature=0.0)) == (
        text_of(chunks)
    )


@pytest.mark.parametrize("stream", [False, True])
def test_stop_word_ends_generation_and_is_not_returned(client, stream: bool) -> None:
    options = {"max_tokens": 30, "temperature": 0.0}
    full = text_of(generate(client, "When in the Course", **options))
    tokens = full.split()
    starts = [match.start() for match in re.finditer(r" \S+", full)]
    # Two tokens from the middle whose first occurrence is there: a stop word spanning tokens.
    position = next(
        i for i in range(4, 20) if full.find(f" {tokens[i]} {tokens[i + 1]}") == starts[i]
    )
    stop_word = f" {tokens[position]} {tokens[position + 1]}"

    chunks = generate(
        client, "When in the Course", stream=stream, stop_words=[stop_word, "xyzzy"], **options
    )

    assert text_of(chunks) == full[: starts[position]]
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].completion_tokens == position + 2


def test_cancellation_stops_generation(server: TritonServer, client) -> None:
    received: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: received.put((result, error)))
    client.async_stream_infer("tiny_lm", lm_inputs("Congress", max_tokens=2000, stream=True))
    for _ in range(5):
        _, error = received.get(timeout=10)
        assert error is None
    client.stop_stream(cancel_requests=True)
    time.sleep(0.1)
    after_cancel = triton_metric(server, TOKENS_METRIC, "tiny_lm")
    time.sleep(0.3)
    # At 5 ms per token an uncancelled request would add ~60 tokens in these 0.3 s.
    assert triton_metric(server, TOKENS_METRIC, "tiny_lm") == after_cancel
    # The model serves the next request.
    assert generate(client, "Congress", max_tokens=3)[-1].completion_tokens == 3


@pytest.mark.parametrize(
    ("prompt", "options", "message"),
    [
        (b"\xff\xfe not utf-8", {}, "text_input is not valid UTF-8"),
        ("fine", {"max_tokens": -1}, "max_tokens must be >= 0, got -1"),
        ("fine", {"temperature": -0.5}, "temperature must be a finite number >= 0"),
        ("fine", {"top_p": 0.0}, "top_p must be in (0, 1]"),
    ],
)
def test_bad_input_is_an_error_response_and_the_model_keeps_serving(
    client, prompt: bytes | str, options: dict[str, object], message: str
) -> None:
    with pytest.raises(InferenceServerException, match=re.escape(message)):
        generate(client, prompt, **options)
    assert generate(client, "fine", max_tokens=2)[-1].completion_tokens == 2


def test_concurrent_requests_queue_and_every_token_is_counted(
    server: TritonServer, client
) -> None:
    requests, max_tokens = 4, 60
    tokens_before = triton_metric(server, TOKENS_METRIC, "tiny_lm")
    peak_pending = 0.0

    def one_request(_: int) -> list[Chunk]:
        own = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            return generate(own, "We the People", max_tokens=max_tokens)
        finally:
            own.close()

    with ThreadPoolExecutor(requests) as pool:
        futures = [pool.submit(one_request, i) for i in range(requests)]
        deadline = time.monotonic() + 20
        while not all(f.done() for f in futures) and time.monotonic() < deadline:
            peak_pending = max(peak_pending, triton_metric(server, PENDING_METRIC, "tiny_lm"))
            time.sleep(0.02)
        results = [f.result() for f in futures]

    # One instance generates one sequence at a time: the others wait in Triton's queue.
    assert peak_pending > 0
    assert all(chunks[-1].completion_tokens == max_tokens for chunks in results)
    assert triton_metric(server, TOKENS_METRIC, "tiny_lm") - tokens_before == requests * max_tokens


# --- embed -----------------------------------------------------------------------------


def embed_reference(client: grpcclient.InferenceServerClient, rows: np.ndarray) -> np.ndarray:
    """numpy's answer for the served model, from the weight seed in its config."""
    config = client.get_model_config("embed", as_json=True)["config"]
    seed = int(config["parameters"]["weight_seed"]["string_value"])
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((384, 128)) / np.sqrt(384)).astype(np.float32)
    return rows @ weight


def embed(client: grpcclient.InferenceServerClient, rows: np.ndarray) -> np.ndarray:
    tensor = grpcclient.InferInput("INPUT", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows)
    return client.infer("embed", [tensor]).as_numpy("OUTPUT")


def test_embed_matches_numpy(client) -> None:
    rows = np.random.default_rng(7).standard_normal((3, 384)).astype(np.float32)
    output = embed(client, rows)
    assert output.dtype == np.float32
    assert output.shape == (3, 128)
    np.testing.assert_allclose(output, embed_reference(client, rows), rtol=1e-4, atol=1e-4)


def test_embed_concurrent_requests_each_get_their_own_rows(server: TritonServer, client) -> None:
    rng = np.random.default_rng(11)
    batches = [rng.standard_normal((n, 384)).astype(np.float32) for n in (1, 5, 2, 9)]

    def one_request(rows: np.ndarray) -> np.ndarray:
        own = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            return embed(own, rows)
        finally:
            own.close()

    with ThreadPoolExecutor(len(batches)) as pool:
        outputs = list(pool.map(one_request, batches))
    for rows, output in zip(batches, outputs, strict=True):
        np.testing.assert_allclose(output, embed_reference(client, rows), rtol=1e-4, atol=1e-4)


# --- tokenize --------------------------------------------------------------------------


def test_tokenize_round_trips_any_bytes(client) -> None:
    items = [b"", "héllo wörld ✓".encode(), b"\x00", b"a\x00b\x00", bytes(range(256)), b"abc"]
    array = np.array(items, dtype=np.object_)
    tensor = grpcclient.InferInput("TEXT", [len(items)], "BYTES")
    tensor.set_data_from_numpy(array)
    result = client.infer("tokenize", [tensor])

    assert list(result.as_numpy("ECHO")) == items
    assert list(result.as_numpy("REVERSED")) == [item[::-1] for item in items]
    assert result.as_numpy("LENGTHS").tolist() == [len(item) for item in items]
    assert result.as_numpy("LENGTHS").dtype == np.int32


# --- the fleet itself (last: it restarts the module's server) --------------------------


def test_kill_then_restart_on_the_same_ports(fleet: TritonFleet) -> None:
    killed = fleet.servers[0]
    fleet.kill(0)
    assert not Path(f"/proc/{killed.pid}").exists(), "killed and reaped"
    dead = grpcclient.InferenceServerClient(killed.grpc_url)
    with pytest.raises(InferenceServerException):
        dead.is_server_live()
    dead.close()

    fleet.restart(0)

    restarted = fleet.servers[0]
    assert restarted.pid != killed.pid
    assert restarted.ports == killed.ports
    client = grpcclient.InferenceServerClient(restarted.grpc_url)
    try:
        assert client.is_server_ready()
        assert generate(client, "Liberty", max_tokens=2)[-1].completion_tokens == 2
    finally:
        client.close()
