"""The composition root: create_app(config) wires routes, state and long-lived resources.

Every route sits behind Ollama's Host check when the proxy listens on loopback (hosts.py).
Routes: GET {metrics_path} (Prometheus), GET /test (health of proxy and upstream), the
/analytics/* API and the dashboard page at /analytics, and everything else, any method, to the
proxy. Resources live in cleanup_ctx: the upstream session and the background refresh of model
names are opened on start-up and closed on shutdown.

As one of the workers of `--workers N` (given `shared`, server/workers.py): /metrics shows every
process's metrics (multiprocess mode) and the main process's /api/ps snapshot, the model label
bound is shared, /analytics/live merges every worker's requests, and records go to the one
writer process the main process started (`writer`, its address).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

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
from ..observe.metrics import Metrics, multiprocess_registry, new_registry
from ..observe.otel import Export
from ..ollama import control, ps, upstream
from . import hosts
from .fast import PLANE, Plane
from .proxy import Observer, Proxy, strip_own_server_header
from .shared import Shared

CONFIG = web.AppKey("config", Config)
RECORDER = web.AppKey("recorder", Recorder)
LIVE = web.AppKey("live", Live)
METRICS = web.AppKey("metrics", Metrics)
SESSION = web.AppKey("session", aiohttp.ClientSession)
ANALYTICS = web.AppKey("analytics", AnalyticsConfig)
LOADED = web.AppKey("loaded", ps.Loaded)  # only while /api/ps is polled
SHARED = web.AppKey("shared", Shared)  # only in a worker of --workers N
LIVE_PUBLISH_EVERY = 0.1  # seconds: how stale another worker's requests may be in a snapshot


def create_app(config: Config, registry: CollectorRegistry | None = None,
               analytics: AnalyticsConfig | None = None,
               shared: Shared | None = None, writer: str | None = None,
               data_plane: bool = True) -> web.Application:
    registry = registry if registry is not None else new_registry()
    analytics = analytics if analytics is not None else AnalyticsConfig(backends=())
    labels = ModelLabels(config.max_extra_models, shared.labels if shared else None)
    metrics = Metrics(registry, labels)
    # Bodies the proxy reads whole are capped by max_parse_bytes; larger ones stream unread.
    app = web.Application(client_max_size=max(config.max_parse_bytes, 1024) + 1,
                          handler_args={"max_field_size": 65536, "max_line_size": 65536})
    app[CONFIG] = config
    app[METRICS] = metrics
    app[ANALYTICS] = analytics
    host_rule = hosts.HostRule() if config.listens_on_loopback else None
    if host_rule is not None:  # Ollama's rule: beyond loopback, Host is not checked
        app.middlewares.append(hosts.check_host(host_rule))

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
    scraped = registry
    if shared is not None:  # the main process polls /api/ps and publishes what it saw
        app[SHARED] = shared
        scraped = multiprocess_registry(shared.metrics)
        if config.ps_interval is not None:
            scraped.register(ps.LoadedCollector(lambda: ps.Loaded.read(shared.loaded)))
    elif config.ps_interval is not None:  # after `resources`: it polls with the session
        app[LOADED] = ps.Loaded()
        app.cleanup_ctx.append(ps.poller(config, registry, lambda: app[SESSION], app[LOADED]))
    live = Live()
    app[LIVE] = live
    if shared is not None:
        app.cleanup_ctx.append(_publishing(live, shared))
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
        recorder = Recorder(stores, analytics, registry, writer=writer)
        app[RECORDER] = recorder
        observers.append(recorder)
        app.cleanup_ctx.append(_recording(recorder, mirrored=shared is not None))
    app.on_response_prepare.append(strip_own_server_header)
    proxy = Proxy(config, lambda: app[SESSION], observers, keep_messages=analytics.max_messages)
    app.on_shutdown.append(proxy.on_shutdown)  # cuts what is still in flight after the grace
    scrape = make_aiohttp_handler(scraped)
    app.router.add_get(config.metrics_path, require_token(analytics.token, scrape)
                       if analytics.protect_metrics else scrape)
    app.router.add_get("/test", _test)
    app.router.add_routes(AnalyticsApi(lambda: queryable(stores), analytics.backends)
                          .routes(analytics.token))
    app.router.add_get("/analytics/live", require_token(analytics.token, _live))
    app.router.add_get("/analytics/loaded", require_token(analytics.token, _loaded))
    app.router.add_routes(dashboard.routes(analytics.token))
    catch_all = app.router.add_route("*", "/{tail:.*}", proxy.handle).resource
    plane = Plane(config, proxy, host_rule)
    # The plane serves what it can; the rest goes to aiohttp and the routes above.
    if data_plane and plane.usable:
        plane.own_routes([r.canonical for r in app.router.resources() if r is not catch_all])
        app[PLANE] = proxy.plane = plane
    return app


def _recording(recorder: Recorder, mirrored: bool
               ) -> Callable[[web.Application], AsyncIterator[None]]:
    """Writers start with the app and drain on shutdown, after requests in flight ended. A
    worker of several (`mirrored`) copies its queue sizes into the multiprocess files."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        await recorder.start()
        mirror = asyncio.create_task(_mirror_queue_sizes(recorder)) if mirrored else None
        yield
        if mirror is not None:
            mirror.cancel()
        await recorder.close()

    return ctx


