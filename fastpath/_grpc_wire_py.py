"""Pure-Python twin of ``fastpath._grpc_wire_c``: Triton gRPC messages as protobuf wire bytes.

Field numbers follow Triton's ``grpc_service.proto`` (``tritonclient.grpc.service_pb2``).
Both twins return the same values and raise ``FramingError`` with the same messages.
"""

from collections.abc import Mapping, Sequence
from struct import Struct

from fastpath.errors import FramingError

Buffer = bytes | bytearray | memoryview
ParamValue = bool | int | float | str
Params = Mapping[str, ParamValue]
# A decoded InferParameter with no value set (valid protobuf, never sent by Triton) is None.
DecodedParams = dict[str, ParamValue | None]

_VARINT, _I64, _LEN, _START_GROUP, _END_GROUP, _I32 = 0, 1, 2, 3, 4, 5
_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
_UINT64_MAX = (1 << 64) - 1
_TAG_MAX = (1 << 32) - 1
_MAX_GROUP_DEPTH = 100
_DOUBLE = Struct("<d")

# Field numbers of the messages this module reads and writes.
_REQ_MODEL_NAME, _REQ_MODEL_VERSION, _REQ_ID, _REQ_PARAMETERS = 1, 2, 3, 4
_REQ_INPUTS, _REQ_OUTPUTS, _REQ_RAW_INPUT_CONTENTS = 5, 6, 7
_TENSOR_NAME, _TENSOR_DATATYPE, _TENSOR_SHAPE, _TENSOR_PARAMETERS = 1, 2, 3, 4
_REQUESTED_OUTPUT_NAME, _REQUESTED_OUTPUT_PARAMETERS = 1, 2
_RESP_MODEL_NAME, _RESP_MODEL_VERSION, _RESP_ID, _RESP_PARAMETERS = 1, 2, 3, 4
_RESP_OUTPUTS, _RESP_RAW_OUTPUT_CONTENTS = 5, 6
_STREAM_ERROR_MESSAGE, _STREAM_INFER_RESPONSE = 1, 2
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_PARAM_BOOL, _PARAM_INT64, _PARAM_STRING, _PARAM_DOUBLE, _PARAM_UINT64 = 1, 2, 3, 4, 5


class InferResponse:
    """A decoded ModelInferResponse; ``raw_outputs`` are zero-copy views of the input buffer."""

    __slots__ = ("id", "model_name", "model_version", "outputs", "parameters", "raw_outputs")

    def __init__(self) -> None:
        self.model_name = ""
        self.model_version = ""
        self.id = ""
        self.parameters: DecodedParams = {}
        # (name, datatype, shape, parameters) per output tensor, in wire order.
        self.outputs: list[tuple[str, str, list[int], DecodedParams]] = []
        self.raw_outputs: list[memoryview] = []


# ---------------------------------------------------------------------------- encoding


def _put_varint(out: bytearray, value: int) -> None:
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _put_key(out: bytearray, field: int, wire_type: int) -> None:
    _put_varint(out, (field << 3) | wire_type)


def _put_len(out: bytearray, field: int, payload: Buffer) -> None:
    _put_key(out, field, _LEN)
    _put_varint(out, len(payload))
    out += payload


def _utf8(value: object, where: str) -> bytes:
    if not isinstance(value, str):
        raise FramingError(f"{where} must be str, found {type(value).__name__}")
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise FramingError(
            f"{where} is not encodable as UTF-8: {exc.reason} at character {exc.start}"
        ) from None


def _put_string(out: bytearray, field: int, value: object, where: str) -> None:
    data = _utf8(value, where)
    # proto3 leaves empty strings out; the parser reads them back as "".
    if data:
        _put_len(out, field, data)


def _param_value(value: object, where: str) -> bytearray:
    out = bytearray()
    # A oneof member is written even when it holds its default, so the choice survives.
    if value is True or value is False:
        _put_key(out, _PARAM_BOOL, _VARINT)
        _put_varint(out, int(value))
    elif isinstance(value, int):
        if _INT64_MIN <= value <= _INT64_MAX:
            _put_key(out, _PARAM_INT64, _VARINT)
            _put_varint(out, value & _UINT64_MAX)
        elif _INT64_MAX < value <= _UINT64_MAX:
            _put_key(out, _PARAM_UINT64, _VARINT)
            _put_varint(out, value)
        else:
            raise FramingError(f"{where} must fit in int64 or uint64, found {value}")
    elif isinstance(value, float):
        _put_key(out, _PARAM_DOUBLE, _I64)
        out += _DOUBLE.pack(value)
    elif isinstance(value, str):
        _put_len(out, _PARAM_STRING, _utf8(value, where))
    else:
        raise FramingError(f"{where} must be bool, int, float or str, found {type(value).__name__}")
    return out


