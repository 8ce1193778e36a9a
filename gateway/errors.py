"""One exception tree for the gateway; each error knows its HTTP status and JSON body.

Bodies follow Triton's shape, ``{"error": "<message>"}``, plus a stable ``type`` so
clients can branch without parsing messages. No traceback ever reaches a client.
"""

from __future__ import annotations

import orjson


class GatewayError(Exception):
    """Base of every error the gateway answers with; never raised directly."""

    status: int = 500
    type: str = "internal_error"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after

    def body(self) -> bytes:
        return orjson.dumps({"error": self.message, "type": self.type})

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, round(self.retry_after)))}


class BadRequest(GatewayError):
    status = 400
    type = "invalid_request"


class NotFound(GatewayError):
    status = 404
    type = "not_found"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "payload_too_large"


class Overloaded(GatewayError):
    status = 429
    type = "overloaded"


class Unavailable(GatewayError):
    """No backend can serve the request now (not ready, unreachable)."""

    status = 503
    type = "unavailable"


class UpstreamError(GatewayError):
    """Triton answered with an error; status follows the gRPC code."""

    type = "upstream_error"

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class GatewayTimeout(GatewayError):
    status = 504
    type = "timeout"
