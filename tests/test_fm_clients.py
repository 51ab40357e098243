"""Failure modes 4, 5, 21 and 23: clients that leave mid-stream or before the first byte, slow
clients (dribbling headers, slow readers) and a graceful shutdown with streams in flight.

Part of the 25 failure modes of shared/reference/failure-modes.md, each a test against the
real proxy, `test_fmNN_…`, its docstring quoting the expected behaviour (fm_helpers.py says
how they are run and time-scaled).
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web

from analytics_helpers import records
from conftest import StartProxy
from fake_ollama import FakeOllama, Scenario
from fm_helpers import NDJSON, _analytics, _fake_requests, _percentile, _post
from helpers import (
    RunningProxy,
    fake_process,
    proxy_process,
    settle,
)
from wire import MIB, Watch, open_fds, upstream

pytestmark = pytest.mark.slow(reason="proxy processes, 500 dribbling sockets, 200 MB relayed")

# --- 4, 5. Client disconnects -------------------------------------------------------------------

async def test_fm04_client_disconnect_mid_stream(
    fake: FakeOllama, start_proxy: StartProxy, http: aiohttp.ClientSession, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Client reads 2 lines and closes ⇒ mock sees its connection closed within 1 s; analytics
    row `client_disconnected` with partial counts; in-flight gauge back to 0; no traceback spam.

    The stored outcome is `cancelled`; its partial counts are the reply bytes and text that
    reached the client, and its output tokens are counted from the chunks that passed (Ollama's
    final line with its counts never came), marked as the proxy's estimate."""
    caplog.set_level("DEBUG")
    tokens = [f"t{n} " for n in range(100)]
    fake.scenarios["long:latest"] = Scenario(tokens=tokens, token_delay=0.05)
    proxy = await start_proxy(fake.url, analytics=_analytics(tmp_path))
    async with aiohttp.ClientSession() as session:
        resp = await session.post(proxy.url + "/api/generate",
                                  data=b'{"model":"long","prompt":"hi"}')
        got = await resp.content.readline() + await resp.content.readline()
        left = time.monotonic()
        resp.close()  # drops the connection
    record = await fake.wait_disconnected(timeout=2.0)
    assert record.disconnected_at is not None and record.disconnected_at - left < 1.0
    (row,) = await records(proxy, http, 1)
    assert row["outcome"] == "cancelled"
    assert row["response_bytes"] >= len(got) > 0
    assert row["response"].startswith("t0 t1 ") and row["response"] != "".join(tokens)
    assert row["tokens_estimated"] is True
    assert row["completion_tokens"] == len(row["response"].split()) >= 2
    assert proxy.sample("ollama_active_requests", model="long:latest") == 0
    assert proxy.sample("ollama_client_disconnects_total", model="long:latest",
                        endpoint="/api/generate") == 1
    noisy = [r for r in caplog.records if r.exc_info or r.levelname in ("WARNING", "ERROR")]
    assert not noisy, [r.getMessage() for r in noisy]


async def test_fm05_client_disconnect_before_first_byte(
    fake: FakeOllama, proxy: RunningProxy,
) -> None:
    """Client disconnect before first byte (non-stream, mock "thinking" 10 s): client closes at
    0.5 s ⇒ upstream closed within 1 s."""
    fake.scenarios["thinker:latest"] = Scenario(first_delay=10.0)
    async with aiohttp.ClientSession() as session:
        with pytest.raises(asyncio.TimeoutError):
            await session.post(proxy.url + "/api/generate",
                               data=b'{"model":"thinker","prompt":"hi","stream":false}',
                               timeout=aiohttp.ClientTimeout(total=0.5))
        left = time.monotonic()
    record = await fake.wait_disconnected(timeout=2.0)
    assert record.disconnected_at is not None and record.disconnected_at - left < 1.0
    await settle(lambda: proxy.sample("ollama_requests_total", model="thinker:latest",
                                      endpoint="/api/generate", status="cancelled",
                                      prompt_category="other") == 1)
    assert proxy.sample("ollama_active_requests", model="thinker:latest") == 0


# --- 21. Slow clients ---------------------------------------------------------------------------


async def test_fm21_slow_clients_dribbling_headers(http: aiohttp.ClientSession) -> None:
    """500 sockets dribbling header bytes every 5 s ⇒ legit requests still served with bounded
    p99; FD count bounded.

    Time-scaled: a byte every 0.5 s for 3.5 s, header timeout 2 s (60 s by default). Each
    dribbling socket holds one descriptor until the header timeout closes it, while it still
    dribbles; none of them reaches Ollama."""
    with fake_process() as fake, proxy_process(fake.url, "--analytics-backend", "none",
                                               "--ps-interval", "0",
                                               "--header-timeout", "2") as proxy:
        pid = proxy.proc.pid
        before = open_fds(pid)
        writers = []
        for _ in range(500):
            _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
            writers.append(writer)
        loop = asyncio.get_running_loop()
        began = loop.time()

        async def dribble() -> None:
            for _ in range(7):
                await asyncio.sleep(0.5)
                for writer in writers:
                    if not writer.transport.is_closing():
                        writer.write(b"a")

        dribbling = asyncio.create_task(dribble())
        latencies, during = [], 0
        while not dribbling.done():
            sent = time.perf_counter()
            async with http.post(proxy.url + "/api/generate",
                                 data=b'{"model":"llama3.2","prompt":"hi"}') as resp:
                assert resp.status == 200 and b'"done":true' in await resp.read()
            latencies.append(time.perf_counter() - sent)
            if loop.time() - began < 1.5:
                during = max(during, open_fds(pid))
            await asyncio.sleep(0.02)
        after = open_fds(pid)  # 3.5 s in: closed by the header timeout, though still sending
        for writer in writers:
            writer.close()
        generates = [r for r in await _fake_requests(http, fake.url)
                     if r["path_qs"] == "/api/generate"]
    print(f"{len(latencies)} requests while 500 sockets dribbled: p99 "
          f"{_percentile(latencies, 99) * 1e3:.1f} ms; descriptors {before} -> {during} -> "
          f"{after} after the header timeout")
    assert len(latencies) > 20 and _percentile(latencies, 99) < 0.25
    assert before + 500 <= during <= before + 510
    assert after <= before + 10  # the keep-alive connections of the real requests
    assert len(generates) == len(latencies)  # only the real requests reached Ollama


