"""Streams go out chunk by chunk; a client that leaves makes the proxy close Ollama's request."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from aiohttp import http_parser

from conftest import StartProxy
from fake_ollama import FakeOllama, Scenario
from helpers import RunningProxy, settle
from ollama_metrics.server import relay


@pytest.fixture
async def proxy(fake: FakeOllama, start_any: StartProxy) -> RunningProxy:
    """Each test here also runs through `serve --workers 2` (conftest.start_any)."""
    return await start_any(fake.url)

GENERATE = b'{"model":"slow","prompt":"Tell me a story"}'


async def _arrivals(http: aiohttp.ClientSession, url: str, body: bytes
                    ) -> list[tuple[float, bytes]]:
    """Each line of a streamed reply with the time.monotonic() it arrived at."""
    out: list[tuple[float, bytes]] = []
    async with http.post(url, data=body) as resp:
        assert resp.status == 200
        async for line in resp.content:
            out.append((time.monotonic(), line))
    return out


@pytest.mark.parametrize(("path", "body"), [
    ("/api/generate", GENERATE),
    ("/api/generate", b'{"model":"slow","prompt":"Tell me a story", "stream" : true}'),
    ("/api/chat", b'{"model":"slow","messages":[{"role":"user","content":"hi"}]}'),
    ("/v1/chat/completions",
     b'{"model":"slow","stream":true,"messages":[{"role":"user","content":"hi"}]}'),
])
async def test_first_token_arrives_before_last_is_produced(
    fake: FakeOllama, proxy: RunningProxy, http: aiohttp.ClientSession, path: str, body: bytes,
) -> None:
    fake.scenarios["slow:latest"] = Scenario(tokens=["a", "b", "c", "d", "e"], token_delay=0.2)
    lines = await _arrivals(http, proxy.url + path, body)
    [upstream] = [r for r in fake.requests if r.path_qs == path]
    # When the fake handed each chunk to its socket (tokens 0.2 s apart, then the end).
    written = upstream.written
    assert len(written) >= 6, written
    frames = [t for t, line in lines if line.strip()]
    # Behaviour, not a time bound: a buffering proxy delivers nothing before Ollama's
    # last chunk; a relaying one delivers the first token while the rest is produced,
    # and more than one frame before the end (the frames kept their pacing).
    assert frames[0] < written[-1], (frames, written)
    assert sum(t < written[-1] for t in frames) >= 2, (frames, written)


async def test_split_lines_relayed_intact_and_counted_once(
    fake: FakeOllama, proxy: RunningProxy, http: aiohttp.ClientSession,
) -> None:
    fake.scenarios["split:latest"] = Scenario(split_lines=True, eval_count=7,
                                              prompt_eval_count=11)
    body = b'{"model":"split","prompt":"hi"}'
    async with http.post(fake.url + "/api/generate", data=body) as resp:
        direct = await resp.read()
    async with http.post(proxy.url + "/api/generate", data=body) as resp:
        proxied = await resp.read()
    assert proxied.count(b"\n") == direct.count(b"\n") == 5
    await settle(lambda: proxy.sample("ollama_output_tokens_total", model="split:latest") > 0)
    assert proxy.sample("ollama_output_tokens_total", model="split:latest") == 7
    assert proxy.sample("ollama_input_tokens_total", model="split:latest") == 11


async def _wait_for_first_byte_then_leave(url: str, body: bytes, leave_after: float) -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(asyncio.TimeoutError):
            async with session.post(url, data=body,
                                    timeout=aiohttp.ClientTimeout(total=leave_after)):
                pass


@pytest.mark.parametrize("body", [
    b'{"model":"thinker","prompt":"hi"}',
    b'{"model":"thinker","prompt":"hi","stream":false}',
    b'{"model":"thinker","stream":true,"messages":[{"role":"user","content":"hi"}]}',
], ids=["streamed", "stream-false", "v1-streamed"])
async def test_disconnect_before_first_byte_closes_upstream(
    fake: FakeOllama, proxy: RunningProxy, body: bytes,
) -> None:
    fake.scenarios["thinker:latest"] = Scenario(first_delay=10.0)
    path = "/v1/chat/completions" if b"messages" in body else "/api/generate"
    left = time.monotonic()
    await _wait_for_first_byte_then_leave(proxy.url + path, body, 0.5)
    record = await fake.wait_disconnected(timeout=2.0)
    assert record.disconnected_at is not None
    assert record.disconnected_at - left < 1.5  # Ollama hears within a second of the client
    endpoint = path
    await settle(lambda: proxy.sample("ollama_client_disconnects_total", model="thinker:latest",
                                      endpoint=endpoint) == 1)
    assert proxy.sample("ollama_requests_total", model="thinker:latest", endpoint=endpoint,
                        status="cancelled", prompt_category="other") == 1
    assert proxy.sample("ollama_active_requests", model="thinker:latest") == 0


async def test_disconnect_mid_stream_closes_upstream(
    fake: FakeOllama, proxy: RunningProxy,
) -> None:
    fake.scenarios["long:latest"] = Scenario(tokens=["x"] * 100, token_delay=0.05)
    async with aiohttp.ClientSession() as session:
        resp = await session.post(proxy.url + "/api/generate",
                                  data=b'{"model":"long","prompt":"hi"}')
        await resp.content.readline()
        await resp.content.readline()
        left = time.monotonic()
        resp.close()  # drops the connection
    record = await fake.wait_disconnected(timeout=2.0)
    assert record.disconnected_at is not None
    assert record.disconnected_at - left < 1.0
    await settle(lambda: proxy.sample("ollama_client_disconnects_total", model="long:latest",
                                      endpoint="/api/generate") == 1)
    assert proxy.sample("ollama_active_requests", model="long:latest") == 0
    assert proxy.sample("ollama_errors_total", error_type="reset") == 0  # not Ollama's fault


@pytest.mark.slow(reason="waits out a slow first byte")
async def test_no_total_timeout_on_slow_first_byte(
    fake: FakeOllama, start_proxy: StartProxy, http: aiohttp.ClientSession,
) -> None:
    """A model load longer than every timeout the proxy has still completes (time-scaled)."""
    fake.scenarios["cold:latest"] = Scenario(first_delay=2.5, token_delay=0.3)
    proxy = await start_proxy(fake.url, connect_timeout=0.5)
    for body in (b'{"model":"cold","prompt":"hi"}',
                 b'{"model":"cold","prompt":"hi","stream":false}'):
        async with http.post(proxy.url + "/api/generate", data=body) as resp:
            assert resp.status == 200
            assert b'"done":true' in await resp.read()
    assert proxy.sample("ollama_requests_total", model="cold:latest", endpoint="/api/generate",
                        status="success", prompt_category="other") == 2


async def test_idle_timeout_when_configured_cuts_a_silent_upstream(
    fake: FakeOllama, start_proxy: StartProxy, http: aiohttp.ClientSession,
) -> None:
    fake.scenarios["stuck:latest"] = Scenario(first_delay=5.0)
    proxy = await start_proxy(fake.url, idle_timeout=0.3)
    async with http.post(proxy.url + "/api/generate",
                         data=b'{"model":"stuck","prompt":"hi"}') as resp:
        assert resp.status == 504
        assert "did not answer" in (await resp.json())["error"]
    assert proxy.sample("ollama_errors_total", error_type="timeout") == 1


async def test_clients_vanishing_at_any_moment_log_no_errors(
    fake: FakeOllama, proxy: RunningProxy, http: aiohttp.ClientSession,
) -> None:
    """Like wrk stopping with requests in flight: each client closes at a different instant."""
    fake.scenarios["quick:latest"] = Scenario(first_delay=0.01, token_delay=0.002)
    body = b'{"model":"quick","prompt":"hi"}'
    request = (b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\n"
               b"Content-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    async def vanish(after: float, half_close: bool) -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(request)
        await asyncio.sleep(after)
        if half_close:  # the server sees EOF while the reply is on its way
            writer.write_eof()
            await asyncio.sleep(0.05)
        writer.transport.abort()

    await asyncio.gather(*(vanish(n * 0.0005, n % 2 == 0) for n in range(80)))
    await settle(lambda: proxy.sample("ollama_active_requests", model="quick:latest") == 0, 5.0)
    async with http.get(proxy.url + "/api/version") as resp:
        assert resp.status == 200


def test_streamed_replies_can_take_the_fast_path_with_this_aiohttp() -> None:
    """relay.py relays a streamed reply from inside aiohttp's parser callback by switching the
    reply's StreamReader to a subclass. With an aiohttp where that switch is refused, every reply
    would still be relayed, only the slower way: fail here rather than let an upgrade make the
    proxy quietly slower. (What the fast path must do, the streaming, disconnect, timeout and
    slow-reader tests check through it.)"""
    if http_parser.HttpResponseParser is http_parser.HttpResponseParserPy:
        pytest.skip("aiohttp's C extensions are off: the fast path is for its C parser")
    assert relay.AVAILABLE
