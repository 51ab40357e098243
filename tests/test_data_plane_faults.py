"""The data plane (server/fast.py) under faults: a client or an Ollama that breaks off, an Ollama
that answers oddly, read-ahead, idle connections and shutdown.

Where aiohttp's path has an answer of its own, the plane's must be the same (test_data_plane's
differential); elsewhere, what must not happen: a request reaching Ollama for a client that can
no longer be answered, an upstream connection reused after Ollama closed it, a connection left
open for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from conftest import StartProxy
from fake_ollama import FakeOllama, Scenario
from helpers import RunningProxy, raw_request, settle
from ollama_metrics.server import fast
from ollama_metrics.server.fast import PLANE, Plane
from test_data_plane import _comparable, start  # noqa: F401  (the fixture)
from test_fm_upstream import _blackhole
from wire import parse_replies

Start = Callable[..., Awaitable[RunningProxy]]
Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _plane(proxy: RunningProxy) -> Plane:
    return proxy.app[PLANE]


def _post(path: bytes, body: bytes, extra: bytes = b"") -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n%s\r\n%s"
            % (path, len(body), extra, body))


@contextlib.asynccontextmanager
async def _raw_ollama(serve: Serve) -> AsyncIterator[str]:
    """An 'Ollama' that is a bare socket server: it answers what `serve` writes, byte for byte."""
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":")[1]))
    return head


def _replying(reply: bytes, close: bool = True) -> Serve:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                await _read_head(reader)
                writer.write(reply)
                await writer.drain()
                if close:
                    break
        writer.close()
    return serve


async def test_nothing_after_a_broken_reply_reaches_ollama(fake: FakeOllama,
                                                           start_proxy: StartProxy) -> None:
    """A reply Ollama broke off is cut at the client, so a request pipelined behind it can
    never be answered: it must not be sent to Ollama (a generate would run for no one)."""
    fake.scenarios["drop:latest"] = Scenario(drop_after=1, token_delay=0.05)
    proxy = await start_proxy(fake.url)
    request = (_post(b"/api/generate", b'{"model":"drop","prompt":"hi"}')
               + _post(b"/api/generate", b'{"model":"llama3.2","prompt":"again"}'))
    fake.requests.clear()
    (reply,) = parse_replies(await raw_request(proxy.port, request))
    assert reply.status == 200 and not reply.complete  # cut: no final chunk
    await asyncio.sleep(0.3)
    assert [r.path_qs for r in fake.requests if r.path_qs == "/api/generate"] == ["/api/generate"]
    assert _plane(proxy).served == 1 and not _plane(proxy).active
    assert not _plane(proxy).pool  # the broken connection is not kept


async def test_client_gone_while_connecting_to_ollama(start_proxy: StartProxy) -> None:
    """The exchange ends as soon as the client goes, while the connect to an Ollama that does not
    answer is still pending; the connect is given up, not left to its timeout."""
    with _blackhole() as port:
        proxy = await start_proxy(f"http://127.0.0.1:{port}", connect_timeout=30)
        plane = _plane(proxy)
        _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(_post(b"/api/show", b'{"model":"llama3.2"}'))
        await settle(lambda: len(plane.active) == 1)
        (exchange,) = plane.active
        connecting = exchange._connecting
        assert connecting is not None and not connecting.done()
        writer.close()
        await settle(lambda: not plane.active, timeout=1.0)
        await settle(connecting.done, timeout=1.0)
        assert connecting.cancelled()


async def test_odd_replies_relayed_as_aiohttp_relays_them(
        start: Start) -> None:  # noqa: F811  (the fixture imported)
    """Replies read until close, 204 and 304 (no body), cut short, not HTTP or loosely framed
    (bare LF): the plane answers the client as aiohttp's path does, and keeps no connection."""
    replies = {
        "until close": b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nhello, until close",
        "204": b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n",
        "304": b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n",
        "garbage": b"SPDY/9 what\r\n\r\n",
        "cut head": b"HTTP/1.1 200 OK\r\nContent-Le",
        "cut body": b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
        "bare lf": b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
        "space in field name": b"HTTP/1.1 200 OK\r\nX A: 1\r\nContent-Length: 2\r\n\r\nok",
    }
    request = _post(b"/api/show", b'{"model":"llama3.2"}', b"Connection: close\r\n")

    def cut(body: bytes) -> bytes:  # the parsers' own words for what broke differ
        return body.partition(b"invalid HTTP reply")[0]

    for name, reply in replies.items():
        async with _raw_ollama(_replying(reply)) as url:
            with_plane, without = await start(url), await start(url, plane=False)
            got = parse_replies(await raw_request(with_plane.port, request, timeout=2.0))
            want = parse_replies(await raw_request(without.port, request, timeout=2.0))
            assert [(r.status, cut(r.body), r.complete) for r in got] == [
                (r.status, cut(r.body), r.complete) for r in want], name
            plane = _plane(with_plane)
            assert plane.served == 1, name
            assert not plane.active and not plane.pool, name  # nothing kept after any of these
