"""Triton's own HTTP API through the gateway, against real tritonserver processes."""

from __future__ import annotations

import gc
import json
import time

import aiohttp
import numpy as np
import pytest
import tritonclient.http as httpclient

from tests.e2e.conftest import GATEWAY_MAX_BODY, Gateway

pytestmark = pytest.mark.e2e

EMBED_SEED = 20240607  # model_repository/embed/config.pbtxt: weight_seed


def embed_reference(x: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(EMBED_SEED)
    weight = (rng.standard_normal((384, 128)) / np.sqrt(384)).astype(np.float32)
    return x @ weight


async def read_sse(response: aiohttp.ClientResponse) -> list[tuple[float, dict]]:
    """(arrival time, parsed JSON) of every `data:` event, as a client sees them."""
    events = []
    async for line in response.content:
        if line.startswith(b"data: "):
            events.append((time.monotonic(), json.loads(line[len(b"data: ") :])))
    return events


async def test_generate_stream_arrives_token_by_token(gateway: Gateway) -> None:
    body = {
        "text_input": "We hold these truths",
        "max_tokens": 24,
        "stream": True,
        "temperature": 0.0,
    }
    async with aiohttp.ClientSession() as session:
        gc.collect()  # not mid-stream: a collection here would read the tokens as a burst
        start = time.monotonic()
        async with session.post(gateway.url + "/v2/models/tiny_lm/generate_stream", json=body) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/event-stream")
            events = await read_sse(r)
    texts = [e["text_output"] for _, e in events if e.get("text_output")]
    assert len(texts) == 24
    assert all(e["model_name"] == "tiny_lm" for _, e in events)
    assert not any("error" in e for _, e in events)
    first, last = events[0][0] - start, events[-1][0] - start
    # 24 tokens at ms_per_token each: the first must arrive long before the last.
    assert first < last / 3, (first, last)


async def test_generate_matches_stream_concatenation(gateway: Gateway) -> None:
    body = {"text_input": "We hold these truths", "max_tokens": 12, "temperature": 0.0}
    async with aiohttp.ClientSession() as session:
        async with session.post(gateway.url + "/v2/models/tiny_lm/generate", json=body) as r:
            assert r.status == 200, await r.text()
            whole = await r.json()
        async with session.post(
            gateway.url + "/v2/models/tiny_lm/generate_stream", json={**body, "stream": True}
        ) as r:
            events = await read_sse(r)
    assert whole["model_name"] == "tiny_lm"
    assert whole["text_output"] == "".join(e["text_output"] for _, e in events)


async def test_generate_stream_refused_by_the_model_keeps_its_message(gateway: Gateway) -> None:
    # tiny_lm refuses top_p=0 before any text; Triton answers 400 with a chunked error
    # event, which the gateway must read whole rather than as a body of fixed length.
    body = {"text_input": "We hold", "top_p": 0.0}
    async with aiohttp.ClientSession() as session:
        async with session.post(gateway.url + "/v2/models/tiny_lm/generate_stream", json=body) as r:
            assert r.status == 400
            error = (await r.json())["error"]
    assert error.startswith("top_p must be in (0, 1]"), error


async def test_binary_and_json_infer_equal_numpy_reference(gateway: Gateway) -> None:
    x = np.random.default_rng(7).standard_normal((3, 384)).astype(np.float32)
    expected = embed_reference(x)
    client = httpclient.InferenceServerClient(gateway.host_port)
    try:
        inp = httpclient.InferInput("INPUT", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        out = client.infer("embed", [inp]).as_numpy("OUTPUT")
        assert out.shape == (3, 128)
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)

        inp.set_data_from_numpy(x, binary_data=False)
        json_out = client.infer(
            "embed", [inp], outputs=[httpclient.InferRequestedOutput("OUTPUT", binary_data=False)]
        ).as_numpy("OUTPUT")
        np.testing.assert_allclose(json_out, expected, rtol=1e-4, atol=1e-5)
    finally:
        client.close()


async def test_pure_json_infer_body(gateway: Gateway) -> None:
    x = np.arange(384, dtype=np.float32).reshape(1, 384) / 384
    body = {
        "inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [1, 384], "data": x.tolist()}]
    }
    async with aiohttp.ClientSession() as session:
        async with session.post(gateway.url + "/v2/models/embed/infer", json=body) as r:
            assert r.status == 200
            reply = await r.json()
    (output,) = reply["outputs"]
    assert output["name"] == "OUTPUT" and output["shape"] == [1, 128]
    np.testing.assert_allclose(
        np.array(output["data"], dtype=np.float32).reshape(1, 128),
        embed_reference(x),
        rtol=1e-4,
        atol=1e-5,
    )


BYTES_CASES = [b"", "héllo wörld ✓".encode(), b"nul\x00inside\x00", b"\x00", b"plain", b""]


@pytest.mark.parametrize("binary", [True, False])
def test_bytes_round_trip(gateway: Gateway, binary: bool) -> None:
    cases = BYTES_CASES
    data = np.array(cases, dtype=np.object_)
    client = httpclient.InferenceServerClient(gateway.host_port)
    try:
        inp = httpclient.InferInput("TEXT", [len(cases)], "BYTES")
        inp.set_data_from_numpy(data, binary_data=binary)
        outputs = [
            httpclient.InferRequestedOutput(n, binary_data=binary)
            for n in ("ECHO", "REVERSED", "LENGTHS")
        ]
        result = client.infer("tokenize", [inp], outputs=outputs)
    finally:
        client.close()
    echo = [x if isinstance(x, bytes) else x.encode() for x in result.as_numpy("ECHO")]
    reversed_ = [x if isinstance(x, bytes) else x.encode() for x in result.as_numpy("REVERSED")]
    assert echo == cases
    # Reversing UTF-8 breaks it; JSON can only carry text, so those bytes become U+FFFD.
    expected = [c[::-1] if binary else c[::-1].decode("utf-8", "replace").encode() for c in cases]
    assert reversed_ == expected
    assert result.as_numpy("LENGTHS").tolist() == [len(c) for c in cases]


def test_tritonclient_http_metadata_unchanged(gateway: Gateway) -> None:
    client = httpclient.InferenceServerClient(gateway.host_port)
    try:
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready("embed")
        assert not client.is_model_ready("no_such_model")
        meta = client.get_model_metadata("embed")
        assert meta["name"] == "embed"
        assert meta["inputs"] == [{"name": "INPUT", "datatype": "FP32", "shape": [-1, 384]}]
        config = client.get_model_config("embed")
        assert config["max_batch_size"] == 64
        assert config["input"][0]["dims"] == [384]
        index = {m["name"]: m for m in client.get_model_repository_index()}
        assert {"embed", "tiny_lm", "tokenize"} <= index.keys()
        assert index["embed"]["state"] == "READY"
        server = client.get_server_metadata()
        assert server["name"] == "meshgate" and server["version"]
    finally:
        client.close()


# -- bad input: a clear JSON error with the right status, and the gateway keeps serving ---


def _bad_cases() -> list[tuple[str, str, dict[str, str], bytes, int]]:
    good_header = json.dumps(
        {
            "inputs": [
                {
                    "name": "INPUT",
                    "datatype": "FP32",
                    "shape": [1, 384],
                    "parameters": {"binary_data_size": 1536},
                }
            ]
        }
    ).encode()
    tensor = np.zeros(384, dtype=np.float32).tobytes()
    json_ct = {"Content-Type": "application/json"}
    return [
        ("unknown model", "/v2/models/nope/infer", json_ct, b'{"inputs": []}', 404),
        ("unknown model generate", "/v2/models/nope/generate", json_ct, b"{}", 404),
        ("malformed JSON", "/v2/models/embed/infer", json_ct, b'{"inputs": [', 400),
        ("JSON not an object", "/v2/models/embed/infer", json_ct, b"[1, 2]", 400),
        (
            "header length not a number",
            "/v2/models/embed/infer",
            {"Inference-Header-Content-Length": "abc"},
            good_header + tensor,
            400,
        ),
        (
            "header length past the body",
            "/v2/models/embed/infer",
            {"Inference-Header-Content-Length": "999999"},
            good_header + tensor,
            400,
        ),
        (
            "binary tail truncated",
            "/v2/models/embed/infer",
            {"Inference-Header-Content-Length": str(len(good_header))},
            good_header + tensor[:-4],
            400,
        ),
        (
            "wrong datatype",
            "/v2/models/embed/infer",
            json_ct,
            json.dumps(
                {
                    "inputs": [
                        {"name": "INPUT", "datatype": "INT32", "shape": [1, 384], "data": [0] * 384}
                    ]
                }
            ).encode(),
            400,
        ),
        (
            "unknown datatype",
            "/v2/models/embed/infer",
            json_ct,
            json.dumps(
                {
                    "inputs": [
                        {"name": "INPUT", "datatype": "FP33", "shape": [1, 384], "data": [0] * 384}
                    ]
                }
            ).encode(),
            400,
        ),
        (
            "wrong shape",
            "/v2/models/embed/infer",
            json_ct,
            json.dumps(
                {
                    "inputs": [
                        {"name": "INPUT", "datatype": "FP32", "shape": [1, 383], "data": [0] * 383}
                    ]
                }
            ).encode(),
            400,
        ),
        (
            "data does not match shape",
            "/v2/models/embed/infer",
            json_ct,
            json.dumps(
                {
                    "inputs": [
                        {"name": "INPUT", "datatype": "FP32", "shape": [1, 384], "data": [0] * 10}
                    ]
                }
            ).encode(),
            400,
        ),
        (
            "negative shape",
            "/v2/models/embed/infer",
            json_ct,
            json.dumps(
                {
                    "inputs": [
                        {"name": "INPUT", "datatype": "FP32", "shape": [-1, 384], "data": [0] * 384}
                    ]
                }
            ).encode(),
            400,
        ),
        (
            "missing input",
            "/v2/models/tokenize/infer",
            json_ct,
            json.dumps(
                {"inputs": [{"name": "NOT_TEXT", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}
            ).encode(),
            400,
        ),
        ("no inputs", "/v2/models/embed/infer", json_ct, b'{"inputs": []}', 400),
        (
            "generate without text_input",
            "/v2/models/tiny_lm/generate",
            json_ct,
            b'{"max_tokens": 3}',
            400,
        ),
        (
            # Triton's own /generate answers this with 200 and an error body.
            "generate that streams",
            "/v2/models/tiny_lm/generate",
            json_ct,
            b'{"text_input": "hi", "max_tokens": 3, "stream": true}',
            400,
        ),
        (
            "generate wrong type",
            "/v2/models/tiny_lm/generate",
            json_ct,
            b'{"text_input": "hi", "max_tokens": "many"}',
            400,
        ),
        ("unknown route", "/v2/nothing/here", json_ct, b"{}", 404),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
async def test_bad_input_gets_json_error(gateway: Gateway, case) -> None:  # type: ignore[no-untyped-def]
    _, path, headers, body, status = case
    async with aiohttp.ClientSession() as session:
        async with session.post(gateway.url + path, data=body, headers=headers) as r:
            text = await r.text()
            assert r.status == status, text
            assert r.headers["Content-Type"].startswith("application/json")
            error = json.loads(text)["error"]
            assert isinstance(error, str) and error
            assert "Traceback" not in text


async def test_body_over_limit_is_413_and_gateway_keeps_serving(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as session:
        big = b"0" * (GATEWAY_MAX_BODY + 1024)
        async with session.post(
            gateway.url + "/v2/models/embed/infer",
            data=big,
            headers={"Content-Type": "application/json"},
        ) as r:
            assert r.status == 413
            assert "error" in await r.json()
        body = {
            "inputs": [
                {"name": "INPUT", "datatype": "FP32", "shape": [1, 384], "data": [0.5] * 384}
            ]
        }
        async with session.post(gateway.url + "/v2/models/embed/infer", json=body) as r:
            assert r.status == 200
