"""The HTTPS listener: a self-signed certificate made in the test, a real TLS client."""

from __future__ import annotations

import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from gateway.local_triton import TritonFleet
from tests.conftest import free_port
from tests.e2e.conftest import REPO, Gateway, stop_gateway

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def https_status(url: str, context: ssl.SSLContext) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


@pytest.fixture(scope="module")
def https_gateway(
    triton_fleet: TritonFleet, run_dir: Path, certificate: tuple[Path, Path]
) -> Iterator[tuple[Gateway, ssl.SSLContext]]:
    cert, key = certificate
    config = run_dir / "tls.toml"
    config.write_text(f'[gateway]\ntls_cert = "{cert}"\ntls_key = "{key}"\n')
    port = free_port()
    log_path = run_dir / "tls-gateway.log"
    args = [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port)]
    args += ["--config", str(config)]
    for server in triton_fleet.servers:
        args += ["--backend", server.backend_url]
    with log_path.open("wb") as log:
        process = subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    gateway = Gateway(f"https://127.0.0.1:{port}", process, log_path)
    client = ssl.create_default_context(cafile=str(cert))
    try:
        for _ in range(300):  # 30 s
            if https_status(gateway.url + "/v2/models/tiny_lm/ready", client) == 200:
                break
            assert process.poll() is None, log_path.read_text()[-3000:]
            time.sleep(0.1)
        else:
            raise RuntimeError(f"HTTPS gateway not ready:\n{log_path.read_text()[-3000:]}")
        yield gateway, client
    finally:
        stop_gateway(gateway)


async def test_https_listener_serves_streams(
    https_gateway: tuple[Gateway, ssl.SSLContext],
) -> None:
    gateway, client = https_gateway
    async with aiohttp.ClientSession() as session:
        async with session.post(
            gateway.url + "/v2/models/tiny_lm/generate_stream",
            json={"text_input": "We hold these truths", "max_tokens": 5, "stream": True},
            ssl=client,
        ) as reply:
            assert reply.status == 200
            events = [line async for line in reply.content if line.startswith(b"data:")]
        assert len(events) == 5
        # Plain HTTP on the TLS port is not served.
        with pytest.raises(aiohttp.ClientError):
            async with session.get(gateway.url.replace("https", "http") + "/v2/health/live"):
                pass
    # A client that does not trust the certificate refuses the handshake.
    assert https_status(gateway.url + "/v2/health/live", ssl.create_default_context()) == 0
