"""Framing hot paths, both twins, against tritonclient and protobuf as peers.

Run with ``pytest bench/test_bench_framing.py --benchmark-only``. The machine is shared
and noisy: compare ratios within one run, not absolute times across runs.
"""

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from pytest_benchmark.fixture import BenchmarkFixture
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from bench.measure import binary_infer_body
from fastpath import framing, grpc_wire, infer_request
from gateway.kserve_codec import decode_infer_body
from gateway.tensors import json_to_raw
from tests.conftest import twin_params

STRINGS = [f"token-{i}" for i in range(10_000)]
STRINGS_ARRAY = np.array(STRINGS, dtype=np.object_)
ENCODED_STRINGS = framing.framing_py.serialize_bytes_tensor(STRINGS)
INPUT = np.random.default_rng(0).random((1, 384), dtype=np.float32)
OUTPUT = np.random.default_rng(1).random((1, 128), dtype=np.float32)


FRAMING = twin_params(framing.framing_py, framing.framing_c)
WIRE = twin_params(grpc_wire.grpc_wire_py, grpc_wire.grpc_wire_c)


def _response_bytes() -> bytes:
    message = pb.ModelInferResponse(
        model_name="simple", model_version="1", id="42", raw_output_contents=[OUTPUT.tobytes()]
    )
    message.outputs.add(name="OUTPUT0", datatype="FP32", shape=[1, 128])
    return message.SerializeToString()


RESPONSE = _response_bytes()


# ---------------------------------------------------------------------------- BYTES tensors


@pytest.mark.benchmark(group="serialize 10k strings")
@pytest.mark.parametrize("impl", FRAMING)
def test_serialize_bytes(benchmark: BenchmarkFixture, impl: Any) -> None:
    assert benchmark(impl.serialize_bytes_tensor, STRINGS) == ENCODED_STRINGS


@pytest.mark.benchmark(group="serialize 10k strings")
def test_serialize_bytes_tritonclient(benchmark: BenchmarkFixture) -> None:
    assert benchmark(serialize_byte_tensor, STRINGS_ARRAY).item() == ENCODED_STRINGS


@pytest.mark.benchmark(group="deserialize 10k strings")
@pytest.mark.parametrize("impl", FRAMING)
def test_deserialize_bytes(benchmark: BenchmarkFixture, impl: Any) -> None:
    assert len(benchmark(impl.deserialize_bytes_tensor, ENCODED_STRINGS)) == len(STRINGS)


@pytest.mark.benchmark(group="deserialize 10k strings")
def test_deserialize_bytes_tritonclient(benchmark: BenchmarkFixture) -> None:
    assert len(benchmark(deserialize_bytes_tensor, ENCODED_STRINGS)) == len(STRINGS)


# ---------------------------------------------------------------------------- gRPC wire


def _encode_with(encode: Callable[..., bytes]) -> bytes:
    return encode(
        "simple",
        "1",
        "42",
        None,
        [("INPUT0", "FP32", [1, 384], None)],
        [("OUTPUT0", None)],
        [INPUT],
    )


def _encode_with_protobuf() -> bytes:
    return pb.ModelInferRequest(
        model_name="simple",
        model_version="1",
        id="42",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name="INPUT0", datatype="FP32", shape=[1, 384])
        ],
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="OUTPUT0")],
        raw_input_contents=[INPUT.tobytes()],
    ).SerializeToString()


@pytest.mark.benchmark(group="encode_infer_request 1x384 FP32")
@pytest.mark.parametrize("impl", WIRE)
def test_encode_infer_request(benchmark: BenchmarkFixture, impl: Any) -> None:
    encoded = benchmark(_encode_with, impl.encode_infer_request)
    assert pb.ModelInferRequest.FromString(encoded) == pb.ModelInferRequest.FromString(
        _encode_with_protobuf()
    )


@pytest.mark.benchmark(group="encode_infer_request 1x384 FP32")
def test_encode_infer_request_protobuf(benchmark: BenchmarkFixture) -> None:
    assert len(benchmark(_encode_with_protobuf)) > INPUT.nbytes


@pytest.mark.benchmark(group="decode_infer_response 1x128 FP32")
@pytest.mark.parametrize("impl", WIRE)
def test_decode_infer_response(benchmark: BenchmarkFixture, impl: Any) -> None:
    response = benchmark(impl.decode_infer_response, RESPONSE)
    assert bytes(response.raw_outputs[0]) == OUTPUT.tobytes()


def _decode_with_protobuf(blob: bytes) -> tuple[Any, ...]:
    # The fields a caller reads, so lazily built containers are paid for too.
    message = pb.ModelInferResponse.FromString(blob)
    outputs = [(o.name, o.datatype, list(o.shape)) for o in message.outputs]
    return message.model_name, message.id, outputs, message.raw_output_contents[0]


@pytest.mark.benchmark(group="decode_infer_response 1x128 FP32")
def test_decode_infer_response_protobuf(benchmark: BenchmarkFixture) -> None:
    assert benchmark(_decode_with_protobuf, RESPONSE)[3] == OUTPUT.tobytes()


# ---------------------------------------------------------------------- infer request check

INFER_CHECK = twin_params(infer_request.infer_request_py, infer_request.infer_request_c)


def _infer_request() -> tuple[dict[str, Any], memoryview]:
    """The JSON header and binary tail of a binary 1x384 FP32 infer, as the benchmarks
    send it (bench/measure.py), split as the gateway splits it."""
    body, headers = binary_infer_body([("INPUT", "FP32", [1, 384], INPUT.tobytes())], ["OUTPUT"])
    return decode_infer_body(body, headers["Inference-Header-Content-Length"])


INFER_HEADER, INFER_TAIL = _infer_request()


def check_infer_with(impl: Any) -> tuple[Any, ...]:
    return impl.parse_infer_request(INFER_HEADER, INFER_TAIL, json_to_raw)  # type: ignore[no-any-return]


@pytest.mark.benchmark(group="parse_infer_request 1x384 FP32 binary")
@pytest.mark.parametrize("impl", INFER_CHECK)
def test_parse_infer_request(benchmark: BenchmarkFixture, impl: Any) -> None:
    inputs = benchmark(check_infer_with, impl)[2]
    assert inputs == [("INPUT", "FP32", [1, 384], None)]
