"""The composition root: create_app(config) wires routes, state and long-lived resources.

Routes: GET {metrics_path} (Prometheus), GET /test (health of proxy and upstream), and everything
else, any method, to the proxy. Resources live in cleanup_ctx: the upstream session and the
background refresh of model names are opened on start-up and closed on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from . import __version__, upstream
from .config import Config
from .interaction import Interaction
from .labels import ModelLabels
from .metrics import Metrics, new_registry
from .proxy import Proxy, strip_own_server_header

CONFIG = web.AppKey("config", Config)
METRICS = web.AppKey("metrics", Metrics)
SESSION = web.AppKey("session", aiohttp.ClientSession)


class MetricsObserver:
    """Bridges the proxy's observer protocol to Metrics (more observers join in later issues)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def started(self, interaction: Interaction) -> object:
        return self._metrics.started(interaction)

    def finished(self, interaction: Interaction, token: object) -> None:
        assert isinstance(token, str)
        self._metrics.finished(interaction, token)


def create_app(config: Config, registry: CollectorRegistry | None = None) -> web.Application:
    registry = registry if registry is not None else new_registry()
    labels = ModelLabels(config.max_extra_models)
    metrics = Metrics(registry, labels)
    # Bodies the proxy reads whole are capped by max_parse_bytes; larger ones stream unread.
    app = web.Application(client_max_size=max(config.max_parse_bytes, 1024) + 1,
                          handler_args={"max_field_size": 65536, "max_line_size": 65536})
    app[CONFIG] = config
    app[METRICS] = metrics

    async def resources(app: web.Application) -> AsyncIterator[None]:
        session = upstream.open_session(config)
        app[SESSION] = session
        refresher = asyncio.create_task(upstream.refresh_models(session, config, labels))
        yield
        refresher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await refresher
        await session.close()

    app.cleanup_ctx.append(resources)
    app.on_response_prepare.append(strip_own_server_header)
    proxy = Proxy(config, lambda: app[SESSION], MetricsObserver(metrics))
    app.router.add_get(config.metrics_path, make_aiohttp_handler(registry))
    app.router.add_get("/test", _test)
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    return app


async def _test(request: web.Request) -> web.Response:
    """The original proxy's health route: is the proxy up, and does Ollama answer?"""
    config = request.app[CONFIG]
    health = await upstream.check(request.app[SESSION], config)
    body = {
        "status": "ok" if health.ok else "degraded",
        "proxy": {"name": "ollama-metrics", "version": __version__, "listen": config.listen},
        "upstream": {
            "url": str(config.upstream),
            "reachable": health.ok,
            "version": health.version,
            "error": health.error,
        },
    }
    return web.json_response(body, status=200 if health.ok else 503)
