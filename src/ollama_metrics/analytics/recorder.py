"""The proxy's side of analytics: hand each finished exchange to the writer process, never wait.

Building records (caps, capture level, redaction), encoding them and writing them to the stores
run in the writer process (writer.py), so none of it takes the event loop's core or its GIL.
Here, `finished` (the observer protocol) and `submit` (a record already built) only append to a
list; FLUSH_EVERY seconds after the first of them, the list is encoded as one orjson frame and
written to a Unix socket connected to the writer (loopback TCP where Python has no Unix sockets,
sending nothing until both ends have proven they hold the writer's secret: channel.py; no
thread: the loop's own non-blocking transport). Not once per loop turn: under load a turn
finishes one or two requests, and a write that wakes the writer costs the loop more than the
encoding (bench/README.md, hand-off line).
Bounded: when more than `queue_size` records wait for a connection, or the transport's write buffer
holds more than `queue_size` times RECORD_BYTES, records are dropped and counted
(`ollama_analytics_dropped_total`); a full queue never waits.

The writer reports each connection's figures (writes, drops, its queues); the Recorder turns
them into its own metrics, with the names and meanings they always had. Records the writer
took and never reported settled when its connection is lost (it died) are counted as dropped
(those it wrote in its last writer.REPORT_EVERY seconds among them: the count errs that way).

One writer serves any number of proxy processes. A Recorder made without `writer` starts one
(WriterProcess: restarted when it dies, counted in `ollama_analytics_writer_restarts_total`) and
connects to it; a Recorder made with `writer=<address>` connects to a writer another process
started (WriterProcess.address: a socket path, or a loopback port with the secret), and
reconnects when the connection drops.

Searches never go through the writer: the queryable store (SQLite in WAL mode, PostgreSQL) is
opened here too, for reading, while the writer process writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import secrets
import shutil
import socket
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any, cast

from prometheus_client import CollectorRegistry, Counter, Gauge

from ..observe.interaction import Interaction
from . import channel
from .privacy import Privacy
from .settings import AnalyticsConfig
from .stores import Record, Store, queryable
from .writer import DROPPED, ERROR, SUCCESS, WAITING

log = logging.getLogger(__name__)

OPEN_TIMEOUT = 10.0
RECORD_BYTES = 8 * 1024  # the transport's buffer holds at most queue_size records of this size
FLUSH_EVERY = 0.005  # seconds from the first record of a frame to its write
RECONNECT_EVERY = 0.5
PROOF_WITHIN = 10.0  # seconds the process at a writer's TCP port has to prove it is the writer
RESTART_AFTER = (0.5, 30.0)  # back-off between restarts of a writer that keeps dying
STEADY = 10.0  # seconds a writer must live for the back-off to start again from its floor
READY_AT_LEAST = 1.0  # seconds start() waits for the writer, even past OPEN_TIMEOUT
STOP_MARGIN = 5.0  # beyond the drain grace, for the writer to answer
EXIT_MARGIN = 1.0  # beyond what is left of the grace, for the writer to exit
# Internal, not a setting: "tcp" runs the writer's channel as on Windows (loopback TCP with a
# secret) where Python has Unix sockets too, so tests cover that path on Linux.
TRANSPORT_VARIABLE = "OLLAMA_METRICS_WRITER_TRANSPORT"


def _tcp() -> bool:
    """Whether the writer's channel is loopback TCP: where Python has no Unix sockets (Windows),
    or TRANSPORT_VARIABLE says so. The one place it is read."""
    return not hasattr(socket, "AF_UNIX") or os.environ.get(TRANSPORT_VARIABLE) == "tcp"


class Recorder:
    """The analytics observer: sends each finished exchange to the writer process."""

    def __init__(self, stores: list[Store], settings: AnalyticsConfig,
                 registry: CollectorRegistry, writer: str | None = None) -> None:
        self.settings = settings
        self.stores = stores  # here only the queryable one is opened, for reading
        self._names = [s.name for s in stores]
        self._reader = queryable(stores)
        if writer is not None:
            channel.Address.parse(writer)  # a ValueError now, not at each reconnect
        self._address = writer
        self._batch: list[tuple[Any, ...]] = []
        self._chars = Privacy.from_settings(settings).decisive_chars
        self._scheduled = False
        self._link: _Link | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._opening: asyncio.Future[None] | None = None
        self._closing = False
        self._limit = settings.queue_size * RECORD_BYTES
        self._loop: asyncio.AbstractEventLoop | None = None
        self.queue_size = Gauge(
            "ollama_analytics_queue_size", "Records waiting to be written", ["backend"],
            registry=registry, multiprocess_mode="livesum")
        self.queue_capacity = Gauge(
            "ollama_analytics_queue_capacity", "Most records a backend's queue holds",
            ["backend"], registry=registry, multiprocess_mode="livemax")
        self.writes = Counter(
            "ollama_analytics_writes_total",
            "Records by the outcome of each write attempt (errors are retried)",
            ["backend", "status"], registry=registry)
        self.dropped = Counter(
            "ollama_analytics_dropped_total",
            "Records not stored: queue full, refused by the store, or still unwritten when "
            "shutdown's grace ran out or the writer process died",
            ["backend"], registry=registry)
        self.restarts = Counter(
            "ollama_analytics_writer_restarts_total",
            "Writer processes that died and were started again", registry=registry)
        self.process = WriterProcess(settings, self.restarts) if writer is None else None
        for name in self._names:
            self.queue_size.labels(name).set_function(partial(self._waiting, name))
            self.queue_capacity.labels(name).set(settings.queue_size)
            self.writes.labels(name, "success")
            self.writes.labels(name, "error")
            self.dropped.labels(name)

    # --- the observer protocol (called from the request handler) ---------------------------

    def started(self, interaction: Interaction) -> object:
        return None

    def finished(self, interaction: Interaction, token: object) -> None:
        """Queue the exchange for the writer to build its record; never waits. (The last
        observer: it leaves out of `interaction` what the record cannot keep.)"""
        elided = interaction.messages_elided + channel.trim(
            interaction, self.settings.max_messages, self._chars)
        self._append((channel.INTERACTION, interaction, elided))

    def submit(self, rec: Record) -> None:
        """Queue a record already built for every store; never waits."""
        self._append((channel.RECORD, rec))

    def _append(self, item: tuple[Any, ...]) -> None:
        # The bound is on every record not yet written, wherever it waits: this batch, the
        # socket, the writer's queue (as of its latest report) - as `queue_size` shows them.
        if self._closing or max(map(self._waiting, self._names), default=len(self._batch)
                                ) >= self.settings.queue_size:
            self._drop(1)
            return
        self._batch.append(item)
        if not self._scheduled and self._loop is not None:
            self._scheduled = True
            self._loop.call_later(FLUSH_EVERY, self._flush)

    def _flush(self) -> None:
        """The records since the last flush as one frame to the writer; kept while there is
        no connection, dropped when the connection's buffer is full."""
        self._scheduled = False
        link = self._link
        if not self._batch or link is None or link.transport.is_closing():
            return
        batch, self._batch = self._batch, []
        if link.transport.get_write_buffer_size() > self._limit:
            self._drop(len(batch))
            return
        payload, n = channel.encode(batch)
        self._drop(len(batch) - n)
        link.transport.writelines((channel.frame(payload), payload))
        link.sent += n
        for item in batch:
            if item[0] == channel.INTERACTION:  # large requests should not outlive the exchange
                item[1].messages = item[1].images = None

    def _drop(self, n: int) -> None:
        if n:
            for name in self._names:
                self.dropped.labels(name).inc(n)

    def _waiting(self, backend: str) -> float:
        link = self._link
        if link is None:
            return len(self._batch)
        return len(self._batch) + link.sent - link.received + link.figures[backend][WAITING]

    # --- the connection ----------------------------------------------------------------------

    def _reported(self, link: _Link, report: dict[str, Any]) -> None:
        for name, now in report["backends"].items():
            if name not in link.figures:
                continue
            before = link.figures[name]
            self.writes.labels(name, "success").inc(now[SUCCESS] - before[SUCCESS])
            self.writes.labels(name, "error").inc(now[ERROR] - before[ERROR])
            self.dropped.labels(name).inc(now[DROPPED] - before[DROPPED])
            link.figures[name] = now
        link.received = report["received"]
        link.ready.set()
        if report["final"]:
            link.final = True

    def _lost(self, link: _Link) -> None:
        link.handshake_over(False)
        if link is not self._link and not link.sent:  # never in use (its handshake failed):
            link.done.set()  # _connect goes on trying
            return
        if self._link is link:
            self._link = None
        if not link.final:  # the writer died: what it had not settled is lost
            lost = {name: link.sent - f[SUCCESS] - f[DROPPED] for name, f in link.figures.items()}
            for name, n in lost.items():
                self.dropped.labels(name).inc(max(n, 0))
            if any(lost.values()):
                log.warning("analytics: the writer process went away with up to %d records "
                            "not written", max(lost.values()))
        link.sent = link.received = 0
        for figures in link.figures.values():
            figures[WAITING] = 0
        link.done.set()
        if not self._closing:
            self._connecting = asyncio.ensure_future(self._connect())

    async def _connect(self) -> None:
        """Connect to the writer, and try again every RECONNECT_EVERY seconds until it
        answers."""
        assert self._loop is not None
        while not self._closing:
            # Each time: a writer restarted over TCP may listen on another port.
            address = self._address or (self.process.address if self.process else "")
            where = channel.Address.parse(address) if address else None
            try:
                if where is None:  # our writer is being restarted
                    raise ConnectionRefusedError("not listening yet")
                if where.port:
                    _, link = await self._loop.create_connection(
                        partial(_Link, self, self._names, where.secret), channel.LOOPBACK,
                        where.port)
                else:
                    _, link = await self._loop.create_unix_connection(
                        lambda: _Link(self, self._names), where.path)
            except OSError as exc:
                log.debug("analytics: cannot reach the writer at %s yet: %s",
                          where.path or f"port {where.port}" if where else "-", exc)
                await asyncio.sleep(RECONNECT_EVERY)
                continue
            if not await link.proven() or link.done.is_set() or link.transport.is_closing():
                # (proven, then lost before it was in use: _lost left it to us)
                log.warning("analytics: the process at loopback port %d did not prove it is "
                            "the writer; no record was sent to it", where.port)
                await asyncio.sleep(RECONNECT_EVERY)
                continue
            self._link = link
            self._flush()
            return

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the queryable store for reading, start the writer process (unless attached
        to another's) and connect to it; within OPEN_TIMEOUT in all. An open still running
        then (a migration over a large store takes minutes) goes on in the background:
        searches answer once it is done, records queue meanwhile."""
        loop = self._loop = asyncio.get_running_loop()
        deadline = loop.time() + OPEN_TIMEOUT
        if self._reader is not None:  # its migrations run before the writer opens it too
            self._opening = asyncio.ensure_future(self._reader.open())
            await asyncio.wait([self._opening], timeout=OPEN_TIMEOUT)
            if not self._opening.done():
                log.warning("analytics: %s is still opening (upgrading a large store can take "
                            "minutes); searches answer once it is open", self._reader.name)
                self._opening.add_done_callback(self._reader_opened)
            else:
                self._reader_opened(self._opening)
        if self.process is not None:
            await self.process.start()
        self._connecting = asyncio.ensure_future(self._connect())
        await asyncio.wait([self._connecting], timeout=max(deadline - loop.time(),
                                                           READY_AT_LEAST))
        if self._link is not None:  # the writer's first report says its stores are open
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._link.ready.wait(),
                                       max(deadline - loop.time(), READY_AT_LEAST))

    def _reader_opened(self, opening: asyncio.Future[None]) -> None:
        if opening.cancelled() or opening.exception() is None:
            return
        log.warning("analytics: cannot open %s yet, retrying in the background: %s",
                    self._reader.name if self._reader else "", opening.exception())
        self._opening = asyncio.ensure_future(self._open_reader())

    async def _open_reader(self) -> None:
        assert self._reader is not None
        delay = RESTART_AFTER[0]
        while True:
            await asyncio.sleep(delay)
            try:
                await self._reader.open()
                return
            except Exception as exc:
                log.debug("analytics: cannot open %s yet: %s", self._reader.name, exc)
                delay = min(delay * 2, RESTART_AFTER[1])

    async def close(self) -> None:
        """Send what is left, wait (up to the drain grace) for the writer to settle it, stop
        the writer process if it is ours, close the store."""
        # One grace for it all: the writer settles this proxy's records within drain_grace
        # and answers; then it has only what is left (and a moment) to exit. What its answer
        # did not count as written was counted as dropped, so nothing uncounted is lost.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.drain_grace
        self._flush()
        self._closing = True
        if self._connecting is not None:
            self._connecting.cancel()
        link = self._link
        if link is not None:
            if not link.transport.is_closing():
                link.transport.write_eof()  # the writer answers with its final report
            try:
                await asyncio.wait_for(link.done.wait(),
                                       deadline - loop.time() + STOP_MARGIN)
            except asyncio.TimeoutError:
                link.transport.abort()
                await link.done.wait()
        self._drop(len(self._batch))  # never reached a writer
        self._batch.clear()
        if self.process is not None:
            await self.process.stop(max(0.0, deadline - loop.time()) + EXIT_MARGIN)
        if self._opening is not None:
            self._opening.cancel()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await self._reader.close()


class _Link(asyncio.Protocol):
    """One connection to the writer: what was sent on it, and the writer's last report."""

    def __init__(self, recorder: Recorder, names: list[str], secret: bytes = b"") -> None:
        self.recorder = recorder
        self.secret = secret  # over TCP: what both ends prove they hold before anything else
        self.transport: asyncio.WriteTransport = None  # type: ignore[assignment]
        self.sent = 0
        self.received = 0
        self.figures = {name: [0, 0, 0, 0] for name in names}
        self.final = False
        self.ready = asyncio.Event()  # the writer's first report came
        self.done = asyncio.Event()
        self._buffer = bytearray()
        self._proven: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._challenge = b""  # the writer's, once it came
        self._answer = b""  # ours
        if not secret:  # a Unix socket in a private directory: only our writer is there
            self._proven.set_result(True)

    async def proven(self) -> bool:
        """Whether the other end proved it is the writer (at once over a Unix socket); a link
        that did not is closed, having sent nothing."""
        ok = False
        try:
            ok = await asyncio.wait_for(asyncio.shield(self._proven), PROOF_WITHIN)
        except asyncio.TimeoutError:
            pass
        finally:  # cancelled too (the Recorder closing): never left open unproven
            if not ok and not self.transport.is_closing():
                self.transport.close()
        return ok

    def handshake_over(self, ok: bool) -> None:
        if not self._proven.done():
            self._proven.set_result(ok)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.WriteTransport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= channel.HEADER:
            size = int.from_bytes(self._buffer[:channel.HEADER], "big")
            end = channel.HEADER + size
            if len(self._buffer) < end:
                return
            payload = bytes(self._buffer[channel.HEADER:end])
            del self._buffer[:end]
            if not self._proven.done():
                self._handshake(payload)
            elif self._proven.result():
                self.recorder._reported(self, channel.decode(payload))

    def _handshake(self, payload: bytes) -> None:
        """channel.py's handshake, the proxy's side: answer the writer's challenge with ours
        and our proof, then check the writer's proof. Nothing else is read before it holds."""
        if not self._challenge:
            if len(payload) != channel.CHALLENGE_BYTES:
                self.handshake_over(False)
                return
            self._challenge = payload
            self._answer = secrets.token_bytes(channel.CHALLENGE_BYTES)
            message = self._answer + channel.proof(self.secret, channel.PROXY_ROLE,
                                                   self._challenge, self._answer)
            self.transport.write(channel.frame(message) + message)
            return
        self.handshake_over(channel.proven(self.secret, channel.WRITER_ROLE, self._challenge,
                                           self._answer, payload))

    def eof_received(self) -> bool:
        return False  # the writer is done with this connection: close it

    def connection_lost(self, exc: Exception | None) -> None:
        self.recorder._lost(self)


class WriterProcess:
    """The writer process (writer.py) behind a Unix socket in a private directory: started,
    restarted when it dies (after a back-off, counted in `restarts`), stopped.

    The listening socket is this process's and is handed to each writer it starts, so the
    address stays the same across restarts and connections made while no writer runs wait in
    the socket's backlog. Other processes attach with `Recorder(..., writer=address)`.

    Where Python has no Unix sockets and cannot pass fds (Windows), or `_tcp()` says so, each
    writer binds a loopback TCP port itself (the last one's if it is free) and says which on its
    stdout; `address` is empty while none listens. This process makes the secret every
    connection must send first and hands it to each writer with its settings.
    """

    def __init__(self, settings: AnalyticsConfig, restarts: Counter | None = None) -> None:
        self.settings = settings
        self.restarts = restarts
        self.address = ""
        self._tcp = _tcp()
        self._secret = secrets.token_bytes(channel.SECRET_BYTES) if self._tcp else b""
        self._port = 0  # the last writer's, over TCP
        self._dir: str | None = None
        self._listening: socket.socket | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    async def start(self) -> None:
        if not self._tcp:
            self._dir = tempfile.mkdtemp(prefix="ollama-metrics-")  # 0700: only this user
            self.address = str(Path(self._dir) / "writer.sock")
            self._listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._listening.bind(self.address)
            self._listening.listen(128)
        await self._spawn()
        self._watch = asyncio.create_task(self._watch_loop(), name="analytics-writer-watch")

    async def _spawn(self) -> None:
        settings = pickle.dumps((self.settings, logging.getLogger().getEffectiveLevel(),
                                 self._secret, self._port))
        if self._tcp:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "ollama_metrics.analytics.writer", "tcp",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        else:
            assert self._listening is not None
            fd = self._listening.fileno()
            self._process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "ollama_metrics.analytics.writer", str(fd),
                stdin=asyncio.subprocess.PIPE, pass_fds=(fd,))
        assert self._process.stdin is not None
        self._process.stdin.write(channel.frame(settings) + settings)
        if self._tcp:
            await self._listening_on()

    async def _listening_on(self) -> None:
        """Read the port the new writer listens on; one that does not say is killed (and so
        restarted)."""
        assert self._process is not None and self._process.stdout is not None
        try:
            line = await asyncio.wait_for(self._process.stdout.readline(), OPEN_TIMEOUT)
        except asyncio.TimeoutError:
            line = b""
        if not line.strip().isdigit():
            log.warning("analytics: the writer process did not say where it listens")
            if self._process.returncode is None:
                self._process.kill()
            return
        self._port = int(line)
        self.address = str(channel.Address(port=self._port, secret=self._secret))

    async def _watch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        delay = RESTART_AFTER[0]
        while True:
            assert self._process is not None
            born = loop.time()
            code = await self._process.wait()
            if self._stopping:
                return
            if self._tcp:
                self.address = ""  # until the next writer says where it listens
            log.warning("analytics: the writer process exited (code %s); starting another in "
                        "%.1fs", code, delay)
            if loop.time() - born > STEADY:
                delay = RESTART_AFTER[0]
            await asyncio.sleep(delay)
            delay = min(2 * delay, RESTART_AFTER[1])
            await self._spawn()
            if self.restarts is not None:
                self.restarts.inc()

    async def stop(self, timeout: float) -> None:
        """Close the writer's stdin (it writes what is queued, then exits); kill it past
        `timeout`."""
        self._stopping = True
        process = self._process
        if process is not None and process.returncode is None:
            assert process.stdin is not None
            process.stdin.close()
            try:
                await asyncio.wait_for(process.wait(), timeout)
            except asyncio.TimeoutError:
                log.warning("analytics: the writer process did not stop in %.0fs; killing it",
                            timeout)
                process.kill()
                await process.wait()
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        if self._listening is not None:
            self._listening.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
