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

from aiohttp import web

from . import upstream
from .app import SESSION, create_app
from .config import Config

log = logging.getLogger("ollama_metrics")


class PortInUse(OSError):
    """The listen address is taken (usually by Ollama itself)."""


def bind(config: Config) -> socket.socket:
    family = socket.AF_INET6 if ":" in config.listen_host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    if sys.platform != "win32":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.listen_host, config.listen_port))
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
        raise
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def make_runner(app: web.Application, config: Config) -> web.AppRunner:
    return web.AppRunner(app, handler_cancellation=True, access_log=None,
                         shutdown_timeout=config.shutdown_grace)


async def serve(config: Config, sock: socket.socket, stop: asyncio.Event | None = None) -> None:
    """Serve on `sock` until SIGINT/SIGTERM (or `stop` is set), then shut down gracefully."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        # Windows has no add_signal_handler; KeyboardInterrupt still stops the process there.
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    app = create_app(config)
    runner = make_runner(app, config)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    host, port = sock.getsockname()[:2]
    log.info("ollama-metrics listening on http://%s:%s, forwarding to %s",
             f"[{host}]" if ":" in host else host, port, config.upstream)
    health = await upstream.check(app[SESSION], config)
    if health.ok:
        log.info("Ollama %s answers at %s", health.version or "(unknown version)", config.upstream)
    else:
        log.warning(
            "Ollama is not answering at %s (%s). Requests get 502 until it does: start it with "
            "OLLAMA_HOST=%s ollama serve, or point --upstream (OLLAMA_METRICS_UPSTREAM) at it.",
            config.upstream, health.error, config.upstream.authority)
    try:
        await stop.wait()
    finally:
        log.info("shutting down (up to %ss for requests in flight)", config.shutdown_grace)
        await runner.cleanup()


def run(config: Config) -> None:
    """Bind, then serve on uvloop where available. Raises PortInUse before serving anything."""
    sock = bind(config)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(config, sock))
    else:
        uvloop.run(serve(config, sock))
