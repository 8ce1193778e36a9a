"""/admin: the fleet as the router sees it, delta ingestion from sidecars, drain.

Every route needs ``Authorization: Bearer <admin_token>``, compared in constant time;
with no admin token configured the admin API answers 403 to everyone.
"""

from __future__ import annotations

import hmac
import os
import time

import orjson
from aiohttp import web

from adapters.deltas import deltas_from_json
from fastpath.state import POLICY_NAMES

from ..errors import BadRequest, GatewayError, NotFound
from ..kserve_codec import parse_json
from .keys import CONFIG, FLEET, ROUTER

_POLICY_BY_ID = {v: k for k, v in POLICY_NAMES.items()}


class Unauthorized(GatewayError):
    status = 401
    type = "unauthorized"
    openai_type = "authentication_error"


class Forbidden(GatewayError):
    status = 403
    type = "forbidden"
    openai_type = "permission_error"


def add_routes(app: web.Application) -> None:
    app.router.add_get("/admin/fleet", fleet_view)
    app.router.add_post("/admin/deltas", ingest_deltas)
    app.router.add_post("/admin/backends/{backend}/drain", drain)
    app.router.add_post("/admin/backends/{backend}/undrain", undrain)


def _authorize(request: web.Request) -> None:
    token = request.app[CONFIG].admin_token
    if not token:
        raise Forbidden("the admin API is disabled: set admin_token (or MESHGATE_ADMIN_TOKEN)")
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
        raise Unauthorized("missing or wrong admin token")


def _json(value: object) -> web.Response:
    # The state array's numbers are numpy scalars; orjson serializes them with this flag.
    body = orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)
    return web.Response(body=body, content_type="application/json")


async def fleet_view(request: web.Request) -> web.Response:
    """Every backend, its health and per-model signals with ages, and each model's
    policy and current ranking (best first) under that policy. With ``--workers N``,
    ``pid`` names the worker that answered: the backends' signals and per-slot in-flight
    counts are the whole gateway's, a model's admitted ``inflight`` and ``outlier`` are
    that worker's."""
    _authorize(request)
    fleet = request.app[FLEET]
    router = request.app[ROUTER]
    now = time.monotonic()
    models = {}
    for model in fleet.state.model_index:
        policy = router.policy_of(model)
        candidates = fleet.candidates(model)
        ranked = router.scorer.rank(candidates, policy, now, 0)
        models[model] = {
            "policy": _POLICY_BY_ID[policy],
            "ranking": [
                fleet.state.slot_keys[s][0] for s in router.scorer.ranked[:ranked].tolist()
            ],
            "saturated": router.scorer.saturated,
            # Hybrid score per backend (lower is better), whatever the policy ranks by.
            "scores": {
                fleet.state.slot_keys[s][0]: router.scorer.score(s) for s in candidates.tolist()
            },
            "inflight": router.admitter.inflight(fleet.state.model_index[model]),
        }
    backends = await fleet.view(now)
    for backend in backends:
        backend["outlier"] = router.outliers.describe(backend["id"])
    return _json({"backends": backends, "models": models, "pid": os.getpid()})


async def ingest_deltas(request: web.Request) -> web.Response:
    _authorize(request)
    try:
        deltas = deltas_from_json(parse_json(await request.read(), "deltas"))
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    applied = await request.app[FLEET].apply_deltas(deltas)
    return _json({"received": len(deltas), "applied": applied})


def _set_draining(request: web.Request, draining: bool) -> web.Response:
    _authorize(request)
    fleet = request.app[FLEET]
    backend = request.match_info["backend"]
    if backend not in fleet.by_id:
        raise NotFound(f"no backend {backend!r}")
    fleet.state.set_draining(backend, draining)
    return _json({"backend": backend, "draining": draining})


async def drain(request: web.Request) -> web.Response:
    return _set_draining(request, True)


async def undrain(request: web.Request) -> web.Response:
    return _set_draining(request, False)
