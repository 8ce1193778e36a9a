# cython: language_level=3
"""Compiled twin of ``fastpath._grpc_wire_py``: same functions, results and error messages.

Encoding writes the message head into one growing scratch buffer (a length prefix is
reserved as one byte and widened only for payloads of 128 bytes or more), then copies
head and raw tensors into one pre-sized bytes object. Decoding walks a pointer with a
bound per enclosing message and slices raw contents out of the input as memoryviews.
"""

from cpython.buffer cimport (
    PyBUF_SIMPLE,
    PyBuffer_FillInfo,
    PyBuffer_Release,
    PyObject_GetBuffer,
)
from cpython.bool cimport PyBool_Check
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.float cimport PyFloat_Check
from cpython.long cimport PyLong_Check
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.exc cimport PyErr_Clear
from cpython.unicode cimport PyUnicode_Check, PyUnicode_DecodeUTF8
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcpy, memmove

from fastpath.errors import FramingError

cdef enum:
    _VARINT = 0
    _I64 = 1
    _LEN = 2
    _START_GROUP = 3
    _END_GROUP = 4
    _I32 = 5
    _MAX_GROUP_DEPTH = 100

cdef uint64_t _TAG_MAX = 0xFFFFFFFF
# Python ints: range checks on arbitrary ints must not overflow a C type.
cdef object _INT64_MIN = -(1 << 63)
cdef object _INT64_MAX = (1 << 63) - 1
cdef object _UINT64_MAX = (1 << 64) - 1


cdef int _acquire(object obj, Py_buffer* view) except -1:
    """Point ``view`` at the bytes of ``obj``; pair every call with PyBuffer_Release."""
    if PyBytes_CheckExact(obj):
        # Fast path: fill the view straight from the bytes object, no type dispatch.
        return PyBuffer_FillInfo(
            view, obj, PyBytes_AS_STRING(obj), PyBytes_GET_SIZE(obj), 1, PyBUF_SIMPLE
        )
    return PyObject_GetBuffer(obj, view, PyBUF_SIMPLE)


cdef class InferResponse:
    """A decoded ModelInferResponse; ``raw_outputs`` are zero-copy views of the input buffer."""

    cdef readonly str model_name
    cdef readonly str model_version
    cdef readonly str id
    cdef readonly dict parameters
    # (name, datatype, shape, parameters) per output tensor, in wire order.
    cdef readonly list outputs
    cdef readonly list raw_outputs

    def __cinit__(self):
        self.model_name = ""
        self.model_version = ""
        self.id = ""
        self.parameters = {}
        self.outputs = []
        self.raw_outputs = []


# ---------------------------------------------------------------------------- encoding

cdef struct _Writer:
    unsigned char* buf
    Py_ssize_t pos
    Py_ssize_t cap


cdef int _reserve(_Writer* w, Py_ssize_t extra) except -1:
    if w.pos + extra <= w.cap:
        return 0
    cdef Py_ssize_t cap = w.cap * 2
    while cap < w.pos + extra:
        cap *= 2
    cdef unsigned char* grown = <unsigned char*>PyMem_Realloc(w.buf, cap)
    if grown == NULL:
        raise MemoryError()
    w.buf = grown
    w.cap = cap
    return 0


cdef inline int _varint_size(uint64_t value) noexcept:
    cdef int size = 1
    while value > 0x7F:
        value >>= 7
        size += 1
    return size


cdef inline unsigned char* _write_varint(unsigned char* out, uint64_t value) noexcept:
    while value > 0x7F:
        out[0] = <unsigned char>((value & 0x7F) | 0x80)
        out += 1
        value >>= 7
    out[0] = <unsigned char>value
    return out + 1


cdef int _put_varint(_Writer* w, uint64_t value) except -1:
    _reserve(w, 10)
    w.pos = _write_varint(w.buf + w.pos, value) - w.buf
    return 0


