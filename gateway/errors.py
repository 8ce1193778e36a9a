"""One exception tree for the gateway; each error knows its HTTP status and JSON body.

On Triton's surface (/v2) bodies follow Triton's shape, ``{"error": "<message>"}``,
plus a stable ``type`` so clients can branch without parsing messages. On the OpenAI
surface (/v1) they follow OpenAI's, ``{"error": {"message", "type", "param", "code"}}``.
No traceback ever reaches a client.
"""

from __future__ import annotations

import orjson
from aiohttp import web


class GatewayError(Exception):
    """Base of every error the gateway answers with; never raised directly."""

    status: int = 500
    type: str = "internal_error"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after

    # OpenAI's error type for this status; its clients map statuses to exception classes.
    openai_type: str = "server_error"
    param: str | None = None

    def body(self) -> bytes:
        return orjson.dumps({"error": self.message, "type": self.type})

    def openai_body(self) -> bytes:
        error = {
            "message": self.message,
            "type": self.openai_type,
            "param": self.param,
            "code": self.type,
        }
        return orjson.dumps({"error": error})

    def response_for(self, path: str) -> web.Response:
        """The JSON answer in the dialect of the surface ``path`` belongs to."""
        body = self.openai_body() if path.startswith("/v1/") else self.body()
        return web.Response(
            status=self.status, body=body, content_type="application/json", headers=self.headers()
        )

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, round(self.retry_after)))}


class BadRequest(GatewayError):
    status = 400
    type = "invalid_request"
    openai_type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class NotFound(GatewayError):
    status = 404
    type = "not_found"
    openai_type = "invalid_request_error"


class ModelNotFound(NotFound):
    """No text model of that name on the OpenAI surface (OpenAI's code ``model_not_found``)."""

    type = "model_not_found"
    param = "model"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "payload_too_large"
    openai_type = "invalid_request_error"


class Overloaded(GatewayError):
    """Admission refused the request; ``type`` is the reason code (saturated, over_limit)."""

    status = 429
    openai_type = "rate_limit_exceeded"

    def __init__(self, message: str, *, reason: str, retry_after: float) -> None:
        super().__init__(message, retry_after=retry_after)
        self.type = reason


class Unavailable(GatewayError):
    """No backend can serve the request now (not ready, unreachable)."""

    status = 503
    type = "no_backend"


class StatusError(GatewayError):
    """An error whose status is decided where it happens (a protocol-level refusal)."""

    type = "http_error"

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status
        if 400 <= status < 500:
            self.openai_type = "invalid_request_error"


class UpstreamError(StatusError):
    """Triton answered with an error; status follows the gRPC code."""

    type = "upstream_error"


class ModelGone(UpstreamError):
    """A backend answered that it does not have the model now (unloaded, not ready):
    safe to try the next-ranked backend, and a hint to stop routing there."""

    type = "model_not_ready"

    def __init__(self, message: str) -> None:
        super().__init__(message, 503)


# Triton's words for a model it does not (or no longer) serve, over every protocol.
TRITON_UNKNOWN_MODEL = "Request for unknown model"


class UpstreamStalled(UpstreamError):
    """A streaming upstream went quiet for longer than the stream idle timeout."""

    type = "upstream_stalled"

    def __init__(self, message: str) -> None:
        super().__init__(message, 504)


class GatewayTimeout(GatewayError):
    status = 504
    type = "timeout"