def _put_params(out: bytearray, field: int, params: Params | None, where: str) -> None:
    if not params:
        return
    for key, value in params.items():
        entry = bytearray()
        _put_string(entry, _ENTRY_KEY, key, f"{where} key")
        _put_len(entry, _ENTRY_VALUE, _param_value(value, f"{where}[{key!r}]"))
        _put_len(out, field, entry)


def _put_shape(out: bytearray, shape: Sequence[int], where: str) -> None:
    packed = bytearray()
    for index, dim in enumerate(shape):
        if not isinstance(dim, int) or not _INT64_MIN <= dim <= _INT64_MAX:
            raise FramingError(f"{where}[{index}] must be an int64, found {dim!r}")
        _put_varint(packed, dim & _UINT64_MAX)
    if packed:
        _put_len(out, _TENSOR_SHAPE, packed)


def encode_infer_request(
    model_name: str,
    model_version: str,
    request_id: str,
    parameters: Params | None,
    inputs: Sequence[tuple[str, str, Sequence[int], Params | None]],
    outputs: Sequence[tuple[str, Params | None]],
    raw_inputs: Sequence[Buffer],
) -> bytes:
    """ModelInferRequest wire bytes; each raw input is copied once, into the result."""
    if len(raw_inputs) != len(inputs):
        raise FramingError(
            f"expected one raw input buffer per input ({len(inputs)}), found {len(raw_inputs)}"
        )
    head = bytearray()
    _put_string(head, _REQ_MODEL_NAME, model_name, "model_name")
    _put_string(head, _REQ_MODEL_VERSION, model_version, "model_version")
    _put_string(head, _REQ_ID, request_id, "id")
    _put_params(head, _REQ_PARAMETERS, parameters, "parameters")
    for index, (name, datatype, shape, params) in enumerate(inputs):
        tensor = bytearray()
        _put_string(tensor, _TENSOR_NAME, name, f"inputs[{index}].name")
        _put_string(tensor, _TENSOR_DATATYPE, datatype, f"inputs[{index}].datatype")
        _put_shape(tensor, shape, f"inputs[{index}].shape")
        _put_params(tensor, _TENSOR_PARAMETERS, params, f"inputs[{index}].parameters")
        _put_len(head, _REQ_INPUTS, tensor)
    for index, (name, params) in enumerate(outputs):
        tensor = bytearray()
        _put_string(tensor, _REQUESTED_OUTPUT_NAME, name, f"outputs[{index}].name")
        _put_params(tensor, _REQUESTED_OUTPUT_PARAMETERS, params, f"outputs[{index}].parameters")
        _put_len(head, _REQ_OUTPUTS, tensor)
    parts: list[Buffer] = [head]
    for raw in raw_inputs:
        view = memoryview(raw)
        prefix = bytearray()
        _put_key(prefix, _REQ_RAW_INPUT_CONTENTS, _LEN)
        _put_varint(prefix, view.nbytes)
        parts.append(prefix)
        parts.append(view)
    # bytes.join sizes the result first and copies each tensor into it exactly once.
    return b"".join(parts)


# ---------------------------------------------------------------------------- decoding
# Readers take (data, pos, end, what): ``end`` bounds the enclosing message and ``what``
# names it for error messages. They return the new position (and the value read).


def _byte_view(buf: Buffer) -> memoryview:
    view = memoryview(buf)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def _read_varint(data: memoryview, pos: int, end: int, what: str) -> tuple[int, int]:
    start = pos
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise FramingError(
                f"truncated varint at offset {start} in {what}, which ends at offset {end}"
            )
        byte = data[pos]
        pos += 1
        if shift == 63 and byte > 1:
            raise FramingError(f"varint at offset {start} in {what} does not fit in 64 bits")
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _read_tag(data: memoryview, pos: int, end: int, what: str) -> tuple[int, int, int]:
    """(field number, wire type, new position) of the field key at ``pos``."""
    tag, after = _read_varint(data, pos, end, what)
    if tag > _TAG_MAX or tag >> 3 == 0:
        raise FramingError(
            f"field key at offset {pos} in {what}: expected a field number in"
            f" [1, 2**29), found {tag >> 3}"
        )
    wire_type = tag & 7
    if wire_type > _I32:
        raise FramingError(
            f"field {tag >> 3} at offset {pos} in {what}: expected a wire type in"
            f" 0..5, found {wire_type}"
        )
    return tag >> 3, wire_type, after


