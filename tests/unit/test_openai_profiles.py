"""gateway.openai_profiles: OpenAI requests to Triton tensors and Triton responses back,
and the OpenAI error bodies as the official `openai` client classifies them."""

from __future__ import annotations

import json
from typing import Any

import httpx2
import numpy as np
import openai
import pytest
from aiohttp.test_utils import make_mocked_request
from tritonclient.grpc import service_pb2 as pb

from fastpath import framing
from fastpath.grpc_wire import InferResponse
from gateway.app import error_response
from gateway.config import ConfigError
from gateway.errors import (
    BadRequest,
    GatewayError,
    ModelGone,
    ModelNotFound,
    NotFound,
    Overloaded,
    StatusError,
    Unavailable,
    UpstreamError,
)
from gateway.fleet import InputSpec, ModelInfo
from gateway.http_generate import event_payload
from gateway.kserve_codec import encode_generate
from gateway.openai_profiles import (
    PROFILES,
    ReplyReader,
    Sampling,
    check_profile_name,
    count_words,
    is_text_model,
    profile_for,
)


def model(
    inputs: dict[str, str], outputs: tuple[str, ...] = ("text_output",), **kw: Any
) -> ModelInfo:
    specs = {name: InputSpec(dtype, (1,), name != "text_input") for name, dtype in inputs.items()}
    fields: dict[str, Any] = {"name": "m", "version": "1", "max_batch_size": 0, "decoupled": True}
    fields.update(kw)
    return ModelInfo(inputs=specs, outputs=outputs, **fields)


TINY_LM = model(
    {
        "text_input": "BYTES",
        "max_tokens": "INT32",
        "stream": "BOOL",
        "temperature": "FP32",
        "top_p": "FP32",
        "seed": "UINT64",
        "stop_words": "BYTES",
    },
    ("text_output", "finish_reason", "prompt_tokens", "completion_tokens"),
)
VLLM_MODEL = model(
    {
        "text_input": "BYTES",
        "stream": "BOOL",
        "sampling_parameters": "BYTES",
        "exclude_input_in_output": "BOOL",
        "return_finish_reason": "BOOL",
        "return_num_input_tokens": "BOOL",
        "return_num_output_tokens": "BOOL",
    }
)


def encode(
    profile: str, info: ModelInfo, sampling: Sampling, request_id: str = "id", stream: bool = True
) -> bytes:
    """The gRPC request the gateway sends for ``sampling`` (the HTTP one is its JSON)."""
    return encode_generate(
        info.name, info, PROFILES[profile].request(info, sampling, request_id, stream)
    )


def decode(wire: bytes) -> tuple[pb.ModelInferRequest, dict[str, Any]]:
    """The request and its inputs as Python values, decoded with Triton's own protobuf."""
    request = pb.ModelInferRequest.FromString(wire)
    values: dict[str, Any] = {}
    for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True):
        if tensor.datatype == "BYTES":
            items = [b.decode() for b in framing.deserialize_bytes_tensor(raw)]
            values[tensor.name] = items[0] if list(tensor.shape) == [1] else items
        else:
            dtype = {"INT32": "<i4", "FP32": "<f4", "UINT64": "<u8", "BOOL": "?"}[tensor.datatype]
            values[tensor.name] = np.frombuffer(raw, dtype=dtype).item()
    return request, values


# -- detection --------------------------------------------------------------------------


def test_text_model_needs_bytes_text_input_and_text_output() -> None:
    assert is_text_model(TINY_LM)
    assert is_text_model(VLLM_MODEL)
    assert not is_text_model(model({"INPUT": "FP32"}, ("OUTPUT",)))
    assert not is_text_model(model({"text_input": "FP32"}))
    assert not is_text_model(model({"text_input": "BYTES"}, ("ECHO",)))


def test_profile_detected_from_inputs_unless_configured() -> None:
    assert profile_for(TINY_LM, None).name == "triton-llm"
    assert profile_for(VLLM_MODEL, None).name == "vllm"
    assert profile_for(VLLM_MODEL, "triton-llm").name == "triton-llm"


def test_unknown_configured_profile_is_a_config_error() -> None:
    check_profile_name("m", "vllm")
    check_profile_name("m", None)
    with pytest.raises(ConfigError, match="profile must be one of"):
        check_profile_name("m", "tgi")


# -- encoding ---------------------------------------------------------------------------


def test_triton_llm_maps_every_parameter_to_its_tensor() -> None:
    sampling = Sampling("hi there", 7, 0.5, 0.9, 42, ("a", "b c"), user="alice")
    request, values = decode(encode("triton-llm", TINY_LM, sampling, "cmpl-1"))
    assert request.model_name == "m" and request.id == "cmpl-1"
    assert values == {
        "text_input": "hi there",
        "max_tokens": 7,
        "temperature": 0.5,
        "top_p": pytest.approx(0.9),
        "seed": 42,
        "stop_words": ["a", "b c"],
        "stream": True,
    }
    assert request.parameters["user"].string_param == "alice"


