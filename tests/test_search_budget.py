"""The search budget (issue 13): capped search text, a deadline on every query, a client that
goes away stops its query, and costly searches never take the readers other queries need.

A costly search here is 32 prefix terms whose 4-letter stem (longer than the prefix index's 2
characters) stands for thousands of distinct words in every record: FTS5 merges their lists for each
term, seconds of work on a store of 10,000 records."""

from __future__ import annotations

import asyncio
import logging
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from analytics_helpers import _seed, record
from conftest import StartProxy
from fake_ollama import FakeOllama
from helpers import RunningProxy
from ollama_metrics.analytics.query import MAX_SEARCH_CHARS, MAX_SEARCH_TERMS
from ollama_metrics.analytics.settings import AnalyticsConfig
from ollama_metrics.analytics.stores import MAX_SEARCHES, MAX_WAITING_SEARCHES

HEAVY = " OR ".join(["word*"] * MAX_SEARCH_TERMS)
QUERY_ROUTES = ("/analytics/search", "/analytics/models", "/analytics/stats",
                "/analytics/timeseries", "/analytics/export")


@pytest.fixture(scope="module")
def heavy_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(1)
    vocabulary = [f"word{rng.randrange(10**6):06d}" for _ in range(3000)]
    records = [record(n, prompt=" ".join(rng.choices(vocabulary, k=12)),
                      response=" ".join(rng.choices(vocabulary, k=20)))
               for n in range(1, 10_001)]
    directory = tmp_path_factory.mktemp("heavy")
    asyncio.run(_seed(directory, records))
    return directory / "interactions.db"


async def _proxy(fake: FakeOllama, start_proxy: StartProxy, tmp_path: Path, heavy_store: Path,
                 timeout: float) -> RunningProxy:
    shutil.copy(heavy_store, tmp_path / "interactions.db")
    settings = AnalyticsConfig.build(analytics_dir=str(tmp_path), analytics_retention_days=0,
                                     analytics_search_timeout=timeout)
    return await start_proxy(fake.url, analytics=settings)


async def _get(http: aiohttp.ClientSession, proxy: RunningProxy, path: str, **params: str
               ) -> tuple[int, Any, aiohttp.ClientResponse]:
    async with http.get(proxy.url + path, params=params) as resp:
        body = await resp.json() if resp.content_type == "application/json" else None
        return resp.status, body, resp


async def test_caps_on_search_text_answer_400_on_every_query_route(
        fake: FakeOllama, start_proxy: StartProxy, tmp_path: Path,
        http: aiohttp.ClientSession) -> None:
    await _seed(tmp_path, [record(1, prompt="kangaroo facts")])
    proxy = await start_proxy(fake.url, analytics=AnalyticsConfig.build(
        analytics_dir=str(tmp_path), analytics_retention_days=0))
    too_many = " OR ".join(["kangaroo"] * (MAX_SEARCH_TERMS + 1))
    too_long = "kangaroo" + "s" * MAX_SEARCH_CHARS
    bad = {too_many: "terms", too_long: "characters"}
    for path in QUERY_ROUTES:
        for text, reason in bad.items():
            status, body, _ = await _get(http, proxy, path, prompt_search=text)
            assert status == 400, (path, text)
            assert reason in body["error"], body
    allowed = " OR ".join(["ka*"] * MAX_SEARCH_TERMS)
    status, body, _ = await _get(http, proxy, "/analytics/search", prompt_search=allowed)
    assert status == 200 and body["count"] == 1, body


async def test_a_search_past_the_deadline_is_503_and_others_answer(
        fake: FakeOllama, start_proxy: StartProxy, tmp_path: Path, heavy_store: Path,
        http: aiohttp.ClientSession) -> None:
    proxy = await _proxy(fake, start_proxy, tmp_path, heavy_store, timeout=0.2)
    for path in ("/analytics/search", "/analytics/stats", "/analytics/models"):
        status, body, _ = await _get(http, proxy, path, prompt_search=HEAVY)
        assert status == 503, (path, body)
        assert "ANALYTICS_SEARCH_TIMEOUT" in body["error"], body
    status, body, _ = await _get(http, proxy, "/analytics/search", limit="5")
    assert status == 200 and body["count"] == 5
    # A 2-letter prefix is read from the prefix index: cheap however common.
    status, body, _ = await _get(http, proxy, "/analytics/search", limit="5",
                                 prompt_search=" OR ".join(["wo*"] * MAX_SEARCH_TERMS))
    assert status == 200 and body["count"] == 5


async def test_costly_searches_leave_readers_for_other_queries(
        fake: FakeOllama, start_proxy: StartProxy, tmp_path: Path, heavy_store: Path,
        http: aiohttp.ClientSession) -> None:
    proxy = await _proxy(fake, start_proxy, tmp_path, heavy_store, timeout=60)
    heavy = [asyncio.create_task(_get(http, proxy, "/analytics/search", prompt_search=HEAVY))
             for _ in range(4)]
    await asyncio.sleep(0.3)  # all four are on their threads or waiting for one
    for path, params in [("/analytics/search", {"limit": "5"}),
                         ("/analytics/messages/rec00007", {}),
                         ("/analytics/stats", {}), ("/analytics/timeseries", {})]:
        status, _, _ = await _get(http, proxy, path, **params)
        assert status == 200, path
    assert not any(task.done() for task in heavy)  # answered while the searches still ran
    for task in heavy:
        task.cancel()
    await asyncio.gather(*heavy, return_exceptions=True)


@pytest.mark.slow(reason="a heavy search per reader slot")
async def test_too_many_searches_at_once_are_told_busy(
        fake: FakeOllama, start_proxy: StartProxy, tmp_path: Path, heavy_store: Path,
        http: aiohttp.ClientSession) -> None:
    proxy = await _proxy(fake, start_proxy, tmp_path, heavy_store, timeout=2)
    admitted = MAX_SEARCHES + MAX_WAITING_SEARCHES
    heavy = [asyncio.create_task(_get(http, proxy, "/analytics/search", prompt_search=HEAVY))
             for _ in range(admitted)]
    await asyncio.sleep(0.3)
    status, body, resp = await _get(http, proxy, "/analytics/search", prompt_search="word*")
    assert status == 503, body
    assert "running" in body["error"] and resp.headers["Retry-After"] == "1"
    assert not any(task.done() for task in heavy)
    for status, body, _ in await asyncio.gather(*heavy):  # an answer, or the deadline's
        assert status == 200 or "ANALYTICS_SEARCH_TIMEOUT" in body["error"], body


async def test_a_client_that_goes_away_stops_its_query(
        fake: FakeOllama, start_proxy: StartProxy, tmp_path: Path, heavy_store: Path,
        http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ollama_metrics.analytics.stores.sqlite")
    proxy = await _proxy(fake, start_proxy, tmp_path, heavy_store, timeout=60)
    with pytest.raises(asyncio.TimeoutError):  # the client gives up and closes its socket
        async with http.get(proxy.url + "/analytics/stats", params={"prompt_search": HEAVY},
                            timeout=aiohttp.ClientTimeout(total=0.5)) as resp:
            await resp.read()
    for _ in range(100):
        if any("stopped (client gone)" in r.getMessage() for r in caplog.records):
            break
        await asyncio.sleep(0.05)
    assert any("stopped (client gone)" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_a_bad_search_timeout_fails_at_start_naming_the_setting(value: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ollama_metrics", "serve", "--analytics-search-timeout", value],
        capture_output=True, text=True, timeout=20)
    assert result.returncode == 2
    assert "ANALYTICS_SEARCH_TIMEOUT" in result.stderr, result.stderr
