"""The data plane (server/fast.py) answers as the aiohttp path does, and hands it the rest.

Each request goes raw to two proxies on one fake Ollama: one with the data plane, one without
(every connection aiohttp's, as before the plane). The replies must be the same bytes (less the
Date and the fake's clock) and Ollama must receive the same request, while the plane's counters
show which of the two paths served it.
"""

from __future__ import annotations

import asyncio
import re
import socket
import zlib
from collections.abc import Awaitable, Callable

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from conftest import StartProxy
from fake_ollama import FakeOllama, Scenario
from helpers import RunningProxy, raw_request, settle
from ollama_metrics.config import Config
from ollama_metrics.observe.metrics import new_registry
from ollama_metrics.server.app import create_app
from ollama_metrics.server.fast import PLANE, Plane
from wire import Reply, mask_clock, parse_replies

Start = Callable[..., Awaitable[RunningProxy]]


@pytest.fixture
def start(start_proxy: StartProxy) -> Start:
    """A proxy with the data plane, or (plane=False) with every connection aiohttp's."""

    async def start(upstream: str, plane: bool = True, **settings: object) -> RunningProxy:
        return await start_proxy(upstream, data_plane=plane, **settings)

    return start


def _plane(proxy: RunningProxy) -> Plane:
    return proxy.app[PLANE]


def _comparable(reply: Reply) -> tuple[int, str, list[tuple[str, str]], bytes]:
    headers = [(k, "<len>" if k.lower() == "content-length" else v)
               for k, v in reply.headers if k.lower() != "date"]
    body = reply.body
    if reply.header("Content-Encoding") == "gzip":  # the fake's clock is inside
        body = zlib.decompress(body, wbits=31)
    return reply.status, reply.reason, headers, mask_clock(body)


async def _both(fake: FakeOllama, start: Start, request: bytes,
                methods: list[str] | None = None) -> tuple[list[Reply], list[Reply], Plane]:
    with_plane = await start(fake.url)
    without = await start(fake.url, plane=False)
    line_end = request.index(b"\n") + 1  # marked, to tell it from the proxies' own polls
    eol = request[line_end - 2:line_end] if request[line_end - 2:line_end] == b"\r\n" else b"\n"
    request = request[:line_end] + b"X-Test: 1" + eol + request[line_end:]
    fast, slow = await _compare(fake, with_plane, without, request, methods)
    assert all(r.complete for r in fast), fast
    return fast, slow, _plane(with_plane)


async def _compare(fake: FakeOllama, with_plane: RunningProxy, without: RunningProxy,
                   request: bytes, methods: list[str] | None = None
                   ) -> tuple[list[Reply], list[Reply]]:
    """`request` (with an X-Test field) sent to both proxies: the same replies, and the same
    requests at Ollama."""

    def seen() -> list[tuple[str, str, dict[str, str], str]]:
        return [(r.method, r.path_qs, r.headers, r.body_sha256) for r in fake.requests
                if "X-Test" in r.headers]

    fake.requests.clear()
    fast = parse_replies(await raw_request(with_plane.port, request, timeout=2.0), methods)
    seen_fast = seen()
    fake.requests.clear()
    slow = parse_replies(await raw_request(without.port, request, timeout=2.0), methods)
    seen_slow = seen()
    assert seen_fast == seen_slow  # Ollama cannot tell the two paths apart
    assert [_comparable(r) for r in fast] == [_comparable(r) for r in slow]
    return fast, slow