def _read_len(data: memoryview, pos: int, end: int, what: str) -> tuple[int, int]:
    """(payload start, payload end) of the length-delimited field whose length is at ``pos``."""
    length, start = _read_varint(data, pos, end, what)
    if length > end - start:
        raise FramingError(
            f"length {length} at offset {pos} in {what} runs past its end:"
            f" only {end - start} bytes remain"
        )
    return start, start + length


def _read_fixed(pos: int, size: int, end: int, what: str) -> int:
    if size > end - pos:
        raise FramingError(
            f"truncated {size}-byte value at offset {pos} in {what}: only {end - pos} bytes remain"
        )
    return pos + size


def _skip(
    data: memoryview, pos: int, end: int, field: int, wire_type: int, what: str, depth: int
) -> int:
    """Position after the value of an unknown (or mistyped) field whose key ended at ``pos``."""
    if wire_type == _VARINT:
        return _read_varint(data, pos, end, what)[1]
    if wire_type == _I64:
        return _read_fixed(pos, 8, end, what)
    if wire_type == _LEN:
        return _read_len(data, pos, end, what)[1]
    if wire_type == _I32:
        return _read_fixed(pos, 4, end, what)
    if wire_type == _END_GROUP:
        raise FramingError(f"end of group {field} before offset {pos} in {what}: no group is open")
    if depth >= _MAX_GROUP_DEPTH:
        raise FramingError(
            f"group {field} before offset {pos} in {what} nests deeper than {_MAX_GROUP_DEPTH}"
        )
    while True:
        inner, inner_type, pos = _read_tag(data, pos, end, what)
        if inner_type == _END_GROUP:
            if inner != field:
                raise FramingError(
                    f"end of group {inner} before offset {pos} in {what}:"
                    f" expected the end of group {field}"
                )
            return pos
        pos = _skip(data, pos, end, inner, inner_type, what, depth + 1)


def _read_string(data: memoryview, start: int, stop: int, what: str) -> str:
    try:
        return str(data[start:stop], "utf-8")
    except UnicodeDecodeError as exc:
        raise FramingError(
            f"string at offset {start} in {what}: expected UTF-8, found invalid byte"
            f" at offset {start + exc.start}"
        ) from None


def _read_param_value(data: memoryview, pos: int, end: int) -> ParamValue | None:
    what = "InferParameter"
    value: ParamValue | None = None
    while pos < end:
        field, wire_type, pos = _read_tag(data, pos, end, what)
        if field in (_PARAM_BOOL, _PARAM_INT64, _PARAM_UINT64) and wire_type == _VARINT:
            number, pos = _read_varint(data, pos, end, what)
            if field == _PARAM_BOOL:
                value = number != 0
            elif field == _PARAM_INT64:
                value = number - (1 << 64) if number > _INT64_MAX else number
            else:
                value = number
        elif field == _PARAM_STRING and wire_type == _LEN:
            start, pos = _read_len(data, pos, end, what)
            value = _read_string(data, start, pos, what)
        elif field == _PARAM_DOUBLE and wire_type == _I64:
            start, pos = pos, _read_fixed(pos, 8, end, what)
            (value,) = _DOUBLE.unpack_from(data, start)
        else:
            pos = _skip(data, pos, end, field, wire_type, what, 0)
    return value


def _read_params_entry(data: memoryview, pos: int, end: int, params: DecodedParams) -> None:
    what = "parameters entry"
    key = ""
    value: ParamValue | None = None
    while pos < end:
        field, wire_type, pos = _read_tag(data, pos, end, what)
        if field == _ENTRY_KEY and wire_type == _LEN:
            start, pos = _read_len(data, pos, end, what)
            key = _read_string(data, start, pos, what)
        elif field == _ENTRY_VALUE and wire_type == _LEN:
            start, pos = _read_len(data, pos, end, what)
            # A repeated value field merges into the previous one: a set member replaces it.
            merged = _read_param_value(data, start, pos)
            if merged is not None:
                value = merged
        else:
            pos = _skip(data, pos, end, field, wire_type, what, 0)
    params[key] = value


