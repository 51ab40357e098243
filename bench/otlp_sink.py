"""A trivial OTLP/HTTP collector for the benchmark's `ollama-metrics+otel` target.

Contract: ``python bench/otlp_sink.py`` binds 127.0.0.1 on a free port, prints ``LISTENING <port>``
once it accepts connections, answers every ``POST /v1/traces`` and ``POST /v1/metrics`` with an
empty success (as a collector does), and ``GET /stats`` with the exports and bytes received so
far as JSON. It decodes nothing: the benchmark measures the proxy's cost of exporting, not the
collector.
"""

from __future__ import annotations

import asyncio
import socket

import uvloop
from aiohttp import web

STATS = web.AppKey("stats", dict)


async def _take(request: web.Request) -> web.Response:
    body = await request.read()
    stats = request.app[STATS]
    kind = request.path.rsplit("/", 1)[-1]
    stats[f"{kind}_exports"] += 1
    stats[f"{kind}_bytes"] += len(body)
    return web.Response(body=b"", content_type="application/x-protobuf")


async def _stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATS])


async def main() -> None:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[STATS] = {"traces_exports": 0, "traces_bytes": 0, "metrics_exports": 0,
                  "metrics_bytes": 0}
    app.router.add_post("/v1/traces", _take)
    app.router.add_post("/v1/metrics", _take)
    app.router.add_get("/stats", _stats)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    print(f"LISTENING {sock.getsockname()[1]}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main())
