"""Tensor values between KServe JSON and Triton's raw little-endian contents."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from fastpath import framing

from .errors import BadRequest

# KServe datatype -> little-endian numpy dtype (BF16 has no numpy type: binary only).
NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(code)
    for name, code in {
        "BOOL": "?",
        "UINT8": "u1",
        "UINT16": "<u2",
        "UINT32": "<u4",
        "UINT64": "<u8",
        "INT8": "i1",
        "INT16": "<i2",
        "INT32": "<i4",
        "INT64": "<i8",
        "FP16": "<f2",
        "FP32": "<f4",
        "FP64": "<f8",
    }.items()
}


def json_to_raw(name: str, datatype: str, shape: Sequence[int], data: Any) -> bytes:
    """Encode a JSON ``data`` array (flat or nested) as Triton raw contents."""
    count = math.prod(shape)
    if datatype == "BYTES":
        items = _flatten(data)
        if not all(isinstance(x, str) for x in items):
            raise BadRequest(f"input '{name}': BYTES data must be strings")
        values: list[str | bytes] = items
        if len(values) != count:
            raise _count_error(name, shape, count, len(values))
        return framing.serialize_bytes_tensor(values)
    dtype = NUMPY_DTYPES.get(datatype)
    if dtype is None:
        raise BadRequest(f"input '{name}': datatype {datatype} is only supported as binary data")
    try:
        array = np.asarray(data, dtype=dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        raise BadRequest(f"input '{name}': data does not fit datatype {datatype}: {exc}") from None
    if array.size != count:
        raise _count_error(name, shape, count, array.size)
    return array.tobytes()


def raw_to_json(datatype: str, raw: memoryview) -> list[Any]:
    """Decode Triton raw contents to a flat JSON-able list (as Triton's HTTP API does)."""
    if datatype == "BYTES":
        return [b.decode("utf-8", "replace") for b in framing.deserialize_bytes_tensor(raw)]
    dtype = NUMPY_DTYPES.get(datatype)
    if dtype is None:
        raise BadRequest(f"output datatype {datatype} can only be returned as binary data")
    values: list[Any] = np.frombuffer(raw, dtype=dtype).tolist()
    return values


def scalar_to_raw(name: str, datatype: str, value: Any) -> tuple[list[int], bytes]:
    """A JSON scalar or flat list as a 1-D tensor of the given datatype (generate API)."""
    values = value if isinstance(value, list) else [value]
    shape = [len(values)]
    return shape, json_to_raw(name, datatype, shape, values)


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _count_error(name: str, shape: Sequence[int], expected: int, got: int) -> BadRequest:
    return BadRequest(
        f"input '{name}': shape {list(shape)} needs {expected} elements, data has {got}"
    )