cdef int _put_bytes(_Writer* w, const void* data, Py_ssize_t length) except -1:
    _reserve(w, length)
    memcpy(w.buf + w.pos, data, length)
    w.pos += length
    return 0


cdef Py_ssize_t _open_len(_Writer* w, int field) except -1:
    """Write the key of a length-delimited field and reserve one byte for its length."""
    _put_varint(w, (field << 3) | _LEN)
    _reserve(w, 1)
    w.pos += 1
    return w.pos


cdef int _close_len(_Writer* w, Py_ssize_t start) except -1:
    """Write the length of the payload written since ``start``, widening the prefix if needed."""
    cdef Py_ssize_t length = w.pos - start
    cdef int extra = _varint_size(length) - 1
    if extra:
        _reserve(w, extra)
        memmove(w.buf + start + extra, w.buf + start, length)
        w.pos += extra
    _write_varint(w.buf + start - 1, length)
    return 0


cdef extern from "Python.h":
    # Declared without an exception clause: _utf8 handles a NULL result itself.
    const char* _utf8_or_null "PyUnicode_AsUTF8AndSize"(object text, Py_ssize_t* length)


cdef inline const char* _utf8(object value, Py_ssize_t* length) noexcept:
    """UTF-8 of a str without copying, or NULL (no exception) if ``value`` has none."""
    if not PyUnicode_Check(value):
        return NULL
    # CPython caches the UTF-8 form on the str (ASCII strs are already UTF-8).
    cdef const char* data = _utf8_or_null(value, length)
    if data == NULL:
        PyErr_Clear()
    return data


cdef object _string_error(object value, str where):
    """The FramingError for a value _utf8 refused; only built on the error path."""
    if not PyUnicode_Check(value):
        return FramingError(f"{where} must be str, found {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return FramingError(
            f"{where} is not encodable as UTF-8: {exc.reason} at character {exc.start}"
        )


cdef int _put_string(_Writer* w, int field, object value) except -2:
    """Returns -1 if ``value`` is not an encodable str: the caller names it in the error."""
    cdef Py_ssize_t length
    cdef const char* data = _utf8(value, &length)
    if data == NULL:
        return -1
    # proto3 leaves empty strings out; the parser reads them back as "".
    if length:
        _put_varint(w, (field << 3) | _LEN)
        _put_varint(w, length)
        _put_bytes(w, data, length)
    return 0


cdef int _put_param_value(_Writer* w, object value) except -2:
    """Returns -1 if ``value`` cannot be an InferParameter: the caller names it in the error."""
    cdef Py_ssize_t length
    cdef const char* data
    cdef double number
    cdef uint64_t bits
    cdef int shift
    # A oneof member is written even when it holds its default, so the choice survives.
    if PyBool_Check(value):
        _put_varint(w, (1 << 3) | _VARINT)
        _put_varint(w, 1 if value is True else 0)
    elif PyLong_Check(value):
        if _INT64_MIN <= value <= _INT64_MAX:
            _put_varint(w, (2 << 3) | _VARINT)
            _put_varint(w, <uint64_t><int64_t>value)
        elif _INT64_MAX < value <= _UINT64_MAX:
            _put_varint(w, (5 << 3) | _VARINT)
            _put_varint(w, <uint64_t>value)
        else:
            return -1
    elif PyFloat_Check(value):
        number = value
        memcpy(&bits, &number, 8)
        _put_varint(w, (4 << 3) | _I64)
        _reserve(w, 8)
        for shift in range(0, 64, 8):
            w.buf[w.pos] = <unsigned char>(bits >> shift)
            w.pos += 1
    elif PyUnicode_Check(value):
        data = _utf8(value, &length)
        if data == NULL:
            return -1
        _put_varint(w, (3 << 3) | _LEN)
        _put_varint(w, length)
        _put_bytes(w, data, length)
    else:
        return -1
    return 0


