"""KServe v2 binary bodies, Triton BYTES tensors and SSE events, on buffers.

Uses the compiled ``fastpath._framing_c`` unless ``MESHGATE_NO_EXTENSIONS`` is set or
it is not built, else the pure-Python twin; both stay reachable as ``framing_c``
(None when not loaded) and ``framing_py`` so tests can exercise each.
"""

from typing import TYPE_CHECKING

from fastpath import _framing_py as framing_py
from fastpath._select import compiled_twin

framing_c = compiled_twin("_framing_c")

COMPILED: bool = framing_c is not None

# Type checkers see the pure-Python twin; the compiled one has the same signatures.
if TYPE_CHECKING or framing_c is None:
    from fastpath._framing_py import (
        build_infer_body,
        deserialize_bytes_tensor,
        elide_long_strings,
        is_utf8,
        serialize_bytes_tensor,
        slice_binary_inputs,
        split_infer_body,
        sse_event,
    )
else:
    from fastpath._framing_c import (
        build_infer_body,
        deserialize_bytes_tensor,
        elide_long_strings,
        is_utf8,
        serialize_bytes_tensor,
        slice_binary_inputs,
        split_infer_body,
        sse_event,
    )

__all__ = [
    "COMPILED",
    "build_infer_body",
    "deserialize_bytes_tensor",
    "elide_long_strings",
    "framing_c",
    "framing_py",
    "is_utf8",
    "serialize_bytes_tensor",
    "slice_binary_inputs",
    "split_infer_body",
    "sse_event",
]
