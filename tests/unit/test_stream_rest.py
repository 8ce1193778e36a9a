"""forward.StreamRest: the rest of a stream after its first reply."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any, cast

import pytest

from gateway.forward import StreamRest
from gateway.http_upstream import UpstreamConnectionError
from gateway.router import Lease


class RecordingLease:
    """What StreamRest reports to its lease."""

    def __init__(self) -> None:
        self.tokens = 0
        self.failures = 0

    def token(self) -> None:
        self.tokens += 1

    def backend_failed(self) -> None:
        self.failures += 1


async def replies(log: list[str], fail_after: int | None = None) -> AsyncGenerator[int, None]:
    try:
        for n in range(3):
            if n == fail_after:
                raise UpstreamConnectionError("connection lost")
            yield n
    finally:
        log.append("closed")


async def first_then_rest(
    log: list[str], fail_after: int | None = None
) -> tuple[int, StreamRest[int], RecordingLease]:
    """As forward.open_stream leaves a stream: its first reply read, the rest wrapped."""
    inner = replies(log, fail_after)
    first = await anext(inner)
    lease = RecordingLease()
    return first, StreamRest(cast(Lease, lease), inner), lease


def test_closing_the_rest_unread_ends_the_upstream_replies() -> None:
    """The fast lane relays an HTTP stream from its connection and never iterates the
    rest: closing it must still end the replies (and so the upstream call) now."""

    async def scenario() -> list[str]:
        log: list[str] = []
        _first, rest, _lease = await first_then_rest(log)
        await rest.aclose()
        return log

    assert asyncio.run(scenario()) == ["closed"]


def test_the_rest_counts_tokens_and_reports_a_lost_backend() -> None:
    async def scenario() -> tuple[list[Any], RecordingLease, list[str]]:
        log: list[str] = []
        first, rest, lease = await first_then_rest(log, fail_after=2)
        seen = [first]
        with pytest.raises(UpstreamConnectionError):
            async for reply in rest:
                seen.append(reply)
        await rest.aclose()
        return seen, lease, log

    seen, lease, log = asyncio.run(scenario())
    assert seen == [0, 1]
    assert (lease.tokens, lease.failures) == (1, 1)
    assert log == ["closed"]
