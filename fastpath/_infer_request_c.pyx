# cython: language_level=3
"""Compiled twin of ``fastpath._infer_request_py``: same results and error messages.

Typed dict and list access instead of the interpreter's generic calls; a fault's
message is only formatted when there is one (the twin formats each input's name into
its ``where`` up front)."""

from cpython.dict cimport PyDict_Contains, PyDict_Copy, PyDict_GetItem
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_CheckExact
from cpython.object cimport PyObject
from cpython.unicode cimport PyUnicode_CheckExact

from fastpath._framing_c import slice_binary_inputs
# One list of each, the twin's.
from fastpath._infer_request_py import DATATYPES, SHARED_MEMORY_PARAMS
from fastpath.errors import FramingError

cdef frozenset _DATATYPES = DATATYPES
cdef tuple _SHARED_MEMORY_PARAMS = SHARED_MEMORY_PARAMS
# What a parameter's kind (_params) names in a fault: the request, an input, an output.
cdef int _REQUEST = 0
cdef int _INPUT = 1
cdef int _OUTPUT = 2


cdef inline object _get(dict mapping, str key):
    """``mapping.get(key)`` without the method call."""
    cdef PyObject* found = PyDict_GetItem(mapping, key)
    return None if found is NULL else <object>found


def parse_infer_request(dict header not None, tail, encode_data):
    """Check an infer request's JSON ``header`` against its binary ``tail`` (a buffer):
    binary inputs become zero-copy slices of ``tail``, JSON ``data`` is encoded by
    ``encode_data(name, datatype, shape, data)``."""
    cdef dict request_params = _params(header.get("parameters"), _REQUEST, None)
    cdef object binary_default = _flag(
        request_params.pop("binary_data_output", False), "binary_data_output"
    )
    cdef object inputs_json = header.get("inputs")
    if not isinstance(inputs_json, list) or not inputs_json:
        raise FramingError("the request must have a non-empty 'inputs' array")

    cdef list inputs = []
    cdef list raws = []
    cdef list binary_sizes = []
    cdef list binary_slots = []
    cdef Py_ssize_t i = 0
    cdef dict tensor
    cdef dict params
    cdef object name, datatype, shape, size
    for item in <list>inputs_json:
        name = _name_of(item, "inputs", i)
        tensor = <dict>item
        datatype = _check_datatype(name, _get(tensor, "datatype"))
        shape = _check_shape(name, _get(tensor, "shape"))
        params = _params(_get(tensor, "parameters"), _INPUT, name)
        _refuse_shared_memory(params, name)
        size = params.pop("binary_data_size", None)
        if size is not None:
            if not PyLong_CheckExact(size) or size < 0:
                raise FramingError(
                    f"input '{name}': binary_data_size must be a non-negative integer"
                )
            if PyDict_Contains(tensor, "data"):
                raise FramingError(f"input '{name}' has both 'data' and binary_data_size")
            binary_sizes.append(size)
            binary_slots.append(i)
            raws.append(None)
        elif PyDict_Contains(tensor, "data"):
            raws.append(encode_data(name, datatype, shape, tensor["data"]))
        else:
            raise FramingError(f"input '{name}' has neither 'data' nor binary_data_size")
        inputs.append((name, datatype, shape, params if params else None))
        i += 1

    cdef list slices = slice_binary_inputs(tail, binary_sizes)
    cdef Py_ssize_t k
    for k in range(len(binary_slots)):
        raws[<Py_ssize_t>binary_slots[k]] = slices[k]

    outputs, binary_outputs = _requested_outputs(header.get("outputs"))
    request_id = header.get("id", "")
    if not isinstance(request_id, str):
        raise FramingError("'id' must be a string")
    return request_id, request_params, inputs, raws, outputs, binary_default, binary_outputs


def check_parameter(name, value, where):
    """``value`` if a KServe parameter may have it (a string, number or boolean)."""
    if isinstance(value, (bool, int, float, str)):
        return value
    raise FramingError(f"{where}: parameter '{name}' must be a string, number or boolean")


cdef object _check_datatype(object name, object datatype):
    if not isinstance(datatype, str) or datatype not in _DATATYPES:
        raise FramingError(f"input '{name}': unknown datatype {datatype!r}")
    return datatype if PyUnicode_CheckExact(datatype) else str(datatype)


cdef object _check_shape(object name, object shape):
    """A list of non-negative int64 dims, or a fault naming the input."""
    cdef int overflow
    if isinstance(shape, list):
        for dim in <list>shape:
            if not PyLong_CheckExact(dim):
                break
            # Out of int64's range either way, or negative: not a dim.
            if PyLong_AsLongLongAndOverflow(dim, &overflow) < 0 or overflow:
                break
        else:
            return shape
    raise FramingError(
        f"input '{name}': shape must be a list of non-negative integers, got {shape!r}"
    )


cdef tuple _requested_outputs(object outputs_json):
    if outputs_json is None:
        return [], {}
    if not isinstance(outputs_json, list):
        raise FramingError("'outputs' must be an array")
    cdef list outputs = []
    cdef dict binary = {}
    cdef Py_ssize_t i = 0
    cdef dict tensor
    cdef dict params
    cdef object name
    for item in <list>outputs_json:
        name = _name_of(item, "outputs", i)
        tensor = <dict>item
        params = _params(_get(tensor, "parameters"), _OUTPUT, name)
        _refuse_shared_memory(params, name)
        if PyDict_Contains(params, "binary_data"):
            binary[name] = _flag(params.pop("binary_data"), f"output '{name}': binary_data")
        outputs.append((name, params if params else None))
        i += 1
    return outputs, binary


cdef object _name_of(object item, str array, Py_ssize_t index):
    """The name of ``array[index]``, an object with a string ``name``."""
    if isinstance(item, dict):
        name = _get(<dict>item, "name")
        if isinstance(name, str):
            return name
    raise FramingError(f"{array}[{index}] must be an object with a string 'name'")


cdef object _flag(object value, str what):
    if not isinstance(value, bool):
        raise FramingError(f"{what} must be true or false, got {value!r}")
    return value


cdef str _where(int kind, object name):
    if kind == _REQUEST:
        return "request"
    return f"input '{name}'" if kind == _INPUT else f"output '{name}'"


cdef dict _params(object value, int kind, object name):
    """A copy of a ``parameters`` object (the caller pops what it reads)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise FramingError(f"{_where(kind, name)}: 'parameters' must be an object")
    cdef type kind_of
    for key, item in (<dict>value).items():
        kind_of = type(item)
        if kind_of is not bool and kind_of is not int and kind_of is not float and kind_of is not str:
            check_parameter(key, item, _where(kind, name))
    return PyDict_Copy(value)


cdef int _refuse_shared_memory(dict params, object name) except -1:
    for key in _SHARED_MEMORY_PARAMS:
        if PyDict_Contains(params, key):
            raise FramingError(
                f"'{name}': shared-memory tensors cannot cross the gateway; send the data"
            )
    return 0
