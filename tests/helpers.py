"""Test helpers: the in-process proxy handle, waiting for conditions, processes and raw HTTP."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry

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


async def settle(check: Callable[[], bool], timeout: float = 2.0) -> None:
    """Wait until `check()` holds: the proxy records an exchange just after the client is done."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


@dataclass
class Process:
    proc: subprocess.Popen[str]
    port: int
    lines: list[str]

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


def _start(args: list[str], pattern: str, stream: str, timeout: float = 20.0) -> Process:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    out = proc.stdout if stream == "stdout" else proc.stderr
    assert out is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = out.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(pattern, line)
        if m:
            return Process(proc, int(m.group(1)), lines)
    proc.kill()
    rest = proc.communicate()
    raise RuntimeError(f"{args} did not start: {''.join(lines)}{rest}")


@contextmanager
def fake_process(*args: str) -> Iterator[Process]:
    """tests/fake_ollama.py as a separate process on a free port."""
    p = _start([sys.executable, str(TESTS / "fake_ollama.py"), "--port", "0", *args],
               r"LISTENING (\d+)", "stdout")
    try:
        yield p
    finally:
        p.stop()


@contextmanager
def proxy_process(upstream: str, *args: str) -> Iterator[Process]:
    """`python -m ollama_metrics serve` as a separate process on a free port."""
    p = _start([sys.executable, "-m", "ollama_metrics", "serve", "--listen", "127.0.0.1:0",
                "--upstream", upstream, *args], r"listening on http://127\.0\.0\.1:(\d+)",
               "stderr")
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