def _firehose(sent: list[int], total: int) -> web.Application:
    """An Ollama that streams `total` bytes of NDJSON as fast as it is let to."""
    line = b'{"response":"' + b"x" * (65536 - 16) + b'"}\n'

    async def generate(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": NDJSON})
        await resp.prepare(request)
        while sent[0] < total:
            await resp.write(line)  # waits while the proxy does not read
            sent[0] += len(line)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/api/generate", generate)
    return app


async def test_fm21_slow_reader_is_not_buffered_for() -> None:
    """(and a slow *reader* client doesn't make the proxy buffer the whole upstream response —
    write backpressure honored).

    Ollama streams 200 MB as fast as it can; the client reads 1 MB, stops for 3 s, then reads
    the rest. While it stops, Ollama must be held up too, and the proxy's memory stay flat."""
    sent, total = [0], 200 * MIB
    async with upstream(_firehose(sent, total)) as ollama:
        with proxy_process(ollama.url, "--analytics-backend", "none", "--ps-interval", "0") as p:
            watch = Watch(p.proc.pid).start()
            reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
            writer.write(_post("/api/generate", b'{"model":"x","prompt":"y"}',
                               b"Connection: close\r\n"))
            got = len(await reader.readexactly(MIB))
            await asyncio.sleep(1.0)
            held = sent[0]
            await asyncio.sleep(2.0)
            assert sent[0] == held  # Ollama is held up while the client does not read
            assert held - got < 64 * MIB  # by socket buffers, not by the proxy's memory
            tail = b""
            while chunk := await reader.read(1 << 20):
                got += len(chunk)
                tail = (tail + chunk)[-16:]
            writer.close()
            rise = watch.stop()
    print(f"Ollama was {held / MIB:.1f} MiB ahead of a reader at 1 MiB; proxy RSS rise "
          f"{rise:.1f} MiB over {total / MIB:.0f} MiB relayed")
    assert tail.endswith(b"0\r\n\r\n")  # the whole reply, cleanly ended
    assert got > total  # every byte, plus the chunk framing
    assert rise < 50


# --- 23. Graceful shutdown ----------------------------------------------------------------------

async def test_fm23_graceful_shutdown_with_streams_in_flight(tmp_path: Path) -> None:
    """SIGTERM with 10 streams in flight ⇒ they finish within the grace period or are closed;
    completed requests' rows flushed.

    Grace 1.5 s: five streams end within it and complete; five would need 5 s and are cut at
    the grace, visibly (no final chunk). All ten are stored, the cut ones as cancelled."""
    scenarios = orjson.dumps({"short:latest": {"tokens": ["a"] * 10, "token_delay": 0.1},
                              "long:latest": {"tokens": ["b"] * 50, "token_delay": 0.1}})
    with fake_process("--scenarios", scenarios.decode()) as fake, proxy_process(
            fake.url, "--analytics-dir", str(tmp_path), "--shutdown-grace", "1.5") as proxy:

        async def stream(model: str) -> tuple[str, int]:
            lines = 0
            try:
                async with aiohttp.ClientSession() as session, session.post(
                        proxy.url + "/api/generate",
                        data=orjson.dumps({"model": model, "prompt": "hi"})) as resp:
                    async for _ in resp.content:
                        lines += 1
                return "complete", lines
            except aiohttp.ClientPayloadError:
                return "cut", lines

        streams = [asyncio.create_task(stream(m)) for m in ["short"] * 5 + ["long"] * 5]
        await asyncio.sleep(0.4)  # all ten are mid-stream
        signalled = time.perf_counter()
        proxy.proc.send_signal(signal.SIGTERM)
        results = await asyncio.gather(*streams)
        code = await asyncio.to_thread(proxy.proc.wait, 10)
        took = time.perf_counter() - signalled
    assert code == 0 and took < 1.5 + 1.0, took
    assert results[:5] == [("complete", 11)] * 5
    assert all(outcome == "cut" and 0 < lines < 51 for outcome, lines in results[5:])
    db = sqlite3.connect(tmp_path / "interactions.db")
    rows = db.execute("SELECT model, outcome, response_bytes, error FROM interactions").fetchall()
    db.close()
    assert sorted((m, o) for m, o, _, _ in rows) == [("long:latest", "cancelled")] * 5 + [
        ("short:latest", "success")] * 5
    assert all(n > 0 and "shutdown" in e for m, _, n, e in rows if m == "long:latest")
