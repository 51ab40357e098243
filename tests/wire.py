"""Helpers for failure-mode tests: raw HTTP/1.1 replies, small upstreams, watching a process.

`parse_replies` reads consecutive HTTP/1.1 responses from raw bytes as a client must (Content-
Length, chunked, or until close) and says whether each ended as its framing promised, so a test
can tell a complete reply from a truncated one. `upstream` serves a throwaway aiohttp app on a
free port (a stand-in Ollama with one odd behaviour). `Watch` samples a process's RSS in the
background for its peak.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import psutil
from aiohttp import web

MIB = 2**20
# The fake's clock, which differs between two otherwise identical replies.
CLOCK = re.compile(rb'"(created_at|created|expires_at|modified_at)":("[^"]*"|\d+)|chatcmpl-\d+|'
                   rb"cmpl-\d+")


def mask_clock(data: bytes) -> bytes:
    return CLOCK.sub(b"<clock>", data)


@dataclass
class Reply:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    complete: bool = False  # the body ended where its framing said it would
    chunked: bool = False
    length: int | None = None  # the declared Content-Length

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def has(self, name: str) -> bool:
        return any(k.lower() == name.lower() for k, _ in self.headers)


def _chunked(data: bytes, at: int) -> tuple[bytes, int, bool]:
    """Decode a chunked body from `at`: (body, offset after it, whether the 0-chunk came)."""
    body = bytearray()
    while True:
        end = data.find(b"\r\n", at)
        if end < 0:
            return bytes(body), len(data), False
        size = int(data[at:end].split(b";")[0], 16)
        at = end + 2
        if size == 0:
            trailer_end = data.find(b"\r\n\r\n", at - 2)
            if trailer_end < 0:
                return bytes(body), len(data), False
            return bytes(body), trailer_end + 4, True
        if len(data) < at + size + 2:
            body += data[at:at + size]
            return bytes(body), len(data), False
        body += data[at:at + size]
        at += size + 2


def parse_replies(data: bytes, methods: list[str] | None = None) -> list[Reply]:
    """Every response in `data`, in order; `methods` are the requests', to know HEAD replies."""
    replies: list[Reply] = []
    answered = 0  # final (non-1xx) replies so far
    at = 0
    while at < len(data):
        head_end = data.find(b"\r\n\r\n", at)
        if head_end < 0:
            break
        lines = data[at:head_end].decode("latin-1").split("\r\n")
        _, status, reason = [*lines[0].split(" ", 2), ""][:3]
        headers = [(k.strip(), v.strip()) for k, _, v in (h.partition(":") for h in lines[1:])]
        reply = Reply(int(status), reason, headers)
        at = head_end + 4
        replies.append(reply)
        if reply.status < 200:  # 100 Continue: the final answer follows
            reply.complete = True
            continue
        method = methods[answered] if methods and answered < len(methods) else "GET"
        answered += 1
        te, cl = reply.header("Transfer-Encoding"), reply.header("Content-Length")
        reply.length = int(cl) if cl is not None else None
        if method == "HEAD" or reply.status in (204, 304):
            reply.complete = True
        elif te is not None and te.lower() == "chunked":
            reply.chunked = True
            reply.body, at, reply.complete = _chunked(data, at)
        elif reply.length is not None:
            reply.body = data[at:at + reply.length]
            reply.complete = len(reply.body) == reply.length
            at += len(reply.body)
        else:  # delimited by the close
            reply.body, at, reply.complete = data[at:], len(data), True
    return replies


@dataclass
class Upstream:
    url: str
    port: int


@asynccontextmanager
async def upstream(app: web.Application) -> AsyncIterator[Upstream]:
    """Serve `app` on 127.0.0.1 (a free port) for the duration of the block."""
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield Upstream(f"http://127.0.0.1:{port}", port)
    finally:
        await runner.cleanup()


@dataclass
class Watch:
    """Samples a process's RSS every 10 ms on a thread, from `start()` to `stop()`."""

    pid: int
    baseline: int = 0
    peak: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Watch:
        process = psutil.Process(self.pid)
        self.baseline = self.peak = process.memory_info().rss

        def run() -> None:
            while not self._stop.is_set():
                self.peak = max(self.peak, process.memory_info().rss)
                time.sleep(0.01)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> float:
        """The peak rise over the baseline, in MiB."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return (self.peak - self.baseline) / MIB


def startup_done(fake_url: str, timeout: float = 10.0) -> None:
    """Wait until a proxy just started has made its own first requests to the fake Ollama
    (process mode) -- the health check and the model list -- then clear the fake's record, so
    that what it records next is only what the test sends."""
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(fake_url + "/_fake/requests", timeout=5) as resp:
            seen = {(r["method"], r["path_qs"]) for r in json.load(resp)}
        if {("GET", "/api/version"), ("GET", "/api/tags")} <= seen:
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"the proxy's start-up requests never came: {seen}")
        time.sleep(0.02)
    urllib.request.urlopen(urllib.request.Request(fake_url + "/_fake/reset", method="POST"),
                           timeout=5).close()


def open_fds(pid: int) -> int:
    count: int = psutil.Process(pid).num_fds()
    return count
