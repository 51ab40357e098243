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
from aiohttp import web

from conftest import StartProxy
from fake_ollama import FakeOllama, Scenario
from helpers import RunningProxy, raw_request, settle
from ollama_metrics.config import Config
from ollama_metrics.observe.metrics import new_registry
from ollama_metrics.server import fast
from ollama_metrics.server.app import create_app
from ollama_metrics.server.fast import PLANE, Plane
from ollama_metrics.server.lifecycle import make_runner, shut_down
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
        "interim reply first": b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
                               b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        "two replies": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                       b"HTTP/1.1 201 Created\r\nContent-Length: 3\r\n\r\nbad",
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
    # Junk after a whole reply in the same read: aiohttp's client drops the reply for a 502 (its
    # parser fails the read whole); the plane relays the reply and drops the connection.
    async with _raw_ollama(_replying(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokjunk")
                           ) as url:
        proxy = await start(url)
        (answer,) = parse_replies(await raw_request(proxy.port, request, timeout=2.0))
        assert (answer.status, answer.body, answer.complete) == (200, b"ok", True)
        await settle(lambda: not _plane(proxy).active)
        assert proxy.sample("ollama_errors_total", error_type="reset") == 0  # recorded as served
        assert not _plane(proxy).pool


async def test_a_pooled_connection_ollama_closed_is_not_used(start_proxy: StartProxy) -> None:
    """Ollama closes keep-alive connections it holds idle: the next request opens a new one
    and succeeds, rather than failing on the dead one."""
    served: list[int] = []  # for each probe request, the connection that carried it

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            head = await _read_head(reader)  # one request a connection, kept open a moment
            if b"probe" in head.partition(b"\r\n")[0]:
                served.append(id(writer))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            await asyncio.sleep(0.05)  # Ollama's idle timeout, shortened
        writer.close()

    async with _raw_ollama(serve) as url:
        proxy = await start_proxy(url)
        request = (b"GET /api/version?probe HTTP/1.1\r\nHost: localhost\r\n"
                   b"Connection: close\r\n\r\n")
        for _ in range(2):
            (reply,) = parse_replies(await raw_request(proxy.port, request))
            assert (reply.status, reply.body) == (200, b"ok")
            await asyncio.sleep(0.2)
        assert len(served) == 2 and served[0] != served[1] and _plane(proxy).served == 2


@pytest.mark.slow(reason="a reply streamed past the shortened keep-alive, then the sweep")
async def test_idle_connections_close_after_the_keepalive(
        fake: FakeOllama, start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    """Idle client connections close after KEEPALIVE, idle upstream ones after
    UPSTREAM_KEEPALIVE (the plane's own sweep, its periods shortened); a reply that streams for
    longer than KEEPALIVE is not idle."""
    monkeypatch.setattr(fast, "KEEPALIVE", 0.3)
    monkeypatch.setattr(fast, "UPSTREAM_KEEPALIVE", 0.3)
    monkeypatch.setattr(fast, "SWEEP_EVERY", 0.1)
    fake.scenarios["slow:latest"] = Scenario(tokens=["a"] * 8, token_delay=0.1)
    proxy = await start_proxy(fake.url)
    plane = _plane(proxy)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(_post(b"/api/generate", b'{"model":"slow","prompt":"hi"}'))
    data = b""
    while not ((replies := parse_replies(data)) and replies[0].complete):
        chunk = await asyncio.wait_for(reader.read(65536), 3)
        assert chunk, data  # not closed while the reply streams (0.8 s)
        data += chunk
    assert plane.pool
    assert await asyncio.wait_for(reader.read(), 2) == b""  # then idle, and closed
    await settle(lambda: not plane.pool and not plane.clients)
    writer.close()



async def test_read_ahead_pauses_while_a_reply_streams(fake: FakeOllama,
                                                       start_proxy: StartProxy) -> None:
    """Requests pipelined behind a streaming reply are read up to READ_AHEAD, then reading
    pauses until the reply ends; every request is then answered in order."""
    fake.scenarios["slow:latest"] = Scenario(tokens=["a"] * 6, token_delay=0.1)
    proxy = await start_proxy(fake.url)
    plane = _plane(proxy)
    body = b'{"model":"llama3.2","x":"' + b"y" * 60_000 + b'"}'
    request = (_post(b"/api/generate", b'{"model":"slow","prompt":"hi"}')
               + _post(b"/api/show", body) * 4
               + b"GET /api/version HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(request)
    await settle(lambda: any(c._reading_paused for c in plane.clients))
    (client,) = plane.clients
    assert len(client._buf) <= fast.READ_AHEAD + (1 << 18)  # at most one read past the cap
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    replies = parse_replies(data)
    assert [r.status for r in replies] == [200] * 6 and all(r.complete for r in replies)
    assert plane.served == 6


@pytest.mark.slow(reason="a stream finished within the shutdown grace")
async def test_shutdown_closes_idle_connections_and_lets_streams_finish(
        fake: FakeOllama) -> None:
    """At shutdown an idle keep-alive connection closes at once, a head still arriving is not
    served but a request whose body is still arriving is, a stream in flight finishes within the
    grace; the second signal cuts what is left."""
    fake.scenarios["slow:latest"] = Scenario(tokens=["a"] * 20, token_delay=0.05)
    fake.scenarios["long:latest"] = Scenario(tokens=["a"] * 400, token_delay=0.05)  # > grace
    config = Config.build(upstream=fake.url, listen="127.0.0.1:0", shutdown_grace=10)
    app = create_app(config, new_registry())
    runner = make_runner(app, config)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    plane = app[PLANE]
    idle_r, idle_w = await asyncio.open_connection("127.0.0.1", port)
    idle_w.write(b"GET /api/version HTTP/1.1\r\nHost: localhost\r\n\r\n")
    await asyncio.wait_for(idle_r.readuntil(b'"}'), 2)
    partial_r, partial_w = await asyncio.open_connection("127.0.0.1", port)
    partial_w.write(b"GET /api/version?late HTTP/1.1\r\nHost: loc")
    body_r, body_w = await asyncio.open_connection("127.0.0.1", port)
    body_w.write(_post(b"/api/show?begun", b'{"model":"llama3.2"}')[:-5])
    streams = []
    for model in (b"slow", b"long"):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(_post(b"/api/generate", b'{"model":"%s","prompt":"hi"}' % model))
        await asyncio.wait_for(r.readuntil(b"\n"), 2)  # streaming
        streams.append((r, w))
    now = asyncio.Event()
    stopping = asyncio.ensure_future(shut_down(runner, now))
    assert await asyncio.wait_for(idle_r.read(), 0.5) == b""  # closed at once
    fake.requests.clear()
    partial_w.write(b"alhost\r\n\r\n")
    assert await asyncio.wait_for(partial_r.read(), 1) == b""
    assert not [r for r in fake.requests if "late" in r.path_qs]
    body_w.write(b'3.2"}')  # its head came before the shutdown: it is served
    (begun,) = parse_replies(await asyncio.wait_for(body_r.read(), 2))
    assert begun.status == 200 and begun.header("Connection") == "close"
    (first_r, _), (second_r, _) = streams
    rest = await asyncio.wait_for(first_r.read(), 5)
    assert rest.endswith(b"0\r\n\r\n")  # finished within the grace
    assert not stopping.done()  # the long stream is still in its grace
    now.set()  # the second signal: what is left is closed now
    await asyncio.wait_for(stopping, 2)
    cut = await asyncio.wait_for(second_r.read(), 1)
    assert not cut.endswith(b"0\r\n\r\n")
    for _, w in [*streams, (idle_r, idle_w), (partial_r, partial_w), (body_r, body_w)]:
        w.close()
    assert not plane.clients


async def test_a_request_on_a_connection_ollama_just_closed(start_proxy: StartProxy) -> None:
    """Ollama closes a pooled connection as a request sets out on it: an idempotent request is
    sent again on a new connection (as aiohttp's client does); a POST is not (502)."""
    seen: list[tuple[int, bytes]] = []  # (connection, request line) of each request read

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            head = await _read_head(reader)
            seen.append((id(writer), head.partition(b"\r\n")[0]))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            head = await _read_head(reader)  # the second on this connection: closed unanswered
            seen.append((id(writer), head.partition(b"\r\n")[0]))
        writer.close()

    async with _raw_ollama(serve) as url:
        proxy = await start_proxy(url)
        mine = [b"GET /api/version?first", b"GET /api/version?again", b"POST /api/version?post"]

        def lines() -> list[bytes]:
            return [line.rpartition(b" ")[0] for _, line in seen if b"?" in line]

        replies = []
        for line in mine:
            request = line + b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
            request += b"Content-Length: 0\r\n\r\n" if line.startswith(b"POST") else b"\r\n"
            (reply,) = parse_replies(await raw_request(proxy.port, request))
            replies.append(reply.status)
            if line.endswith(b"again"):  # now pooled again: the next request meets it closing
                await settle(lambda: len(_plane(proxy).pool) == 1)
        assert replies == [200, 200, 502]
        # the second went out twice (the first time on the first connection), the POST once
        assert lines() == [mine[0], mine[1], mine[1], mine[2]]


async def test_shutdown_cuts_what_the_grace_did_not_see_end(fake: FakeOllama) -> None:
    """Past the grace, a stream still going is cut (no final chunk) and a connection whose
    request body is still arriving is closed: shutdown ends without the second signal."""
    fake.scenarios["long:latest"] = Scenario(tokens=["a"] * 400, token_delay=0.05)
    config = Config.build(upstream=fake.url, listen="127.0.0.1:0", shutdown_grace=0.3)
    app = create_app(config, new_registry())
    runner = make_runner(app, config)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    stream_r, stream_w = await asyncio.open_connection("127.0.0.1", port)
    stream_w.write(_post(b"/api/generate", b'{"model":"long","prompt":"hi"}'))
    await asyncio.wait_for(stream_r.readuntil(b"\n"), 2)
    body_r, body_w = await asyncio.open_connection("127.0.0.1", port)
    body_w.write(_post(b"/api/show", b'{"model":"llama3.2"}')[:-5])
    await settle(lambda: len(app[PLANE].clients) == 2)
    await asyncio.wait_for(shut_down(runner, asyncio.Event()), 3)
    assert not (await asyncio.wait_for(stream_r.read(), 1)).endswith(b"0\r\n\r\n")
    assert await asyncio.wait_for(body_r.read(), 1) == b""
    stream_w.close()
    body_w.close()
