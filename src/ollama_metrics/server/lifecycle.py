"""What a serving process does on start and on stop, whether it is the only one or a worker:
the AppRunner as `serve` sets it up, shutdown within the grace (or at once), and its log lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CollectorRegistry

from ..analytics.settings import AnalyticsConfig
from ..config import Config
from ..ollama.supervisor import Supervisor
from ..printable import printable
from .connection import Runner
from .fast import PLANE

log = logging.getLogger("ollama_metrics")


class _QuietBadRequests(logging.Filter):
    """aiohttp logs every request it cannot parse (bad framing, oversized or invalid headers) at
    ERROR with a traceback. Those are the client's fault and routine from scanners and hostile
    peers, so they become one DEBUG line: no traceback, and the offending bytes, which may be a
    prompt, never reach the log at INFO."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            why = f"{exc.code}: {exc.message}"
        elif isinstance(exc, web.RequestPayloadError):  # a body that broke its framing
            why = str(exc)
        else:
            return True  # anything else is a real fault: keep it loud
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.msg, record.args = "bad request (%s)", (printable(why),)
        record.exc_info, record.exc_text = None, None
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


_HTTP_LOG = logging.getLogger("ollama_metrics.http")
_HTTP_LOG.addFilter(_QuietBadRequests())


def make_runner(app: web.Application, config: Config) -> web.AppRunner:
    # auto_decompress off: a request body with Content-Encoding goes to Ollama as it came, as
    # every other byte does (decoded, it would reach Ollama still labelled gzip; undecodable, it
    # would be a 500 of the proxy's own).
    return Runner(app, plane=app.get(PLANE), header_timeout=config.header_timeout,
                  handler_cancellation=True,
                  access_log=None, shutdown_timeout=config.shutdown_grace,
                  auto_decompress=False, logger=_HTTP_LOG)


async def unless_stopped(work: Awaitable[None], stop: asyncio.Event) -> bool:
    """Run `work` unless `stop` is set first (then cancel it and return False)."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return False
    task.result()
    return True


async def with_ollama(config: Config, registry: CollectorRegistry,
                      environ: Mapping[str, str] | None, sock: socket.socket,
                      stop: asyncio.Event, now: asyncio.Event,
                      serving: Callable[[], Awaitable[None]]) -> None:
    """Run `serving`; with `config.supervise`, between starting `ollama serve` (given up if
    `stop` comes first: then `sock` is closed and nothing serves) and stopping it."""
    supervisor = None
    if config.supervise:
        assert environ is not None, "the child's environment is needed to start Ollama"
        supervisor = Supervisor(config, registry, environ)
        try:
            started = await unless_stopped(supervisor.start(), stop)
        except BaseException:
            sock.close()
            raise
        if not started:
            sock.close()
            await supervisor.stop()
            return
    try:
        await serving()
    finally:
        if supervisor is not None:
            await supervisor.stop(now)


async def shut_down(runner: web.AppRunner, now: asyncio.Event) -> None:
    """Shut down within the grace, or at once when `now` is set: the connections still open
    are closed, which cancels their requests (each is recorded, as a client that went away
    is); the app's cleanup still writes the records queued."""
    cleanup = asyncio.ensure_future(runner.cleanup())
    forced = asyncio.ensure_future(now.wait())
    await asyncio.wait({cleanup, forced}, return_when=asyncio.FIRST_COMPLETED)
    forced.cancel()
    if not cleanup.done():
        connections = runner.server.connections if runner.server is not None else []
        log.warning("stopping now: closing %d connection(s) still open", len(connections))
        for connection in connections:
            connection.force_close()
    await cleanup


def announce_analytics(config: Config, analytics: AnalyticsConfig | None) -> None:
    if analytics is None or not analytics.enabled:
        log.info("analytics off: nothing is recorded")
        return
    where = ", ".join(f"{b} ({analytics.dir})" if b in ("sqlite", "jsonl") else b
                      for b in analytics.backends)
    log.info("recording interactions to %s (capture: %s, retention: %s days)", where,
             analytics.capture, analytics.retention_days or "unlimited")
    if not config.listens_on_loopback and analytics.token is None:
        log.warning(
            "listening on %s, beyond this machine, with no ANALYTICS_TOKEN: anyone who can reach "
            "it can read stored prompts at /analytics. Set --analytics-token (ANALYTICS_TOKEN), "
            "or listen on 127.0.0.1.", config.listen)
