"""Triton gRPC calls. Hot-path calls move wire bytes (no protobuf objects): the request
is built by ``fastpath.grpc_wire`` and the response parsed by it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

import grpc
from tritonclient.grpc import service_pb2_grpc

from .config import GrpcTls
from .errors import GatewayError, GatewayTimeout, UpstreamError
from .grpc_h2 import H2Channel, Metadata

_SERVICE = "/inference.GRPCInferenceService/"
_INFER = (_SERVICE + "ModelInfer").encode()
_STREAM = (_SERVICE + "ModelStreamInfer").encode()

# Triton's own HTTP mapping of its error codes (http_server.cc), by the gRPC code it uses.
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNIMPLEMENTED: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.CANCELLED: 499,
}


def upstream_error(exc: grpc.aio.AioRpcError) -> GatewayError:
    """The gateway error a failed Triton call becomes, with Triton's message."""
    code = exc.code()
    message = exc.details() or code.name
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return GatewayTimeout(f"upstream deadline exceeded: {message}")
    return UpstreamError(message, _HTTP_STATUS.get(code, 500))


def is_connection_failure(exc: grpc.aio.AioRpcError) -> bool:
    """True when the call never reached a serving Triton (safe to retry elsewhere)."""
    return exc.code() == grpc.StatusCode.UNAVAILABLE


class StreamCall(Protocol):
    """A ModelStreamInfer call: its serialized responses, and a way to stop it."""

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    def cancel(self) -> bool: ...


class TritonChannel:
    """One gRPC channel to one Triton server: plaintext, or TLS when ``tls`` is given.

    ``infer``/``stream`` take and return serialized protobuf bytes: plaintext, over
    the event loop's own HTTP/2 connections (gateway/grpc_h2.py), else grpc.aio's.
    ``control`` is Triton's generated stub for the (cold) metadata, health and
    repository calls, always grpc.aio.
    """

    def __init__(self, target: str, max_message_bytes: int, tls: GrpcTls | None = None) -> None:
        self.target = target
        options: list[tuple[str, str | int]] = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            # A restarted Triton must be found again quickly, not after grpc's 120 s cap.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2000),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
        ]
        if tls is None:
            self.channel = grpc.aio.insecure_channel(target, options=options)
        else:
            if tls.server_name:
                options.append(("grpc.ssl_target_name_override", tls.server_name))
            credentials = grpc.ssl_channel_credentials(
                root_certificates=tls.root_certificates,
                private_key=tls.private_key,
                certificate_chain=tls.certificate_chain,
            )
            self.channel = grpc.aio.secure_channel(target, credentials, options=options)
        self.control = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        # No serializers: grpc sends our bytes as they are and hands back raw bytes.
        self._infer = self.channel.unary_unary(_INFER.decode())
        self._stream = self.channel.stream_stream(_STREAM.decode())
        self._h2 = H2Channel(target, max_message_bytes) if tls is None else None

    async def infer(self, request: bytes, timeout: float, metadata: Metadata = ()) -> bytes:
        if self._h2 is not None:
            return await (await self._h2.call(_INFER, request, timeout, metadata)).reply()
        response: bytes = await self._infer(request, timeout=timeout, metadata=metadata or None)
        return response

    async def stream(self, request: bytes, timeout: float, metadata: Metadata = ()) -> StreamCall:
        """Open ModelStreamInfer with one request; Triton ends the stream after its
        last response because the request side is closed right after it."""
        if self._h2 is not None:
            return await self._h2.call(_STREAM, request, timeout, metadata)
        call: StreamCall = self._stream(
            iter((request,)), timeout=timeout, metadata=metadata or None
        )
        return call

    async def close(self) -> None:
        if self._h2 is not None:
            self._h2.close()
        await self.channel.close(grace=None)
