"""gateway.auth: keys → tenants, probe token, rate headers; and [tenants] in the config."""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import make_mocked_request

from fastpath.tenants import TenantLimits
from gateway import auth
from gateway.api.admin import Unauthorized
from gateway.auth import ANONYMOUS, Tenants, duration, hash_key
from gateway.config import ConfigError, TenantSpec, load_config
from gateway.errors import Overloaded

KEY_A, KEY_B = "sk-alpha-secret", "sk-beta-secret"


def tenants(probe_token: str | None = None, **limits: Any) -> Tenants:
    return Tenants(
        [
            TenantSpec("alpha", (hash_key(KEY_A),), TenantLimits(**limits)),
            TenantSpec("beta", (hash_key("old-key"), hash_key(KEY_B)), TenantLimits()),
        ],
        probe_token,
    )


def request(path: str, authorization: str | None = None) -> Any:
    headers = {"Authorization": authorization} if authorization is not None else {}
    return make_mocked_request("GET", path, headers=headers)


def test_keys_name_their_tenant() -> None:
    t = tenants()
    assert t.identify(request("/v1/models", f"Bearer {KEY_A}")) == 0
    assert t.identify(request("/v2/models/m/infer", f"bearer {KEY_B}")) == 1
    assert t.identify(request("/v2/models/m/infer", "Bearer old-key")) == 1


@pytest.mark.parametrize(
    "authorization", [None, "", "Bearer", f"Basic {KEY_A}", "Bearer wrong", f"Bearer {KEY_A}x"]
)
def test_missing_or_wrong_key_is_401_without_echoing_it(authorization: str | None) -> None:
    with pytest.raises(Unauthorized) as caught:
        tenants().identify(request("/v1/chat/completions", authorization))
    assert caught.value.status == 401
    assert KEY_A not in caught.value.message and "wrong" not in caught.value.message


def test_the_matched_digest_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    constant_time = hmac.compare_digest

    def compare(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return constant_time(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", compare)
    assert tenants().identify(request("/v1/models", f"Bearer {KEY_A}")) == 0
    assert calls == [(bytes.fromhex(hash_key(KEY_A)),) * 2]


def test_open_routes() -> None:
    none = Tenants([], None)
    assert none.identify(request("/v1/models")) == ANONYMOUS  # no tenants: no keys
    t = tenants()
    assert t.identify(request("/v2/health/ready")) == ANONYMOUS
    assert t.identify(request("/metrics")) == ANONYMOUS
    assert t.identify(request("/admin/fleet")) == ANONYMOUS  # it checks the admin token


def test_probe_token_guards_health_and_metrics() -> None:
    t = tenants(probe_token="probe")
    assert t.identify(request("/metrics", "Bearer probe")) == ANONYMOUS
    for authorization in (None, f"Bearer {KEY_A}"):
        with pytest.raises(Unauthorized):
            t.identify(request("/v2/health/live", authorization))


def test_claims_enforce_limits_and_release() -> None:
    t = tenants(max_concurrent=1, tokens_per_minute=10)
    claim = t.claim(0)
    with pytest.raises(Overloaded) as caught:
        t.claim(0)
    assert (caught.value.status, caught.value.type) == (429, "tenant_concurrency")
    assert caught.value.headers() == {"Retry-After": "1"}
    claim.count_tokens(4)
    claim.count_tokens(25)  # a running total: 21 more
    claim.close()
    claim.close()  # idempotent
    assert t.limiter.inflight(0) == 0
    with pytest.raises(Overloaded, match="tenant 'alpha'") as caught:
        t.claim(0)
    assert caught.value.type == "tenant_token_limit"
    t.claim(1).close()  # beta is unaffected


def test_rate_headers() -> None:
    t = tenants(requests_per_second=2, tokens_per_minute=600)
    t.claim(0).close()
    headers = t.rate_headers(0)
    assert headers["x-ratelimit-limit-requests"] == "2"
    assert headers["x-ratelimit-remaining-requests"] == "1"
    assert headers["x-ratelimit-limit-tokens"] == "600"
    assert headers["x-ratelimit-remaining-tokens"] == "600"
    assert headers["x-ratelimit-reset-tokens"] == "0s"
    assert t.rate_headers(1) == {}  # no limits: no headers


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0, "0s"), (0.0201, "21ms"), (1.5, "1.5s"), (60.0, "1m0s"), (80.25, "1m20.25s")],
)
def test_duration(seconds: float, text: str) -> None:
    assert duration(seconds) == text


def test_config_tenants(tmp_path: Path) -> None:
    path = tmp_path / "meshgate.toml"
    path.write_text(
        f'[gateway]\ntls_cert = "c.pem"\ntls_key = "k.pem"\n'
        f'[tenants.alpha]\nkey_sha256 = "{hash_key(KEY_A).upper()}"\n'
        "requests_per_second = 5\nmax_concurrent = 2\ntokens_per_minute = 1000\n"
        f'[tenants.beta]\nkey_sha256 = ["{hash_key(KEY_B)}"]\n'
    )
    config = load_config(path)
    assert config.tenants == (
        TenantSpec("alpha", (hash_key(KEY_A),), TenantLimits(5, 2, 1000)),
        TenantSpec("beta", (hash_key(KEY_B),), TenantLimits()),
    )
    assert config.tls_cert == tmp_path / "c.pem"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('key_sha256 = "sk-a-key-by-mistake"', "64 hex digits"),
        ("key_sha256 = []", "key_sha256 must be"),
        (f'key_sha256 = "{"0" * 64}"\nrps = 1', "unknown keys"),
        (f'key_sha256 = "{"0" * 64}"\nmax_concurrent = -1', "expected finite >= 0"),
    ],
)
def test_config_rejects_bad_tenants(tmp_path: Path, table: str, message: str) -> None:
    path = tmp_path / "meshgate.toml"
    path.write_text(f"[tenants.alpha]\n{table}\n")
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(path)
    assert "sk-a-key-by-mistake" not in str(caught.value)


def test_a_digest_may_belong_to_one_tenant_only() -> None:
    spec = TenantSpec("a", (hash_key(KEY_A),), TenantLimits())
    with pytest.raises(ConfigError, match="listed twice"):
        Tenants([spec, TenantSpec("b", spec.key_sha256, TenantLimits())], None)
