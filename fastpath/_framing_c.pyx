# cython: language_level=3
"""Compiled twin of ``fastpath._framing_py``: same functions, results and error messages."""

from cpython.buffer cimport (
    PyBUF_SIMPLE,
    PyBuffer_FillInfo,
    PyBuffer_Release,
    PyObject_GetBuffer,
)
from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_Check,
    PyBytes_CheckExact,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.exc cimport PyErr_Clear
from cpython.unicode cimport PyUnicode_Check, PyUnicode_CheckExact
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memchr, memcpy

from fastpath.errors import FramingError

cdef Py_ssize_t _U32_MAX = 0xFFFFFFFF


cdef int _acquire(object obj, Py_buffer* view) except -1:
    """Point ``view`` at the bytes of ``obj``; pair every call with PyBuffer_Release."""
    if PyBytes_CheckExact(obj):
        # Fast path: fill the view straight from the bytes object, no type dispatch.
        return PyBuffer_FillInfo(
            view, obj, PyBytes_AS_STRING(obj), PyBytes_GET_SIZE(obj), 1, PyBUF_SIMPLE
        )
    return PyObject_GetBuffer(obj, view, PyBUF_SIMPLE)


cdef object _byte_view(object buf):
    """A flat unsigned-byte memoryview of ``buf``, so slices count bytes."""
    cdef object view = memoryview(buf)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def split_infer_body(body, header_length):
    """Split a binary-extension body into (JSON header, binary tail), both zero-copy views."""
    cdef object view = _byte_view(body)
    cdef Py_ssize_t total = len(view)
    if not 0 <= header_length <= total:
        raise FramingError(
            f"Inference-Header-Content-Length {header_length} exceeds body length {total}"
            if header_length > 0
            else f"Inference-Header-Content-Length must be >= 0, found {header_length}"
        )
    cdef Py_ssize_t split = header_length
    return view[:split], view[split:]


def slice_binary_inputs(tail, sizes):
    """Consecutive zero-copy views of ``tail``; the sizes must cover it exactly."""
    cdef object view = _byte_view(tail)
    cdef Py_ssize_t total = len(view)
    cdef Py_ssize_t offset = 0
    cdef Py_ssize_t index = 0
    cdef Py_ssize_t length
    cdef list slices = []
    for size in sizes:
        # Compared as Python ints first: a huge size is a FramingError, not an OverflowError.
        if size < 0:
            raise FramingError(f"binary_data_size of input {index} must be >= 0, found {size}")
        if size > total - offset:
            raise FramingError(
                f"binary_data_size of input {index} is {size} but only {total - offset} bytes"
                f" remain in the binary data at offset {offset}"
            )
        length = size
        slices.append(view[offset:offset + length])
        offset += length
        index += 1
    if offset != total:
        raise FramingError(
            f"binary data has {total - offset} bytes after the last input"
            f" (input {index - 1}); expected the sizes to sum to {total}, found {offset}"
        )
    return slices


cdef extern from "Python.h":
    bint PyUnicode_IS_COMPACT_ASCII(object text)
    void* PyUnicode_DATA(object text)
    Py_ssize_t PyUnicode_GET_LENGTH(object text)
    # Declared without an exception clause: a NULL result (exception set) is handled here,
    # so the per-element loop needs no try block.
    const char* _utf8_or_null "PyUnicode_AsUTF8AndSize"(object text, Py_ssize_t* length)


cdef object _element_error(object item, Py_ssize_t index):
    """The FramingError for an element _element refused; only built on the error path."""
    if not isinstance(item, str):
        return FramingError(
            f"BYTES element {index} must be bytes or str, found {type(item).__name__}"
        )
    try:
        item.encode("utf-8")
    except UnicodeEncodeError as exc:
        return FramingError(
            f"BYTES element {index} is a str that is not encodable as UTF-8: {exc.reason}"
            f" at character {exc.start}"
        )


cdef inline const char* _element(object item, Py_ssize_t index, Py_ssize_t* length) except NULL:
    """Pointer to and length of the encoded bytes of one BYTES element (no copy)."""
    cdef const char* data = NULL
    if PyUnicode_CheckExact(item) and PyUnicode_IS_COMPACT_ASCII(item):
        # The common case (JSON strings, token text), read in place: its characters
        # are its UTF-8 bytes and no length exceeds the 4-byte limit here in practice
        # (checked below all the same).
        data = <const char*>PyUnicode_DATA(item)
        length[0] = PyUnicode_GET_LENGTH(item)
    elif PyBytes_Check(item):
        data = PyBytes_AS_STRING(item)
        length[0] = PyBytes_GET_SIZE(item)
    elif PyUnicode_Check(item):
        # CPython caches the UTF-8 form on the str (ASCII strs are already UTF-8).
        data = _utf8_or_null(item, length)
        if data == NULL:
            PyErr_Clear()
    if data == NULL:
        raise _element_error(item, index)
    if length[0] > _U32_MAX:
        raise FramingError(
            f"BYTES element {index} is {length[0]} bytes, more than a 4-byte length can hold"
        )
    return data


