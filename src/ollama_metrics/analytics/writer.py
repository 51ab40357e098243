"""The writer process: builds records and writes them, off every proxy's core.

`python -m ollama_metrics.analytics.writer FD` is started by recorder.WriterProcess with a
listening Unix socket as FD and its settings (pickled, length-prefixed) on stdin. Where Python
has no Unix sockets (Windows) and no fds to pass, `python -m ollama_metrics.analytics.writer
tcp` gets a secret and a port to prefer with its settings, binds a TCP listener on the loopback
interface itself (that port if it is free, so processes attached to the last writer find this
one, else any) and writes its port on stdout, one line; a connection there is read only once it
has proven it holds the secret, and proven in turn that this writer does (channel.proof). Any
number of proxies connect and send frames of finished exchanges (channel.py). For each, the
writer builds the record (categories are the proxy's; caps, capture level and redaction here)
and queues it for every store.
Each store has its own bounded queue and writer task, so a slow or broken store (Loki down,
PostgreSQL unreachable, a full disk) only costs its own counted drops: a full queue drops the
record and counts it. A writer task takes whatever is queued (up to a batch), writes it, and on
failure retries the same batch with exponential back-off until it succeeds or shutdown's grace
runs out. A periodic task enforces retention on every store.

Every count belongs to the proxy connection whose record it is, and is reported back to it
(REPORT_EVERY after it changes): that proxy shows it on its /metrics. A proxy that closes its
side is answered with a final report once its records are settled (or the drain grace ran out),
then the connection is closed. The process ignores SIGINT and SIGTERM (a signal to the whole
process group must not cut the writes short): it stops when stdin reaches its end (its owner
closed it, or died), after writing what is queued within the drain grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from ..printable import printable
from . import channel, record
from .privacy import Privacy
from .settings import AnalyticsConfig
from .stores import Record, Store, open_stores

log = logging.getLogger("ollama_metrics.analytics.writer")  # also when run as __main__

BACKOFF_START = 0.5
BACKOFF_MAX = 30.0
OPEN_TIMEOUT = 10.0
REPORT_EVERY = 0.05  # seconds from a change of a proxy's figures to its report
SECRET_WITHIN = 10.0  # seconds a TCP connection has to prove it holds the secret
SUCCESS, ERROR, DROPPED, WAITING = range(4)  # a backend's figures in a report


@dataclass(eq=False)
class Origin:
    """One connected proxy: the figures of its records, per backend."""

    stream: asyncio.StreamWriter
    figures: dict[str, list[int]]  # backend -> [success, error, dropped, waiting]
    held: dict[str, int] = field(default_factory=dict)  # per backend: taken in, no outcome yet
    received: int = 0
    closed: bool = False  # its final report is sent: later outcomes are nobody's
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    report: asyncio.TimerHandle | None = None

    def count(self, backend: str, what: int, n: int = 1) -> None:
        self.figures[backend][what] += n
        if self.report is None and not self.closed:
            self.report = asyncio.get_running_loop().call_later(REPORT_EVERY, self.send)

    def hold(self, backend: str) -> None:
        self.held[backend] = self.held.get(backend, 0) + 1
        self.count(backend, WAITING)

    def outcome(self, backend: str, what: int) -> None:
        """One record it was holding for `backend` is written (SUCCESS) or lost (DROPPED)."""
        self.count(backend, what)
        self.held[backend] -= 1
        if not any(self.held.values()):
            self.settled.set()

    def send(self, final: bool = False) -> None:
        self.report = None
        if self.closed:
            return
        body = channel.encode_report(self.received, self.figures, final)
        with contextlib.suppress(Exception):  # the proxy went away: nobody to tell
            self.stream.write(channel.frame(body) + body)


Item = tuple[Origin, Record]


@dataclass(eq=False)
class _Lane:
    """One store with its queue and writer task."""

    store: Store
    queue: asyncio.Queue[Item]
    task: asyncio.Task[None] | None = None
    opened: bool = False
    opening: asyncio.Future[None] | None = None  # the first open, left running past start()
    failing_since: float | None = None


class Writer:
    """The stores, their queues and writer tasks, and the proxies that feed them."""

    def __init__(self, settings: AnalyticsConfig, secret: bytes = b"") -> None:
        self.settings = settings
        self.secret = secret  # what each connection proves it holds, over TCP
        self.privacy = Privacy.from_settings(settings)
        self.stores = open_stores(settings)
        self._lanes = [_Lane(s, asyncio.Queue(settings.queue_size)) for s in self.stores]
        self._origins: set[Origin] = set()
        self._deadline = float("inf")
        self._cleanup: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()  # set once start() has tried to open every store

    # --- taking records in -----------------------------------------------------------------

    async def serve_origin(self, reader: asyncio.StreamReader,
                           stream: asyncio.StreamWriter) -> None:
        """One proxy's connection: its frames until it closes its side, then its final
        report once its records are settled or the drain grace ran out."""
        if self.secret and not await self._authentic(reader, stream):
            log.warning("analytics: a connection to the writer did not prove it holds the "
                        "secret; closing it")
            with contextlib.suppress(Exception):
                stream.close()
                await stream.wait_closed()
            return
        origin = Origin(stream, {lane.store.name: [0, 0, 0, 0] for lane in self._lanes})
        self._origins.add(origin)
        await self.ready.wait()
        origin.send()  # the first report: the stores are open (or being retried)
        try:
            while True:
                size = int.from_bytes(await reader.readexactly(channel.HEADER), "big")
                if size > channel.MAX_FRAME:
                    log.error("analytics: a frame of %d bytes from a proxy; closing it", size)
                    break
                self.take(origin, channel.decode(await reader.readexactly(size)))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the proxy is done (or gone: what it sent is still written)
        if any(origin.held.values()):
            origin.settled.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(origin.settled.wait(), self.settings.drain_grace)
        self.finish(origin)
        with contextlib.suppress(Exception):
            stream.close()
            await stream.wait_closed()

    async def _authentic(self, reader: asyncio.StreamReader, stream: asyncio.StreamWriter
                         ) -> bool:
        """The handshake of channel.py, the writer's side: whether the connection proved,
        within SECRET_WITHIN, that it holds the secret (then this writer's proof is sent)."""
        challenge = secrets.token_bytes(channel.CHALLENGE_BYTES)
        stream.write(channel.frame(challenge) + challenge)

        async def answer() -> bytes:
            size = int.from_bytes(await reader.readexactly(channel.HEADER), "big")
            expected = channel.CHALLENGE_BYTES + len(self.secret)
            return await reader.readexactly(size) if size == expected else b""

        try:
            given = await asyncio.wait_for(answer(), SECRET_WITHIN)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError):
            return False
        theirs, mac = given[:channel.CHALLENGE_BYTES], given[channel.CHALLENGE_BYTES:]
        if not (given and channel.proven(self.secret, channel.PROXY_ROLE, challenge, theirs,
                                         mac)):
            return False
        mine = channel.proof(self.secret, channel.WRITER_ROLE, challenge, theirs)
        stream.write(channel.frame(mine) + mine)
        return True

    def finish(self, origin: Origin) -> None:
        """Count what is still unsettled of `origin` as dropped and send its final report."""
        if origin.closed:
            return
        for name, left in origin.held.items():
            if left:
                log.warning("analytics: %d records for %s were not written before shutdown",
                            left, name)
                origin.figures[name][DROPPED] += left
        if origin.report is not None:
            origin.report.cancel()
        origin.send(final=True)
        origin.closed = True
        self._origins.discard(origin)

    def take(self, origin: Origin, items: list[list[Any]]) -> None:
        """Build the record of each item and queue it for every store; never waits."""
        origin.received += len(items)
        for kind, data, *elided in items:
            try:
                rec = record.build(channel.interaction(data, *elided), self.privacy) \
                    if kind == channel.INTERACTION else data
            except Exception:  # a record we cannot build is lost, loudly; the rest carry on
                log.exception("analytics: could not build a record")
                for lane in self._lanes:
                    origin.count(lane.store.name, DROPPED)
                continue
            for lane in self._lanes:
                name = lane.store.name
                try:
                    lane.queue.put_nowait((origin, rec))
                except asyncio.QueueFull:
                    origin.count(name, DROPPED)
                    continue
                origin.hold(name)

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Open every store and start the writer tasks. A store that cannot open now is
        retried by its writer task in the background; its records queue meanwhile. An open
        still running after OPEN_TIMEOUT (a migration over a large store takes minutes) is not
        cancelled: it goes on, and its writer task starts writing when it is done."""
        for lane in self._lanes:
            lane.opening = asyncio.ensure_future(lane.store.open())
        await asyncio.wait([lane.opening for lane in self._lanes if lane.opening],
                           timeout=OPEN_TIMEOUT)
        for lane in self._lanes:
            opening = lane.opening
            if opening is None or not opening.done():
                log.warning("analytics: %s is still opening (upgrading a large store can take "
                            "minutes); its records queue meanwhile", lane.store.name)
                continue
            lane.opening = None
            exc = opening.exception()
            if exc is None:
                lane.opened = True
            else:
                log.warning("analytics: cannot open %s yet, retrying in the background: %s",
                            lane.store.name, printable(str(exc) or type(exc).__name__))
        for lane in self._lanes:
            lane.task = asyncio.create_task(self._write_loop(lane),
                                            name=f"analytics-{lane.store.name}")
        self.ready.set()
        if self.settings.retention_days or self.settings.max_size_mb:
            self._cleanup = asyncio.create_task(self._cleanup_loop(), name="analytics-cleanup")

    async def close(self) -> None:
        """Write what is queued within the drain grace, answer every proxy, close the
        stores."""
        self._deadline = time.monotonic() + self.settings.drain_grace
        if self._cleanup is not None:
            self._cleanup.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._cleanup
        for lane in self._lanes:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(lane.queue.join(),
                                       max(0.0, self._deadline - time.monotonic()))
            if lane.task is not None:
                lane.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await lane.task
        for origin in list(self._origins):
            self.finish(origin)
        for lane in self._lanes:
            with contextlib.suppress(Exception):
                await lane.store.close()

    # --- the writer tasks ------------------------------------------------------------------

    async def _write_loop(self, lane: _Lane) -> None:
        name = lane.store.name
        if lane.opening is not None:  # the first open, still running after start()
            try:
                await lane.opening
                lane.opened = True
            except Exception as exc:
                log.warning("analytics: cannot open %s yet, retrying: %s", name,
                            printable(str(exc) or type(exc).__name__))
            lane.opening = None
        if not lane.opened:
            lane.opened = await self._retry(lane, lane.store.open, "open", []) is not None
        while True:
            batch = [await lane.queue.get()]
            while len(batch) < self.settings.batch_size and not lane.queue.empty():
                batch.append(lane.queue.get_nowait())
            for origin, _ in batch:
                origin.count(name, WAITING, -1)
            records = [rec for _, rec in batch]
            refused = await self._retry(lane, partial(lane.store.write_batch, records), "write",
                                        batch)
            # Records the store refused for good, or still unwritten when the grace ran out:
            # the last ones of the batch (a store says how many, not which).
            kept = 0 if refused is None else len(batch) - refused
            for n, (origin, _) in enumerate(batch):
                if not origin.closed:
                    origin.outcome(name, SUCCESS if n < kept else DROPPED)
            for _ in batch:
                lane.queue.task_done()

    async def _retry(self, lane: _Lane, action: Callable[[], Awaitable[int | None]], what: str,
                     batch: list[Item]) -> int | None:
        """Run `action` until it succeeds or shutdown's grace runs out (None). A write returns
        how many of its records the store refused for good."""
        name = lane.store.name
        delay = BACKOFF_START
        while True:
            try:
                refused = await action() or 0
            except Exception as exc:
                for origin, _ in batch:
                    if not origin.closed:
                        origin.count(name, ERROR)
                if lane.failing_since is None:
                    lane.failing_since = time.monotonic()
                    log.warning("analytics: %s to %s failed, retrying: %s", what, name,
                                printable(exc or type(exc).__name__))
                else:
                    log.debug("analytics: %s to %s failed again: %s", what, name, printable(exc))
                if time.monotonic() + delay > self._deadline:
                    return None
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            if lane.failing_since is not None:
                log.warning("analytics: %s to %s works again after %.1fs", what, name,
                            time.monotonic() - lane.failing_since)
                lane.failing_since = None
            return refused

    async def _cleanup_loop(self) -> None:
        max_bytes = int(self.settings.max_size_mb * 2**20) or None
        while True:
            older = (time.time() - self.settings.retention_days * 86400
                     if self.settings.retention_days else None)
            for lane in self._lanes:
                if not lane.opened:
                    continue
                try:
                    deleted = await lane.store.purge(older, max_bytes)
                except Exception as exc:
                    log.warning("analytics: cleanup of %s failed: %s", lane.store.name,
                                printable(exc))
                    continue
                if deleted:
                    log.info("analytics: removed %s from %s", f"{deleted} old records"
                             if deleted > 0 else "old files", lane.store.name)
            await asyncio.sleep(self.settings.cleanup_interval)


# --- the process -----------------------------------------------------------------------------


class _UntilEnd(asyncio.Protocol):
    def __init__(self, ended: asyncio.Event) -> None:
        self._ended = ended

    def eof_received(self) -> bool:
        self._ended.set()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended.set()


def _watch_stdin_in_a_thread(ended: asyncio.Event) -> None:
    """Where stdin is a pipe the event loop cannot read (Windows: the child's end of asyncio's
    pipe is not overlapped), a thread waits for its end."""
    loop = asyncio.get_running_loop()

    def wait() -> None:
        with contextlib.suppress(OSError):
            while os.read(0, 4096):
                pass
        loop.call_soon_threadsafe(ended.set)

    threading.Thread(target=wait, name="analytics-writer-stdin", daemon=True).start()


async def _run(listening: socket.socket, settings: AnalyticsConfig, secret: bytes) -> None:
    writer = Writer(settings, secret)
    loop = asyncio.get_running_loop()
    ended = asyncio.Event()
    # Accepting first: proxies' records queue (bounded, counted) while a store opens.
    if listening.family == socket.AF_INET:  # the Windows shape, also where a test forces it
        _watch_stdin_in_a_thread(ended)
        server = await asyncio.start_server(writer.serve_origin, sock=listening)
    else:
        await loop.connect_read_pipe(lambda: _UntilEnd(ended), sys.stdin)
        server = await asyncio.start_unix_server(writer.serve_origin, sock=listening)
    await writer.start()
    await ended.wait()
    server.close()  # no new proxies; the connected ones are answered by close()
    await writer.close()


def _read_settings() -> tuple[AnalyticsConfig, int, bytes, int]:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = os.read(0, n - len(data))
            if not chunk:
                raise SystemExit("analytics writer: no settings on stdin")
            data += chunk
        return data

    size = int.from_bytes(exactly(channel.HEADER), "big")
    # From our own parent, over a private pipe: settings, log level, and for TCP the secret and
    # the port to prefer.
    settings, level, secret, port = pickle.loads(exactly(size))
    assert isinstance(settings, AnalyticsConfig) and isinstance(level, int)
    assert isinstance(secret, bytes) and isinstance(port, int)
    return settings, level, secret, port


def _listen_tcp(port: int) -> socket.socket:
    """A listener on the loopback interface only: on `port` if it is free, else on any."""
    listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    exclusive = getattr(socket, "SO_EXCLUSIVEADDRUSE", None)  # Windows: no one binds it too
    if exclusive is not None:
        listening.setsockopt(socket.SOL_SOCKET, exclusive, 1)
    else:  # the last writer's connections linger in TIME_WAIT on that port
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listening.bind((channel.LOOPBACK, port))
    except OSError:
        if not port:
            raise
        log.warning("analytics: the writer's port %d is taken; listening on another (processes "
                    "attached to the last writer cannot follow)", port)
        listening.bind((channel.LOOPBACK, 0))
    listening.listen(128)
    return listening


NICENESS = 10  # added to the writer's niceness: its work waits, a request does not


def _yield_the_cpu() -> None:
    """Run below the proxy's priority: on a busy machine the cores go to requests first and
    the writer catches up when they are idle (the bounded queue absorbs the wait; what
    overflows it is dropped and counted, never a request slowed)."""
    import psutil  # a dependency already (the Host check)

    try:
        if sys.platform == "win32":
            psutil.Process().nice(psutil.BELOW_NORMAL_PRIORITY_CLASS)
        else:
            os.nice(NICENESS)
    except (OSError, psutil.Error) as exc:
        log.warning("analytics writer: could not lower its priority (%s)", exc)


def main(argv: list[str]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    settings, level, secret, port = _read_settings()
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _yield_the_cpu()
    if argv[1] == "tcp":
        listening = _listen_tcp(port)
        sys.stdout.write(f"{listening.getsockname()[1]}\n")
        sys.stdout.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)  # the owner reads one line, no more
        os.dup2(devnull, 1)
        os.close(devnull)
    else:
        listening = socket.socket(fileno=int(argv[1]))
    try:
        import uvloop
    except ImportError:
        asyncio.run(_run(listening, settings, secret))
    else:
        uvloop.run(_run(listening, settings, secret))


if __name__ == "__main__":
    main(sys.argv)
