"""fastpath.infer_request: both twins give the same checked request or the same fault."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastpath import infer_request
from fastpath.errors import FramingError
from gateway.tensors import NUMPY_DTYPES
from tests.conftest import loaded_twins, twin_params

TWINS = loaded_twins(infer_request.infer_request_py, infer_request.infer_request_c)
IMPLS = twin_params(infer_request.infer_request_py, infer_request.infer_request_c)


class DataRefused(Exception):
    """What the test's ``encode_data`` raises; it must reach the caller unchanged."""


def encode_data(name: str, datatype: str, shape: list[int], data: Any) -> bytes:
    if data == "refuse":
        raise DataRefused(f"{name} refused")
    return f"{name}|{datatype}|{shape}|{data!r}".encode()


def outcome(impl: ModuleType, header: dict[str, Any], tail: bytes) -> tuple[Any, ...]:
    """("ok", the result with views as bytes) or (the error's type, its message)."""
    try:
        request_id, params, inputs, raws, outputs, binary, per_output = impl.parse_infer_request(
            header, memoryview(tail), encode_data
        )
    except (FramingError, DataRefused) as exc:
        return type(exc).__name__, str(exc)
    raws = [bytes(raw) if isinstance(raw, memoryview) else raw for raw in raws]
    return "ok", request_id, params, inputs, raws, outputs, binary, per_output


def agreed(header: dict[str, Any], tail: bytes = b"") -> tuple[Any, ...]:
    results = [outcome(twin, header, tail) for twin in TWINS]
    assert all(result == results[0] for result in results), results
    return results[0]


good_scalars = st.booleans() | st.integers(0, 9) | st.text(max_size=3) | st.floats(-1, 1)
bad_values = st.none() | st.lists(good_scalars, max_size=1) | st.integers(2**64, 2**65)


@st.composite
def requests(draw: st.DrawFn) -> tuple[dict[str, Any], bytes]:
    """An infer header and a tail: each part well-formed but for a fault now and then
    (one draw in eight), so that every check, and success, is reached."""

    def fault() -> bool:
        return draw(st.integers(0, 7)) == 5  # not 0 nor 7: Hypothesis favours those

    def value() -> Any:
        return draw(bad_values if fault() else good_scalars)

    def parameters(flag: str, size: int | None) -> Any:
        if fault():
            return draw(st.none() | st.integers() | st.lists(st.none(), max_size=1))
        params: dict[str, Any] = {}
        if draw(st.booleans()):
            params["priority"] = value()
        if draw(st.booleans()):
            params[flag] = draw(st.booleans()) if not fault() else value()
        if size is not None:
            params["binary_data_size"] = (
                size if not fault() else draw(st.integers(-1, 2**64) | st.text(max_size=1))
            )
        if fault():
            params[draw(st.sampled_from(["shared_memory_region", "shared_memory_offset"]))] = 0
        return params

    def tensor(name: str, size: int | None, output: bool) -> Any:
        if fault():
            return draw(st.integers() | st.fixed_dictionaries({"name": st.integers()}))
        entry: dict[str, Any] = {"name": name}
        if output:
            if draw(st.booleans()):
                entry["parameters"] = parameters("binary_data", None)
            return entry
        entry["datatype"] = draw(st.sampled_from(["FP32", "BYTES", "BF16", "INT8"]))
        if fault():
            entry["datatype"] = draw(st.sampled_from(["fp32", 5, None]))
        entry["shape"] = draw(st.lists(st.integers(0, 4), max_size=3))
        if fault():
            entry["shape"] = draw(
                st.lists(
                    st.booleans()
                    | st.integers(-2, -1)
                    | st.integers(2**63 - 1, 2**63)
                    | st.floats(),
                    max_size=2,
                )
                | st.text(max_size=1)
            )
        if size is None or fault():
            entry["data"] = draw(st.sampled_from(["refuse", 1, [1.5, 2]]))
        if size is not None or draw(st.booleans()):
            entry["parameters"] = parameters("binary_data", size)
        return entry

    sizes = draw(st.lists(st.integers(0, 3) | st.none(), min_size=0 if fault() else 1, max_size=3))
    header: dict[str, Any] = {
        "inputs": [tensor(name, size, False) for name, size in zip("abc", sizes, strict=False)]
    }
    if fault():
        header["inputs"] = draw(st.integers() | st.text(max_size=1))
    if draw(st.booleans()):
        header["outputs"] = [
            tensor(name, None, True) for name in draw(st.lists(st.sampled_from("op"), max_size=2))
        ]
        if fault():
            header["outputs"] = draw(st.text(max_size=1))
    if draw(st.booleans()):
        header["parameters"] = parameters("binary_data_output", None)
    if draw(st.booleans()):
        header["id"] = draw(st.integers() if fault() else st.text(max_size=2))
    tail = bytes(range(sum(size for size in sizes if size)))
    return header, draw(st.binary(max_size=4)) if fault() else tail


