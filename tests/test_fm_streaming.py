"""Failure modes 1-3 and 14: streams relayed frame by frame, lines split across reads, long
generations and idle timeouts, pull/create progress outlasting timeouts.

Part of the 25 failure modes of shared/reference/failure-modes.md, each a test against the
real proxy, `test_fmNN_…`, its docstring quoting the expected behaviour (fm_helpers.py says
how they are run and time-scaled).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import orjson
import pytest

from analytics_helpers import records
from conftest import StartProxy
from fake_ollama import FakeOllama, Scenario
from fm_helpers import JSON_UTF8, NDJSON, SSE, _analytics, _go_epoch
from helpers import (
    RunningProxy,
)
from wire import mask_clock

# --- 1. Default streaming ---------------------------------------------------------------------

async def _timed_lines(http: aiohttp.ClientSession, url: str, body: bytes
                       ) -> tuple[int, str, list[tuple[float, float, bytes]]]:
    """Status, Content-Type and every line with its arrival: (wall clock, s since sent, line)."""
    sent = time.perf_counter()
    async with http.post(url, data=body) as resp:
        lines = [(time.time(), time.perf_counter() - sent, line) async for line in resp.content]
        return resp.status, resp.headers["Content-Type"], lines


FM01_CASES = [
    ("/api/generate", b'{"model":"paced","prompt":"Tell me a story"}', NDJSON),
    ("/api/generate", b'{"model":"paced","prompt":"Tell me a story", "stream" : true}', NDJSON),
    ("/api/generate", b'{"model":"paced","prompt":"Tell me a story","stream":false}', JSON_UTF8),
    ("/v1/chat/completions",
     b'{"model":"paced","stream":true,"messages":[{"role":"user","content":"hi"}]}', SSE),
]


@pytest.mark.parametrize(("path", "body", "content_type"), FM01_CASES,
                         ids=["no-stream-field", "stream-true-spaced", "stream-false", "v1-sse"])
@pytest.mark.slow(reason="paced 200 ms frames, direct and proxied")
async def test_fm01_default_streaming_frame_by_frame(
    fake: FakeOllama, proxy: RunningProxy, http: aiohttp.ClientSession, path: str, body: bytes,
    content_type: str,
) -> None:
    """`/api/generate` with no `stream` field; mock emits 5 lines 200 ms apart ⇒ client gets line
    1 within 50 ms of emission (not at the end); `Content-Type: application/x-ndjson` and status
    preserved. Repeat with `"stream": true` (spaces), `stream:false`, and `/v1/chat/completions`
    SSE (`text/event-stream`, `[DONE]`) ⇒ same per-frame latency, bytes identical."""
    fake.scenarios["paced:latest"] = Scenario(tokens=["a", "b", "c", "d"], token_delay=0.2)
    d_status, d_type, direct = await _timed_lines(http, fake.url + path, body)
    p_status, p_type, proxied = await _timed_lines(http, proxy.url + path, body)
    assert (p_status, p_type) == (d_status, d_type) == (200, content_type)
    assert mask_clock(b"".join(x[2] for x in proxied)) == mask_clock(b"".join(x[2] for x in direct))
    if content_type == JSON_UTF8:
        return  # one JSON object: nothing to stream, only the bytes to keep
    frames = [x for x in proxied if x[2].strip()]
    direct_frames = [x for x in direct if x[2].strip()]
    assert len(frames) == len(direct_frames) == (5 if content_type == NDJSON else 6)
    if content_type == SSE:
        assert frames[-1][2] == b"data: [DONE]\n"
    else:  # each NDJSON line carries the instant the fake made it (created_at, in ns)
        lags = [wall - _go_epoch(orjson.loads(line)["created_at"]) for wall, _, line in frames]
        assert max(lags) < 0.05, lags
    # Each frame reaches the client when it would without the proxy, within 50 ms...
    offsets = [(p[1], d[1]) for p, d in zip(frames, direct_frames, strict=True)]
    assert all(abs(p - d) < 0.05 for p, d in offsets), offsets
    assert frames[0][1] < 0.05 and frames[-1][1] > 0.75  # ...so the first is not held back


# --- 2. Split lines -----------------------------------------------------------------------------

SPLIT = Scenario(split_lines=True, eval_count=7, prompt_eval_count=11, load_duration=250_000_000,
                 prompt_eval_duration=125_000_000, eval_duration=500_000_000,
                 total_duration=900_000_000)


@pytest.mark.parametrize(("path", "body"), [
    ("/api/generate", b'{"model":"split","prompt":"hi"}'),
    ("/v1/chat/completions", b'{"model":"split","stream":true,"stream_options":'
                             b'{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}'),
], ids=["ndjson", "sse"])
async def test_fm02_split_lines(fake: FakeOllama, start_proxy: StartProxy,
                                http: aiohttp.ClientSession, tmp_path: Path, path: str,
                                body: bytes) -> None:
    """Mock writes half a JSON line, waits 100 ms, writes the rest ⇒ client bytes identical;
    `eval_count`/`prompt_eval_count`/durations recorded exactly once from the `done:true` line.
    (The fake pauses 50 ms between halves; /v1 streams carry the counts in their usage chunk.)"""
    fake.scenarios["split:latest"] = SPLIT
    proxy = await start_proxy(fake.url, analytics=_analytics(tmp_path))
    async with http.post(fake.url + path, data=body) as resp:
        direct = await resp.read()
    async with http.post(proxy.url + path, data=body) as resp:
        proxied = await resp.read()
    assert mask_clock(proxied) == mask_clock(direct)
    (row,) = await records(proxy, http, 1)
    assert (row["outcome"], row["prompt_tokens"], row["completion_tokens"]) == ("success", 11, 7)
    assert row["response"] == "Hello, world!"
    assert proxy.sample("ollama_output_tokens_total", model="split:latest") == 7
    assert proxy.sample("ollama_input_tokens_total", model="split:latest") == 11
    if path == "/api/generate":
        assert (row["load_duration"], row["prompt_eval_duration"], row["eval_duration"],
                row["total_duration"]) == (0.25, 0.125, 0.5, 0.9)
        assert row["tokens_per_second"] == pytest.approx(14.0)
        assert proxy.sample("ollama_model_load_duration_seconds_sum", model="split:latest") == 0.25


# --- 3. Long generation -------------------------------------------------------------------------

@pytest.mark.slow(reason="8 s of time-scaled streaming")
async def test_fm03_long_generation_and_idle_timeout(
    fake: FakeOllama, start_proxy: StartProxy, http: aiohttp.ClientSession, tmp_path: Path,
) -> None:
    """Stream with 1 s gaps for longer than 300 s (or time-scaled: idle timeout 2 s, 30 s stream
    with 0.5 s gaps) ⇒ completes; a silent upstream beyond the idle timeout ⇒ 504 and row
    `status=upstream_timeout`. Non-stream request with a long pre-first-byte wait (model load) ⇒
    succeeds.

    Time-scaled further: 8 s of tokens 0.5 s apart (four idle timeouts). The stored outcome of a
    timeout is `upstream_error` with a message saying Ollama was silent (the record has no
    separate timeout status; `ollama_errors_total{error_type="timeout"}` counts them). The idle
    timeout is off by default, and only a proxy without one lets a silent model load last."""
    fake.scenarios["long:latest"] = Scenario(tokens=[f"t{n} " for n in range(16)], token_delay=0.5)
    fake.scenarios["silent:latest"] = Scenario(first_delay=3.0)
    fake.scenarios["stalls:latest"] = Scenario(tokens=["a", "b"], token_delay=3.0)
    fake.scenarios["loading:latest"] = Scenario(first_delay=3.0)
    idle = await start_proxy(fake.url, analytics=_analytics(tmp_path), idle_timeout=2.0,
                             connect_timeout=0.5)
    default = await start_proxy(fake.url, connect_timeout=0.5)

    def generate(model: str, stream: bool = True) -> bytes:
        return orjson.dumps({"model": model, "prompt": "hi", "stream": stream})

    async def long_stream() -> float:
        started = time.perf_counter()
        async with http.post(idle.url + "/api/generate", data=generate("long")) as resp:
            assert resp.status == 200
            lines = [line async for line in resp.content]
        assert len(lines) == 17 and orjson.loads(lines[-1])["done"] is True
        return time.perf_counter() - started

    async def silent() -> float:
        started = time.perf_counter()
        async with http.post(idle.url + "/api/generate", data=generate("silent")) as resp:
            assert resp.status == 504
            assert "did not answer in time" in (await resp.json())["error"]
        return time.perf_counter() - started

    async def stalls() -> None:
        async with http.post(idle.url + "/api/generate", data=generate("stalls")) as resp:
            assert resp.status == 200
            assert b'"response":"a"' in await resp.content.readline()
            with pytest.raises(aiohttp.ClientPayloadError):  # cut, and visibly so
                await resp.read()

    async def model_load() -> None:
        async with http.post(default.url + "/api/generate",
                             data=generate("loading", stream=False)) as resp:
            assert resp.status == 200
            assert (await resp.json())["done"] is True

    took, waited, _, _ = await asyncio.gather(long_stream(), silent(), stalls(), model_load())
    assert took > 7.5  # four times the idle timeout, and it completed
    assert 1.9 < waited < 2.9
    rows = {r["model"]: r for r in await records(idle, http, 3)}
    assert rows["long:latest"]["outcome"] == "success"
    assert rows["long:latest"]["response"] == "".join(f"t{n} " for n in range(16))
    assert rows["silent:latest"]["outcome"] == rows["stalls:latest"]["outcome"] == "upstream_error"
    assert rows["silent:latest"]["http_status"] == 504
    assert "Ollama sent nothing for 2.0s mid-reply" in rows["stalls:latest"]["error"]
    assert idle.sample("ollama_errors_total", error_type="timeout") == 2


# --- 14. Progress streams ---------------------------------------------------------------------

@pytest.mark.slow(reason="5 s of time-scaled progress")
async def test_fm14_pull_and_create_progress_outlast_timeouts(
    fake: FakeOllama, start_proxy: StartProxy, http: aiohttp.ClientSession,
) -> None:
    """`/api/pull`, `/api/create` progress streams longer than the default 300 s cap
    (time-scaled) ⇒ pass.

    The proxy has no total timeout; time-scaled, the streams last several times the idle
    timeout (1 s) and connect timeout (0.5 s) configured here, with gaps under the idle one."""
    fake.scenarios["big:latest"] = Scenario(tokens=["x"] * 5, token_delay=0.3)  # 17 lines
    fake.scenarios["made:latest"] = Scenario(token_delay=0.8)  # 4 lines
    proxy = await start_proxy(fake.url, idle_timeout=1.0, connect_timeout=0.5)

    async def progress(path: str, body: bytes, n: int) -> float:
        started = time.perf_counter()
        async with http.post(proxy.url + path, data=body) as resp:
            assert (resp.status, resp.headers["Content-Type"]) == (200, NDJSON)
            lines = [orjson.loads(line) async for line in resp.content]
        assert len(lines) == n and lines[-1] == {"status": "success"}
        return time.perf_counter() - started

    pulled, created = await asyncio.gather(
        progress("/api/pull", b'{"model":"big"}', 17),
        progress("/api/create", b'{"model":"made","from":"llama3.2"}', 4))
    assert pulled > 4.5 and created > 2.3
    for endpoint in ("/api/pull", "/api/create"):
        model = "big:latest" if endpoint == "/api/pull" else "made:latest"
        assert proxy.sample("ollama_requests_total", model=model, endpoint=endpoint,
                            status="success", prompt_category="other") == 1
