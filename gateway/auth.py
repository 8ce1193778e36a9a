"""API keys → tenants, and each tenant's limits (``fastpath.tenants``) per request.

Keys are configured as SHA-256 digests (``[tenants.NAME] key_sha256``), so neither the
config file nor the process holds a key. A presented key is hashed and its digest
looked up in a dict. This is timing-safe: what the lookup's timing can depend on is
the digest of the *presented* key, which an attacker already knows and which reveals
nothing about a stored key's preimage; the matched entry is then compared with
``hmac.compare_digest`` all the same, so no byte-by-byte comparison of secret-derived
values ever short-circuits. Keys never appear in errors or logs: a refusal says only
that the key is missing or unknown.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import sys
import time
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web

from fastpath.state import ADMIT, BUCKET_REQUESTS, BUCKET_TOKENS, TENANT_REASON_NAMES
from fastpath.tenants import TenantLimiter

from .api.admin import Unauthorized
from .config import ConfigError, TenantSpec
from .errors import Overloaded

ANONYMOUS = -1  # the tenant id of every request when no tenants are configured
# Health probes (and /metrics, which another module adds) take the probe token instead.
PROBE_PATHS = ("/v2/health/", "/metrics")
_BUCKET_HEADERS = ((BUCKET_REQUESTS, "requests"), (BUCKET_TOKENS, "tokens"))

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def hash_key(key: str) -> str:
    """The ``key_sha256`` value of an API key."""
    return hashlib.sha256(key.encode()).hexdigest()


def _bearer(request: web.Request) -> bytes | None:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    value = value.strip()
    return value.encode() if scheme.lower() == "bearer" and value else None


class Tenants:
    """The configured tenants: who a request's key belongs to, and their limits."""

    def __init__(self, specs: Sequence[TenantSpec], probe_token: str | None) -> None:
        self.names = [spec.name for spec in specs]
        self._by_digest: dict[bytes, tuple[int, bytes]] = {}
        for tenant, spec in enumerate(specs):
            for hexdigest in spec.key_sha256:
                digest = bytes.fromhex(hexdigest)
                if digest in self._by_digest:
                    raise ConfigError(f"tenant {spec.name!r}: a key_sha256 is listed twice")
                self._by_digest[digest] = (tenant, digest)
        self._probe_token = probe_token.encode() if probe_token else None
        self.limiter = TenantLimiter([spec.limits for spec in specs])
        # An anonymous claim holds nothing (its methods do nothing): one serves all.
        self._anonymous = TenantClaim(self.limiter, ANONYMOUS)

    def identify(self, request: web.Request) -> int:
        """The tenant whose key the request presents, ANONYMOUS on probe routes and when
        no tenants are configured; 401 otherwise."""
        if request.path.startswith(PROBE_PATHS):
            if self._probe_token is not None:
                given = _bearer(request) or b""
                if not hmac.compare_digest(given, self._probe_token):
                    raise Unauthorized("missing or wrong probe token")
            return ANONYMOUS
        if not self._by_digest or request.path.startswith("/admin/"):
            return ANONYMOUS  # /admin checks its own token
        key = _bearer(request)
        if key is None:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        digest = hashlib.sha256(key).digest()
        entry = self._by_digest.get(digest)
        if entry is None or not hmac.compare_digest(digest, entry[1]):
            raise Unauthorized("incorrect API key")
        return entry[0]

    def claim(self, tenant: int) -> TenantClaim:
        """Admit one request of ``tenant`` against its limits, or raise 429."""
        if tenant == ANONYMOUS:
            return self._anonymous
        code = self.limiter.admit(tenant, time.monotonic())
        if code != ADMIT:
            reason = TENANT_REASON_NAMES[code]
            raise Overloaded(
                f"tenant '{self.names[tenant]}' is over its {reason.replace('_', ' ')}; "
                "retry later",
                reason=reason,
                retry_after=self.limiter.retry_after,
            )
        return TenantClaim(self.limiter, tenant)

    def rate_headers(self, tenant: int) -> dict[str, str]:
        """OpenAI's ``x-ratelimit-*`` headers for each limited bucket of ``tenant``.

        The requests bucket holds one second of requests, the tokens bucket one minute
        of tokens; ``reset`` is the time until the bucket is full again."""
        now = time.monotonic()
        headers = {}
        for bucket, name in _BUCKET_HEADERS:
            limit = self.limiter.limit(tenant, bucket)
            if limit > 0:
                remaining = self.limiter.remaining(tenant, bucket, now)
                headers[f"x-ratelimit-limit-{name}"] = f"{limit:g}"
                headers[f"x-ratelimit-remaining-{name}"] = str(math.floor(remaining))
                headers[f"x-ratelimit-reset-{name}"] = duration(
                    self.limiter.reset(tenant, bucket, now)
                )
        return headers


class TenantClaim:
    """An admitted request's hold on its tenant's limits: its concurrency slot until
    ``close``, and the tokens it generates, charged as they stream."""

    __slots__ = ("_charged", "_limiter", "_open", "_tenant")

    def __init__(self, limiter: TenantLimiter, tenant: int) -> None:
        self._limiter = limiter
        self._tenant = tenant
        self._charged = 0
        self._open = tenant != ANONYMOUS

    @property
    def charged(self) -> bool:
        """Whether this request's tokens are charged to a tenant (not anonymous)."""
        return self._open

    def count_tokens(self, total: int) -> None:
        """The request has generated ``total`` tokens so far: charge the increase."""
        if self._open and total > self._charged:
            self._limiter.charge_tokens(self._tenant, total - self._charged, time.monotonic())
            self._charged = total

    def close(self) -> None:
        """Free the concurrency slot; later calls do nothing."""
        if self._open:
            self._open = False
            self._limiter.release(self._tenant)


def duration(seconds: float) -> str:
    """A reset time as OpenAI writes it: "20ms", "1.5s", "6m0s"."""
    millis = math.ceil(seconds * 1000)
    if millis < 1000:
        return f"{millis}ms" if millis else "0s"
    minutes, rest = divmod(millis, 60_000)
    tail = f"{rest / 1000:g}s"
    return f"{minutes}m{tail}" if minutes else tail


TENANTS = web.AppKey("tenants", Tenants)
TENANT = web.RequestKey("tenant", int)


@web.middleware
def authenticate(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
    """Names the request's tenant (``request[TENANT]``), or refuses it with 401.

    Not a coroutine: it returns the handler's own, which aiohttp and the fast lane await,
    so no frame of its own waits out every request (a stream's lives as long as the
    stream, and the garbage collector walks it; gateway/loop_lag.py)."""
    request[TENANT] = request.app[TENANTS].identify(request)
    return handler(request)


async def add_rate_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: every response to a tenant, streamed, refused or not,
    says how much of its limits remain."""
    tenant = request.get(TENANT, ANONYMOUS)
    if tenant != ANONYMOUS:
        response.headers.update(request.app[TENANTS].rate_headers(tenant))


def hash_key_command(_args: object) -> int:
    """``meshgate key hash``: read a key on stdin, print its key_sha256."""
    key = sys.stdin.readline().strip()
    if not key:
        print("meshgate key hash: error: no key on stdin", file=sys.stderr)
        return 2
    print(hash_key(key))
    return 0
