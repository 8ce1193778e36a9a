"""grpcs:// backends against a real Triton whose gRPC endpoint demands mutual TLS.

The certificates come from a throwaway CA made in the test (tests/pki.py); the server
certificate names ``localhost`` only, so the gateway, dialling 127.0.0.1, needs
``server_name=localhost``. Triton's HTTP port stays plain, which is what the fleet's
readiness wait uses; the gateway is given no ``http=``, so unary infer goes over TLS too.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import aiohttp
import numpy as np
import pytest

from gateway.local_triton import TritonFleet, TritonServer, find_free_port_base
from tests.e2e.conftest import (
    MODEL_REPOSITORY,
    Gateway,
    admin_fleet,
    http_status,
    start_gateway,
    stop_gateway,
)
from tests.e2e.test_kserve import embed_reference
from tests.pki import Pki, make_pki

pytestmark = pytest.mark.e2e

ADMIN_TOKEN = "grpc-tls-admin"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("grpc-tls-pki"))


@pytest.fixture(scope="module")
def mtls_triton(pki: Pki, run_dir: Path) -> Iterator[TritonServer]:
    fleet = TritonFleet(
        count=1,
        port_base=find_free_port_base(1),
        model_repository=MODEL_REPOSITORY,
        log_dir=run_dir / "grpc-tls-triton",
        extra_args=[
            "--grpc-use-ssl=true",
            "--grpc-use-ssl-mutual=true",  # Triton 2.51: refuse clients without a cert
            f"--grpc-server-cert={pki.server_cert}",
            f"--grpc-server-key={pki.server_key}",
            f"--grpc-root-cert={pki.ca}",
        ],
    )
    with fleet:
        yield fleet.servers[0]


def grpcs_backend(server: TritonServer, **files: Path | str) -> str:
    """A grpcs:// URL of ``server`` with its metrics, and no plain-HTTP passthrough."""
    query = "&".join(f"{name}={quote(str(value))}" for name, value in files.items())
    return f"grpcs://{server.grpc_url}?{query}&metrics={quote(server.metrics_url)}"


def start(server: TritonServer, log_path: Path, **files: Path | str) -> Gateway:
    return start_gateway([grpcs_backend(server, **files)], log_path, "--admin-token", ADMIN_TOKEN)


@pytest.fixture(scope="module")
def mtls_gateway(mtls_triton: TritonServer, pki: Pki, run_dir: Path) -> Iterator[Gateway]:
    gateway = start(
        mtls_triton,
        run_dir / "grpc-tls-gateway.log",
        ca=pki.ca,
        cert=pki.client_cert,
        key=pki.client_key,
        server_name="localhost",
    )
    try:
        deadline = time.monotonic() + 60
        while http_status(gateway.url + "/v2/models/tiny_lm/ready") != 200:
            if time.monotonic() > deadline or gateway.process.poll() is not None:
                raise RuntimeError(f"never ready:\n{gateway.log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield gateway
    finally:
        stop_gateway(gateway)


async def test_streams_and_infer_over_mutual_tls(mtls_gateway: Gateway) -> None:
    (backend,) = (await admin_fleet(mtls_gateway, ADMIN_TOKEN))["backends"]
    assert backend["reachable"] and backend["ready"] and backend["last_error"] == ""
    async with aiohttp.ClientSession() as session:
        async with session.post(
            mtls_gateway.url + "/v2/models/tiny_lm/generate_stream",
            json={"text_input": "We hold these truths", "max_tokens": 5, "stream": True},
        ) as reply:
            assert reply.status == 200, await reply.text()
            events = [
                json.loads(line[len(b"data: ") :])
                async for line in reply.content
                if line.startswith(b"data: ")
            ]
        assert len(events) == 5 and all("text_output" in e for e in events), events
        x = np.linspace(-1, 1, 384, dtype=np.float32).reshape(1, 384)
        body = {
            "inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [1, 384], "data": x.tolist()}]
        }
        async with session.post(mtls_gateway.url + "/v2/models/embed/infer", json=body) as reply:
            assert reply.status == 200, await reply.text()
            (output,) = (await reply.json())["outputs"]
    np.testing.assert_allclose(
        np.array(output["data"], dtype=np.float32).reshape(1, 128),
        embed_reference(x),
        rtol=1e-4,
        atol=1e-5,
    )


EMBED_BODY = {
    "inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [1, 384], "data": [0.0] * 384}]
}


async def wait_for_failed_discovery(gateway: Gateway) -> str:
    """The backend's last_error once discovery has tried it and failed."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        (backend,) = (await admin_fleet(gateway, ADMIN_TOKEN))["backends"]
        if backend["last_error"]:
            return str(backend["last_error"])
        await asyncio.sleep(0.2)
    raise AssertionError(f"discovery never failed:\n{gateway.log_path.read_text()[-3000:]}")


async def test_missing_client_cert_or_server_name_gets_no_backend(
    mtls_gateway: Gateway, mtls_triton: TritonServer, pki: Pki, run_dir: Path
) -> None:
    # mtls_gateway is the control: the same Triton serves a gateway with every piece.
    cases = {
        # Trusts the server but has no certificate to show: mutual TLS must refuse it.
        "no-cert": {"ca": pki.ca, "server_name": "localhost"},
        # Has every file, but checks the certificate against 127.0.0.1, which it does not name.
        "no-name": {"ca": pki.ca, "cert": pki.client_cert, "key": pki.client_key},
    }
    gateways: dict[str, Gateway] = {}
    try:
        for case, files in cases.items():
            gateways[case] = start(mtls_triton, run_dir / f"grpc-tls-{case}.log", **files)
        errors = {case: await wait_for_failed_discovery(gw) for case, gw in gateways.items()}
        assert "Hostname Verification" in errors["no-name"], errors
        await asyncio.sleep(2.0)  # four more discovery passes: still nothing
        async with aiohttp.ClientSession() as session:
            for gateway in gateways.values():
                (backend,) = (await admin_fleet(gateway, ADMIN_TOKEN))["backends"]
                assert not backend["reachable"] and not backend["ready"], backend
                async with session.post(
                    gateway.url + "/v2/models/tiny_lm/generate_stream",
                    json={"text_input": "x", "max_tokens": 1, "stream": True},
                ) as reply:
                    assert reply.status == 503, await reply.text()
                    assert "error" in await reply.json()
                async with session.post(
                    gateway.url + "/v2/models/embed/infer", json=EMBED_BODY
                ) as reply:
                    assert reply.status == 503, await reply.text()
    finally:
        for gateway in gateways.values():
            stop_gateway(gateway)
