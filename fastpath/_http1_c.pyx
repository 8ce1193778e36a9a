# cython: language_level=3
"""Compiled twin of ``fastpath._http1_py``: same functions and results, one pass over
the head's bytes instead of a regex, a decode and a lower per line."""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeASCII, PyUnicode_DecodeUTF8
from libc.string cimport memchr, memcmp

from fastpath._http1_py import MAX_LENGTH_DIGITS

cdef int _MAX_LENGTH_DIGITS = MAX_LENGTH_DIGITS

# Character classes, indexed by byte.
cdef bint _TOKEN[256]
cdef bint _VALUE[256]  # allowed in a header value: not a control character, but tab
cdef bint _SPACE[256]  # what bytes.strip() strips
cdef int _byte
for _byte in range(256):
    _TOKEN[_byte] = (
        (48 <= _byte <= 57) or (65 <= _byte <= 90) or (97 <= _byte <= 122)
        or chr(_byte) in "!#$%&'*+.^_`|~-"
    )
    _VALUE[_byte] = _byte == 9 or (_byte >= 32 and _byte != 127)
    _SPACE[_byte] = _byte in (9, 10, 11, 12, 13, 32)


cdef inline unsigned char _lower(unsigned char c) nogil:
    return c + 32 if 65 <= c <= 90 else c


cdef bint _lower_equals(const unsigned char* p, Py_ssize_t n, const char* lower) noexcept:
    """Whether p[:n], lower-cased, is the NUL-terminated ``lower``."""
    cdef Py_ssize_t i
    for i in range(n):
        if lower[i] == 0 or _lower(p[i]) != <unsigned char>lower[i]:
            return False
    return lower[n] == 0


cdef Py_ssize_t _line_end(const unsigned char* p, Py_ssize_t start, Py_ssize_t n) noexcept:
    """Where the line starting at ``start`` ends: its CR of CRLF, else ``n``."""
    cdef const unsigned char* found
    cdef Py_ssize_t at = start
    while at < n:
        found = <const unsigned char*>memchr(p + at, 13, n - at)
        if found == NULL:
            return n
        at = found - p
        if at + 1 < n and p[at + 1] == 10:
            return at
        at += 1
    return n


def parse_request_head(bytes head):
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(head)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(head)
    cdef Py_ssize_t end = _line_end(p, 0, n)
    cdef Py_ssize_t i = 0, method_end, target_start, target_end
    # Request line: TOKEN SP /target SP HTTP/1.1
    while i < end and _TOKEN[p[i]]:
        i += 1
    if i == 0 or i >= end or p[i] != 32:
        return None
    method_end = i
    target_start = i = i + 1
    if i >= end or p[i] != 47:  # origin form only
        return None
    while i < end and 0x21 <= p[i] <= 0x7E:
        if p[i] == 37:  # '%': escapes, which aiohttp decodes
            return None
        if p[i] == 47 and i + 1 < end and (p[i + 1] == 46 or p[i + 1] == 47):  # "/." "//"
            return None
        i += 1
    target_end = i
    if end - i != 9 or memcmp(p + i, b" HTTP/1.1", 9) != 0:
        return None

    cdef list raw_headers = []
    cdef list headers = []
    cdef long long content_length = -1
    cdef bint close = False
    cdef Py_ssize_t start, name_end, value_start, value_end, k
    cdef bytes name, value
    cdef const unsigned char* v
    while end < n:
        start = end + 2
        end = _line_end(p, start, n)
        i = start
        while i < end and _TOKEN[p[i]]:
            i += 1
        if i == start or i >= end or p[i] != 58:  # a token, then ':'
            return None
        name_end = i
        i += 1
        while i < end and (p[i] == 32 or p[i] == 9):
            i += 1
        value_start = i
        while i < end and _VALUE[p[i]]:
            i += 1
        if i != end:
            return None
        value_end = end
        while value_end > value_start and (p[value_end - 1] == 32 or p[value_end - 1] == 9):
            value_end -= 1
        k = name_end - start
        if (
            _lower_equals(p + start, k, b"transfer-encoding")
            or _lower_equals(p + start, k, b"expect")
            or _lower_equals(p + start, k, b"upgrade")
            or _lower_equals(p + start, k, b"content-encoding")
        ):
            return None
        v = p + value_start
        if _lower_equals(p + start, k, b"content-length"):
            if content_length >= 0 or value_end == value_start:
                return None
            if value_end - value_start > _MAX_LENGTH_DIGITS:
                return None
            content_length = 0
            for i in range(value_end - value_start):
                if not 48 <= v[i] <= 57:
                    return None
                content_length = content_length * 10 + (v[i] - 48)
        elif _lower_equals(p + start, k, b"connection"):
            if _lower_equals(v, value_end - value_start, b"close"):
                close = True
            elif _lower_equals(v, value_end - value_start, b"keep-alive"):
                close = False
            else:
                return None
        name = PyBytes_FromStringAndSize(<const char*>p + start, k)
        value = PyBytes_FromStringAndSize(<const char*>v, value_end - value_start)
        raw_headers.append((name, value))
        headers.append((
            PyUnicode_DecodeASCII(<const char*>p + start, k, NULL),
            PyUnicode_DecodeUTF8(<const char*>v, value_end - value_start, "surrogateescape"),
        ))
    return (
        PyUnicode_DecodeASCII(<const char*>p, method_end, NULL),
        PyUnicode_DecodeASCII(<const char*>p + target_start, target_end - target_start, NULL),
        raw_headers,
        headers,
        content_length if content_length > 0 else 0,
        close,
    )


cdef bytes _stripped(const unsigned char* p, Py_ssize_t start, Py_ssize_t end, bint lower):
    while start < end and _SPACE[p[start]]:
        start += 1
    while end > start and _SPACE[p[end - 1]]:
        end -= 1
    if not lower:
        return PyBytes_FromStringAndSize(<const char*>p + start, end - start)
    # A new object written here: a bytes made from data may be CPython's shared
    # one-byte object (b"C"), which must never be changed in place.
    cdef bytes out = PyBytes_FromStringAndSize(NULL, end - start)
    cdef char* w = PyBytes_AS_STRING(out)
    cdef Py_ssize_t i
    for i in range(end - start):
        w[i] = <char>_lower(p[start + i])
    return out


def parse_reply_head(bytes head):
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(head)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(head)
    cdef Py_ssize_t end = _line_end(p, 0, n)
    cdef Py_ssize_t i = 0, digits, colon, start
    cdef int status = 0
    while i < end and p[i] != 32:
        i += 1
    i += 1
    digits = i
    while i < end and p[i] != 32:
        if not 48 <= p[i] <= 57 or i - digits >= 9:
            raise ValueError(f"malformed status line {head[:min(end, 100)]!r}")
        status = status * 10 + (p[i] - 48)
        i += 1
    if i == digits:
        raise ValueError(f"malformed status line {head[:min(end, 100)]!r}")
    cdef dict headers = {}
    cdef const unsigned char* found
    while end < n:
        start = end + 2
        end = _line_end(p, start, n)
        found = <const unsigned char*>memchr(p + start, 58, end - start)
        colon = end if found == NULL else found - p
        headers[_stripped(p, start, colon, True)] = (
            _stripped(p, colon + 1, end, False) if colon < end else b""
        )
    return status, headers