SERVED = {
    "generate": b'POST /api/generate HTTP/1.1\r\nHost: localhost:11434\r\nContent-Type: '
                b'application/json\r\nContent-Length: 50\r\nConnection: close\r\n\r\n'
                b'{"model":"llama3.2","prompt":"hi","stream":false} ',
    "generate streamed": b'POST /api/generate HTTP/1.1\r\nHost: localhost\r\nUser-Agent: t/1\r\n'
                         b'Content-Length: 34\r\nConnection: close\r\n\r\n'
                         b'{"model":"llama3.2","prompt":"hi"}',
    "openai streamed": b'POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n'
                       b'Authorization: Bearer k\r\nContent-Length: 78\r\nConnection: close\r\n\r\n'
                       b'{"model":"llama3.2","stream":true,"messages":[{"role":"user","content":'
                       b'"hi"}]}',
    "tags": b"GET /api/tags HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n"
            b"Connection: close\r\n\r\n",
    "empty query": b"GET /api/tags? HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    "odd query": b"GET /api/tags?a=%20b%zz&&c=[1]{2}|^`'<>??x;y HTTP/1.1\r\nHost: localhost\r\n"
                 b"Connection: close\r\n\r\n",
    "unknown path": b"GET /nope HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    "wrong method": b"GET /api/generate HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    "post without body": b"POST /api/pull HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    "delete with body": b'DELETE /api/delete HTTP/1.1\r\nHost: localhost\r\nContent-Length: 16\r\n'
                        b'Connection: close\r\n\r\n{"model":"none"}',
    "hop-by-hop named": b"GET /api/version HTTP/1.1\r\nHost: localhost\r\nX-Hop: 1\r\n"
                        b"X-End: 2\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n"
                        b"Connection: close, X-Hop\r\n\r\n",
}


@pytest.mark.parametrize("name", SERVED)
async def test_plane_answers_as_aiohttp_does(fake: FakeOllama, start: Start, name: str) -> None:
    fast, _, plane = await _both(fake, start, SERVED[name])
    assert (plane.served, plane.handed) == (1, 0)
    assert len(fast) == 1


async def test_gzip_and_mid_stream_error_relayed_alike(fake: FakeOllama, start: Start) -> None:
    fake.scenarios["gz:latest"] = Scenario(gzip=True)
    fake.scenarios["broken:latest"] = Scenario(error_after=2)
    for model in (b"gz", b"broken"):
        body = b'{"model":"%s","prompt":"hi"}' % model
        request = (b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n"
                   b"Connection: close\r\n\r\n%s" % (len(body), body))
        _, _, plane = await _both(fake, start, request)
        assert plane.served == 1


HANDED = {
    "chunked upload": b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: "
                      b"chunked\r\nConnection: close\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    "http/1.0": b"GET /api/tags HTTP/1.0\r\nHost: localhost\r\n\r\n",
    "percent in path": b"GET /api/%74ags HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    "dot segment": b"GET /x/../api/tags HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    "foreign host": b"GET /api/tags HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    "no host": b"GET /api/tags HTTP/1.1\r\nConnection: close\r\n\r\n",
    "two hosts": b"GET /api/tags HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\n"
                 b"Connection: close\r\n\r\n",
    "own route": b"GET /test HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    "expect": b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\n"
              b"Content-Length: 2\r\nConnection: close\r\n\r\n{}",
    "two lengths": b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n"
                   b"Content-Length: 2\r\nConnection: close\r\n\r\n{}",
    "obs-fold": b"GET /api/tags HTTP/1.1\r\nHost: localhost\r\nX-A: 1\r\n 2\r\n"
                b"Connection: close\r\n\r\n",
    "absolute form": b"GET http://localhost/api/tags HTTP/1.1\r\nHost: localhost\r\n"
                     b"Connection: close\r\n\r\n",
    "head": b"HEAD /api/tags HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    "bare LF": b"GET /api/tags HTTP/1.1\nHost: localhost\nConnection: close\n\n",
    "lower-case method": b"get /api/tags HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    # What aiohttp answers 400 must not reach Ollama through the plane.
    "unknown method": b"FOO /api/tags HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    "user-agent twice": b"GET /api/tags HTTP/1.1\r\nHost: localhost\r\nUser-Agent: a\r\n"
                        b"User-Agent: b\r\nConnection: close\r\n\r\n",
    "content-type twice": b'POST /api/show HTTP/1.1\r\nHost: localhost\r\nContent-Type: a\r\n'
                          b'Content-Type: b\r\nContent-Length: 20\r\nConnection: close\r\n\r\n'
                          b'{"model":"llama3.2"}',
    # aiohttp's path reads these bytes as surrogates and sends Ollama something else.
    "non-ascii value": b"GET /api/tags HTTP/1.1\r\nHost: localhost\r\nX-A: \xff\xfe\r\n"
                       b"Connection: close\r\n\r\n",
}


@pytest.mark.parametrize("name", HANDED)
async def test_what_the_plane_does_not_serve_goes_to_aiohttp(fake: FakeOllama, start: Start,
                                                            name: str) -> None:
    methods = ["HEAD"] if name == "head" else None
    fast, _, plane = await _both(fake, start, HANDED[name], methods)
    assert (plane.served, plane.handed) == (0, 1)
    if name == "foreign host":
        assert (fast[0].status, fast[0].body) == (403, b"")


async def test_large_body_goes_to_aiohttp_and_streams(fake: FakeOllama, start: Start) -> None:
    body = b'{"model":"llama3.2","prompt":"' + b"x" * 70_000 + b'","stream":false}'
    request = (b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n"
               b"Connection: close\r\n\r\n%s" % (len(body), body))
    fast, _, plane = await _both(fake, start, request)
    assert fast[0].status == 200 and (plane.served, plane.handed) == (0, 1)


async def test_one_connection_moves_to_aiohttp_midway(fake: FakeOllama, start: Start) -> None:
    """Served, served, then one the plane does not serve: that one and every later request on
    the connection are aiohttp's, all answered in order."""
    proxy = await start(fake.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    heads = [b"GET /api/version HTTP/1.1\r\nHost: localhost\r\n\r\n",
             b"GET /api/tags HTTP/1.1\r\nHost: localhost\r\n\r\n",
             b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n",
             b"GET /api/version HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"]
    data = b""
    for head in heads:
        writer.write(head)
        before = len(parse_replies(data))
        while len(replies := parse_replies(data)) == before or not replies[-1].complete:
            chunk = await asyncio.wait_for(reader.read(65536), 5)
            assert chunk, data
            data += chunk
    writer.close()
    replies = parse_replies(data)
    assert [r.status for r in replies] == [200, 200, 200, 200]
    assert b'"version"' in replies[0].body and b'"models"' in replies[1].body
    assert b"ollama_requests_total" in replies[2].body
    assert replies[3].header("Connection") == "close"
    assert (_plane(proxy).served, _plane(proxy).handed) == (2, 1)


async def test_pipelined_requests_answered_in_order(fake: FakeOllama, start: Start) -> None:
    proxy = await start(fake.url)
    request = (b"GET /api/version HTTP/1.1\r\nHost: localhost\r\n\r\n"
               b"GET /api/tags HTTP/1.1\r\nHost: localhost\r\n\r\n"
               b'POST /api/show HTTP/1.1\r\nHost: localhost\r\nContent-Length: 20\r\n'
               b'Connection: close\r\n\r\n{"model":"llama3.2"}')
    replies = parse_replies(await raw_request(proxy.port, request))
    assert [r.status for r in replies] == [200, 200, 200] and all(r.complete for r in replies)
    assert b'"version"' in replies[0].body and b'"models"' in replies[1].body
    assert b'"modelfile"' in replies[2].body or b'"details"' in replies[2].body
    assert _plane(proxy).served == 3


async def test_upstream_connections_pooled(fake: FakeOllama, start: Start) -> None:
    proxy = await start(fake.url)
    for _ in range(5):
        await raw_request(proxy.port, b"GET /api/version HTTP/1.1\r\nHost: localhost\r\n"
                                      b"Connection: close\r\n\r\n")
    assert len(_plane(proxy).pool) == 1  # one connection, reused for all five


async def test_unreachable_ollama_answered_alike(start: Start) -> None:
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))
    try:
        upstream = f"http://127.0.0.1:{refused.getsockname()[1]}"
        request = (b'POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2'
                   b'\r\nConnection: close\r\n\r\n{}')
        with_plane, without = await start(upstream), await start(upstream, plane=False)
        fast = parse_replies(await raw_request(with_plane.port, request))
        slow = parse_replies(await raw_request(without.port, request))
        assert [_comparable(r) for r in fast] == [_comparable(r) for r in slow]
        assert fast[0].status == 502 and b"cannot reach Ollama" in fast[0].body
        assert _plane(with_plane).served == 1
        await settle(lambda: with_plane.sample("ollama_errors_total", error_type="connect") == 1)
    finally:
        refused.close()


def test_plane_off_where_it_cannot_serve() -> None:
    for given_ in ({"upstream": "https://ollama.example"},
                   {"upstream": "http://127.0.0.1:11435", "idle_timeout": 30}):
        config = Config.build(listen="127.0.0.1:0", **given_)
        assert PLANE not in create_app(config, new_registry())


@pytest.mark.slow(reason="8 MB read slowly")
async def test_a_connection_pooled_after_a_slow_reader_still_reads(fake: FakeOllama,
                                                                  start: Start) -> None:
    """A reply that ends while its client lags leaves Ollama's connection paused for reading;
    back in the pool it must read again, or the next request on it would wait for ever."""
    fake.scenarios["big:latest"] = Scenario(tokens=["x" * 4_000_000, "y" * 4_000_000])
    proxy = await start(fake.url)
    body = b'{"model":"big","prompt":"hi","stream":false}'
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the kernel holds little
    sock.connect(("127.0.0.1", proxy.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n"
                 b"Connection: close\r\n\r\n%s" % (len(body), body))
    await asyncio.sleep(0.3)  # the proxy's buffer to this client fills: Ollama is paused
    got = b""
    while chunk := await reader.read(65536):  # slowly: each read Ollama resumes for pauses it
        got += chunk
        await asyncio.sleep(0.001)
    writer.close()
    assert parse_replies(got)[0].complete and len(_plane(proxy).pool) == 1
    reply = await asyncio.wait_for(raw_request(
        proxy.port, b"GET /api/version HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"),
        5)
    assert parse_replies(reply)[0].status == 200


# Heads built from the pieces where parsers disagree: odd methods, versions, targets, field names,
# separators, values and lengths. Whatever the plane does with one (serve or hand off), the
# client and Ollama must see what they see through aiohttp alone.
_LINE_ENDS = st.sampled_from([b"\r\n"] * 20 + [b"\n", b"\r", b"\r\r\n"])
_ODD = st.binary(max_size=3).map(lambda b: b.translate(None, b"\r\n")) | st.sampled_from(
    [b"\x00", b"\x7f", b"\xff", b"\t", b" ", b"%", b"#", b"..", b"\\", b"\"", b"\x0b"])
_RARELY_ODD = st.one_of(*[st.just(b"")] * 6, _ODD)
_NAMES = st.sampled_from([b"X-A", b"Accept", b"X-B"] * 4 + [
    b"Host", b"host", b"User-Agent", b"Content-Type", b"Content-Length", b"Connection",
    b"Transfer-Encoding", b"Expect", b"Authorization", b"X A", b"X\x00", b"", b"X-\xff", b"TE"])
_VALUES = st.sampled_from([b"x", b"a b", b"*/*"] * 4 + [
    b"localhost", b"", b"0", b"2", b"02", b"+2", b"-2", b"2 ", b" 2", b"2,2", b"0x2", b"close",
    b"keep-alive", b"gzip", b"evil.example", b"100-continue"])
_FIELDS = st.lists(st.tuples(_NAMES, st.sampled_from([b": "] * 8 + [b":", b" :", b":\t", b"::"]),
                             _VALUES, _RARELY_ODD, _LINE_ENDS), max_size=4)


@st.composite
def _heads(draw: st.DrawFn) -> bytes:
    method: bytes = draw(st.sampled_from([b"GET"] * 4 + [b"POST"] * 4 + [
        b"DELETE", b"PUT", b"FOO", b"get", b"PROPFIND", b"HEAD", b"G\x00T"]))
    target = draw(st.sampled_from([b"/api/tags", b"/api/version", b"/api/show", b"/v1/models"] * 3
                                  + [b"api/tags", b"*"])) + draw(_RARELY_ODD)
    version = draw(st.sampled_from([b"HTTP/1.1"] * 16 + [b"HTTP/1.0", b"http/1.1", b"HTTP/1.10",
                                                        b"HTTP/2", b"HTTP/1.1 "]))
    space = draw(st.sampled_from([b" "] * 16 + [b"  ", b"\t"]))
    head: bytes = method + space + target + b" " + version + draw(_LINE_ENDS) + b"X-Test: 1\r\n"
    body = b""
    for name, colon, value, odd, end in draw(_FIELDS):
        head += name + colon + value + odd + end
        if name.lower() == b"content-length" and (value + odd).strip(b" \t") in (b"2", b"02"):
            body = b"{}"  # what the head declares, if it declares anything: no example waits
    if draw(st.sampled_from([True] * 4 + [False])):
        head += b"Host: localhost\r\n"
    # Connection: close, so the answer comes at once. Never bytes the head does not declare: a
    # read holding a request and junk after it is a 400 for both through aiohttp (its parser
    # drops the request it read before the junk), where the plane answers the request first.
    return head + b"Connection: close\r\n\r\n" + body


@pytest.fixture
async def pair(fake: FakeOllama, start: Start) -> tuple[RunningProxy, RunningProxy]:
    return await start(fake.url), await start(fake.url, plane=False)


@pytest.mark.slow(reason="300 Hypothesis examples, each sent to two proxies")
# Hypothesis imports a deprecated module while reporting a failure: not an internal error.
@pytest.mark.filterwarnings("ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning")
@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(_heads())
@example(b"POST /api/show HTTP/1.1\r\nX-Test: 1\r\nHost: localhost\r\nContent-Length: 02\r\n"
         b"Connection: close\r\n\r\n{}")
@example(b"FOO /api/tags HTTP/1.1\r\nX-Test: 1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
@example(b"GET /api/tags HTTP/1.1\r\nX-Test: 1\r\nHost: localhost\r\nUser-Agent: a\r\n"
         b"User-Agent: a\r\nConnection: close\r\n\r\n")
async def test_any_head_answered_as_aiohttp_answers_it(
        fake: FakeOllama, pair: tuple[RunningProxy, RunningProxy], head: bytes) -> None:
    # Known, aiohttp's own (both paths, not the plane's): an Expect value with bytes past ASCII
    # fails aiohttp's expect handler while it builds its 417 (a 500 and a logged traceback).
    assume(re.search(rb"(?i)(^|\n)expect[^\n]*[\x80-\xff]", head) is None)
    await _compare(fake, *pair, head, ["HEAD"] if head.startswith(b"HEAD") else None)