cdef inline void _put_u32_le(char* out, uint32_t value) noexcept:
    out[0] = <char>(value & 0xFF)
    out[1] = <char>((value >> 8) & 0xFF)
    out[2] = <char>((value >> 16) & 0xFF)
    out[3] = <char>(value >> 24)


cdef inline uint32_t _get_u32_le(const unsigned char* data) noexcept:
    return data[0] | (<uint32_t>data[1] << 8) | (<uint32_t>data[2] << 16) | (<uint32_t>data[3] << 24)


def serialize_bytes_tensor(items):
    """Triton's BYTES wire format: per element a little-endian uint32 length, then the bytes."""
    # A list gives the two passes direct item access (no bounds check, see setup.py).
    cdef list seq = items if type(items) is list else list(items)
    cdef Py_ssize_t count = len(seq)
    cdef Py_ssize_t total = 4 * count
    cdef Py_ssize_t index
    cdef Py_ssize_t length
    for index in range(count):
        _element(seq[index], index, &length)
        total += length
    cdef bytes result = PyBytes_FromStringAndSize(NULL, total)
    cdef char* out = PyBytes_AS_STRING(result)
    cdef const char* data
    for index in range(count):
        data = _element(seq[index], index, &length)
        _put_u32_le(out, <uint32_t>length)
        memcpy(out + 4, data, length)
        out += 4 + length
    return result


def deserialize_bytes_tensor(buf):
    """Inverse of ``serialize_bytes_tensor``; every length is checked against what remains."""
    cdef Py_buffer view
    cdef const unsigned char* data
    cdef Py_ssize_t total, offset = 0, length
    cdef list items = []
    _acquire(buf, &view)
    try:
        data = <const unsigned char*>view.buf
        total = view.len
        while offset < total:
            if total - offset < 4:
                raise FramingError(
                    f"BYTES element {len(items)} at offset {offset}: expected a 4-byte length,"
                    f" found {total - offset} trailing bytes"
                )
            length = _get_u32_le(data + offset)
            offset += 4
            if length > total - offset:
                raise FramingError(
                    f"BYTES element {len(items)} at offset {offset - 4} declares {length} bytes"
                    f" but only {total - offset} remain"
                )
            items.append(PyBytes_FromStringAndSize(<const char*>data + offset, length))
            offset += length
    finally:
        PyBuffer_Release(&view)
    return items


def build_infer_body(header_json, tails):
    """Binary-extension response body: the JSON header followed by every tail, one allocation."""
    cdef list parts = [header_json]
    parts.extend(tails)
    cdef Py_ssize_t count = len(parts)
    cdef Py_buffer* views = <Py_buffer*>PyMem_Malloc(count * sizeof(Py_buffer))
    if views == NULL:
        raise MemoryError()
    cdef Py_ssize_t acquired = 0, total = 0, index
    cdef bytes result
    cdef char* out
    try:
        for index in range(count):
            _acquire(parts[index], &views[index])
            acquired += 1
            total += views[index].len
        result = PyBytes_FromStringAndSize(NULL, total)
        out = PyBytes_AS_STRING(result)
        for index in range(count):
            memcpy(out, views[index].buf, views[index].len)
            out += views[index].len
    finally:
        for index in range(acquired):
            PyBuffer_Release(&views[index])
        PyMem_Free(views)
    return result


cdef int _acquire_line(object value, Py_buffer* view, str what) except -1:
    """Acquire ``value`` like _acquire, releasing it again if it holds a line break."""
    _acquire(value, view)
    cdef const char* data = <const char*>view.buf
    cdef const char* found = <const char*>memchr(data, b"\n", view.len)
    # Only the part before the first \n can hold an earlier \r.
    cdef const char* carriage = <const char*>memchr(
        data, b"\r", (found - data) if found != NULL else view.len
    )
    if carriage != NULL:
        found = carriage
    if found != NULL:
        PyBuffer_Release(view)
        raise FramingError(
            f"SSE {what} must be a single line, found {found[:1]!r} at offset {found - data}"
        )
    return 0


cdef inline char* _put(char* out, const void* data, Py_ssize_t length) noexcept:
    memcpy(out, data, length)
    return out + length