@settings(max_examples=600, deadline=None)
@given(request=requests())
def test_twins_agree_on_any_header(request: tuple[dict[str, Any], bytes]) -> None:
    agreed(*request)


def binary_input(name: str, size: int, **params: Any) -> dict[str, Any]:
    return {
        "name": name,
        "datatype": "FP32",
        "shape": [1, size // 4],
        "parameters": {"binary_data_size": size, **params},
    }


@pytest.mark.parametrize("impl", IMPLS)
def test_binary_inputs_are_views_of_the_tail(impl: ModuleType) -> None:
    tail = memoryview(bytes(range(12)))
    header = {
        "id": "r1",
        "parameters": {"binary_data_output": True, "priority": 2},
        "inputs": [
            binary_input("x", 8),
            {"name": "t", "datatype": "BYTES", "shape": [1], "data": ["s"]},
            binary_input("y", 4),
        ],
        "outputs": [
            {"name": "o", "parameters": {"binary_data": False, "classification": 2}},
            {"name": "p"},
        ],
    }
    request_id, params, inputs, raws, outputs, binary, per_output = impl.parse_infer_request(
        header, tail, encode_data
    )
    assert request_id == "r1"
    assert params == {"priority": 2} and "binary_data_output" in header["parameters"]
    assert inputs == [
        ("x", "FP32", [1, 2], None),
        ("t", "BYTES", [1], None),
        ("y", "FP32", [1, 1], None),
    ]
    assert [bytes(raw) for raw in raws] == [
        bytes(range(8)),
        b"t|BYTES|[1]|['s']",
        bytes(range(8, 12)),
    ]
    assert raws[0].obj is tail.obj  # no copy of the tensor bytes
    assert outputs == [("o", {"classification": 2}), ("p", None)]
    assert binary is True and per_output == {"o": False}


@pytest.mark.parametrize(
    ("header", "tail", "message"),
    [
        ({"inputs": []}, b"", "the request must have a non-empty 'inputs' array"),
        (
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [True], "data": [1]}]},
            b"",
            "input 'x': shape must be a list of non-negative integers, got [True]",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2**63], "data": [1]}]},
            b"",
            f"input 'x': shape must be a list of non-negative integers, got [{2**63}]",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "FP64x", "shape": [1], "data": [1]}]},
            b"",
            "input 'x': unknown datatype 'FP64x'",
        ),
        (
            {"inputs": [binary_input("x", 4, shared_memory_region="r")]},
            b"abcd",
            "'x': shared-memory tensors cannot cross the gateway; send the data",
        ),
        (
            {
                "inputs": [binary_input("x", 4)],
                "outputs": [{"name": "o", "parameters": {"shared_memory_offset": 0}}],
            },
            b"abcd",
            "'o': shared-memory tensors cannot cross the gateway; send the data",
        ),
        (
            {"inputs": [{**binary_input("x", 4), "data": [1]}]},
            b"abcd",
            "input 'x' has both 'data' and binary_data_size",
        ),
        (
            {"inputs": [binary_input("x", 4)]},
            b"abcde",
            "binary data has 1 bytes after the last input (input 0);"
            " expected the sizes to sum to 5, found 4",
        ),
        (
            {"inputs": [binary_input("x", 4)], "parameters": {"p": [1]}},
            b"abcd",
            "request: parameter 'p' must be a string, number or boolean",
        ),
        (
            {"inputs": [binary_input("x", 4, p={})]},
            b"abcd",
            "input 'x': parameter 'p' must be a string, number or boolean",
        ),
        (
            {
                "inputs": [binary_input("x", 4)],
                "outputs": [{"name": "o", "parameters": {"binary_data": 1}}],
            },
            b"abcd",
            "output 'o': binary_data must be true or false, got 1",
        ),
        ({"inputs": [binary_input("x", 4)], "id": 3}, b"abcd", "'id' must be a string"),
    ],
)
def test_faults_are_named(header: dict[str, Any], tail: bytes, message: str) -> None:
    assert agreed(header, tail) == ("FramingError", message)


def test_a_dim_of_int64_max_is_accepted() -> None:
    header = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [0, 2**63 - 1], "data": []}]}
    assert agreed(header)[0] == "ok"


def test_data_encoding_errors_reach_the_caller() -> None:
    header = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": "refuse"}]}
    assert agreed(header) == ("DataRefused", "x refused")


@pytest.mark.parametrize("impl", IMPLS)
def test_datatypes_are_kserves(impl: ModuleType) -> None:
    assert frozenset(NUMPY_DTYPES) | {"BYTES", "BF16"} == impl.DATATYPES


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    ("value", "accepted"),
    [(True, True), (3, True), (0.5, True), ("s", True), (None, False), ([], False)],
)
def test_check_parameter(impl: ModuleType, value: Any, accepted: bool) -> None:
    check: Callable[[str, Any, str], Any] = impl.check_parameter
    if accepted:
        assert check("n", value, "here") is value
    else:
        with pytest.raises(
            FramingError, match=r"^here: parameter 'n' must be a string, number or boolean$"
        ):
            check("n", value, "here")
