"""DNS discovery: backends from names that resolve to one address per Triton server.

A ``dns+grpc://NAME:PORT`` backend (a Kubernetes headless Service: one A record per
ready pod) is resolved again every ``dns_interval_s``; each address is one backend
(``DnsBackendSpec.backend``), so Triton servers join and leave without a gateway
restart. The fleet adds the addresses that appear and drains the ones that vanish.

A resolution that fails keeps the name's previous answer, so a DNS outage never
empties the fleet. That includes a name with no address at all (how an empty headless
Service answers): its last servers stay listed, fail discovery's health checks and
get no traffic, and leave at the next answer that names other servers.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence

from .config import BackendSpec, DnsBackendSpec

log = logging.getLogger("meshgate.discovery")

# (host, port) -> every (address, port) the host resolves to. Ports are part of the
# answer so that an SRV-like resolver (or a test) can name servers on other ports.
Resolver = Callable[[str, int], Awaitable[list[tuple[str, int]]]]

RESOLVE_TIMEOUT_S = 5.0


async def system_resolver(host: str, port: int) -> list[tuple[str, int]]:
    """Every TCP (address, port) the system resolver (``getaddrinfo``) gives for ``host``."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({(str(info[4][0]), int(info[4][1])) for info in infos})


class DnsDiscovery:
    """Resolves DNS names into backend specs, remembering each name's last good answer."""

    def __init__(self, names: Sequence[DnsBackendSpec], resolver: Resolver) -> None:
        self._resolver = resolver
        self._answers: dict[DnsBackendSpec, list[BackendSpec]] = {name: [] for name in names}
        self._failing: set[DnsBackendSpec] = set()

    async def resolve(self) -> list[BackendSpec]:
        """The backends every name resolves to now (see the module docstring on failures)."""
        answers = await asyncio.gather(*(self._resolve(name) for name in self._answers))
        return [spec for specs in answers for spec in specs]

    async def _resolve(self, name: DnsBackendSpec) -> list[BackendSpec]:
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT_S):
                addresses = await self._resolver(name.name, name.port)
            if not addresses:
                raise OSError("no address")
        except (OSError, TimeoutError) as exc:  # socket.gaierror is an OSError
            if name not in self._failing:
                log.warning(
                    "resolving %s failed (%s): keeping its %d backends",
                    name.name,
                    str(exc) or type(exc).__name__,
                    len(self._answers[name]),
                )
            self._failing.add(name)
            return self._answers[name]
        if name in self._failing:
            log.info("resolving %s works again", name.name)
            self._failing.discard(name)
        specs = [name.backend(address, port) for address, port in addresses]
        self._answers[name] = specs
        return specs
