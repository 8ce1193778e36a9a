"""DNS discovery: parsing dns+grpc:// names, re-resolution, and the fleet's membership
changes (join, drain-then-leave, rejoin) with an injected resolver.

Backends here point at a closed port, so discovery finds them unreachable at once; the
end-to-end test (tests/e2e/test_dns_discovery.py) does the same against real Tritons.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import pytest
from aiohttp import web

from gateway.config import BackendSpec, ConfigError, DnsBackendSpec, GatewayConfig, parse_backends
from gateway.discovery import DnsDiscovery, system_resolver
from gateway.fleet import Fleet
from gateway.outliers import OutlierDetector
from gateway.signals import SignalPlane
from tests.conftest import free_port

NAME = "triton-headless"


def test_parse_dns_backend() -> None:
    spec = DnsBackendSpec.parse(f"dns+grpc://{NAME}:8001?metrics_port=8002&http_port=8000")
    assert spec == DnsBackendSpec(NAME, 8001, metrics_port=8002, http_port=8000)
    assert DnsBackendSpec.parse(f"dns+grpc://{NAME}:8001") == DnsBackendSpec(NAME, 8001)


@pytest.mark.parametrize(
    "url",
    [
        f"dns+grpc://{NAME}",  # no port
        f"dns+grpc://{NAME}:8001?metrics=http://x:8002/metrics",  # grpc:// parameter
        f"dns+grpc://{NAME}:8001?metrics_port=http",
        f"dns+grpc://{NAME}:8001?http_port=70000",
    ],
)
def test_parse_dns_backend_refuses(url: str) -> None:
    with pytest.raises(ConfigError, match="backend"):
        DnsBackendSpec.parse(url)


def test_parse_backends_splits_fixed_and_dns() -> None:
    fixed, dns = parse_backends(["grpc://a:8001", f"dns+grpc://{NAME}:8001", "grpc://b:8001"])
    assert [s.id for s in fixed] == ["b0", "b1"]
    assert dns == (DnsBackendSpec(NAME, 8001),)


def test_backend_per_address() -> None:
    name = DnsBackendSpec(NAME, 8001, metrics_port=8002, http_port=8000)
    assert name.backend("10.0.0.5", 8001) == BackendSpec(
        id=f"{NAME}@10.0.0.5",
        grpc_target="10.0.0.5:8001",
        metrics_url="http://10.0.0.5:8002/metrics",
        http_target="10.0.0.5:8000",
    )
    # An SRV-like answer on another port: the id names the port, the others shift with it.
    other = name.backend("127.0.0.1", 9001)
    assert other.id == f"{NAME}@127.0.0.1:9001"
    assert other.metrics_url == "http://127.0.0.1:9002/metrics"
    assert other.http_target == "127.0.0.1:9000"
    assert name.backend("fd00::5", 8001).grpc_target == "[fd00::5]:8001"
    assert DnsBackendSpec(NAME, 8001).backend("10.0.0.5", 8001).metrics_url is None


async def test_system_resolver_resolves_localhost() -> None:
    assert ("127.0.0.1", 8001) in await system_resolver("localhost", 8001)


class ScriptedDns:
    """A resolver whose answer the test sets; ``None`` makes it fail like a DNS outage."""

    def __init__(self, answer: list[tuple[str, int]] | None) -> None:
        self.answer = answer
        self.asked: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> list[tuple[str, int]]:
        self.asked.append((host, port))
        if self.answer is None:
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return list(self.answer)


async def test_resolution_keeps_last_answer_on_failure() -> None:
    dns = ScriptedDns([("10.0.0.1", 8001)])
    discovery = DnsDiscovery([DnsBackendSpec(NAME, 8001)], dns)
    assert [s.id for s in await discovery.resolve()] == [f"{NAME}@10.0.0.1"]
    dns.answer = [("10.0.0.1", 8001), ("10.0.0.2", 8001)]
    assert [s.id for s in await discovery.resolve()] == [f"{NAME}@10.0.0.1", f"{NAME}@10.0.0.2"]
    for failure in (None, []):
        dns.answer = failure
        assert len(await discovery.resolve()) == 2
    dns.answer = [("10.0.0.2", 8001)]
    assert [s.id for s in await discovery.resolve()] == [f"{NAME}@10.0.0.2"]
    assert dns.asked[0] == (NAME, 8001)


class Membership:
    """A fleet listener that records what it was told."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def backend_added(self, spec: BackendSpec) -> None:
        self.events.append(("added", spec.id))

    def backend_removed(self, backend_id: str) -> None:
        self.events.append(("removed", backend_id))


def closed_port() -> int:
    return free_port()  # nothing listens on it: every gRPC call fails fast


def dns_fleet(dns: ScriptedDns, port: int) -> Fleet:
    config = GatewayConfig(
        dns_backends=(DnsBackendSpec(NAME, port),),
        resolver=dns,
        dns_interval_s=0.05,
        discovery_interval_s=60.0,
    )
    return Fleet(config)


BACKEND = "b0"


