"""`--workers N`: N processes serve the listen port; this one runs everything there is one of.

The main process binds the listen address first (so that a port in use is reported as with one
process, and a port 0 gets its number), with SO_REUSEPORT and without listening: it holds the
port and accepts nothing. Each worker (worker.py) binds its own listening socket to that port,
and the kernel spreads new connections over them. Here stay the things there must be one of:
the `ollama serve` child (supervisor.py), the /api/ps poller (its snapshot published for the
workers), the analytics writer process (each worker sends it its records), and shutdown:
the first SIGINT/SIGTERM tells every worker to drain within the grace, a second to stop now;
the main process exits once they all have, after the records they sent are written, and Ollama
is stopped last. A worker that dies is started again (logged), as Ollama would be.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
import signal
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import mark_process_dead

from ..analytics.recorder import Recorder
from ..analytics.settings import AnalyticsConfig
from ..analytics.stores import open_stores
from ..config import Config
from ..ollama import control, ps, upstream
from .lifecycle import announce_analytics, with_ollama
from .shared import Shared
from .worker import HEADER, Start

log = logging.getLogger("ollama_metrics")

RESTART_AFTER = 1.0  # seconds before a worker that died is started again


class WorkerFailed(Exception):
    """A worker exited before it served (its own log lines say why)."""


@dataclass
class _Worker:
    index: int
    proc: asyncio.subprocess.Process
    ready: bool = False
    exited: asyncio.Event = field(default_factory=asyncio.Event)

    def order(self, what: bytes) -> None:
        stdin = self.proc.stdin
        if stdin is not None and not stdin.is_closing():
            with contextlib.suppress(OSError):
                stdin.write(what + b"\n")


class Workers:
    def __init__(self, config: Config, analytics: AnalyticsConfig | None, sock: socket.socket,
                 shared: Shared, environ: Mapping[str, str], writer: str | None) -> None:
        self._config = config
        self._writer = writer
        self._analytics = analytics
        self._host, self._port = sock.getsockname()[:2]
        self._shared = shared
        self._environ = {**environ, "PROMETHEUS_MULTIPROC_DIR": str(shared.metrics)}
        self.running: dict[int, _Worker] = {}
        self.stopping = False

    async def start(self, index: int) -> _Worker:
        proc = await asyncio.create_subprocess_exec(
            # Not `-m`: run as __main__, the module's Start would not be the one pickled.
            sys.executable, "-c", "from ollama_metrics.server.worker import main; main()",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=self._environ)
        assert proc.stdin is not None and proc.stdout is not None
        start = pickle.dumps(Start(index, self._config, self._analytics, self._host,
                                   self._port, self._shared, self._writer))
        proc.stdin.write(len(start).to_bytes(HEADER, "big") + start)
        worker = _Worker(index, proc)
        line = await proc.stdout.readline()
        if line != b"ready\n":
            code = await proc.wait()
            raise WorkerFailed(f"worker {index} exited with code {code} before it served; "
                               "its log lines above say why")
        worker.ready = True
        self.running[index] = worker
        return worker

    async def watch(self, worker: _Worker) -> None:
        """Wait for `worker` to exit; start another unless shutting down."""
        code = await worker.proc.wait()
        pid = worker.proc.pid
        with contextlib.suppress(OSError):
            mark_process_dead(pid, str(self._shared.metrics))  # type: ignore[no-untyped-call]  # its requests in flight ended
        with contextlib.suppress(OSError):
            self._shared.live_file(pid).unlink()
        worker.exited.set()
        if self.stopping:
            if code:
                log.warning("worker %d (pid %d) exited with code %d", worker.index, pid, code)
            return
        log.warning("worker %d (pid %d) exited with code %d; starting another in %ss",
                    worker.index, pid, code, RESTART_AFTER)
        while not self.stopping:
            await asyncio.sleep(RESTART_AFTER)
            if self.stopping:
                return
            try:
                again = await self.start(worker.index)
            except WorkerFailed as exc:
                log.warning("%s", exc)
                continue
            await self.watch(again)
            return

    def order(self, what: bytes) -> None:
        for worker in self.running.values():
            worker.order(what)

    async def stopped(self) -> None:
        waits = [w.exited.wait() for w in self.running.values()]
        if waits:
            await asyncio.gather(*waits)


async def serve(config: Config, sock: socket.socket, shared: Shared,
                environ: Mapping[str, str], analytics: AnalyticsConfig | None = None) -> None:
    """Serve with `config.workers` processes until SIGINT/SIGTERM, then shut them down."""
    stop, now = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():
            now.set()
        stop.set()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    registry = CollectorRegistry()  # its values go to the shared files: the workers show them

    async def serving() -> None:
        try:
            await _serve(config, sock, shared, environ, analytics, stop, now)
        finally:
            sock.close()
    await with_ollama(config, registry, environ, sock, stop, now, serving)


async def _serve(config: Config, sock: socket.socket, shared: Shared,
                 environ: Mapping[str, str], analytics: AnalyticsConfig | None,
                 stop: asyncio.Event, now: asyncio.Event) -> None:
    session = upstream.open_session(config)
    poller = None
    if config.ps_interval is not None:
        ps.Loaded().publish(shared.loaded)
        poller = asyncio.create_task(ps.poll(session, config, None, config.ps_interval,
                                             ps.Loaded(), shared.loaded))
    # The writer process is started (and restarted) by this process's Recorder; the workers'
    # Recorders send it their records directly.
    recorder = None
    stores = open_stores(analytics) if analytics is not None else []
    if stores:
        assert analytics is not None
        recorder = Recorder(stores, analytics, CollectorRegistry())
        await recorder.start()  # the stores exist before a worker opens them to search
    writer = recorder.process.address if recorder and recorder.process else None
    workers = Workers(config, analytics, sock, shared, environ, writer)
    watching: list[asyncio.Task[None]] = []
    try:
        try:
            for index in range(1, config.workers + 1):
                worker = await workers.start(index)
                watching.append(asyncio.create_task(workers.watch(worker)))
        except BaseException:
            workers.stopping = True
            workers.order(b"now")
            await workers.stopped()
            raise
        host, port = sock.getsockname()[:2]
        log.info("ollama-metrics listening on http://%s:%s with %d workers, forwarding to %s",
                 f"[{host}]" if ":" in host else host, port, config.workers,
                 config.upstream_shown)
        announce_analytics(config, analytics)
        health = await control.health(session, config.upstream)
        if health.ok:
            log.info("Ollama %s answers at %s", health.version or "(unknown version)",
                     config.upstream_shown)
        else:
            log.warning(
                "Ollama is not answering at %s (%s). Requests get 502 until it does: start it "
                "with OLLAMA_HOST=%s ollama serve, or point --upstream (OLLAMA_METRICS_UPSTREAM) "
                "at it.", config.upstream_shown, health.error,
                f"{config.upstream.host}:{config.upstream.port}")
        await stop.wait()
        log.info("shutting down (up to %ss for requests in flight; press Ctrl-C again, or send "
                 "a second SIGTERM, to stop now)", config.shutdown_grace)
        workers.stopping = True
        workers.order(b"stop")
        forced = asyncio.create_task(now.wait())
        drained = asyncio.create_task(workers.stopped())
        await asyncio.wait({forced, drained}, return_when=asyncio.FIRST_COMPLETED)
        if not drained.done():
            log.warning("stopping now")
            workers.order(b"now")
            await drained
        forced.cancel()
    finally:
        workers.stopping = True
        for task in watching:
            task.cancel()
        if poller is not None:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
        if recorder is not None:
            await recorder.close()
        await session.close()

