"""Fleet.model_info: a backend that lost the model between ranking and the attempt is
ModelGone (failover tries the next one), not an internal error; discovery changes a
backend's models and its slots together."""

from __future__ import annotations

import asyncio

import pytest

from gateway.api.openai import _check_text_model
from gateway.config import GatewayConfig, parse_backends
from gateway.errors import ModelGone, Unavailable
from gateway.fleet import Backend, Fleet, InputSpec, ModelInfo


def _info(version: str) -> ModelInfo:
    return ModelInfo("m", version, 0, False, {}, ("OUT",))


def _fleet_of_one() -> tuple[Fleet, Backend]:
    backends, _ = parse_backends(["grpc://127.0.0.1:1"])
    fleet = Fleet(GatewayConfig(backends=backends))
    return fleet, fleet._open(backends[0])  # as discovery opens it, without the network


def test_the_newest_ready_version_or_the_one_asked_for() -> None:
    fleet, backend = _fleet_of_one()
    backend.models["m"] = {"2": _info("2"), "10": _info("10")}
    assert fleet.model_info(backend, "m").version == "10"
    assert fleet.model_info(backend, "m", "2").version == "2"


@pytest.mark.parametrize(("model", "version"), [("gone", ""), ("m", "3"), ("m", "")])
def test_a_model_no_longer_ready_there_is_model_gone(model: str, version: str) -> None:
    fleet, backend = _fleet_of_one()
    backend.models["m"] = {} if not version else {"2": _info("2")}
    with pytest.raises(ModelGone, match="no longer has model"):
        fleet.model_info(backend, model, version)


def _text_info() -> ModelInfo:
    return ModelInfo(
        "m", "1", 0, True, {"text_input": InputSpec("BYTES", (1,), False)}, ("text_output",)
    )


def _fleet_of_two() -> tuple[Fleet, Backend, Backend]:
    backends, _ = parse_backends(["grpc://127.0.0.1:1", "grpc://127.0.0.1:2"])
    fleet = Fleet(GatewayConfig(backends=backends))
    first, second = (fleet._open(spec) for spec in backends)
    for backend in (first, second):
        backend.reachable = backend.ready = True
        backend.known_models = frozenset({"m"})
        backend.models = {"m": {"1": _text_info()}}
        fleet._mark_slots(backend)
    return fleet, first, second


def test_a_backend_that_fails_discovery_leaves_the_ranking_before_the_others_answer() -> None:
    """Its models and its slots change together: a request checked in between (the
    /v1 model check reads a READY slot's models) must not find a READY slot without
    models (CI saw 123 such requests answered 503 while a slower backend was asked)."""

    async def scenario() -> None:  # in a loop: the fleet's gRPC channels want one
        fleet, lost, slow = _fleet_of_two()
        answer = asyncio.Event()

        async def refresh(backend: Backend) -> None:
            if backend is lost:  # a refused connection fails at once
                backend.reachable = backend.ready = False
                backend.models = {}
            else:
                await answer.wait()

        fleet._refresh_backend = refresh  # type: ignore[method-assign]
        discovery = asyncio.create_task(fleet.refresh())
        await asyncio.sleep(0.01)  # the lost backend has failed; the slow one is pending
        assert fleet.ready_backends("m") == [slow]
        answer.set()
        await discovery
        assert fleet.ready_backends("m") == [slow]

    asyncio.run(scenario())


def test_the_openai_model_check_skips_a_backend_that_lost_the_model() -> None:
    async def scenario() -> None:  # in a loop: the fleet's gRPC channels want one
        fleet, lost, _ = _fleet_of_two()
        lost.models = {}  # discovery cleared it; its slot is still READY
        _check_text_model(fleet, "m")  # answered from the other backend
        for backend in fleet.backends:
            backend.models = {}
        with pytest.raises(Unavailable, match="no backend has model 'm' ready"):
            _check_text_model(fleet, "m")

    asyncio.run(scenario())