cdef object _param_error(object value, str where):
    """The FramingError for a value _put_param_value refused."""
    if PyUnicode_Check(value):
        return _string_error(value, where)
    if PyLong_Check(value):
        return FramingError(f"{where} must fit in int64 or uint64, found {value}")
    return FramingError(
        f"{where} must be bool, int, float or str, found {type(value).__name__}"
    )


cdef int _put_params(_Writer* w, int field, object params, str where) except -1:
    cdef Py_ssize_t entry, param
    for key, value in params.items():
        entry = _open_len(w, field)
        if _put_string(w, 1, key) < 0:
            raise _string_error(key, f"{where} key")
        param = _open_len(w, 2)
        if _put_param_value(w, value) < 0:
            raise _param_error(value, f"{where}[{key!r}]")
        _close_len(w, param)
        _close_len(w, entry)
    return 0


cdef int _put_shape(_Writer* w, object shape, Py_ssize_t input_index) except -1:
    cdef Py_ssize_t start = -1
    cdef Py_ssize_t index = 0
    for dim in shape:
        if not PyLong_Check(dim) or not _INT64_MIN <= dim <= _INT64_MAX:
            raise FramingError(
                f"inputs[{input_index}].shape[{index}] must be an int64, found {dim!r}"
            )
        if start < 0:
            start = _open_len(w, 3)
        _put_varint(w, <uint64_t><int64_t>dim)
        index += 1
    if start >= 0:
        _close_len(w, start)
    return 0


cdef int _put_head(
    _Writer* w, model_name, model_version, request_id, parameters, inputs, outputs
) except -1:
    cdef Py_ssize_t index = 0
    cdef Py_ssize_t tensor
    if _put_string(w, 1, model_name) < 0:
        raise _string_error(model_name, "model_name")
    if _put_string(w, 2, model_version) < 0:
        raise _string_error(model_version, "model_version")
    if _put_string(w, 3, request_id) < 0:
        raise _string_error(request_id, "id")
    if parameters:
        _put_params(w, 4, parameters, "parameters")
    for name, datatype, shape, params in inputs:
        tensor = _open_len(w, 5)
        if _put_string(w, 1, name) < 0:
            raise _string_error(name, f"inputs[{index}].name")
        if _put_string(w, 2, datatype) < 0:
            raise _string_error(datatype, f"inputs[{index}].datatype")
        _put_shape(w, shape, index)
        if params:
            _put_params(w, 4, params, f"inputs[{index}].parameters")
        _close_len(w, tensor)
        index += 1
    index = 0
    for name, params in outputs:
        tensor = _open_len(w, 6)
        if _put_string(w, 1, name) < 0:
            raise _string_error(name, f"outputs[{index}].name")
        if params:
            _put_params(w, 2, params, f"outputs[{index}].parameters")
        _close_len(w, tensor)
        index += 1
    return 0


def encode_infer_request(
    model_name, model_version, request_id, parameters, inputs, outputs, raw_inputs
):
    """ModelInferRequest wire bytes; each raw input is copied once, into the result."""
    if len(raw_inputs) != len(inputs):
        raise FramingError(
            f"expected one raw input buffer per input ({len(inputs)}), found {len(raw_inputs)}"
        )
    cdef _Writer head
    cdef Py_ssize_t count = len(raw_inputs)
    cdef Py_ssize_t acquired = 0, total, index
    cdef Py_buffer* views = NULL
    cdef bytes result
    cdef unsigned char* out
    head.pos = 0
    head.cap = 256
    head.buf = <unsigned char*>PyMem_Malloc(head.cap)
    if head.buf == NULL:
        raise MemoryError()
    try:
        _put_head(&head, model_name, model_version, request_id, parameters, inputs, outputs)
        views = <Py_buffer*>PyMem_Malloc(count * sizeof(Py_buffer) + 1)
        if views == NULL:
            raise MemoryError()
        total = head.pos
        for index in range(count):
            _acquire(raw_inputs[index], &views[index])
            acquired += 1
            total += 1 + _varint_size(views[index].len) + views[index].len
        result = PyBytes_FromStringAndSize(NULL, total)
        out = <unsigned char*>PyBytes_AS_STRING(result)
        memcpy(out, head.buf, head.pos)
        out += head.pos
        for index in range(count):
            out[0] = (7 << 3) | _LEN
            out = _write_varint(out + 1, views[index].len)
            memcpy(out, views[index].buf, views[index].len)
            out += views[index].len
    finally:
        for index in range(acquired):
            PyBuffer_Release(&views[index])
        PyMem_Free(views)
        PyMem_Free(head.buf)
    return result