QUEUE_SIZE_EVERY = 0.5


async def _mirror_queue_sizes(recorder: Recorder) -> None:
    """`ollama_analytics_queue_size` is a callback gauge, which the multiprocess mode cannot
    show (a scrape reads the files only): its values are copied into them every
    QUEUE_SIZE_EVERY seconds."""
    while True:
        for metric in recorder.queue_size.collect():
            for sample in metric.samples:
                recorder.queue_size.labels(**sample.labels).set(sample.value)
        await asyncio.sleep(QUEUE_SIZE_EVERY)


def _publishing(live: Live, shared: Shared) -> Callable[[web.Application],
                                                         AsyncIterator[None]]:
    """This worker's requests, written for the others every LIVE_PUBLISH_EVERY seconds while
    any is in flight (their chunks and times move) or after one ended (atomically: they read
    the file whenever asked)."""
    mine = shared.live_file(os.getpid())

    async def publish() -> None:
        seen = -1
        while True:
            if live.changes != seen or live.in_flight:
                seen = live.changes
                part = mine.with_suffix(".part")
                await asyncio.to_thread(part.write_bytes, orjson.dumps(live.published()))
                os.replace(part, mine)
            await asyncio.sleep(LIVE_PUBLISH_EVERY)

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(publish())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        with contextlib.suppress(OSError):
            mine.unlink()

    return ctx


def _others_live(shared: Shared) -> list[dict[str, Any]]:
    """What the other workers published (a file being replaced or gone is skipped)."""
    mine = shared.live_file(os.getpid())
    out = []
    for path in shared.live.glob("*.json"):
        if path == mine:
            continue
        with contextlib.suppress(OSError, orjson.JSONDecodeError):
            out.append(orjson.loads(path.read_bytes()))
    return out


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
    shared = request.app.get(SHARED)
    others = await asyncio.to_thread(_others_live, shared) if shared is not None else []
    return web.Response(body=orjson.dumps(request.app[LIVE].snapshot(recent, others)),
                        content_type="application/json")


async def _loaded(request: web.Request) -> web.Response:
    """What Ollama has in memory, from the latest /api/ps poll (for the dashboard)."""
    loaded = request.app.get(LOADED)
    shared = request.app.get(SHARED)
    if shared is not None and request.app[CONFIG].ps_interval is not None:
        loaded = ps.Loaded.read(shared.loaded)
    return web.Response(body=orjson.dumps(loaded.as_json() if loaded else {"polling": False}),
                        content_type="application/json")
