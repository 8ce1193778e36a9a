"""fastpath.grpc_wire: both twins, against tritonclient's protobuf messages and each other."""

import tracemalloc
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb

from fastpath import grpc_wire
from fastpath.errors import FramingError
from tests.conftest import loaded_twins, twin_params

IMPLS = twin_params(grpc_wire.grpc_wire_py, grpc_wire.grpc_wire_c)
LOADED = loaded_twins(grpc_wire.grpc_wire_py, grpc_wire.grpc_wire_c)


@pytest.fixture(params=IMPLS, scope="module")
def wire(request: pytest.FixtureRequest) -> ModuleType:
    return request.param


# ---------------------------------------------------------------------------- helpers


def varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def pb_params(params: Any) -> dict[str, Any]:
    """A protobuf parameters map as {key: value or None}."""
    result = {}
    for key, value in params.items():
        choice = value.WhichOneof("parameter_choice")
        result[key] = None if choice is None else getattr(value, choice)
    return result


def fields(response: Any) -> tuple[Any, ...]:
    """An InferResponse of either twin as plain values."""
    return (
        response.model_name,
        response.model_version,
        response.id,
        response.parameters,
        response.outputs,
        [bytes(raw) for raw in response.raw_outputs],
    )


def pb_fields(message: Any) -> tuple[Any, ...]:
    return (
        message.model_name,
        message.model_version,
        message.id,
        pb_params(message.parameters),
        [(o.name, o.datatype, list(o.shape), pb_params(o.parameters)) for o in message.outputs],
        list(message.raw_output_contents),
    )


def outcome(fn: Callable[[bytes], Any], blob: bytes) -> tuple[str, Any]:
    try:
        result = fn(blob)
    except FramingError as exc:
        return "error", str(exc)
    if isinstance(result, tuple):  # decode_stream_response
        return "ok", (result[0], None if result[1] is None else fields(result[1]))
    return "ok", fields(result)


def decode_both(name: str, blob: bytes) -> tuple[str, Any]:
    """Outcome of decoding ``blob`` in every loaded twin, asserting they agree exactly."""
    results = [outcome(getattr(m, name), blob) for m in LOADED]
    assert all(r == results[0] for r in results), results
    return results[0]


# ---------------------------------------------------------------------------- strategies

names = st.text(max_size=12)
param_values = (
    st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
)
params = st.dictionaries(names, param_values, max_size=3)
shapes = st.lists(st.integers(-(2**63), 2**63 - 1) | st.integers(-1, 64), max_size=4)


@st.composite
def unknown_fields(draw: st.DrawFn) -> bytes:
    """Zero or more fields with numbers no message here defines, of every wire type."""
    out = b""
    for _ in range(draw(st.integers(0, 2))):
        field = draw(st.integers(7, 2**29 - 1))
        wire_type = draw(st.sampled_from([0, 1, 2, 3, 5]))
        key = varint(field << 3 | wire_type)
        if wire_type == 0:
            out += key + varint(draw(st.integers(0, 2**64 - 1)))
        elif wire_type == 1:
            out += key + draw(st.binary(min_size=8, max_size=8))
        elif wire_type == 2:
            payload = draw(st.binary(max_size=6))
            out += key + varint(len(payload)) + payload
        elif wire_type == 5:
            out += key + draw(st.binary(min_size=4, max_size=4))
        else:  # a group holding one varint field, closed by its end-group key
            out += key + varint(9 << 3) + b"\x01" + varint(field << 3 | 4)
    return out


@st.composite
def pb_responses(draw: st.DrawFn) -> Any:
    """A ModelInferResponse with every kind of field, unknown fields at every level."""
    message = pb.ModelInferResponse(
        model_name=draw(names), model_version=draw(names), id=draw(names)
    )

    def set_params(target: Any) -> None:
        for key, value in draw(params).items():
            slot = target[key]
            if isinstance(value, bool):
                slot.bool_param = value
            elif isinstance(value, int):
                if value > 2**63 - 1:
                    slot.uint64_param = value
                else:
                    slot.int64_param = value
            elif isinstance(value, float):
                slot.double_param = value
            else:
                slot.string_param = value
            slot.MergeFromString(draw(unknown_fields()))

    set_params(message.parameters)
    for _ in range(draw(st.integers(0, 3))):
        output = message.outputs.add(name=draw(names), datatype=draw(names), shape=draw(shapes))
        set_params(output.parameters)
        output.MergeFromString(draw(unknown_fields()))
        message.raw_output_contents.append(draw(st.binary(max_size=40)))
    message.MergeFromString(draw(unknown_fields()))
    return message


# ---------------------------------------------------------------------------- selection


# ---------------------------------------------------------------------------- encoding