# ---------------------------------------------------------------------------- decoding
# Readers move ``r.pos`` forward; ``end`` bounds the enclosing message and ``what`` names
# it for error messages.

cdef struct _Reader:
    const unsigned char* buf
    Py_ssize_t pos


cdef int _read_varint(_Reader* r, Py_ssize_t end, uint64_t* out, str what) except -1:
    cdef Py_ssize_t start = r.pos
    cdef uint64_t result = 0
    cdef int shift = 0
    cdef unsigned char byte
    while True:
        if r.pos >= end:
            raise FramingError(
                f"truncated varint at offset {start} in {what}, which ends at offset {end}"
            )
        byte = r.buf[r.pos]
        r.pos += 1
        if shift == 63 and byte > 1:
            raise FramingError(f"varint at offset {start} in {what} does not fit in 64 bits")
        result |= <uint64_t>(byte & 0x7F) << shift
        if byte < 0x80:
            out[0] = result
            return 0
        shift += 7


cdef inline int64_t _signed(uint64_t value) noexcept:
    return <int64_t>value


cdef int _read_tag(_Reader* r, Py_ssize_t end, uint64_t* field, int* wire_type, str what) except -1:
    cdef Py_ssize_t start = r.pos
    cdef uint64_t tag
    _read_varint(r, end, &tag, what)
    if tag > _TAG_MAX or tag >> 3 == 0:
        raise FramingError(
            f"field key at offset {start} in {what}: expected a field number in"
            f" [1, 2**29), found {tag >> 3}"
        )
    wire_type[0] = tag & 7
    if wire_type[0] > _I32:
        raise FramingError(
            f"field {tag >> 3} at offset {start} in {what}: expected a wire type in"
            f" 0..5, found {wire_type[0]}"
        )
    field[0] = tag >> 3
    return 0


cdef Py_ssize_t _read_len(_Reader* r, Py_ssize_t end, str what) except -1:
    """Payload start of the length-delimited field whose length is at ``r.pos``; moves past it."""
    cdef Py_ssize_t at = r.pos
    cdef uint64_t length
    _read_varint(r, end, &length, what)
    if length > <uint64_t>(end - r.pos):
        raise FramingError(
            f"length {length} at offset {at} in {what} runs past its end:"
            f" only {end - r.pos} bytes remain"
        )
    r.pos += <Py_ssize_t>length
    return r.pos - <Py_ssize_t>length


cdef int _read_fixed(_Reader* r, Py_ssize_t size, Py_ssize_t end, str what) except -1:
    if size > end - r.pos:
        raise FramingError(
            f"truncated {size}-byte value at offset {r.pos} in {what}:"
            f" only {end - r.pos} bytes remain"
        )
    r.pos += size
    return 0