def test_triton_llm_leaves_unset_parameters_to_the_model() -> None:
    _, values = decode(encode("triton-llm", TINY_LM, Sampling("x")))
    assert values == {"text_input": "x", "stream": True}


def test_decoupled_model_streams_as_asked() -> None:
    _, values = decode(encode("triton-llm", TINY_LM, Sampling("x"), stream=False))
    assert values["stream"] is False


def test_http_request_is_the_generate_json_of_the_same_fields() -> None:
    sampling = Sampling("hi", 7, seed=42, stop=("a",), user="alice")
    body = PROFILES["triton-llm"].request(TINY_LM, sampling, "cmpl-1", True)
    assert body == {
        "id": "cmpl-1",
        "text_input": "hi",
        "max_tokens": 7,
        "seed": 42,
        "stop_words": ["a"],
        "stream": True,
        "user": "alice",  # not an input: Triton's generate takes it as a parameter
    }


def test_non_decoupled_model_is_not_asked_to_stream() -> None:
    info = model({"text_input": "BYTES", "stream": "BOOL"}, decoupled=False)
    _, values = decode(encode("triton-llm", info, Sampling("x")))
    assert values["stream"] is False


def test_triton_llm_uses_tensorrt_llm_random_seed_name() -> None:
    info = model({"text_input": "BYTES", "random_seed": "UINT64"})
    _, values = decode(encode("triton-llm", info, Sampling("x", seed=5)))
    assert values["random_seed"] == 5


def test_parameter_without_an_input_is_refused_with_its_name() -> None:
    info = model({"text_input": "BYTES"})
    with pytest.raises(BadRequest, match="no input for 'temperature'") as caught:
        encode("triton-llm", info, Sampling("x", temperature=1.0))
    assert caught.value.param == "temperature"


def test_batching_model_gets_a_batch_dimension() -> None:
    info = model({"text_input": "BYTES", "max_tokens": "INT32"}, max_batch_size=8)
    request, _ = decode(encode("triton-llm", info, Sampling("x", 3)))
    assert [list(t.shape) for t in request.inputs] == [[1, 1], [1, 1]]


def test_vllm_sends_sampling_parameters_as_json_and_asks_for_counts() -> None:
    sampling = Sampling("p", max_tokens=9, temperature=0.0, seed=3, stop=("x",))
    _, values = decode(encode("vllm", VLLM_MODEL, sampling))
    params = json.loads(values.pop("sampling_parameters"))
    assert params == {"max_tokens": 9, "temperature": 0.0, "seed": 3, "stop": ["x"]}
    assert values == {
        "text_input": "p",
        "stream": True,
        "exclude_input_in_output": True,
        "return_finish_reason": True,
        "return_num_input_tokens": True,
        "return_num_output_tokens": True,
    }


# -- reading responses ------------------------------------------------------------------


def reply(**outputs: Any) -> InferResponse:
    """A decoded response whose outputs are given as Python values."""
    response = InferResponse()
    for name, value in outputs.items():
        if isinstance(value, bytes | str):
            data = value.encode() if isinstance(value, str) else value
            raw, datatype = framing.serialize_bytes_tensor([data]), "BYTES"
        else:
            raw, datatype = np.array([value], dtype="<i4").tobytes(), "INT32"
        response.outputs.append((name, datatype, [1], {}))
        response.raw_outputs.append(memoryview(raw))
    return response


def test_tiny_lm_style_running_totals() -> None:
    reader = ReplyReader()
    assert (
        reader.read(reply(text_output=" a", finish_reason="", prompt_tokens=3, completion_tokens=1))
        == " a"
    )
    assert reader.finish_reason is None
    reader.read(
        reply(text_output=" b", finish_reason="length", prompt_tokens=3, completion_tokens=2)
    )
    usage = reader.usage("ignored because the model counted")
    assert (reader.text, usage.prompt_tokens, usage.completion_tokens) == (" a b", 3, 2)
    assert usage.as_json() == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert reader.final_reason(usage, max_tokens=2) == "length"


def test_vllm_style_per_response_counts_are_summed() -> None:
    reader = ReplyReader()
    for text, reason in (("x", "None"), ("yz", "None"), ("", "stop")):
        reader.read(
            reply(
                text_output=text,
                finish_reason=reason,
                num_input_tokens=4,
                num_output_tokens=len(text),
            )
        )
    usage = reader.usage("p")
    assert (usage.prompt_tokens, usage.completion_tokens, reader.finish_reason) == (4, 3, "stop")


def test_utf8_character_split_across_responses() -> None:
    reader = ReplyReader()
    encoded = "é✓".encode()
    assert reader.read(reply(text_output=encoded[:1])) == ""
    assert reader.read(reply(text_output=encoded[1:4])) == "é"
    assert reader.read(reply(text_output=encoded[4:])) == "✓"
    assert reader.flush() == ""
    assert reader.text == "é✓"


def event(data: bytes) -> dict[str, Any]:
    """The payload of one of Triton's HTTP events whose JSON is ``data``."""
    return event_payload(b"data: " + data + b"\n\n")


