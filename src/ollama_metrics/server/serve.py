"""Process lifecycle: bind the listen port, serve the app, shut down gracefully on a signal.

The port is bound before anything else so that a port already in use is reported at once, by
name, with what to do about it. Handler cancellation is on: a client that disconnects cancels its
handler, which closes the upstream request, which is how Ollama learns to stop generating.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import socket
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from types import FrameType
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from ..analytics.settings import AnalyticsConfig
from ..analytics.stores import check_usable
from ..config import Config, connect_url
from ..observe.metrics import new_registry
from ..ollama import control, probe
from . import relay
from .app import SESSION, create_app
from .connection import verify
from .descriptors import Watch, lift_open_file_limit
from .lifecycle import announce_analytics, make_runner, shut_down, with_ollama
from .shared import Shared

log = logging.getLogger("ollama_metrics")


class PortInUse(OSError):
    """The listen address is taken (usually by Ollama itself)."""


class CannotListen(OSError):
    """The listen address is not one this machine can listen on (not its own, unresolvable,
    refused by the system); the message says which and what to do."""


def bind(config: Config, shared_port: bool = False) -> socket.socket:
    """The listening socket; with `shared_port` (--workers), bound with SO_REUSEPORT and not
    listening: it holds the port for the workers' own sockets (server/workers.py).

    A port shared with SO_REUSEPORT would also be shared with another process of this user
    that set it (another proxy with workers): so the port is first bound without it, which
    fails if anyone holds it, then bound again with it."""
    if shared_port:
        alone = _bind(config, shared_port=False)
        port = alone.getsockname()[1]  # a port 0 is numbered here
        alone.close()
        return _bind(replace(config, listen_port=port), shared_port=True)
    return _bind(config, shared_port=False)


def _bind(config: Config, shared_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in config.listen_host else socket.AF_INET
    where = f"{config.listen_host}:{config.listen_port}"
    fix = "listen on an address of this machine with --listen HOST:PORT (OLLAMA_METRICS_LISTEN)"
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:  # e.g. IPv6 turned off
        raise CannotListen(exc.errno, f"cannot listen on {where}: {exc.strerror}; {fix}") \
            from None
    if sys.platform != "win32":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if shared_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((config.listen_host, config.listen_port))
    except socket.gaierror as exc:
        sock.close()
        raise CannotListen(exc.errno, f"cannot listen on {where}: no address is known for "
                                      f"{config.listen_host!r} ({exc.strerror}); {fix}") from None
    except OSError as exc:
        sock.close()
        if exc.errno in (errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", -1)):
            raise PortInUse(
                exc.errno,
                f"port {config.listen_port} on {config.listen_host} is already in use. "
                "If Ollama itself listens there, move it with OLLAMA_HOST=127.0.0.1:11435 "
                "ollama serve, or run the proxy elsewhere with --listen HOST:PORT "
                "(OLLAMA_METRICS_LISTEN)",
            ) from None
        why = "not an address of this machine" if exc.errno == errno.EADDRNOTAVAIL else \
            "not allowed (ports below 1024 need privileges)" if exc.errno == errno.EACCES else \
            exc.strerror
        raise CannotListen(exc.errno, f"cannot listen on {where}: {why}; {fix}") from None
    if not shared_port:
        sock.listen(1024)
    sock.setblocking(False)
    return sock


async def serve(config: Config, sock: socket.socket, stop: asyncio.Event | None = None,
                environ: Mapping[str, str] | None = None,
                analytics: AnalyticsConfig | None = None) -> None:
    """Serve on `sock` until SIGINT/SIGTERM (or `stop` is set), then shut down gracefully.

    With `config.supervise`, `ollama serve` is started first (with `environ`, less OLLAMA_HOST)
    and stopped after the proxy has drained.
    """
    stop = stop or asyncio.Event()
    now = asyncio.Event()  # a second signal: stop without waiting for the grace

    def on_signal() -> None:
        if stop.is_set():
            now.set()
        stop.set()
    with _stop_signals(asyncio.get_running_loop(), on_signal):
        await _serve(config, sock, stop, now, environ, analytics)


@contextlib.contextmanager
def _stop_signals(loop: asyncio.AbstractEventLoop, handler: Callable[[], None]
                  ) -> Iterator[None]:
    """`handler` runs in the loop on each SIGINT and SIGTERM, the first and the second alike.

    A loop without add_signal_handler (Windows) gets them through a plain signal handler that
    hands each to the loop: Python's own would cut the shutdown short instead (asyncio.run
    cancels on the first Ctrl-C and raises KeyboardInterrupt on the second, abandoning the queued
    records and an Ollama being stopped). Outside the main thread, signals are left alone.
    """
    added: list[signal.Signals] = []
    replaced: dict[signal.Signals, Any] = {}

    def hand_over(signum: int, frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(handler)
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, handler)
            added.append(sig)
        except NotImplementedError:
            with contextlib.suppress(ValueError):  # not the main thread
                replaced[sig] = signal.signal(sig, hand_over)
        except RuntimeError:  # not the main thread
            pass
    try:
        yield
    finally:
        for sig in added:
            loop.remove_signal_handler(sig)
        for sig, previous in replaced.items():
            signal.signal(sig, previous)


async def _serve(config: Config, sock: socket.socket, stop: asyncio.Event, now: asyncio.Event,
                 environ: Mapping[str, str] | None, analytics: AnalyticsConfig | None) -> None:
    registry = new_registry()
    await with_ollama(config, registry, environ, sock, stop, now,
                      lambda: _serve_app(config, sock, stop, now, registry, analytics))


async def _serve_app(config: Config, sock: socket.socket, stop: asyncio.Event,
                     now: asyncio.Event, registry: CollectorRegistry,
                     analytics: AnalyticsConfig | None) -> None:
    app = create_app(config, registry, analytics)
    runner = make_runner(app, config)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    descriptors = Watch(sock.fileno())
    descriptors.start()
    host, port = sock.getsockname()[:2]
    log.info("ollama-metrics listening on http://%s:%s, forwarding to %s",
             f"[{host}]" if ":" in host else host, port, config.upstream_shown)
    if relay.UNAVAILABLE is not None:
        log.info("streamed replies take the plain relay (%s): correct, with more CPU per frame",
                 relay.UNAVAILABLE)
    announce_analytics(config, analytics)
    health = await control.health(app[SESSION], config.upstream)
    if health.ok:
        log.info("Ollama %s answers at %s", health.version or "(unknown version)",
                 config.upstream_shown)
    else:
        log.warning(
            "Ollama is not answering at %s (%s). Requests get 502 until it does: start it with "
            "OLLAMA_HOST=%s ollama serve, or point --upstream (OLLAMA_METRICS_UPSTREAM) at it.",
            config.upstream_shown, health.error, f"{config.upstream.host}:{config.upstream.port}")
    try:
        await stop.wait()
    finally:
        log.info("shutting down (up to %ss for requests in flight; press Ctrl-C again, or send "
                 "a second SIGTERM, to stop now)", config.shutdown_grace)
        descriptors.stop()
        await shut_down(runner, now)


def run(config: Config, environ: Mapping[str, str],
        analytics: AnalyticsConfig | None = None, shared: Shared | None = None) -> None:
    """Bind, then serve on uvloop where available: in this process, or with `shared`
    (shared.prepared) in `config.workers` worker processes (server/workers.py).

    Raises before serving anything: internals.Unsupported when this aiohttp cannot take the
    request guard, StoreError when the analytics settings cannot work (check_usable),
    probe.OllamaInTheWay when an Ollama holds the listen address, PortInUse when anything else
    does, CannotListen when the address is not this machine's, and the Supervisor's errors when
    Ollama cannot be started.
    """
    verify()
    if analytics is not None:
        check_usable(analytics)
    lift_open_file_limit()
    try:
        sock = bind(config, shared_port=shared is not None)
    except PortInUse:
        answer = probe.identify(connect_url(config.listen_host, config.listen_port), timeout=1.0)
        if answer.who is probe.Who.OLLAMA:
            raise probe.OllamaInTheWay(
                probe.explain_ollama_in_the_way(config, answer.version)) from None
        raise
    if shared is not None:
        from . import workers

        main = workers.serve(config, sock, shared, environ, analytics)
    else:
        main = serve(config, sock, environ=environ, analytics=analytics)
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)