cdef int _skip(
    _Reader* r, Py_ssize_t end, uint64_t field, int wire_type, str what, int depth
) except -1:
    """Move past the value of an unknown (or mistyped) field whose key ended at ``r.pos``."""
    cdef uint64_t ignored, inner
    cdef int inner_type
    if wire_type == _VARINT:
        return _read_varint(r, end, &ignored, what)
    if wire_type == _I64:
        return _read_fixed(r, 8, end, what)
    if wire_type == _LEN:
        _read_len(r, end, what)
        return 0
    if wire_type == _I32:
        return _read_fixed(r, 4, end, what)
    if wire_type == _END_GROUP:
        raise FramingError(
            f"end of group {field} before offset {r.pos} in {what}: no group is open"
        )
    if depth >= _MAX_GROUP_DEPTH:
        raise FramingError(
            f"group {field} before offset {r.pos} in {what} nests deeper than {_MAX_GROUP_DEPTH}"
        )
    while True:
        _read_tag(r, end, &inner, &inner_type, what)
        if inner_type == _END_GROUP:
            if inner != field:
                raise FramingError(
                    f"end of group {inner} before offset {r.pos} in {what}:"
                    f" expected the end of group {field}"
                )
            return 0
        _skip(r, end, inner, inner_type, what, depth + 1)


cdef str _read_string(_Reader* r, Py_ssize_t start, str what):
    try:
        return PyUnicode_DecodeUTF8(<const char*>r.buf + start, r.pos - start, NULL)
    except UnicodeDecodeError as exc:
        raise FramingError(
            f"string at offset {start} in {what}: expected UTF-8, found invalid byte"
            f" at offset {start + exc.start}"
        ) from None


