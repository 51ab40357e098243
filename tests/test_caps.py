"""Caps on what a client controls: a 20 MB model name, the 404 that echoes it, the live list,
and request bodies too large to parse on the event loop or too many to parse at once."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import io
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from analytics_helpers import records
from conftest import StartProxy
from fake_ollama import FakeOllama, Scenario
from helpers import fake_process, proxy_process, settle
from ollama_metrics.analytics.settings import AnalyticsConfig
from ollama_metrics.observe.interaction import CAPS
from ollama_metrics.ollama.request import read_request

HUGE = 20 * 1024 * 1024


def huge_model_body(n: int = 0) -> bytes:
    return b'{"model":"' + bytes([97 + n % 26]) * HUGE + b'","prompt":"hi","stream":false}'


async def test_huge_model_name_is_capped_everywhere(
        fake: FakeOllama, start_proxy: StartProxy, http: aiohttp.ClientSession,
        tmp_path: Path) -> None:
    proxy = await start_proxy(fake.url, analytics=AnalyticsConfig.build(
        analytics_dir=str(tmp_path)))
    body = huge_model_body()
    async with http.post(proxy.url + "/api/generate", data=io.BytesIO(body)) as resp:
        assert resp.status == 404
        reply = await resp.read()
    # Forwarded unchanged, and Ollama's 404 echoing the name relayed unchanged.
    assert fake.requests[-1].body_sha256 == hashlib.sha256(body).hexdigest()
    assert len(reply) > HUGE
    # Metrics: counted under the bounded label, never the name.
    await settle(lambda: proxy.sample("ollama_requests_total", model="other",
                                      endpoint="/api/generate", status="error",
                                      prompt_category="other") == 1)
    # The live list keeps the name cut to its cap.
    async with http.get(proxy.url + "/analytics/live") as resp:
        (entry,) = (await resp.json())["recent"]
    assert entry["model"] == "a" * CAPS["model"]
    # The record: name and error text cut to their caps.
    (r,) = await records(proxy, http, 1)
    assert r["model"] == "a" * CAPS["model"]
    assert r["error"].startswith("model 'aaa") and len(r["error"]) <= CAPS["error"]


@pytest.mark.slow(reason="forty 20 MB model names")
async def test_live_snapshot_stays_small_after_huge_names(
        fake: FakeOllama, start_proxy: StartProxy, http: aiohttp.ClientSession) -> None:
    proxy = await start_proxy(fake.url)
    for n in range(5):
        async with http.post(proxy.url + "/api/generate",
                             data=io.BytesIO(huge_model_body(n))) as resp:
            assert resp.status == 404
            await resp.read()
    async with http.get(proxy.url + "/analytics/live", params={"recent": "500"}) as resp:
        assert resp.status == 200
        snapshot = await resp.read()
    assert len(snapshot) < 16 * 1024, len(snapshot)


async def test_recent_zero_lists_none(proxy: Any, http: aiohttp.ClientSession) -> None:
    async with http.post(proxy.url + "/api/generate",
                         json={"model": "llama3.2", "prompt": "hi", "stream": False}) as resp:
        await resp.read()
    async with http.get(proxy.url + "/analytics/live", params={"recent": "0"}) as resp:
        assert (await resp.json())["recent"] == []


@pytest.fixture
def parse_threads() -> Iterator[list[str]]:
    """Names of the threads read_request ran on, seen through the profiler hook."""
    seen: list[str] = []
    code = read_request.__code__

    def hook(frame: types.FrameType, event: str, arg: object) -> None:
        if event == "call" and frame.f_code is code:
            seen.append(threading.current_thread().name)

    threading.setprofile(hook)
    sys.setprofile(hook)
    try:
        yield seen
    finally:
        sys.setprofile(None)
        threading.setprofile(None)


async def test_large_bodies_are_parsed_off_the_loop(
        proxy: Any, http: aiohttp.ClientSession, parse_threads: list[str]) -> None:
    small = {"model": "llama3.2", "prompt": "hi", "stream": False}
    large = {**small, "prompt": "word " * 200_000}
    for body in (small, large):
        async with http.post(proxy.url + "/api/generate", json=body) as resp:
            assert resp.status == 200
            await resp.read()
    loop_thread = threading.current_thread().name
    assert parse_threads[0] == loop_thread
    assert parse_threads[1] != loop_thread
    await settle(lambda: proxy.sample("ollama_requests_total", model="llama3.2:latest",
                                      endpoint="/api/generate", status="success",
                                      prompt_category="other") == 2)


@pytest.mark.slow(reason="three 30 MB bodies")
async def test_bodies_over_the_parse_budget_go_on_unread(
        fake: FakeOllama, start_proxy: StartProxy, http: aiohttp.ClientSession,
        tmp_path: Path) -> None:
    # max_parse_bytes 1 MB: the budget is 2 MB, so two 0.9 MB bodies in flight fill it.
    fake.scenarios["slow:latest"] = Scenario(first_delay=1.0)
    proxy = await start_proxy(fake.url, analytics=AnalyticsConfig.build(
        analytics_dir=str(tmp_path)), max_parse_bytes=1_000_000)
    bodies = [b'{"model":"slow","stream":false,"prompt":"' + bytes([97 + n]) * 900_000 + b'"}'
              for n in range(3)]

    async def post(body: bytes, after: float) -> int:
        await asyncio.sleep(after)
        async with http.post(proxy.url + "/api/generate", data=io.BytesIO(body)) as resp:
            await resp.read()
            return resp.status

    statuses = await asyncio.gather(*(post(b, 0.2 * n) for n, b in enumerate(bodies)))
    assert statuses == [200, 200, 200]
    sent = {hashlib.sha256(b).hexdigest() for b in bodies}
    # All three reached Ollama whole.
    assert {r.body_sha256 for r in fake.requests if r.method == "POST"} == sent
    found = await records(proxy, http, 3)
    assert sorted(r["model"] or "" for r in found) == ["", "slow:latest", "slow:latest"]
    # Once those exchanges ended, their budget is free again.
    async with http.post(proxy.url + "/api/generate", data=io.BytesIO(bodies[0])) as resp:
        assert resp.status == 200
    assert sorted(r["model"] or "" for r in await records(proxy, http, 4)) == [
        "", "slow:latest", "slow:latest", "slow:latest"]


@pytest.mark.slow
async def test_forty_huge_model_names_leave_memory_and_database_near_rest(
        tmp_path: Path) -> None:
    with fake_process() as fake, proxy_process(fake.url, "--analytics-dir",
                                               str(tmp_path)) as proxy:
        process = psutil.Process(proxy.proc.pid)
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            async def generate(body: bytes) -> None:
                async with http.post(proxy.url + "/api/generate", data=io.BytesIO(body)) as resp:
                    await resp.read()

            await generate(b'{"model":"warm-up","prompt":"hi","stream":false}')
            await asyncio.sleep(1.0)
            db = tmp_path / "interactions.db"
            baseline = process.memory_info().rss
            db_before = sum(f.stat().st_size for f in tmp_path.glob("interactions.db*"))
            body = huge_model_body()
            for _ in range(40):
                await generate(body)
            del body
            gc.collect()
            async with http.get(proxy.url + "/analytics/live",
                                params={"recent": "500"}) as resp:
                snapshot = await resp.read()
            found = 0
            for _ in range(100):  # the writer batches in the background
                async with http.get(proxy.url + "/analytics/search",
                                    params={"limit": "100"}) as resp:
                    found = len((await resp.json())["results"])
                if found == 41:
                    break
                await asyncio.sleep(0.1)
            assert found == 41
            await asyncio.sleep(1.0)
        rise = (process.memory_info().rss - baseline) / 2**20
        growth = (sum(f.stat().st_size for f in tmp_path.glob("interactions.db*"))
                  - db_before) / 2**20
        print(f"RSS rise {rise:.1f} MiB, database growth {growth:.2f} MiB, "
              f"live snapshot {len(snapshot)} bytes")
        assert db.exists()
        assert len(snapshot) < 64 * 1024
        assert rise < 100, f"RSS {rise:.1f} MiB above its resting size"
        assert growth < 5, f"database grew {growth:.1f} MiB"