@settings(max_examples=300)
@given(
    head=st.tuples(names, names, names),
    request_params=st.none() | params,
    inputs=st.lists(st.tuples(names, names, shapes, st.none() | params), max_size=3),
    outputs=st.lists(st.tuples(names, st.none() | params), max_size=3),
    data=st.data(),
)
def test_encode_parses_with_protobuf(
    wire: ModuleType,
    head: tuple[str, str, str],
    request_params: dict[str, Any] | None,
    inputs: list[Any],
    outputs: list[Any],
    data: st.DataObject,
) -> None:
    raw = [data.draw(st.binary(max_size=300)) for _ in inputs]
    encoded = wire.encode_infer_request(*head, request_params, inputs, outputs, raw)
    message = pb.ModelInferRequest.FromString(encoded)
    assert (message.model_name, message.model_version, message.id) == head
    assert pb_params(message.parameters) == (request_params or {})
    assert [
        (i.name, i.datatype, list(i.shape), pb_params(i.parameters), i.HasField("contents"))
        for i in message.inputs
    ] == [(n, d, s, p or {}, False) for n, d, s, p in inputs]
    assert [(o.name, pb_params(o.parameters)) for o in message.outputs] == [
        (n, p or {}) for n, p in outputs
    ]
    assert list(message.raw_input_contents) == raw
    # Both twins write the same bytes.
    assert all(
        m.encode_infer_request(*head, request_params, inputs, outputs, raw) == encoded
        for m in LOADED
    )


def test_encode_parameter_types(wire: ModuleType) -> None:
    values = {"b": False, "i": -1, "u": 2**63, "d": 0.0, "s": ""}
    message = pb.ModelInferRequest.FromString(
        wire.encode_infer_request("m", "", "", values, [], [], [])
    )
    assert {k: v.WhichOneof("parameter_choice") for k, v in message.parameters.items()} == {
        "b": "bool_param",
        "i": "int64_param",
        "u": "uint64_param",
        "d": "double_param",
        "s": "string_param",
    }
    assert pb_params(message.parameters) == values


def test_encode_accepts_buffers(wire: ModuleType) -> None:
    tensor = np.arange(6, dtype=np.float32).reshape(2, 3)
    encoded = wire.encode_infer_request(
        "m",
        "1",
        "r",
        None,
        [("a", "FP32", [2, 3], None), ("b", "UINT8", [2], None), ("c", "UINT8", [1], None)],
        [("o", None)],
        [tensor, bytearray(b"xy"), memoryview(b"z")],
    )
    message = pb.ModelInferRequest.FromString(encoded)
    assert list(message.raw_input_contents) == [tensor.tobytes(), b"xy", b"z"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("m", "", "", {"k": None}, [], [], []),
            r"parameters\['k'\] must be bool, int, float or str, found NoneType",
        ),
        (("m", "", "", {"k": 2**64}, [], [], []), r"parameters\['k'\] must fit in int64 or uint64"),
        (("m", "", "", {"k": -(2**63) - 1}, [], [], []), "must fit in int64 or uint64"),
        (("m", "", "", {1: 1}, [], [], []), "parameters key must be str, found int"),
        ((b"m", "", "", None, [], [], []), "model_name must be str, found bytes"),
        (("m", "", "\ud800", None, [], [], []), "id is not encodable as UTF-8"),
        (
            ("m", "", "", None, [("x", "FP32", [1, 2**63], None)], [], [b""]),
            r"inputs\[0\].shape\[1\] must be an int64",
        ),
        (
            ("m", "", "", None, [("x", "FP32", [1.0], None)], [], [b""]),
            r"inputs\[0\].shape\[0\] must be an int64",
        ),
        (("m", "", "", None, [("x", 5, [], None)], [], [b""]), r"inputs\[0\].datatype must be str"),
        (
            ("m", "", "", None, [], [("o", {"k": [1]})], []),
            r"outputs\[0\].parameters\['k'\] must be bool",
        ),
        (
            ("m", "", "", None, [("x", "FP32", [], None)], [], []),
            r"one raw input buffer per input \(1\), found 0",
        ),
    ],
)
def test_encode_rejects_bad_values(wire: ModuleType, args: tuple[Any, ...], message: str) -> None:
    with pytest.raises(FramingError, match=message):
        wire.encode_infer_request(*args)


