"""Test helpers: the in-process proxy handle, waiting for conditions, processes and raw HTTP."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from ollama_metrics.config import Config

TESTS = Path(__file__).parent


@dataclass
class RunningProxy:
    url: str
    port: int
    registry: CollectorRegistry
    config: Config
    app: web.Application

    def sample(self, name: str, **labels: str) -> float:
        """A metric sample's value, 0.0 when the series does not exist (yet)."""
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


class Scraped(Collector):
    """The metrics a running proxy's /metrics shows, read at each collect (a blocking GET: the
    proxy is another process, which answers /metrics without asking Ollama)."""

    def __init__(self, url: str) -> None:
        self._url = url

    def collect(self) -> Iterator[Metric]:
        with urllib.request.urlopen(self._url, timeout=5) as reply:
            yield from text_string_to_metric_families(reply.read().decode())


async def settle(check: Callable[[], bool], timeout: float = 2.0) -> None:
    """Wait until `check()` holds: the proxy records an exchange just after the client is done."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


class Process:
    """A child process whose stdout and stderr are drained into `lines` by background threads
    (an undrained pipe would eventually block the child's writes)."""

    def __init__(self, args: list[str], cwd: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env, cwd=cwd)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._drains = [threading.Thread(target=self._drain, args=(s,), daemon=True)
                        for s in (self.proc.stdout, self.proc.stderr)]
        for t in self._drains:
            t.start()
        self.port = 0

    def _drain(self, stream: IO[str] | None) -> None:
        assert stream is not None
        for line in stream:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        stream.close()

    def wait_for(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        """The first output line matching `pattern`, waiting for it to be printed."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    if m := regex.search(line):
                        return m
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and
                                 not any(t.is_alive() for t in self._drains)):
                    raise AssertionError(f"no line matching {pattern!r} in: {self.output}")
                self._changed.wait(min(left, 0.1))

    @property
    def output(self) -> str:
        return "".join(self.lines)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        finally:
            for t in self._drains:
                t.join(5)


def _start(args: list[str], pattern: str, cwd: str | None = None) -> Process:
    p = Process(args, cwd)
    try:
        p.port = int(p.wait_for(pattern).group(1))
    except BaseException:
        p.stop()
        raise
    return p


@contextmanager
def fake_process(*args: str) -> Iterator[Process]:
    """tests/fake_ollama.py as a separate process on a free port."""
    p = _start([sys.executable, str(TESTS / "fake_ollama.py"), "--port", "0", *args],
               r"LISTENING (\d+)")
    try:
        yield p
    finally:
        p.stop()


@contextmanager
def proxy_process(upstream: str, *args: str,
                  python: Sequence[str] = ("-m", "ollama_metrics")) -> Iterator[Process]:
    """`python -m ollama_metrics serve` as a separate process on a free port, in a scratch
    directory of its own (conftest's data_home keeps its default analytics out of $HOME).
    `python`: what runs the CLI instead of `-m ollama_metrics` (a `-c` script)."""
    with tempfile.TemporaryDirectory(prefix="ollama-metrics-proxy-") as scratch:
        p = _start([sys.executable, *python, "serve", "--listen", "127.0.0.1:0",
                    "--upstream", upstream, *args], r"listening on http://127\.0\.0\.1:(\d+)",
                   cwd=scratch)
        try:
            yield p
        finally:
            p.stop()


async def raw_request(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes to 127.0.0.1:port and read until the server closes or goes quiet."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    chunks: list[bytes] = []
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), timeout)
            if not chunk:
                break
            chunks.append(chunk)
    except asyncio.TimeoutError:
        pass
    finally:
        writer.close()
    return b"".join(chunks)