def fixed_fleet(drain_timeout_s: float = 10.0) -> Fleet:
    """One backend given as grpc://, so only the test adds and removes backends."""
    spec = BackendSpec(id=BACKEND, grpc_target=f"127.0.0.1:{closed_port()}")
    config = GatewayConfig(
        backends=(spec,), discovery_interval_s=60.0, drain_timeout_s=drain_timeout_s
    )
    return Fleet(config)


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def test_backends_join_and_leave_as_dns_changes() -> None:
    port = closed_port()
    dns = ScriptedDns([("127.0.0.1", port)])
    fleet = dns_fleet(dns, port)
    members = Membership()
    fleet.listeners.append(members)
    await fleet.start()
    try:
        first, second = f"{NAME}@127.0.0.1", f"{NAME}@127.0.0.1:{port + 1}"
        assert list(fleet.by_id) == [first]
        dns.answer = [("127.0.0.1", port), ("127.0.0.1", port + 1)]
        await wait_for(lambda: second in fleet.by_id)
        dns.answer = [("127.0.0.1", port + 1)]
        await wait_for(lambda: first not in fleet.by_id)
        assert [b.id for b in fleet.backends] == [second]
        assert members.events == [("added", first), ("added", second), ("removed", first)]
    finally:
        await fleet.close()


async def test_leaving_backend_drains_its_inflight_requests() -> None:
    fleet = fixed_fleet()
    await fleet.start()
    try:
        backend_id = BACKEND
        slot = fleet.state.slot(backend_id, "m")
        fleet.state.dispatched(slot)  # a request in flight on it
        leaving = fleet.remove_backend(backend_id)
        await asyncio.sleep(0.3)
        assert not leaving.done() and backend_id in fleet.by_id
        assert fleet.state.describe_slot(slot, 0.0)["draining"]
        fleet.state.finished(slot)
        await asyncio.wait_for(leaving, 1.0)
        assert backend_id not in fleet.by_id
        assert not fleet.state.describe_slot(slot, 0.0)["ready"]
    finally:
        await fleet.close()


async def test_leaving_backend_goes_after_the_drain_timeout() -> None:
    fleet = fixed_fleet(drain_timeout_s=0.2)
    await fleet.start()
    try:
        backend_id = BACKEND
        fleet.state.dispatched(fleet.state.slot(backend_id, "m"))  # never finishes
        await asyncio.wait_for(fleet.remove_backend(backend_id), 2.0)
        assert backend_id not in fleet.by_id
    finally:
        await fleet.close()


async def test_rejoin_while_draining_cancels_the_leave() -> None:
    fleet = fixed_fleet()
    await fleet.start()
    try:
        backend_id = BACKEND
        backend = fleet.by_id[backend_id]
        slot = fleet.state.slot(backend_id, "m")
        fleet.state.dispatched(slot)
        leaving = fleet.remove_backend(backend_id)
        await fleet.add_backend(backend.spec)
        await asyncio.gather(leaving, return_exceptions=True)
        assert leaving.cancelled()
        assert fleet.by_id[backend_id] is backend
        assert not fleet.state.describe_slot(slot, 0.0)["draining"]
    finally:
        await fleet.close()


async def test_outlier_records_of_a_departed_backend_are_dropped() -> None:
    fleet = fixed_fleet()
    await fleet.start()
    try:
        backend_id = BACKEND
        detector = OutlierDetector(fleet, GatewayConfig().outlier)
        for _ in range(GatewayConfig().outlier.consecutive_failures):
            detector.failed(backend_id)
        await fleet.remove_backend(backend_id)
        await detector._check()  # would raise KeyError on the departed backend
        assert detector.describe(backend_id)["consecutive_failures"] == 0
    finally:
        await fleet.close()


METRICS = 'nv_inference_pending_request_count{model="m",version="1"} 3\n'


async def test_signal_plane_scrapes_joined_backends_only() -> None:
    scrapes: dict[int, int] = {}

    async def metrics(request: web.Request) -> web.Response:
        port = request.url.port or 0
        scrapes[port] = scrapes.get(port, 0) + 1
        return web.Response(text=METRICS)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    ports = [free_port(), free_port()]
    for port in ports:
        await web.TCPSite(runner, "127.0.0.1", port).start()
    # gRPC on the closed port p - 1, metrics on p: metrics_port keeps that distance.
    name = DnsBackendSpec(NAME, ports[0] - 1, metrics_port=ports[0])
    dns = ScriptedDns([("127.0.0.1", ports[0] - 1)])
    config = GatewayConfig(
        dns_backends=(name,), resolver=dns, dns_interval_s=0.05, scrape_interval_s=0.05
    )
    fleet = Fleet(config)
    signals = SignalPlane(fleet, config)
    await fleet.start()
    await signals.start()
    try:
        first = name.backend("127.0.0.1", ports[0] - 1).id
        second = name.backend("127.0.0.1", ports[1] - 1).id
        assert scrapes.get(ports[0])
        dns.answer = [("127.0.0.1", ports[0] - 1), ("127.0.0.1", ports[1] - 1)]
        await wait_for(lambda: scrapes.get(ports[1], 0) >= 2)
        assert fleet.state.describe_slot(fleet.state.slot(second, "m"), 0.0)["queue_depth"] == 3
        dns.answer = [("127.0.0.1", ports[1] - 1)]
        await wait_for(lambda: first not in fleet.by_id)
        await asyncio.sleep(0.1)  # a scrape in progress at removal may still land
        stopped_at = scrapes[ports[0]]
        await asyncio.sleep(0.3)
        assert scrapes[ports[0]] == stopped_at
        assert scrapes[ports[1]] > 2
    finally:
        await signals.close()
        await fleet.close()
        await runner.cleanup()