def test_encode_copies_tensor_once(wire: ModuleType) -> None:
    tensor = np.random.default_rng(0).random(1 << 20, dtype=np.float32)  # 4 MiB
    tracemalloc.start()
    try:
        encoded = wire.encode_infer_request(
            "m", "1", "r", None, [("x", "FP32", [1, 1 << 20], None)], [("y", None)], [tensor]
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert pb.ModelInferRequest.FromString(encoded).raw_input_contents[0] == tensor.tobytes()
    assert tensor.nbytes <= peak < 1.5 * tensor.nbytes


# ---------------------------------------------------------------------------- decoding


@settings(max_examples=300)
@given(message=pb_responses())
def test_decode_matches_protobuf(message: Any) -> None:
    blob = message.SerializeToString()
    assert decode_both("decode_infer_response", blob) == ("ok", pb_fields(message))


@settings(max_examples=200)
@given(error=names, message=st.none() | pb_responses(), extra=unknown_fields())
def test_decode_stream_matches_protobuf(error: str, message: Any, extra: bytes) -> None:
    stream = pb.ModelStreamInferResponse(error_message=error)
    if message is not None:
        stream.infer_response.CopyFrom(message)
    blob = stream.SerializeToString() + extra
    expected = (error, None if message is None else pb_fields(message))
    assert decode_both("decode_stream_response", blob) == ("ok", expected)


@settings(max_examples=300)
@given(message=pb_responses(), data=st.data())
def test_truncation_agrees_with_protobuf(message: Any, data: st.DataObject) -> None:
    blob = message.SerializeToString()
    cut = data.draw(st.integers(0, max(len(blob) - 1, 0)))
    kind, value = decode_both("decode_infer_response", blob[:cut])
    try:
        expected = pb.ModelInferResponse.FromString(blob[:cut])
    except DecodeError:
        assert kind == "error"
    else:
        assert (kind, value) == ("ok", pb_fields(expected))


@settings(max_examples=200)
@given(message=pb_responses(), payload=st.binary(max_size=20), excess=st.integers(1, 2**40))
def test_lying_length_is_rejected(message: Any, payload: bytes, excess: int) -> None:
    # raw_output_contents whose declared length runs past the end of the buffer
    blob = message.SerializeToString() + b"\x32" + varint(len(payload) + excess) + payload
    kind, text = decode_both("decode_infer_response", blob)
    assert kind == "error"
    assert f"length {len(payload) + excess} at offset" in text


@settings(max_examples=500)
@given(blob=st.binary(max_size=60))
def test_arbitrary_bytes_decode_or_framing_error(blob: bytes) -> None:
    decode_both("decode_infer_response", blob)
    decode_both("decode_stream_response", blob)


@settings(max_examples=300)
@given(message=pb_responses(), data=st.data())
def test_mutated_bytes_decode_or_framing_error(message: Any, data: st.DataObject) -> None:
    blob = bytearray(message.SerializeToString() + b"\x01")
    blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    decode_both("decode_infer_response", bytes(blob))


def test_unpacked_shape_negative_dims_and_groups(wire: ModuleType) -> None:
    # outputs { shape: 2 (unpacked), shape: [-1, 3] (packed), group 20 { group 21 {} varint } }
    output = (
        b"\x18\x02"
        + b"\x1a"
        + varint(11)
        + varint(2**64 - 1)
        + b"\x03"
        + varint(20 << 3 | 3)
        + varint(21 << 3 | 3)
        + varint(21 << 3 | 4)
        + b"\x08\x05"
        + varint(20 << 3 | 4)
    )
    blob = b"\x2a" + varint(len(output)) + output + b"\x32\x00"
    expected = pb.ModelInferResponse.FromString(blob)
    decoded = wire.decode_infer_response(blob)
    assert fields(decoded) == pb_fields(expected)
    assert decoded.outputs[0][2] == [2, -1, 3]


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"\x0a\x05ab", "length 5 at offset 1 in ModelInferResponse runs past its end"),
        (
            b"\x08" + b"\xff" * 9 + b"\x02",
            "varint at offset 1 in ModelInferResponse does not fit in 64 bits",
        ),
        (b"\x08" + b"\xff" * 11, "does not fit in 64 bits"),
        (b"\x08\xff", "truncated varint at offset 1"),
        (
            b"\x0b\x14",
            "end of group 2 before offset 2 in ModelInferResponse: expected the end of group 1",
        ),
        (b"\x0c", "no group is open"),
        (b"\x00", "expected a field number in"),
        (b"\x0f", "expected a wire type in 0..5, found 7"),
        (b"\x80\x80\x80\x80\x10", "expected a field number in"),
        (b"\x0a\x02\xc3\x28", "string at offset 2 in ModelInferResponse: expected UTF-8"),
        (b"\x2a\x03\x1a\x01\xff", "truncated varint at offset 4 in InferOutputTensor.shape"),
        (b"\x22\x03\x12\x01\x21", "truncated 8-byte value"),
        (b"\x0b" * 101, "nests deeper than 100"),
    ],
)
def test_decode_errors_say_what_and_where(wire: ModuleType, blob: bytes, message: str) -> None:
    with pytest.raises(FramingError, match=message):
        wire.decode_infer_response(blob)


def test_raw_outputs_are_zero_copy_views(wire: ModuleType) -> None:
    tensor = np.arange(128, dtype=np.float32)
    message = pb.ModelInferResponse(model_name="m", raw_output_contents=[tensor.tobytes()])
    message.outputs.add(name="y", datatype="FP32", shape=[1, 128])
    blob = message.SerializeToString()
    for buf in (blob, bytearray(blob), memoryview(blob)):
        (raw,) = wire.decode_infer_response(buf).raw_outputs
        assert raw.obj is (buf.obj if isinstance(buf, memoryview) else buf)
        assert np.array_equal(np.frombuffer(raw, dtype=np.float32), tensor)
