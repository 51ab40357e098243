"""Shared fixtures: a fake Ollama and the proxy, both on real sockets in the test's loop.

`start_proxy` runs the real app (create_app, with the AppRunner settings `serve` uses) on a free
port with its own registry, so metric values can be read exactly. Tests that need separate
processes (memory, signals, the CLI) use `fake_process` / `proxy_process` from helpers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from fake_ollama import FakeOllama
from helpers import Process, RunningProxy, Scraped, proxy_process
from ollama_metrics.analytics.settings import AnalyticsConfig
from ollama_metrics.config import Config
from ollama_metrics.observe.metrics import new_registry
from ollama_metrics.server.app import create_app
from ollama_metrics.server.lifecycle import make_runner
from services import loki, phoenix, postgres_dsn, victoria_metrics  # noqa: F401  (fixtures)

StartProxy = Callable[..., Awaitable[RunningProxy]]


def pytest_asyncio_loop_factories(config: pytest.Config,
                                  item: pytest.Item) -> dict[str, Callable[[], Any]]:
    """Tests marked `uvloop` run on the loop `serve` uses in production (where uvloop is
    installed); the rest on the standard one."""
    if item.get_closest_marker("uvloop") is not None:
        import uvloop
        return {"uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


@pytest.fixture(autouse=True, scope="session")
def data_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The per-user data directory (where analytics go by default) in a scratch directory, for
    every command and proxy process the tests start: never the real user's."""
    saved = {name: os.environ.get(name) for name in ("XDG_DATA_HOME", "ANALYTICS_DIR")}
    os.environ["XDG_DATA_HOME"] = str(tmp_path_factory.mktemp("data-home"))
    os.environ.pop("ANALYTICS_DIR", None)
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(autouse=True)
def no_error_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Expected faults (disconnects, upstream failures) must never log errors or tracebacks."""
    yield
    errors = [r for r in caplog.get_records("call") if r.levelno >= logging.ERROR]
    assert not errors, [f"{r.name}: {r.getMessage()}" for r in errors]


@pytest.fixture
async def fake() -> AsyncIterator[FakeOllama]:
    server = FakeOllama()
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def start_proxy() -> AsyncIterator[StartProxy]:
    runners: list[web.AppRunner] = []

    async def start(upstream: str, analytics: AnalyticsConfig | None = None,
                    data_plane: bool = True, **settings: Any) -> RunningProxy:
        config = Config.build(upstream=upstream, **{"listen": "127.0.0.1:0", **settings})
        registry = new_registry()
        app = create_app(config, registry, analytics, data_plane=data_plane)
        runner = make_runner(app, config)
        await runner.setup()
        runners.append(runner)
        sock = socket.socket()
        sock.bind((config.listen_host, 0))  # reached at 127.0.0.1 either way
        await web.SockSite(runner, sock).start()
        port = sock.getsockname()[1]
        return RunningProxy(f"http://127.0.0.1:{port}", port, registry, config, app)

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def start_workers() -> AsyncIterator[StartProxy]:
    """`start_proxy`'s twin for `serve --workers 2`: the real command in processes of its own,
    given the same settings; its `registry` reads the metrics by scraping /metrics (the sum
    over the workers), and its `app` is an empty one (a test reaching into the app is
    in-process only). Stopped with SIGTERM, and must exit 0."""
    with contextlib.ExitStack() as stack:
        running: list[Process] = []

        async def start(upstream: str, analytics: AnalyticsConfig | None = None,
                        **settings: Any) -> RunningProxy:
            args = ["--workers", str(settings.pop("workers", 2))]
            for name, value in settings.items():
                args += [f"--{name.replace('_', '-')}", str(value)]
            if analytics is None or not analytics.enabled:
                args += ["--analytics-backend", "none"]
            else:
                args += ["--analytics-backend", ",".join(analytics.backends),
                         "--analytics-dir", str(analytics.dir),
                         "--analytics-retention-days", str(analytics.retention_days),
                         "--analytics-capture", analytics.capture]
                if analytics.token is not None:
                    args += ["--analytics-token", analytics.token]
                if analytics.protect_metrics:
                    args.append("--analytics-protect-metrics")
            # In a thread: the fake Ollama may be serving in this test's loop meanwhile.
            proc = await asyncio.to_thread(stack.enter_context,
                                           proxy_process(upstream, *args))
            running.append(proc)
            config = Config.build(upstream=upstream, listen=f"127.0.0.1:{proc.port}")
            registry = CollectorRegistry(auto_describe=False)
            registry.register(Scraped(f"{proc.url}{config.metrics_path}"))
            return RunningProxy(proc.url, proc.port, registry, config, web.Application())

        yield start
        for proc in running:
            assert await asyncio.to_thread(proc.stop) == 0, proc.output
            # What no_error_logs checks in this process, in theirs.
            assert " ERROR " not in proc.output and "Traceback" not in proc.output, proc.output


@pytest.fixture(params=[1, pytest.param(2, marks=pytest.mark.slow(
    reason="starts serve --workers 2: three processes"))], ids=["1-worker", "2-workers"])
def start_any(request: pytest.FixtureRequest, start_proxy: StartProxy,
              start_workers: StartProxy) -> StartProxy:
    """`start_proxy` in this process, then again as `serve --workers 2`."""
    return start_proxy if request.param == 1 else start_workers


@pytest.fixture
async def proxy(fake: FakeOllama, start_proxy: StartProxy) -> RunningProxy:
    return await start_proxy(fake.url)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain client that changes nothing: no decompression, no invented headers."""
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session
