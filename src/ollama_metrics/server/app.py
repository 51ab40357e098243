"""The composition root: create_app(config) wires routes, state and long-lived resources.

Every route sits behind Ollama's Host check when the proxy listens on loopback (hosts.py).
Routes: GET {metrics_path} (Prometheus), GET /test (health of proxy and upstream), the
/analytics/* API and the dashboard page at /analytics, and everything else, any method, to the
proxy. Resources live in cleanup_ctx: the upstream session and the background refresh of model
names are opened on start-up and closed on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import aiohttp
import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from .. import __version__
from ..analytics import otel_content
from ..analytics.api import AnalyticsApi, require_token
from ..analytics.privacy import Privacy
from ..analytics.recorder import Recorder
from ..analytics.settings import AnalyticsConfig
from ..analytics.stores import open_stores, queryable
from ..config import Config
from ..dashboard import routes as dashboard
from ..observe.labels import ModelLabels
from ..observe.live import Live
from ..observe.metrics import Metrics, new_registry
from ..observe.otel import Export
from ..ollama import control, ps, upstream
from . import hosts
from .proxy import Observer, Proxy, strip_own_server_header

CONFIG = web.AppKey("config", Config)
RECORDER = web.AppKey("recorder", Recorder)
LIVE = web.AppKey("live", Live)
METRICS = web.AppKey("metrics", Metrics)
SESSION = web.AppKey("session", aiohttp.ClientSession)
ANALYTICS = web.AppKey("analytics", AnalyticsConfig)
LOADED = web.AppKey("loaded", ps.Loaded)  # only while /api/ps is polled


def create_app(config: Config, registry: CollectorRegistry | None = None,
               analytics: AnalyticsConfig | None = None) -> web.Application:
    registry = registry if registry is not None else new_registry()
    analytics = analytics if analytics is not None else AnalyticsConfig(backends=())
    labels = ModelLabels(config.max_extra_models)
    metrics = Metrics(registry, labels)
    # Bodies the proxy reads whole are capped by max_parse_bytes; larger ones stream unread.
    app = web.Application(client_max_size=max(config.max_parse_bytes, 1024) + 1,
                          handler_args={"max_field_size": 65536, "max_line_size": 65536})
    app[CONFIG] = config
    app[METRICS] = metrics
    app[ANALYTICS] = analytics
    if config.listens_on_loopback:  # Ollama's rule: beyond loopback, Host is not checked
        app.middlewares.append(hosts.check_host())

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
    if config.ps_interval is not None:  # after `resources`: it polls with the upstream session
        app[LOADED] = ps.Loaded()
        app.cleanup_ctx.append(ps.poller(config, registry, lambda: app[SESSION], app[LOADED]))
    live = Live()
    app[LIVE] = live
    observers: list[Observer] = [metrics, live]
    if config.otel:  # before the recorder, which lets go of the parsed request
        export = Export(upstream=config.upstream, registry=registry, labels=labels,
                        version=__version__, protocol=config.otel_protocol,
                        content=otel_content.builder(Privacy.from_settings(analytics))
                        if config.otel_content else None)
        observers.append(export)
        app.cleanup_ctx.append(_exporting(export, config.shutdown_grace))
    stores = open_stores(analytics)
    if stores:
        recorder = Recorder(stores, analytics, registry)
        app[RECORDER] = recorder
        observers.append(recorder)
        app.cleanup_ctx.append(_recording(recorder))
    app.on_response_prepare.append(strip_own_server_header)
    proxy = Proxy(config, lambda: app[SESSION], observers)
    app.on_shutdown.append(proxy.on_shutdown)  # cuts what is still in flight after the grace
    scrape = make_aiohttp_handler(registry)
    app.router.add_get(config.metrics_path, require_token(analytics.token, scrape)
                       if analytics.protect_metrics else scrape)
    app.router.add_get("/test", _test)
    app.router.add_routes(AnalyticsApi(lambda: queryable(stores), analytics.backends)
                          .routes(analytics.token))
    app.router.add_get("/analytics/live", require_token(analytics.token, _live))
    app.router.add_get("/analytics/loaded", require_token(analytics.token, _loaded))
    app.router.add_routes(dashboard.routes(analytics.token))
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    return app


def _recording(recorder: Recorder) -> Callable[[web.Application], AsyncIterator[None]]:
    """Writers start with the app and drain on shutdown, after requests in flight ended."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        await recorder.start()
        yield
        await recorder.close()

    return ctx


def _exporting(export: Export, grace: float) -> Callable[[web.Application],
                                                             AsyncIterator[None]]:
    """The exporting process starts with the app; what still waits is sent on shutdown, off the
    event loop."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        await asyncio.to_thread(export.start)
        yield
        await asyncio.to_thread(export.close, grace)

    return ctx


async def _test(request: web.Request) -> web.Response:
    """The original proxy's health route: is the proxy up, and does Ollama answer?"""
    config, analytics = request.app[CONFIG], request.app[ANALYTICS]
    health = await control.health(request.app[SESSION], config.upstream)
    body = {
        "status": "ok" if health.ok else "degraded",
        "proxy": {"name": "ollama-metrics", "version": __version__, "listen": config.listen},
        "upstream": {
            "url": config.upstream_shown,
            "reachable": health.ok,
            "version": health.version,
            "error": health.error,
        },
        # Where analytics go, for `ollama-metrics status`.
        "analytics": {"backends": list(analytics.backends),
                      "dir": str(analytics.dir.absolute())
                      if {"sqlite", "jsonl"} & set(analytics.backends)
                      else None},
    }
    return web.json_response(body, status=200 if health.ok else 503)


async def _live(request: web.Request) -> web.Response:
    """Requests in flight and the latest completions (for `ollama-metrics top`)."""
    try:
        recent = min(max(int(request.query.get("recent", "20")), 0), 500)
    except ValueError:
        return web.json_response({"error": "recent: expected a whole number"}, status=400)
    return web.Response(body=orjson.dumps(request.app[LIVE].snapshot(recent)),
                        content_type="application/json")


async def _loaded(request: web.Request) -> web.Response:
    """What Ollama has in memory, from the latest /api/ps poll (for the dashboard)."""
    loaded = request.app.get(LOADED)
    return web.Response(body=orjson.dumps(loaded.as_json() if loaded else {"polling": False}),
                        content_type="application/json")
