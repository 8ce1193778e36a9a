"""Fleet.model_info: a backend that lost the model between ranking and the attempt is
ModelGone (failover tries the next one), not an internal error."""

from __future__ import annotations

import pytest

from gateway.config import GatewayConfig, parse_backends
from gateway.errors import ModelGone
from gateway.fleet import Backend, Fleet, ModelInfo


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
