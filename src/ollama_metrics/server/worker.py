"""One worker of `--workers N`: a process running `main()` here, started by workers.py.

It reads its orders on stdin: first its settings (a length-prefixed pickle of Start, from the
process that started it, never from anyone else), then one line per order, `stop` (shut down
within the grace) or `now` (stop at once). The end of stdin is `stop`: the main process is gone.
It binds its own socket to the main process's port with SO_REUSEPORT, serves the app (the same
one as a single process serves), and writes `ready` on stdout once it accepts connections.
SIGINT and SIGTERM are ignored: a Ctrl-C reaches the whole process group, and a service
manager may signal every process; the main process alone decides when workers stop, so one
Ctrl-C never counts twice.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import signal
import socket
import sys
from dataclasses import dataclass

from aiohttp import web

from ..analytics.settings import AnalyticsConfig
from ..config import Config
from ..observe.metrics import new_registry
from .app import create_app
from .connection import verify
from .descriptors import Watch, lift_open_file_limit
from .lifecycle import make_runner, shut_down
from .shared import Shared

log = logging.getLogger("ollama_metrics")

HEADER = 4


@dataclass(frozen=True)
class Start:
    """What a worker needs: its number (for its log lines), the settings, where to listen and
    the directory it shares with the others."""

    index: int
    config: Config
    analytics: AnalyticsConfig | None
    host: str
    port: int
    shared: Shared
    writer: str | None = None  # the analytics writer process's address, if analytics are on


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


class _Orders(asyncio.Protocol):
    def __init__(self, stop: asyncio.Event, now: asyncio.Event) -> None:
        self._stop, self._now, self._text = stop, now, b""

    def data_received(self, data: bytes) -> None:
        self._text += data
        *lines, self._text = self._text.split(b"\n")
        for line in lines:
            if line == b"now":
                self._now.set()
            self._stop.set()

    def eof_received(self) -> bool:
        self._stop.set()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop.set()


async def serve(start: Start) -> None:
    config = start.config
    sock = listen(start.host, start.port)
    stop, now = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: _Orders(stop, now), sys.stdin)
    app = create_app(config, new_registry(), start.analytics, start.shared, start.writer)
    runner = make_runner(app, config)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    descriptors = Watch(sock.fileno())
    descriptors.start()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    try:
        await stop.wait()
    finally:
        descriptors.stop()
        await shut_down(runner, now)


def _read_start() -> Start:
    def exactly(n: int) -> bytes:  # unbuffered: the orders after it are the loop's to read
        data = b""
        while len(data) < n:
            more = os.read(0, n - len(data))
            if not more:
                raise SystemExit(1)  # the main process went away before we started
            data += more
        return data

    start = pickle.loads(exactly(int.from_bytes(exactly(HEADER), "big")))
    assert isinstance(start, Start)
    return start


def main() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    start = _read_start()
    logging.basicConfig(
        level=start.config.log_level, stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s %(name)s [worker {start.index}]: %(message)s")
    verify()
    lift_open_file_limit()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(start))
    else:
        uvloop.run(serve(start))