def test_http_events_are_read_like_grpc_responses() -> None:
    reader = ReplyReader()
    first = b'{"completion_tokens":1,"finish_reason":"","model_name":"tiny_lm",'
    first += b'"prompt_tokens":2,"text_output":" He"}'
    assert reader.read(event(first)) == " He"
    last = b'{"completion_tokens":2,"finish_reason":"length","prompt_tokens":2,'
    last += rb'"text_output":["\u00e9"," it"]}'
    assert reader.read(event(last)) == "é it"
    usage = reader.usage("ignored because the model counted")
    assert (reader.text, usage.prompt_tokens, usage.completion_tokens) == (" Heé it", 2, 2)
    assert reader.finish_reason == "length"


def test_utf8_character_split_across_http_events() -> None:
    # Triton writes a BYTES output's raw bytes into its JSON, valid UTF-8 or not.
    reader = ReplyReader()
    encoded = "é✓".encode()
    assert reader.read(event(b'{"text_output":"' + encoded[:1] + b'"}')) == ""
    assert reader.read(event(b'{"text_output":"' + encoded[1:4] + b'"}')) == "é"
    assert reader.read(event(b'{"text_output":"' + encoded[4:] + b'"}')) == "✓"
    assert reader.flush() == ""
    assert reader.text == "é✓"


def test_without_counts_or_reason_the_word_rule_applies() -> None:
    reader = ReplyReader()
    reader.read(reply(text_output=" one two"))
    reader.read(reply(text_output=" three"))
    usage = reader.usage("a prompt of five words")
    assert (usage.prompt_tokens, usage.completion_tokens) == (5, 3)
    assert reader.final_reason(usage, max_tokens=3) == "length"
    assert reader.final_reason(usage, max_tokens=4) == "stop"
    assert reader.final_reason(usage, max_tokens=None) == "stop"
    assert count_words("  a\tb\nc  ") == 3


def test_malformed_model_outputs_are_upstream_errors() -> None:
    bad_text = InferResponse()
    bad_text.outputs.append(("text_output", "INT32", [1], {}))
    bad_text.raw_outputs.append(memoryview(b"\0\0\0\0"))
    with pytest.raises(UpstreamError, match="must be BYTES") as caught:
        ReplyReader().read(bad_text)
    assert caught.value.status == 502
    truncated = InferResponse()
    truncated.outputs.append(("text_output", "BYTES", [1], {}))
    truncated.raw_outputs.append(memoryview(b"\x09\0\0\0ab"))
    with pytest.raises(UpstreamError):
        ReplyReader().read(truncated)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b'{"text_output":5}', "must be text"),
        (b'{"text_output":["a",1]}', "must be text"),
        (b'{"completion_tokens":"3"}', "must be one integer"),
        (b'{"prompt_tokens":[1,2]}', "must be one integer"),
        (b'{"num_output_tokens":true}', "must be one integer"),
        (b"[1]", "malformed event"),
        (b'{"text_output":"a"', "malformed event"),
    ],
)
def test_malformed_http_events_are_upstream_errors(data: bytes, message: str) -> None:
    with pytest.raises(UpstreamError, match=message) as caught:
        ReplyReader().read(event(data))
    assert caught.value.status == 502


def test_error_events_raise_their_message() -> None:
    with pytest.raises(UpstreamError, match=r"^top_p must be") as caught:
        event(b'{"error":"top_p must be in (0, 1]"}')
    assert caught.value.status == 400 and not isinstance(caught.value, ModelGone)
    with pytest.raises(ModelGone):
        event(b'{"error":"Request for unknown model: \'x\' is not found"}')


# -- errors as the openai client sees them ---------------------------------------------


@pytest.mark.parametrize(
    ("error", "exception"),
    [
        (BadRequest("bad temperature", param="temperature"), openai.BadRequestError),
        (StatusError("missing API key", 401), openai.AuthenticationError),
        (ModelNotFound("The model 'x' does not exist"), openai.NotFoundError),
        (NotFound("no route"), openai.NotFoundError),
        (Overloaded("busy", reason="saturated", retry_after=2.4), openai.RateLimitError),
        (Unavailable("no backend ready"), openai.InternalServerError),
        (GatewayError("internal gateway error"), openai.InternalServerError),
    ],
)
def test_error_bodies_map_to_openai_exceptions(
    error: GatewayError, exception: type[openai.APIStatusError]
) -> None:
    rendered = error_response(make_mocked_request("POST", "/v1/chat/completions"), error)
    assert rendered.body is not None
    response = httpx2.Response(
        rendered.status,
        content=bytes(rendered.body),
        headers=dict(rendered.headers),
        request=httpx2.Request("POST", "http://127.0.0.1/v1/chat/completions"),
    )
    client = openai.OpenAI(api_key="unused", base_url="http://127.0.0.1:9/v1")
    mapped = client._make_status_error_from_response(response)
    assert type(mapped) is exception
    assert mapped.status_code == error.status
    assert error.message in mapped.message
    assert (mapped.code, mapped.param, mapped.type) == (error.type, error.param, error.openai_type)
    if error.retry_after is not None:
        assert response.headers["Retry-After"] == "2"
    else:
        assert "Retry-After" not in response.headers
