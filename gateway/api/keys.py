"""Typed keys for what the app shares with its handlers."""

from aiohttp import web

from ..config import GatewayConfig
from ..fleet import Fleet
from ..router import Router

CONFIG = web.AppKey("config", GatewayConfig)
FLEET = web.AppKey("fleet", Fleet)
ROUTER = web.AppKey("router", Router)
