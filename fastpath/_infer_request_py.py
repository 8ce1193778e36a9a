"""Pure-Python twin of ``fastpath._infer_request_c``: a KServe v2 ``infer`` request's
JSON header and binary tail checked, before anything is sent to Triton.

Every fault is a ``FramingError`` whose message names it (the gateway answers it as a
400); data given as JSON is encoded by the caller's ``encode_data``, whose own errors
pass through unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastpath._framing_py import slice_binary_inputs
from fastpath.errors import FramingError

# KServe's tensor datatypes (gateway/tensors.py NUMPY_DTYPES, and BYTES and BF16).
DATATYPES = frozenset(
    {
        "BOOL",
        "UINT8",
        "UINT16",
        "UINT32",
        "UINT64",
        "INT8",
        "INT16",
        "INT32",
        "INT64",
        "FP16",
        "FP32",
        "FP64",
        "BYTES",
        "BF16",
    }
)
SHARED_MEMORY_PARAMS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")
# The JSON types a parameter may have, checked by type first (isinstance is the slow way).
_PARAMETER_TYPES = frozenset({bool, int, float, str})
_INT64_MAX = 2**63 - 1

Input = tuple[str, str, list[int], dict[str, Any] | None]
Output = tuple[str, dict[str, Any] | None]
EncodeData = Callable[[str, str, list[int], Any], bytes]
# (request id, request parameters, inputs, one buffer per input, outputs,
#  request-level binary_data_output, each requested output's binary_data flag)
InferRequest = tuple[
    str, dict[str, Any], list[Input], list[Any], list[Output], bool, dict[str, bool]
]


def parse_infer_request(header: dict[str, Any], tail: Any, encode_data: EncodeData) -> InferRequest:
    """Check an infer request's JSON ``header`` against its binary ``tail`` (a buffer):
    binary inputs become zero-copy slices of ``tail``, JSON ``data`` is encoded by
    ``encode_data(name, datatype, shape, data)``."""
    request_params = _params(header.get("parameters"), "request")
    binary_default = _flag(request_params.pop("binary_data_output", False), "binary_data_output")
    inputs_json = header.get("inputs")
    if not isinstance(inputs_json, list) or not inputs_json:
        raise FramingError("the request must have a non-empty 'inputs' array")

    inputs: list[Input] = []
    raws: list[Any] = []
    binary_sizes: list[int] = []
    binary_slots: list[int] = []
    for i, tensor in enumerate(inputs_json):
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise FramingError(f"inputs[{i}] must be an object with a string 'name'")
        name = tensor["name"]
        datatype = _check_datatype(name, tensor.get("datatype"))
        shape = _check_shape(name, tensor.get("shape"))
        params = _params(tensor.get("parameters"), f"input '{name}'")
        _refuse_shared_memory(params, name)
        size = params.pop("binary_data_size", None)
        if size is not None:
            if type(size) is not int or size < 0:
                raise FramingError(
                    f"input '{name}': binary_data_size must be a non-negative integer"
                )
            if "data" in tensor:
                raise FramingError(f"input '{name}' has both 'data' and binary_data_size")
            binary_sizes.append(size)
            binary_slots.append(i)
            raws.append(None)
        elif "data" in tensor:
            # Checked here, not left to Triton: it answers 500 for data that does not
            # match the shape (a client's fault).
            raws.append(encode_data(name, datatype, shape, tensor["data"]))
        else:
            raise FramingError(f"input '{name}' has neither 'data' nor binary_data_size")
        inputs.append((name, datatype, shape, params or None))

    slices = slice_binary_inputs(tail, binary_sizes)
    for slot, piece in zip(binary_slots, slices, strict=True):
        raws[slot] = piece

    outputs, binary_outputs = _requested_outputs(header.get("outputs"))
    request_id = header.get("id", "")
    if not isinstance(request_id, str):
        raise FramingError("'id' must be a string")
    return request_id, request_params, inputs, raws, outputs, binary_default, binary_outputs


def check_parameter(name: str, value: Any, where: str) -> Any:
    """``value`` if a KServe parameter may have it (a string, number or boolean)."""
    if isinstance(value, bool | int | float | str):
        return value
    raise FramingError(f"{where}: parameter '{name}' must be a string, number or boolean")


def _check_datatype(name: str, datatype: Any) -> str:
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise FramingError(f"input '{name}': unknown datatype {datatype!r}")
    return str(datatype)


def _check_shape(name: str, shape: Any) -> list[int]:
    """A list of non-negative int64 dims, or a fault naming the input."""
    if isinstance(shape, list):
        for dim in shape:  # a loop, not all() over a generator: this runs per request
            if type(dim) is not int or not 0 <= dim <= _INT64_MAX:
                break
        else:
            return shape
    raise FramingError(
        f"input '{name}': shape must be a list of non-negative integers, got {shape!r}"
    )


def _requested_outputs(outputs_json: Any) -> tuple[list[Output], dict[str, bool]]:
    if outputs_json is None:
        return [], {}
    if not isinstance(outputs_json, list):
        raise FramingError("'outputs' must be an array")
    outputs: list[Output] = []
    binary: dict[str, bool] = {}
    for i, tensor in enumerate(outputs_json):
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise FramingError(f"outputs[{i}] must be an object with a string 'name'")
        name = tensor["name"]
        params = _params(tensor.get("parameters"), f"output '{name}'")
        _refuse_shared_memory(params, name)
        if "binary_data" in params:
            binary[name] = _flag(params.pop("binary_data"), f"output '{name}': binary_data")
        outputs.append((name, params or None))
    return outputs, binary


def _flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise FramingError(f"{what} must be true or false, got {value!r}")
    return value


def _params(value: Any, where: str) -> dict[str, Any]:
    """A copy of a ``parameters`` object (the caller pops what it reads)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise FramingError(f"{where}: 'parameters' must be an object")
    for name, item in value.items():  # a loop, not a comprehension: this runs per request
        if type(item) not in _PARAMETER_TYPES:
            check_parameter(name, item, where)
    return value.copy()


def _refuse_shared_memory(params: dict[str, Any], name: str) -> None:
    if not params.keys().isdisjoint(SHARED_MEMORY_PARAMS):
        raise FramingError(
            f"'{name}': shared-memory tensors cannot cross the gateway; send the data"
        )
