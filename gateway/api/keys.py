"""Typed keys for what the app shares with its handlers."""

from dataclasses import dataclass

from aiohttp import web

from ..config import GatewayConfig
from ..fleet import Fleet
from ..router import Router

CONFIG = web.AppKey("config", GatewayConfig)
FLEET = web.AppKey("fleet", Fleet)
ROUTER = web.AppKey("router", Router)


@dataclass
class Lifecycle:
    """Set once shutdown began: readiness answers 503 while in-flight work drains."""

    draining: bool = False


LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
