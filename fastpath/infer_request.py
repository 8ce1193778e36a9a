"""A KServe v2 ``infer`` request's JSON header and binary tail, checked.

Uses the compiled ``fastpath._infer_request_c`` unless ``MESHGATE_NO_EXTENSIONS`` is
set or it is not built, else the pure-Python twin; both stay reachable as
``infer_request_c`` (None when not loaded) and ``infer_request_py`` so tests can
exercise each.
"""

from typing import TYPE_CHECKING

from fastpath import _infer_request_py as infer_request_py
from fastpath._select import compiled_twin

infer_request_c = compiled_twin("_infer_request_c")

COMPILED: bool = infer_request_c is not None

# Type checkers see the pure-Python twin; the compiled one has the same signatures.
if TYPE_CHECKING or infer_request_c is None:
    from fastpath._infer_request_py import (
        DATATYPES,
        check_parameter,
        parse_infer_request,
    )
else:
    from fastpath._infer_request_c import (
        DATATYPES,
        check_parameter,
        parse_infer_request,
    )

__all__ = [
    "COMPILED",
    "DATATYPES",
    "check_parameter",
    "infer_request_c",
    "infer_request_py",
    "parse_infer_request",
]