def _read_output(data: memoryview, pos: int, end: int) -> tuple[str, str, list[int], DecodedParams]:
    what = "InferOutputTensor"
    name = ""
    datatype = ""
    shape: list[int] = []
    params: DecodedParams = {}
    while pos < end:
        field, wire_type, pos = _read_tag(data, pos, end, what)
        if field == _TENSOR_NAME and wire_type == _LEN:
            start, pos = _read_len(data, pos, end, what)
            name = _read_string(data, start, pos, what)
        elif field == _TENSOR_DATATYPE and wire_type == _LEN:
            start, pos = _read_len(data, pos, end, what)
            datatype = _read_string(data, start, pos, what)
        elif field == _TENSOR_SHAPE and wire_type == _LEN:
            start, pos = _read_len(data, pos, end, what)
            while start < pos:
                dim, start = _read_varint(data, start, pos, "InferOutputTensor.shape")
                shape.append(dim - (1 << 64) if dim > _INT64_MAX else dim)
        elif field == _TENSOR_SHAPE and wire_type == _VARINT:
            dim, pos = _read_varint(data, pos, end, what)
            shape.append(dim - (1 << 64) if dim > _INT64_MAX else dim)
        elif field == _TENSOR_PARAMETERS and wire_type == _LEN:
            start, pos = _read_len(data, pos, end, what)
            _read_params_entry(data, start, pos, params)
        else:
            # Typed ``contents`` (field 5) is skipped too: Triton answers with raw contents.
            pos = _skip(data, pos, end, field, wire_type, what, 0)
    return name, datatype, shape, params


def _read_response(
    data: memoryview, pos: int, end: int, response: InferResponse, what: str
) -> None:
    """Merge the ModelInferResponse fields in [pos, end) into ``response``."""
    while pos < end:
        field, wire_type, pos = _read_tag(data, pos, end, what)
        if wire_type == _LEN and field in (_RESP_MODEL_NAME, _RESP_MODEL_VERSION, _RESP_ID):
            start, pos = _read_len(data, pos, end, what)
            text = _read_string(data, start, pos, what)
            if field == _RESP_MODEL_NAME:
                response.model_name = text
            elif field == _RESP_MODEL_VERSION:
                response.model_version = text
            else:
                response.id = text
        elif field == _RESP_PARAMETERS and wire_type == _LEN:
            start, pos = _read_len(data, pos, end, what)
            _read_params_entry(data, start, pos, response.parameters)
        elif field == _RESP_OUTPUTS and wire_type == _LEN:
            start, pos = _read_len(data, pos, end, what)
            response.outputs.append(_read_output(data, start, pos))
        elif field == _RESP_RAW_OUTPUT_CONTENTS and wire_type == _LEN:
            start, pos = _read_len(data, pos, end, what)
            response.raw_outputs.append(data[start:pos])
        else:
            pos = _skip(data, pos, end, field, wire_type, what, 0)


def decode_infer_response(buf: Buffer) -> InferResponse:
    """Parse ModelInferResponse wire bytes; unknown fields of every wire type are skipped."""
    data = _byte_view(buf)
    response = InferResponse()
    _read_response(data, 0, len(data), response, "ModelInferResponse")
    return response


def decode_stream_response(buf: Buffer) -> tuple[str, InferResponse | None]:
    """Parse ModelStreamInferResponse wire bytes into (error_message, response or None)."""
    data = _byte_view(buf)
    what = "ModelStreamInferResponse"
    end = len(data)
    pos = 0
    error_message = ""
    response: InferResponse | None = None
    while pos < end:
        field, wire_type, pos = _read_tag(data, pos, end, what)
        if field == _STREAM_ERROR_MESSAGE and wire_type == _LEN:
            start, pos = _read_len(data, pos, end, what)
            error_message = _read_string(data, start, pos, what)
        elif field == _STREAM_INFER_RESPONSE and wire_type == _LEN:
            start, pos = _read_len(data, pos, end, what)
            # A repeated singular message field merges into the earlier one (protobuf rule).
            if response is None:
                response = InferResponse()
            _read_response(data, start, pos, response, "ModelInferResponse")
        else:
            pos = _skip(data, pos, end, field, wire_type, what, 0)
    return error_message, response
