"""Failure modes 6-8 and 20: an upstream that dies mid-stream, refuses or blackholes
connections, answers errors, or is busy under load.

Part of the 25 failure modes of shared/reference/failure-modes.md, each a test against the
real proxy, `test_fmNN_…`, its docstring quoting the expected behaviour (fm_helpers.py says
how they are run and time-scaled).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from analytics_helpers import records
from conftest import StartProxy
from fake_ollama import FakeOllama, Scenario
from fm_helpers import _analytics, _post
from helpers import (
    RunningProxy,
    raw_request,
)
from wire import parse_replies, upstream

# --- 6. Upstream dies mid-stream ----------------------------------------------------------------

async def test_fm06_upstream_dies_mid_stream(fake: FakeOllama, start_proxy: StartProxy,
                                             http: aiohttp.ClientSession, tmp_path: Path) -> None:
    """Upstream dies mid-stream (limit_data / reset_peer after 3 lines) ⇒ client gets the 3 lines
    then an aborted connection (no clean final chunk, so truncation is detectable); row
    `upstream_error`; no hang."""
    fake.scenarios["dies:latest"] = Scenario(tokens=["a"] * 10, token_delay=0.01, drop_after=3)
    proxy = await start_proxy(fake.url, analytics=_analytics(tmp_path))
    started = time.perf_counter()
    raw = await raw_request(proxy.port, _post("/api/generate", b'{"model":"dies","prompt":"x"}'),
                            timeout=3.0)
    assert time.perf_counter() - started < 2.0  # closed by the proxy, not by our timeout
    (reply,) = parse_replies(raw)
    assert (reply.status, reply.chunked, reply.complete) == (200, True, False)
    assert reply.body.count(b"\n") == 3
    (row,) = await records(proxy, http, 1)
    assert row["outcome"] == "upstream_error" and "closed the reply early" in row["error"]
    assert row["response_bytes"] == len(reply.body)


# --- 7. Upstream refused or blackholed ----------------------------------------------------------

@contextmanager
def _blackhole() -> Iterator[int]:
    """A loopback port whose connections hang: it listens with a backlog of 0, and one
    connection nobody accepts fills that, so the kernel drops every later SYN."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    port = hole.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port))
    probe = socket.socket()
    probe.settimeout(0.3)
    try:
        with pytest.raises(TimeoutError):  # the hole really swallows connects
            probe.connect(("127.0.0.1", port))
        yield port
    finally:
        for s in (probe, filler, hole):
            s.close()


async def test_fm07_upstream_refused_or_blackholed(start_proxy: StartProxy,
                                                   http: aiohttp.ClientSession) -> None:
    """Upstream refused / blackholed ⇒ 502 fast; 504 after connect timeout; both counted."""
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    body = b'{"model":"m","prompt":"x"}'
    try:
        with _blackhole() as hole:
            to_refused = await start_proxy(f"http://127.0.0.1:{refused.getsockname()[1]}",
                                           connect_timeout=0.5)
            to_hole = await start_proxy(f"http://127.0.0.1:{hole}", connect_timeout=0.5)
            # Refused answers before the connect timeout could have run out; a black hole
            # answers when it does.
            for proxy, status, limits in ((to_refused, 502, (0.0, 0.45)),
                                          (to_hole, 504, (0.45, 1.5))):
                started = time.perf_counter()
                async with http.post(proxy.url + "/api/generate", data=body) as resp:
                    assert resp.status == status
                    assert "Ollama at http://127.0.0.1:" in (await resp.json())["error"]
                took = time.perf_counter() - started
                assert limits[0] <= took < limits[1], (status, took)
    finally:
        refused.close()
    for proxy, error_type in ((to_refused, "connect"), (to_hole, "timeout")):
        assert proxy.sample("ollama_errors_total", error_type=error_type) == 1
        assert proxy.sample("ollama_requests_total", model="m:latest", endpoint="/api/generate",
                            status="error", prompt_category="other") == 1


# --- 8. Upstream errors relayed verbatim --------------------------------------------------------