def sse_event(data, event=None):
    """One Server-Sent Event: ``[event: NAME\\n]data: DATA\\n\\n``."""
    cdef Py_buffer data_view
    cdef Py_buffer event_view
    cdef bytes result
    cdef char* out
    _acquire_line(data, &data_view, "data")
    try:
        if event is None:
            result = PyBytes_FromStringAndSize(NULL, 6 + data_view.len + 2)
            out = _put(PyBytes_AS_STRING(result), b"data: ", 6)
        else:
            _acquire_line(event, &event_view, "event")
            try:
                result = PyBytes_FromStringAndSize(NULL, 7 + event_view.len + 7 + data_view.len + 2)
                out = _put(PyBytes_AS_STRING(result), b"event: ", 7)
                out = _put(out, event_view.buf, event_view.len)
                out = _put(out, b"\ndata: ", 7)
            finally:
                PyBuffer_Release(&event_view)
        out = _put(out, data_view.buf, data_view.len)
        _put(out, b"\n\n", 2)
    finally:
        PyBuffer_Release(&data_view)
    return result


def elide_long_strings(text, Py_ssize_t min_length):
    cdef Py_buffer view
    _acquire(text, &view)
    cdef const char* p = <const char*>view.buf
    cdef Py_ssize_t n = view.len
    cdef char* out = <char*>PyMem_Malloc(n + 1)
    cdef Py_ssize_t i = 0, o = 0, start, j, back
    cdef const char* found
    if out == NULL:
        PyBuffer_Release(&view)
        raise MemoryError()
    try:
        while i < n:
            found = <const char*>memchr(p + i, 34, n - i)  # '"'
            if found == NULL:
                break
            start = found - p
            memcpy(out + o, p + i, start - i)
            o += start - i
            # The closing quote: the next one not escaped by an odd run of backslashes.
            j = start + 1
            while True:
                found = <const char*>memchr(p + j, 34, n - j)
                if found == NULL:
                    j = -1
                    break
                j = found - p
                back = j - 1
                while back > start and p[back] == 92:  # '\\'
                    back -= 1
                if (j - 1 - back) % 2 == 0:
                    break
                j += 1
            if j < 0:  # unterminated: left as it is
                i = start
                break
            if j + 1 - start > min_length:
                out[o] = 34
                out[o + 1] = 34
                o += 2
            else:
                memcpy(out + o, p + start, j + 1 - start)
                o += j + 1 - start
            i = j + 1
        memcpy(out + o, p + i, n - i)
        o += n - i
        return PyBytes_FromStringAndSize(out, o)
    finally:
        PyMem_Free(out)
        PyBuffer_Release(&view)


def is_utf8(data):
    cdef Py_buffer view
    _acquire(data, &view)
    try:
        return _utf8_valid(<const unsigned char*>view.buf, view.len)
    finally:
        PyBuffer_Release(&view)


cdef bint _utf8_valid(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """Well-formed UTF-8 as Python's strict decoder takes it (Unicode's table 3-7: no
    overlong forms, no surrogates, nothing above U+10FFFF)."""
    cdef Py_ssize_t i = 0
    cdef uint64_t words[4]
    cdef unsigned char lead, low, high
    cdef Py_ssize_t length, k
    while i < n:
        # ASCII, the usual content of a JSON body, 32 then 8 bytes at a time.
        while i + 32 <= n:
            memcpy(words, p + i, 32)
            if (words[0] | words[1] | words[2] | words[3]) & 0x8080808080808080ULL:
                break
            i += 32
        while i + 8 <= n:
            memcpy(words, p + i, 8)
            if words[0] & 0x8080808080808080ULL:
                break
            i += 8
        if i >= n:
            break
        lead = p[i]
        if lead < 0x80:
            i += 1
            continue
        if lead < 0xC2 or lead > 0xF4:  # a continuation byte, overlong, or past U+10FFFF
            return False
        length = 2 if lead < 0xE0 else (3 if lead < 0xF0 else 4)
        # The second byte's range (Unicode's table 3-7) rules out the overlong forms, the
        # surrogates and the code points above U+10FFFF; the rest are continuation bytes.
        low = 0xA0 if lead == 0xE0 else (0x90 if lead == 0xF0 else 0x80)
        high = 0x9F if lead == 0xED else (0x8F if lead == 0xF4 else 0xBF)
        if i + length > n or not low <= p[i + 1] <= high:
            return False
        for k in range(i + 2, i + length):
            if p[k] & 0xC0 != 0x80:
                return False
        i += length
    return True