cdef object _read_param_value(_Reader* r, Py_ssize_t end):
    cdef str what = "InferParameter"
    cdef object value = None
    cdef uint64_t field, number
    cdef int wire_type
    cdef Py_ssize_t start
    cdef double real
    cdef int shift
    while r.pos < end:
        _read_tag(r, end, &field, &wire_type, what)
        if (field == 1 or field == 2 or field == 5) and wire_type == _VARINT:
            _read_varint(r, end, &number, what)
            if field == 1:
                value = number != 0
            elif field == 2:
                value = _signed(number)
            else:
                value = number
        elif field == 3 and wire_type == _LEN:
            start = _read_len(r, end, what)
            value = _read_string(r, start, what)
        elif field == 4 and wire_type == _I64:
            _read_fixed(r, 8, end, what)
            number = 0
            for shift in range(0, 64, 8):
                number |= <uint64_t>r.buf[r.pos - 8 + shift // 8] << shift
            memcpy(&real, &number, 8)
            value = real
        else:
            _skip(r, end, field, wire_type, what, 0)
    return value


cdef int _read_params_entry(_Reader* r, Py_ssize_t end, dict params) except -1:
    cdef str what = "parameters entry"
    cdef str key = ""
    cdef object value = None, merged
    cdef uint64_t field
    cdef int wire_type
    cdef Py_ssize_t start
    cdef _Reader inner
    while r.pos < end:
        _read_tag(r, end, &field, &wire_type, what)
        if field == 1 and wire_type == _LEN:
            start = _read_len(r, end, what)
            key = _read_string(r, start, what)
        elif field == 2 and wire_type == _LEN:
            start = _read_len(r, end, what)
            inner.buf = r.buf
            inner.pos = start
            # A repeated value field merges into the previous one: a set member replaces it.
            merged = _read_param_value(&inner, r.pos)
            if merged is not None:
                value = merged
        else:
            _skip(r, end, field, wire_type, what, 0)
    params[key] = value
    return 0


cdef tuple _read_output(_Reader* r, Py_ssize_t end):
    cdef str what = "InferOutputTensor"
    cdef str name = "", datatype = ""
    cdef list shape = []
    cdef dict params = {}
    cdef uint64_t field, dim
    cdef int wire_type
    cdef Py_ssize_t start, stop
    cdef _Reader inner
    while r.pos < end:
        _read_tag(r, end, &field, &wire_type, what)
        if field == 1 and wire_type == _LEN:
            start = _read_len(r, end, what)
            name = _read_string(r, start, what)
        elif field == 2 and wire_type == _LEN:
            start = _read_len(r, end, what)
            datatype = _read_string(r, start, what)
        elif field == 3 and wire_type == _LEN:
            inner.buf = r.buf
            inner.pos = _read_len(r, end, what)
            while inner.pos < r.pos:
                _read_varint(&inner, r.pos, &dim, "InferOutputTensor.shape")
                shape.append(_signed(dim))
        elif field == 3 and wire_type == _VARINT:
            _read_varint(r, end, &dim, what)
            shape.append(_signed(dim))
        elif field == 4 and wire_type == _LEN:
            start = _read_len(r, end, what)
            stop = r.pos
            r.pos = start
            _read_params_entry(r, stop, params)
        else:
            # Typed ``contents`` (field 5) is skipped too: Triton answers with raw contents.
            _skip(r, end, field, wire_type, what, 0)
    return (name, datatype, shape, params)


cdef int _read_response(
    _Reader* r, Py_ssize_t end, InferResponse response, object buf, str what
) except -1:
    """Merge the ModelInferResponse fields in [r.pos, end) into ``response``."""
    cdef uint64_t field
    cdef int wire_type
    cdef Py_ssize_t start, stop
    cdef object view = None
    while r.pos < end:
        _read_tag(r, end, &field, &wire_type, what)
        if wire_type == _LEN and 1 <= field <= 3:
            start = _read_len(r, end, what)
            if field == 1:
                response.model_name = _read_string(r, start, what)
            elif field == 2:
                response.model_version = _read_string(r, start, what)
            else:
                response.id = _read_string(r, start, what)
        elif field == 4 and wire_type == _LEN:
            start = _read_len(r, end, what)
            stop = r.pos
            r.pos = start
            _read_params_entry(r, stop, response.parameters)
        elif field == 5 and wire_type == _LEN:
            start = _read_len(r, end, what)
            stop = r.pos
            r.pos = start
            response.outputs.append(_read_output(r, stop))
        elif field == 6 and wire_type == _LEN:
            start = _read_len(r, end, what)
            if view is None:
                view = memoryview(buf)
                if view.format != "B" or view.ndim != 1:
                    view = view.cast("B")
            response.raw_outputs.append(view[start:r.pos])
        else:
            _skip(r, end, field, wire_type, what, 0)
    return 0


def decode_infer_response(buf):
    """Parse ModelInferResponse wire bytes; unknown fields of every wire type are skipped."""
    cdef Py_buffer data
    cdef _Reader r
    cdef InferResponse response = InferResponse.__new__(InferResponse)
    _acquire(buf, &data)
    try:
        r.buf = <const unsigned char*>data.buf
        r.pos = 0
        _read_response(&r, data.len, response, buf, "ModelInferResponse")
    finally:
        PyBuffer_Release(&data)
    return response


def decode_stream_response(buf):
    """Parse ModelStreamInferResponse wire bytes into (error_message, response or None)."""
    cdef Py_buffer data
    cdef _Reader r
    cdef str what = "ModelStreamInferResponse"
    cdef str error_message = ""
    cdef InferResponse response = None
    cdef uint64_t field
    cdef int wire_type
    cdef Py_ssize_t start, stop
    _acquire(buf, &data)
    try:
        r.buf = <const unsigned char*>data.buf
        r.pos = 0
        while r.pos < data.len:
            _read_tag(&r, data.len, &field, &wire_type, what)
            if field == 1 and wire_type == _LEN:
                start = _read_len(&r, data.len, what)
                error_message = _read_string(&r, start, what)
            elif field == 2 and wire_type == _LEN:
                start = _read_len(&r, data.len, what)
                stop = r.pos
                r.pos = start
                # A repeated singular message field merges into the earlier one (protobuf rule).
                if response is None:
                    response = InferResponse.__new__(InferResponse)
                _read_response(&r, stop, response, buf, "ModelInferResponse")
            else:
                _skip(&r, data.len, field, wire_type, what, 0)
    finally:
        PyBuffer_Release(&data)
    return error_message, response