def _erring_upstream(hits: list[str]) -> web.Application:
    """Answers POST /api/generate?status=N[&json] with that status, a JSON or empty body, and
    a header of its own; counts every attempt."""

    async def generate(request: web.Request) -> web.Response:
        await request.read()
        hits.append(request.query_string)
        status = int(request.query["status"])
        headers = {"X-Upstream": "yes"}
        if "json" in request.query:
            return web.Response(status=status, headers=headers, content_type="application/json",
                                body=b'{"error":"status %d from Ollama"}' % status)
        return web.Response(status=status, headers=headers)

    app = web.Application()
    app.router.add_post("/api/generate", generate)
    return app


@pytest.mark.parametrize("status", [400, 403, 404, 500, 503])
async def test_fm08_upstream_errors_relayed_verbatim(
    start_proxy: StartProxy, http: aiohttp.ClientSession, status: int,
) -> None:
    """Upstream 400/403/404/500/503 (empty and JSON bodies) ⇒ relayed verbatim (status, headers,
    body), no retry, `status` label correct."""
    hits: list[str] = []
    async with upstream(_erring_upstream(hits)) as ollama:
        proxy = await start_proxy(ollama.url)
        for query in (f"status={status}", f"status={status}&json"):
            answers = []
            for base in (ollama.url, proxy.url):
                async with http.post(f"{base}/api/generate?{query}",
                                     data=b'{"model":"llama3.2","prompt":"x"}') as resp:
                    headers = sorted((k, v) for k, v in resp.headers.items() if k != "Date")
                    answers.append((resp.status, resp.reason, headers, await resp.read()))
            assert answers[0] == answers[1]
            assert answers[1][0] == status
    assert hits == [f"status={status}"] * 2 + [f"status={status}&json"] * 2  # one try each
    assert proxy.sample("ollama_requests_total", model="llama3.2:latest", endpoint="/api/generate",
                        status="error", prompt_category="other") == 2
    kind = "http_5xx" if status >= 500 else "http_4xx"
    assert proxy.sample("ollama_errors_total", error_type=kind) == 2


# --- 20. Upstream busy --------------------------------------------------------------------------

async def test_fm20_upstream_503_under_load(fake: FakeOllama, proxy: RunningProxy,
                                            http: aiohttp.ClientSession) -> None:
    """Upstream 503 under load / proxy semaphore full ⇒ fast 503 (or queue with bound), no
    deadlock of in-flight streams.

    The proxy has no semaphore of its own: it limits nothing and queues nothing (Ollama queues,
    up to OLLAMA_MAX_QUEUE, and answers 503 beyond it), so the half about a full semaphore does
    not apply. Ollama's 503s must come back at once while its streams carry on."""
    fake.scenarios["busy:latest"] = Scenario(
        error_before=(503, "server busy, please try again.  maximum pending requests exceeded"))
    fake.scenarios["slow:latest"] = Scenario(tokens=[f"{k} " for k in range(20)], token_delay=0.15)

    async def stream() -> tuple[bytes, float]:
        async with http.post(proxy.url + "/api/generate",
                             data=b'{"model":"slow","prompt":"x"}') as resp:
            return await resp.read(), time.perf_counter()

    async def busy() -> float:
        async with http.post(proxy.url + "/api/generate",
                             data=b'{"model":"busy","prompt":"x"}') as resp:
            assert resp.status == 503
            assert "server busy" in (await resp.json())["error"]
        return time.perf_counter()

    streams = [asyncio.create_task(stream()) for _ in range(20)]
    await asyncio.sleep(0.1)
    refused = await asyncio.gather(*(busy() for _ in range(200)))
    ended = await asyncio.wait_for(asyncio.gather(*streams), 15)
    assert all(b.count(b"\n") == 21 and b'"done":true' in b for b, _ in ended)
    # Refused at once, never queued behind the streams: every 503 is back while they still
    # run (3 s of tokens). How fast is a bench figure, not this test's.
    assert max(refused) < min(when for _, when in ended)
    assert proxy.sample("ollama_requests_total", model="busy:latest", endpoint="/api/generate",
                        status="error", prompt_category="other") == 200
