"""Triton's gRPC ModelInferRequest / ModelInferResponse as protobuf wire bytes.

No protobuf objects on the hot path: requests are encoded straight from buffers and
responses are parsed into zero-copy memoryviews. Uses the compiled
``fastpath._grpc_wire_c`` unless ``MESHGATE_NO_EXTENSIONS`` is set or it is not built,
else the pure-Python twin; both stay reachable as ``grpc_wire_c`` (None when not
loaded) and ``grpc_wire_py``.
"""

from typing import TYPE_CHECKING

from fastpath import _grpc_wire_py as grpc_wire_py
from fastpath._grpc_wire_py import DecodedParams, Params, ParamValue
from fastpath._select import compiled_twin

grpc_wire_c = compiled_twin("_grpc_wire_c")

COMPILED: bool = grpc_wire_c is not None

# Type checkers see the pure-Python twin; the compiled one has the same signatures.
if TYPE_CHECKING or grpc_wire_c is None:
    from fastpath._grpc_wire_py import (
        InferResponse,
        decode_infer_response,
        decode_stream_response,
        encode_infer_request,
    )
else:
    from fastpath._grpc_wire_c import (
        InferResponse,
        decode_infer_response,
        decode_stream_response,
        encode_infer_request,
    )

__all__ = [
    "COMPILED",
    "DecodedParams",
    "InferResponse",
    "ParamValue",
    "Params",
    "decode_infer_response",
    "decode_stream_response",
    "encode_infer_request",
    "grpc_wire_c",
    "grpc_wire_py",
]
