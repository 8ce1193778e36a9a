"""grpcs:// backends: parsing the URL (files read once, clear errors) and the TLS channel
``TritonChannel`` opens from it, checked against an in-process grpc server on 127.0.0.1.

The end-to-end test against a real Triton is tests/e2e/test_grpc_tls.py.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

import grpc
import pytest
from tritonclient.grpc import service_pb2 as pb

from gateway.config import BackendSpec, ConfigError, GrpcTls, load_config, parse_backends
from gateway.upstream import TritonChannel
from tests.pki import Pki, make_pki

MAX_MESSAGE = 1 << 20


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def grpcs_url(
    port: int = 8001,
    *,
    ca: Path | None = None,
    cert: Path | None = None,
    key: Path | None = None,
    server_name: str | None = None,
    extra: str = "",
) -> str:
    params = [
        f"{name}={quote(str(value))}"
        for name, value in (("ca", ca), ("cert", cert), ("key", key), ("server_name", server_name))
        if value is not None
    ]
    if extra:
        params.append(extra)
    return f"grpcs://127.0.0.1:{port}" + ("?" + "&".join(params) if params else "")


def test_grpcs_reads_every_file_once_at_parse(pki: Pki, tmp_path: Path) -> None:
    # Copies, removed after parsing: the spec must carry the bytes, not the paths.
    files = {}
    for name, source in (("ca", pki.ca), ("cert", pki.client_cert), ("key", pki.client_key)):
        files[name] = tmp_path / f"{name}.pem"
        files[name].write_bytes(source.read_bytes())
    url = grpcs_url(
        9001,
        **files,
        server_name="localhost",
        extra="metrics=http://127.0.0.1:9002/metrics&http=127.0.0.1:9000&id=t0",
    )
    spec = BackendSpec.parse(url, "b0")
    for path in files.values():
        path.unlink()
    assert spec == BackendSpec(
        id="t0",
        grpc_target="127.0.0.1:9001",
        metrics_url="http://127.0.0.1:9002/metrics",
        http_target="127.0.0.1:9000",
        tls=GrpcTls(
            root_certificates=pki.ca.read_bytes(),
            certificate_chain=pki.client_cert.read_bytes(),
            private_key=pki.client_key.read_bytes(),
            server_name="localhost",
        ),
    )
    # Key material never shows in a repr (logs, tracebacks).
    assert b"PRIVATE KEY" in pki.client_key.read_bytes()
    assert "PRIVATE KEY" not in repr(spec) and "BEGIN" not in repr(spec)
    assert "server_name='localhost'" in repr(spec)


def test_grpcs_without_parameters_uses_system_roots() -> None:
    spec = BackendSpec.parse("grpcs://triton.example:443", "b0")
    assert spec.grpc_target == "triton.example:443"
    assert spec.tls == GrpcTls()


def test_grpc_stays_plaintext() -> None:
    spec = BackendSpec.parse("grpc://127.0.0.1:8001?http=127.0.0.1:8000", "b0")
    assert spec.tls is None
    assert BackendSpec.parse("127.0.0.1:8001", "b0").tls is None
    # Blank values still mean "not set", as before.
    assert BackendSpec.parse("grpc://h:1?metrics=&http=&id=", "b3") == BackendSpec("b3", "h:1")


def test_ca_only_is_server_tls(pki: Pki) -> None:
    tls = BackendSpec.parse(grpcs_url(ca=pki.ca), "b0").tls
    assert tls == GrpcTls(root_certificates=pki.ca.read_bytes())


def error_of(url: str) -> str:
    with pytest.raises(ConfigError) as caught:
        BackendSpec.parse(url, "b0")
    return str(caught.value)


@pytest.mark.parametrize("only", ["cert", "key"])
def test_cert_and_key_go_together(pki: Pki, only: str) -> None:
    path = pki.client_cert if only == "cert" else pki.client_key
    message = error_of(grpcs_url(**{only: path}))  # type: ignore[arg-type]
    assert "cert and key go together" in message


def test_unreadable_file_is_named(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "ca.pem"
    message = error_of(grpcs_url(ca=missing))
    assert f"ca file {missing}" in message and "No such file" in message
    message = error_of(grpcs_url(cert=pki.client_cert, key=tmp_path))  # a directory
    assert f"key file {tmp_path}:" in message


def test_non_pem_file_is_named(pki: Pki, tmp_path: Path) -> None:
    garbage = tmp_path / "ca.der"
    garbage.write_bytes(b"\x30\x82\x01\x0a not a certificate")
    assert f"ca file {garbage} is not PEM" in error_of(grpcs_url(ca=garbage))
    # PEM armour around no certificate: ssl says so at parse, not grpc at first handshake.
    fake = tmp_path / "fake.pem"
    fake.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    assert f"ca file {fake}:" in error_of(grpcs_url(ca=fake))


def test_mismatched_key_is_refused_at_parse(pki: Pki) -> None:
    message = error_of(grpcs_url(cert=pki.client_cert, key=pki.server_key))
    assert f"cert file {pki.client_cert} with key file {pki.server_key}" in message


def test_encrypted_key_is_refused_without_prompting(pki: Pki, tmp_path: Path) -> None:
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(
        [
            *("openssl", "pkey", "-in", str(pki.client_key), "-aes256"),
            *("-passout", "pass:secret", "-out", str(encrypted)),
        ],
        check=True,
        capture_output=True,
    )
    message = error_of(grpcs_url(cert=pki.client_cert, key=encrypted))
    assert f"key file {encrypted} is encrypted" in message


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("grpc://127.0.0.1:8001?ca=/etc/ca.pem", "['ca'] need the grpcs:// scheme"),
        ("grpc://127.0.0.1:8001?server_name=localhost", "need the grpcs:// scheme"),
        ("grpcs://127.0.0.1:8001?sever_name=localhost", "unknown parameters ['sever_name']"),
        ("grpcs://127.0.0.1:8001?ca=", "['ca'] must not be empty"),
        ("grpcs://127.0.0.1", "expected grpcs://HOST:PORT"),
        ("https://127.0.0.1:8001", "expected scheme grpc:// or grpcs://"),
    ],
)
def test_bad_urls(url: str, expected: str) -> None:
    assert expected in error_of(url)


def test_config_file_paths_are_relative_to_it(pki: Pki, tmp_path: Path) -> None:
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "ca.pem").write_bytes(pki.ca.read_bytes())
    config = tmp_path / "meshgate.toml"
    config.write_text('backends = ["grpcs://127.0.0.1:8001?ca=certs/ca.pem"]\n')
    (spec,) = load_config(config).backends
    assert spec.tls == GrpcTls(root_certificates=pki.ca.read_bytes())
    # On the command line (no base) the same URL is relative to the working directory.
    with pytest.raises(ConfigError, match=re.escape("ca file certs/ca.pem")):
        parse_backends(["grpcs://127.0.0.1:8001?ca=certs/ca.pem"])


# -- the channel, against a grpc server that demands a client certificate --------------


@pytest.fixture
async def mtls_port(pki: Pki) -> AsyncIterator[int]:
    server = grpc.aio.server()  # no services: a call that gets through is UNIMPLEMENTED
    credentials = grpc.ssl_server_credentials(
        [(pki.server_key.read_bytes(), pki.server_cert.read_bytes())],
        root_certificates=pki.ca.read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        yield port
    finally:
        await server.stop(grace=None)


async def call_code(url: str) -> grpc.StatusCode:
    spec = BackendSpec.parse(url, "b0")
    channel = TritonChannel(spec.grpc_target, MAX_MESSAGE, spec.tls)
    try:
        await channel.control.ServerReady(pb.ServerReadyRequest(), timeout=5)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    finally:
        await channel.close()
    raise AssertionError("a server without services answered ServerReady")


async def test_channel_speaks_mutual_tls(pki: Pki, mtls_port: int) -> None:
    full = {"ca": pki.ca, "cert": pki.client_cert, "key": pki.client_key}
    # The handshake succeeds: the call reaches the server, which has no such method.
    ok = grpcs_url(mtls_port, **full, server_name="localhost")
    assert await call_code(ok) == grpc.StatusCode.UNIMPLEMENTED
    # Each missing piece fails the handshake, so the call never gets there.
    no_client_cert = grpcs_url(mtls_port, ca=pki.ca, server_name="localhost")
    assert await call_code(no_client_cert) == grpc.StatusCode.UNAVAILABLE
    # The certificate names localhost only: without the override 127.0.0.1 does not match.
    no_override = grpcs_url(mtls_port, **full)
    assert await call_code(no_override) == grpc.StatusCode.UNAVAILABLE
    # System roots do not trust the test CA.
    untrusted = grpcs_url(
        mtls_port, cert=pki.client_cert, key=pki.client_key, server_name="localhost"
    )
    assert await call_code(untrusted) == grpc.StatusCode.UNAVAILABLE
    # Plaintext to a TLS port fails too.
    plain = f"grpc://127.0.0.1:{mtls_port}"
    assert await call_code(plain) == grpc.StatusCode.UNAVAILABLE
