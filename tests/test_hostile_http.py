"""Hostile HTTP over raw sockets against `ollama-metrics serve` as a process.

Every probe is answered -- 400 (aiohttp 3.14 answers bad framing and oversized header lines
with 400, never 431), 501 for a transfer coding Ollama would refuse, or passed through as
Ollama would read it -- and never becomes two requests upstream. After each one the process still
serves, and has logged no error or traceback. The fake Ollama runs as a process too, and lists
what reached it (`GET /_fake/requests`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import aiohttp
import pytest

from conftest import StartProxy
from fake_ollama import FakeOllama, Scenario
from helpers import Process, fake_process, proxy_process, raw_request
from wire import Reply, parse_replies, startup_done

pytestmark = pytest.mark.slow(reason="raw sockets against proxy processes, with header timeouts")

SMUGGLED = b"GET /api/ps HTTP/1.1\r\nHost: localhost\r\n\r\n"


@dataclass
class Stack:
    fake: Process
    proxy: Process
    bystander: socket.socket  # a listener that no request may ever reach


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    bystander = socket.socket()
    bystander.bind(("127.0.0.1", 0))
    bystander.listen(8)
    bystander.setblocking(False)
    with fake_process() as fake, proxy_process(fake.url, "--ps-interval", "0",
                                               "--model-refresh", "3600") as proxy:
        startup_done(fake.url)
        yield Stack(fake, proxy, bystander)
    bystander.close()


async def _probe(stack: Stack, data: bytes, *, timeout: float = 0.5
                 ) -> tuple[list[Reply], list[tuple[str, str, int]]]:
    """Send `data`; the replies, and what reached Ollama: (method, path, body length)."""
    async with aiohttp.ClientSession() as http:
        async with http.post(stack.fake.url + "/_fake/reset"):
            pass
        replies = parse_replies(await raw_request(stack.proxy.port, data, timeout=timeout))
        async with http.get(stack.fake.url + "/_fake/requests") as resp:
            seen = [(r["method"], r["path_qs"], r["body_len"]) for r in await resp.json()]
        async with http.get(stack.proxy.url + "/api/version") as resp:
            assert resp.status == 200  # the proxy survived
    with pytest.raises(BlockingIOError):
        stack.bystander.accept()  # and sent nothing anywhere but to Ollama
    _assert_quiet(stack)
    return replies, seen


def _assert_quiet(stack: Stack) -> None:
    assert "Traceback" not in stack.proxy.output and " ERROR " not in stack.proxy.output


def _post(headers: bytes, body: bytes, target: bytes = b"/api/show") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: localhost\r\n%s\r\n%s" % (target, headers, body)


CHUNKED = b"Transfer-Encoding: chunked\r\n"
REFUSED = {
    "CL and TE": _post(b"Content-Length: 4\r\n" + CHUNKED, b"0\r\n\r\n" + SMUGGLED),
    "TE chunked, identity": _post(b"Transfer-Encoding: chunked, identity\r\n", b"0\r\n\r\n"),
    "TE with space before colon": _post(b"Transfer-Encoding : chunked\r\n", b"0\r\n\r\n"),
    "TE xchunked": _post(b"Transfer-Encoding: xchunked\r\n", b"0\r\n\r\n" + SMUGGLED),
    "TE twice": _post(CHUNKED + b"Transfer-Encoding: identity\r\n", b"0\r\n\r\n"),
    "TE folded": _post(b"Transfer-Encoding:\r\n chunked\r\n", b"0\r\n\r\n"),
    "TE after vertical tab": _post(b"Transfer-Encoding:\x0bchunked\r\n", b"0\r\n\r\n"),
    "TE identity": _post(b"Transfer-Encoding: identity\r\n", SMUGGLED),
    "TE quoted": _post(b'Transfer-Encoding: "chunked"\r\n', b"0\r\n\r\n"),
    "TE with a parameter": _post(b"Transfer-Encoding: chunked;q=1\r\n", b"0\r\n\r\n"),
    "LF in chunk extension": _post(CHUNKED, b"2;a=\nx\r\n{}\r\n0\r\n\r\n"),
    "bare LF after chunk size": _post(CHUNKED, b"2\n{}\r\n0\r\n\r\n"),
    "chunk size not hex": _post(CHUNKED, b"zz\r\n{}\r\n0\r\n\r\n"),
    "chunk size negative": _post(CHUNKED, b"-1\r\n{}\r\n0\r\n\r\n"),
    "chunk size 0x": _post(CHUNKED, b"0x2\r\n{}\r\n0\r\n\r\n"),
    "chunk size overflows": _post(CHUNKED, b"f" * 20 + b"\r\n{}\r\n0\r\n\r\n"),
    "chunk size with space": _post(CHUNKED, b"2 \r\n{}\r\n0\r\n\r\n"),
    "chunk longer than its size": _post(CHUNKED, b"2\r\n{}XX\r\n0\r\n\r\n"),
    "two Content-Lengths": _post(b"Content-Length: 2\r\nContent-Length: 5\r\n", b"{}"),
    "Content-Length +2": _post(b"Content-Length: +2\r\n", b"{}"),
    "Content-Length list": _post(b"Content-Length: 2, 2\r\n", b"{}"),
    "Content-Length negative": _post(b"Content-Length: -1\r\n", b"{}"),
    "Content-Length overflows": _post(b"Content-Length: " + b"9" * 30 + b"\r\n", b"{}"),
    "Content-Length space before colon": _post(b"Content-Length : 2\r\n", b"{}"),
    "header line of 70 KB": b"GET /api/tags HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 70_000
                            + b"\r\n\r\n",
    "request line of 70 KB": b"GET /api/tags?" + b"a" * 70_000
                             + b" HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "200 headers": b"GET /api/tags HTTP/1.1\r\nHost: localhost\r\n"
                   + b"".join(b"X-H%d: v\r\n" % n for n in range(200)) + b"\r\n",
    "NUL in a header": b"GET /api/tags HTTP/1.1\r\nHost: localhost\r\nX-A: a\x00b\r\n\r\n",
    "CR in a header": b"GET /api/tags HTTP/1.1\r\nHost: localhost\r\nX-A: a\rb\r\n\r\n",
    "no Host": b"GET /api/tags HTTP/1.1\r\n\r\n",
    "two Hosts": b"GET /api/tags HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "target with userinfo": b"GET @127.0.0.1:1/api/tags HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "target without slash": b"GET 0/api/tags HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "HTTP/9.9": b"GET /api/tags HTTP/9.9\r\nHost: localhost\r\n\r\n",
    "TLS handshake": bytes.fromhex("16030100a5010000a10303") + bytes(range(32)) * 4,
}


@pytest.mark.parametrize("name", REFUSED)
async def test_bad_framing_is_refused(stack: Stack, name: str) -> None:
    replies, seen = await _probe(stack, REFUSED[name])
    assert [r.status for r in replies] == [400]
    assert seen == []


@pytest.mark.parametrize(("coding", "body"), [
    (b"", SMUGGLED),
    (b"gzip, chunked", b"%x\r\n%s\r\n0\r\n\r\n%s" % (len(SMUGGLED), SMUGGLED, SMUGGLED)),
], ids=["empty", "gzip-chunked"])
async def test_codings_ollama_refuses_are_refused(stack: Stack, coding: bytes, body: bytes
                                                  ) -> None:
    """aiohttp reads an empty coding as no body and `gzip, chunked` as plain chunks; Ollama
    (Go's net/http) answers both 501. So does the proxy, and closes: what follows the headers,
    here a request, is never read as a request of its own."""
    replies, seen = await _probe(stack, _post(b"Transfer-Encoding: %s\r\n" % coding, body))
    assert [(r.status, r.header("Connection")) for r in replies] == [(501, "close")]
    assert seen == []


PASSED = {
    # name: (request, statuses, what reaches Ollama)
    "TE after a tab": (_post(b"Transfer-Encoding:\tchunked\r\n", b"2\r\n{}\r\n0\r\n\r\n"),
                       [404], [("POST", "/api/show", 2)]),
    "TE in capitals": (_post(b"Transfer-Encoding: CHUNKED\r\n", b"2\r\n{}\r\n0\r\n\r\n"),
                       [404], [("POST", "/api/show", 2)]),
    "chunk extension": (_post(CHUNKED, b"2;name=value\r\n{}\r\n0\r\n\r\n"),
                        [404], [("POST", "/api/show", 2)]),
    "chunked trailer": (_post(CHUNKED, b"2\r\n{}\r\n0\r\nX-Trailer: 1\r\n\r\n"),
                        [404], [("POST", "/api/show", 2)]),
    "HTTP/1.0 with TE": (b"POST /api/show HTTP/1.0\r\nHost: localhost\r\n" + CHUNKED
                         + b"\r\n2\r\n{}\r\n0\r\n\r\n", [404], [("POST", "/api/show", 2)]),
    "header line of 10 KB": (b"GET /api/tags HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 10_000
                             + b"\r\n\r\n", [200], [("GET", "/api/tags", 0)]),
    "three pipelined": (b"GET /api/version HTTP/1.1\r\nHost: localhost\r\n\r\n"
                        b"GET /api/tags HTTP/1.1\r\nHost: localhost\r\n\r\n" + SMUGGLED,
                        [200, 200, 200],
                        [("GET", "/api/version", 0), ("GET", "/api/tags", 0),
                         ("GET", "/api/ps", 0)]),
    "a request inside a body": (_post(b"Content-Length: %d\r\n" % len(SMUGGLED), SMUGGLED,
                                      b"/api/generate"),
                                [400], [("POST", "/api/generate", len(SMUGGLED))]),
    "GET with a body": (b"GET /api/tags HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n%s"
                        % (len(SMUGGLED), SMUGGLED), [200], [("GET", "/api/tags", len(SMUGGLED))]),
    "absolute form": (b"GET http://127.0.0.1:1/api/tags?x=1 HTTP/1.1\r\nHost: localhost\r\n\r\n",
                      [200], [("GET", "/api/tags?x=1", 0)]),
    "Expect: 100-continue": (_post(b"Expect: 100-continue\r\nContent-Length: 2\r\n", b"{}"),
                             [100, 404], [("POST", "/api/show", 2)]),
    "h2c upgrade": (b"GET /api/tags HTTP/1.1\r\nHost: localhost\r\n"
                    b"Connection: Upgrade, HTTP2-Settings\r\n"
                    b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
                    [200], [("GET", "/api/tags", 0)]),
    "OPTIONS *": (b"OPTIONS * HTTP/1.1\r\nHost: localhost\r\n\r\n", [404], []),
    "CONNECT": (b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: 127.0.0.1:1\r\n\r\n", [404], []),
}


@pytest.mark.parametrize("name", PASSED)
async def test_valid_or_tolerable_framing_passes_through(stack: Stack, name: str) -> None:
    request, statuses, upstream = PASSED[name]
    replies, seen = await _probe(stack, request)
    assert [r.status for r in replies] == statuses
    assert seen == upstream
    assert all(r.complete for r in replies)


async def test_big_header_reaches_ollama_whole(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(stack.proxy.url + "/api/tags?big",
                            headers={"X-Big": "b" * 60_000}) as resp:
            assert resp.status == 200
        async with http.get(stack.fake.url + "/_fake/requests") as resp:
            (seen,) = [r for r in await resp.json() if r["path_qs"] == "/api/tags?big"]
    assert seen["headers"]["X-Big"] == "b" * 60_000


async def _dribble(port: int, parts: list[bytes], gap: float, wait: float = 2.0
                   ) -> tuple[bytes, float]:
    """Send `parts` `gap` seconds apart (stopping if the proxy closes), then read until it
    closes or `wait` passes; what came back, and when it closed, from the first byte sent."""
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    got, closed = bytearray(), float("inf")
    first = loop.time()

    async def read() -> None:
        nonlocal closed
        while chunk := await reader.read(65536):
            got.extend(chunk)
        closed = loop.time() - first

    reading = asyncio.create_task(read())
    try:
        for part in parts:
            if reading.done():
                break
            writer.write(part)
            await asyncio.sleep(gap)
        with contextlib.suppress(asyncio.TimeoutError, ConnectionResetError):
            await asyncio.wait_for(asyncio.shield(reading), wait)
    finally:
        reading.cancel()
        writer.close()
    return bytes(got), closed


BLOB = "/api/blobs/sha256:" + "0" * 64


def _bad_chunk_late(path: str) -> list[bytes]:
    """A chunked body whose framing breaks after good chunks have gone on to Ollama."""
    return [b"POST %s HTTP/1.1\r\nHost: localhost\r\n%s\r\n2\r\n{}\r\n" % (path.encode(), CHUNKED),
            b"zz\r\n", b"0\r\n\r\n"]


@pytest.mark.parametrize("path", ["/api/generate", BLOB], ids=["parsed", "streamed"])
async def test_bad_chunk_after_good_ones_is_answered_400(stack: Stack, path: str) -> None:
    """A chunk size gone bad after the body has begun: 400 and the connection closes, whether
    the proxy was reading the body itself (a prompt) or streaming it on to Ollama (a blob).
    Ollama gets no complete request, and the proxy carries on.

    aiohttp's C parser loses this error (it never reaches the body being read); without the
    guard in connection.py the client waits for an answer until it gives up."""
    async with aiohttp.ClientSession() as http:
        async with http.post(stack.fake.url + "/_fake/reset"):
            pass
        loop = asyncio.get_running_loop()
        sent = loop.time()
        reply, _ = await _dribble(stack.proxy.port, _bad_chunk_late(path), 0.1, 3.0)
        took = loop.time() - sent
        await asyncio.sleep(0.2)
        async with http.get(stack.fake.url + "/_fake/requests") as resp:
            seen = await resp.json()
        async with http.get(stack.proxy.url + "/api/version") as resp:
            assert resp.status == 200
    (answer,) = parse_replies(reply)
    assert answer.status == 400, reply
    assert (answer.header("Connection") or "").lower() == "close"
    assert took < 2.0  # answered at once, not when the client gave up
    assert len(seen) <= 1
    assert all(r["status"] in (None, 400) or r["disconnected"] for r in seen), seen
    _assert_quiet(stack)


async def test_bad_chunk_in_a_pipelined_request_fails_that_request_only(stack: Stack) -> None:
    """Two requests in one go, the second's body breaking once the first is answered: the first
    gets its reply, the second its 400, and the connection closes after it."""
    first = b"GET /api/version HTTP/1.1\r\nHost: localhost\r\n\r\n"
    second = _bad_chunk_late("/api/generate")
    reply, _ = await _dribble(stack.proxy.port, [first + second[0], *second[1:]], 0.1, 3.0)
    statuses = [r.status for r in parse_replies(reply, ["GET", "POST"])]
    assert statuses == [200, 400], reply
    _assert_quiet(stack)


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br"])
async def test_encoded_request_bodies_reach_ollama_as_sent(stack: Stack, encoding: str) -> None:
    """A body with a Content-Encoding goes on as it came, header and bytes, as everything else
    does: Ollama answers it as it would directly, and a bogus one is no fault of the proxy's."""
    sent = gzip.compress(b'{"model":"llama3.2"}') if encoding == "gzip" else b"not really"
    async with aiohttp.ClientSession() as http:
        async with http.post(stack.fake.url + "/_fake/reset"):
            pass
        request = _post(b"Content-Encoding: %s\r\nContent-Length: %d\r\n"
                        % (encoding.encode(), len(sent)), sent)
        (reply,) = parse_replies(await raw_request(stack.proxy.port, request, timeout=0.5))
        async with http.get(stack.fake.url + "/_fake/requests") as resp:
            (seen,) = await resp.json()
    assert reply.status == 400  # Ollama's JSON parser on the bytes as sent
    assert seen["headers"]["Content-Encoding"] == encoding
    assert seen["body_sha256"] == hashlib.sha256(sent).hexdigest()


# --- request heads that take too long ---------------------------------------------------------

HEAD_TIMEOUT = 0.5


async def test_a_request_head_past_the_header_timeout_closes_the_connection(
        fake: FakeOllama, start_proxy: StartProxy) -> None:
    """A head dribbled a header line every 0.1 s: closed once its first byte is 0.5 s old,
    without an answer, and nothing reaches Ollama."""
    proxy = await start_proxy(fake.url, header_timeout=HEAD_TIMEOUT)
    head = [b"GET /api/version HTTP/1.1\r\nHost: localhost\r\n"] + [b"X-Slow: %d\r\n" % n
                                                            for n in range(30)]
    reply, closed = await _dribble(proxy.port, head, 0.1)
    assert reply == b""
    assert HEAD_TIMEOUT <= closed < HEAD_TIMEOUT + 0.4
    assert not [r for r in fake.requests if "X-Slow" in r.headers]


@pytest.mark.uvloop
async def test_connections_that_send_nothing_are_closed_after_the_header_timeout(
        fake: FakeOllama, start_proxy: StartProxy) -> None:
    """As nginx's client_header_timeout: a new connection's first head is timed from accept, so
    200 connections that never send a byte are closed, unanswered, once they are 0.5 s old
    (aiohttp alone keeps them an hour), while a connection opened with them and silent for 0.3 s
    before its request is served."""
    proxy = await start_proxy(fake.url, header_timeout=HEAD_TIMEOUT)
    late = b"GET /api/version HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    silent = [_dribble(proxy.port, [], 0, wait=3.0) for _ in range(200)]
    results = await asyncio.gather(_dribble(proxy.port, [b"", late], 0.3), *silent)
    (served, _), closings = results[0], results[1:]
    assert [r.status for r in parse_replies(served)] == [200]
    assert all(reply == b"" for reply, _ in closings)
    closed = sorted(when for _, when in closings)
    assert closed[-1] < 3.0, closed  # every one closed by the proxy, none left open
    assert closed[0] >= HEAD_TIMEOUT * 0.9, closed  # and none before its time


async def test_the_header_timeout_spares_timely_heads_idle_connections_slow_bodies_and_long_replies(
        fake: FakeOllama, start_proxy: StartProxy) -> None:
    """Only a head that has begun and not ended is timed: a head sent over 0.3 s, a keep-alive
    connection idle for 1 s between requests, a body sent over 1.2 s and a reply streamed for
    1.2 s all go through with a 0.5 s header timeout."""
    fake.scenarios["long:latest"] = Scenario(tokens=["a "] * 12, token_delay=0.1)
    proxy = await start_proxy(fake.url, header_timeout=HEAD_TIMEOUT)
    version = b"GET /api/version HTTP/1.1\r\nHost: localhost\r\n\r\n"
    last = b"GET /api/version HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    body = b'{"model":"long","prompt":"count","stream":true}'
    post = (b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    timely = [last[:10], last[10:30], last[30:]]
    idle = [version, b"", b"", b"", b"", b"", last]  # 1.2 s between the two
    slow_body = [post] + [body[n:n + 4] for n in range(0, len(body), 4)]
    streamed, _ = await _dribble(proxy.port, [post + body], 0, wait=2.0)
    for parts, gap, expect in [(timely, 0.1, 1), (idle, 0.2, 2), (slow_body, 0.1, 1)]:
        reply, _ = await _dribble(proxy.port, parts, gap, wait=2.0)
        replies = parse_replies(reply, ["POST" if parts[0].startswith(b"POST") else "GET"] * 2)
        assert [r.status for r in replies] == [200] * expect, reply
        assert all(r.complete for r in replies)
    (long,) = parse_replies(streamed, ["POST"])
    assert long.status == 200 and long.complete and long.body.count(b"\n") == 13


async def test_the_header_timeout_never_cuts_a_reply_in_flight(
        fake: FakeOllama, start_proxy: StartProxy) -> None:
    """Bytes of a next head arriving while a 1.2 s reply streams (a stray CRLF after the body,
    or a pipelined head that stops halfway) do not cut the reply; the unfinished head closes
    the connection once the reply is done, at once since it is overdue by then."""
    fake.scenarios["long:latest"] = Scenario(tokens=["a "] * 12, token_delay=0.1)
    proxy = await start_proxy(fake.url, header_timeout=HEAD_TIMEOUT)
    body = b'{"model":"long","prompt":"count","stream":true}'
    post = b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n" % len(body)
    stray = [post + b"Connection: close\r\n\r\n" + body, b"\r\n"]
    halfway = [post + b"\r\n" + body, b"GET /api/vers"]
    for parts in (stray, halfway):
        reply, closed = await _dribble(proxy.port, parts, 0.1, wait=3.0)
        (long,) = parse_replies(reply, ["POST"])
        assert long.status == 200 and long.complete and long.body.count(b"\n") == 13, reply
        assert closed < 2.0
