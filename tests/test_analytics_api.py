"""The /analytics/* routes: filters, paging, stats, export, bad input and the token."""

from __future__ import annotations

import asyncio
import csv
import io
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from analytics_helpers import DATA, T0, _seed, record
from conftest import StartProxy
from fake_ollama import FakeOllama
from helpers import RunningProxy
from ollama_metrics.analytics.settings import AnalyticsConfig
from ollama_metrics.analytics.stores import FIELD_NAMES

TOKEN = "s3cret-token"


@pytest.fixture
async def api(fake: FakeOllama, start_any: StartProxy, tmp_path: Path) -> RunningProxy:
    """Each test of the API also runs through `serve --workers 2`: a worker answers from the
    store the main process writes."""
    await _seed(tmp_path, DATA)
    settings = AnalyticsConfig.build(analytics_dir=str(tmp_path), analytics_token=TOKEN,
                                     analytics_retention_days=0)
    return await start_any(fake.url, analytics=settings)


@pytest.fixture
async def api_here(fake: FakeOllama, start_proxy: StartProxy, tmp_path: Path) -> RunningProxy:
    """`api` in this process only: for the long tables of parameters (a worker reads them with
    the same code)."""
    await _seed(tmp_path, DATA)
    settings = AnalyticsConfig.build(analytics_dir=str(tmp_path), analytics_token=TOKEN,
                                     analytics_retention_days=0)
    return await start_proxy(fake.url, analytics=settings)


AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def _get(http: aiohttp.ClientSession, proxy: RunningProxy, path: str,
               **params: str) -> tuple[int, Any]:
    async with http.get(proxy.url + path, params=params, headers=AUTH) as resp:
        body = await resp.read()
        ctype = resp.headers.get("Content-Type", "")
        return resp.status, orjson.loads(body) if ctype == "application/json" else body


async def _ids(http: aiohttp.ClientSession, proxy: RunningProxy, **params: str) -> list[str]:
    status, body = await _get(http, proxy, "/analytics/search", **params)
    assert status == 200, body
    return [r["id"] for r in body["results"]]


async def test_token_guards_every_analytics_route(api: RunningProxy,
                                                  http: aiohttp.ClientSession) -> None:
    for path in ("/analytics/search", "/analytics/messages", "/analytics/messages/rec00001",
                 "/analytics/models", "/analytics/stats", "/analytics/export",
                 "/analytics/timeseries", "/analytics/live", "/analytics/loaded"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            async with http.get(api.url + path, headers=headers) as resp:
                assert resp.status == 401, (path, headers)
                assert resp.headers["WWW-Authenticate"] == "Bearer"
        async with http.get(api.url + path, headers=AUTH) as resp:
            assert resp.status == 200, path
    async with http.get(api.url + "/metrics") as resp:  # open unless configured otherwise
        assert resp.status == 200
    async with http.get(api.url + "/api/tags", headers={"Authorization": "Bearer other"}) as r:
        assert r.status == 200  # Ollama's routes are never affected


async def test_metrics_can_be_protected(fake: FakeOllama, start_proxy: StartProxy,
                                        http: aiohttp.ClientSession, tmp_path: Path) -> None:
    proxy = await start_proxy(fake.url, analytics=AnalyticsConfig.build(
        analytics_dir=str(tmp_path), analytics_token=TOKEN, analytics_protect_metrics=True))
    async with http.get(proxy.url + "/metrics") as resp:
        assert resp.status == 401
    async with http.get(proxy.url + "/metrics", headers=AUTH) as resp:
        assert resp.status == 200


async def test_filters(api: RunningProxy, http: aiohttp.ClientSession) -> None:
    assert len(await _ids(http, api)) == 24
    assert (await _ids(http, api))[:2] == ["rec00024", "rec00023"]  # newest first
    assert await _ids(http, api, model="qwen3") == ["rec00023", "rec00022", "rec00021"]
    assert await _ids(http, api, prompt_category="summarize") == ["rec00021"]
    assert await _ids(http, api, status="error") == ["rec00023", "rec00022"]
    assert await _ids(http, api, status="success") == [f"rec{n:05d}" for n in range(21, 0, -1)]
    assert await _ids(http, api, status="cancelled") == ["rec00024"]
    assert await _ids(http, api, endpoint="/api/generate") == ["rec00023"]
    assert await _ids(http, api, start_time=str(T0 + 5), end_time=str(T0 + 8)) == [
        "rec00007", "rec00006", "rec00005"]
    assert await _ids(http, api, prompt_search="meeting") == ["rec00021"]
    assert await _ids(http, api, prompt_search="sea") == ["rec00024"]  # matches the response
    assert await _ids(http, api, prompt_search='"number 7"') == ["rec00007"]
    assert await _ids(http, api, prompt_search="number", model="qwen3") == [
        "rec00023", "rec00022"]  # their responses say "answer number N"
    assert await _ids(http, api, prompt_search="meeting", model="llama3.2") == []


async def test_paging(api: RunningProxy, http: aiohttp.ClientSession) -> None:
    seen: list[str] = []
    params = {"limit": "7"}
    while True:
        status, body = await _get(http, api, "/analytics/search", **params)
        assert status == 200
        seen += [r["id"] for r in body["results"]]
        if body["next_cursor"] is None:
            break
        params["cursor"] = str(body["next_cursor"])
    assert seen == [f"rec{n:05d}" for n in range(24, 0, -1)]
    assert await _ids(http, api, limit="3", offset="3") == ["rec00021", "rec00020", "rec00019"]


async def test_ranked_search(api: RunningProxy, http: aiohttp.ClientSession,
                             tmp_path: Path) -> None:
    await _seed_extra(api, tmp_path, [record(30, prompt="sea sea sea", response="x"),
                                      record(31, prompt="nothing", response="sea")])
    ids = await _ids(http, api, prompt_search="sea", order="rank")
    assert ids[0] == "rec00030"  # most prompt matches ranks first, though not newest
    assert set(ids) == {"rec00030", "rec00031", "rec00024"}


async def _seed_extra(proxy: RunningProxy, directory: Path,
                      records: list[dict[str, Any]]) -> None:
    """Records added while the proxy runs: through its recorder, or with workers (whose
    recorder is in another process) into the store it writes."""
    from ollama_metrics.server.app import RECORDER

    if RECORDER not in proxy.app:
        await _seed(directory, records)
        return
    for r in records:
        proxy.app[RECORDER].submit(r)
    from helpers import settle

    await settle(lambda: proxy.sample("ollama_analytics_writes_total", backend="sqlite",
                                      status="success") >= len(records))


async def test_one_record(api: RunningProxy, http: aiohttp.ClientSession) -> None:
    status, body = await _get(http, api, "/analytics/messages/rec00021")
    assert status == 200 and body == record(21, model="qwen3:latest",
                                            prompt="summarize the meeting notes",
                                            prompt_category="summarize",
                                            response="The team agreed", duration=100.0)
    status, body = await _get(http, api, "/analytics/messages/nope")
    assert (status, body) == (404, {"error": "no such interaction"})


async def test_models_and_stats(api: RunningProxy, http: aiohttp.ClientSession) -> None:
    status, body = await _get(http, api, "/analytics/models")
    assert status == 200
    models = {m["model"]: m for m in body["models"]}
    assert models["llama3.2:latest"]["requests"] == 21
    assert models["qwen3:latest"]["requests"] == 3
    assert models["qwen3:latest"]["last_used"] == T0 + 23
    status, stats = await _get(http, api, "/analytics/stats")
    assert status == 200
    totals = stats["totals"]
    assert (totals["requests"], totals["errors"], totals["cancelled"]) == (24, 2, 1)
    assert totals["error_rate"] == pytest.approx(2 / 24)
    assert totals["prompt_tokens"] == 240
    assert totals["completion_tokens"] == sum(range(1, 25))
    # Nearest rank over durations 1..20, 100, 22, 23, 24: p50 is the 12th smallest, p95 the 23rd.
    assert (totals["latency_p50"], totals["latency_p95"]) == (12.0, 24.0)
    qwen = next(m for m in stats["models"] if m["model"] == "qwen3:latest")
    assert (qwen["requests"], qwen["errors"], qwen["latency_p50"]) == (3, 2, 23.0)
    assert {c["prompt_category"] for c in stats["categories"]} == {
        "question", "summarize", "translate", "explain", "creative"}
    status, ranged = await _get(http, api, "/analytics/stats", start_time=str(T0 + 21))
    assert ranged["totals"]["requests"] == 4 and ranged["range"]["start_time"] == T0 + 21


async def test_timeseries(api: RunningProxy, http: aiohttp.ClientSession) -> None:
    status, body = await _get(http, api, "/analytics/timeseries", start_time=str(T0),
                              end_time=str(T0 + 30), step="10")
    assert status == 200, body
    assert (body["start_time"], body["end_time"], body["step"]) == (T0, T0 + 30, 10.0)
    # Records at T0+n, n = 1..24: durations n (21's is 100), TTFT n/10, 22 and 23 errors.
    first, second, third = body["points"]
    assert first == {"start": T0, "seconds": 10.0, "requests": 9, "errors": 0, "cancelled": 0,
                     "error_rate": 0.0, "prompt_tokens": 90, "completion_tokens": 45,
                     "latency_p50": 5.0, "latency_p95": 9.0, "ttft_p50": 0.5, "ttft_p95": 0.9}
    assert (second["start"], second["requests"], second["latency_p50"],
            second["latency_p95"]) == (T0 + 10, 10, 14.0, 19.0)
    assert (third["start"], third["requests"], third["errors"], third["cancelled"],
            third["latency_p50"], third["latency_p95"]) == (T0 + 20, 5, 2, 1, 23.0, 100.0)

    # Buckets stay on multiples of the step; `seconds` is their part inside the range.
    status, body = await _get(http, api, "/analytics/timeseries", start_time=str(T0 + 5),
                              end_time=str(T0 + 25), step="10")
    assert [(p["start"], p["seconds"], p["requests"]) for p in body["points"]] == [
        (T0, 5.0, 5), (T0 + 10, 10.0, 10), (T0 + 20, 5.0, 5)]
    # Buckets without requests are there, empty.
    status, body = await _get(http, api, "/analytics/timeseries", start_time=str(T0 - 20),
                              end_time=str(T0 + 10), step="10", model="qwen3")
    assert [p["requests"] for p in body["points"]] == [0, 0, 0]
    assert body["points"][0] == {
        "start": T0 - 20, "seconds": 10.0, "requests": 0, "errors": 0, "cancelled": 0,
        "error_rate": 0.0, "prompt_tokens": 0, "completion_tokens": 0, "latency_p50": None,
        "latency_p95": None, "ttft_p50": None, "ttft_p95": None}
    status, body = await _get(http, api, "/analytics/timeseries", start_time=str(T0),
                              end_time=str(T0 + 30), step="10", model="qwen3")
    assert [p["requests"] for p in body["points"]] == [0, 0, 3]


@pytest.mark.parametrize(("since", "step"), [
    ("15m", 10), ("1h", 30), ("6h", 300), ("24h", 900), ("7d", 7200)])
async def test_timeseries_chooses_a_step(api_here: RunningProxy, http: aiohttp.ClientSession,
                                         since: str, step: int) -> None:
    status, body = await _get(http, api_here, "/analytics/timeseries", since=since)
    assert status == 200 and body["step"] == step
    span = body["end_time"] - body["start_time"]
    assert 60 <= round(span) / step <= 120
    assert len(body["points"]) in (span // step, span // step + 1)
    assert sum(p["seconds"] for p in body["points"]) == pytest.approx(span)
    # Without a start: the last hour.
    status, body = await _get(http, api_here, "/analytics/timeseries")
    assert body["end_time"] - body["start_time"] == 3600 and body["step"] == 30


@pytest.mark.parametrize(("params", "reason"), [
    ({"step": "0"}, "step: must be at least 1 second"),
    ({"step": "-60"}, "step: must be at least 1 second"),
    ({"step": "nan"}, "step: must be at least 1 second"),
    ({"step": "inf"}, "step: must be at least 1 second"),
    ({"step": "a minute"}, "step: expected seconds"),
    ({"since": "7d", "step": "1"}, "step: 1 s makes 604800 buckets"),
    ({"since": "soon"}, "since: expected a duration"),
    ({"colour": "blue"}, "unknown parameter 'colour'"),
])
async def test_timeseries_bad_parameters(api_here: RunningProxy, http: aiohttp.ClientSession,
                                         params: dict[str, str], reason: str) -> None:
    status, body = await _get(http, api_here, "/analytics/timeseries", **params)
    assert status == 400, body
    assert reason in body["error"]


async def test_export(api: RunningProxy, http: aiohttp.ClientSession) -> None:
    status, body = await _get(http, api, "/analytics/export", model="qwen3")
    assert status == 200
    lines = [orjson.loads(line) for line in body.splitlines()]
    assert [r["id"] for r in lines] == ["rec00023", "rec00022", "rec00021"]
    async with http.get(api.url + "/analytics/export", params={"format": "csv"},
                        headers=AUTH) as resp:
        assert resp.headers["Content-Type"].startswith("text/csv")
        rows = list(csv.reader(io.StringIO(await resp.text())))
    assert rows[0] == FIELD_NAMES and len(rows) == 25


async def test_csv_export_neutralises_formulas(api: RunningProxy, http: aiohttp.ClientSession,
                                               tmp_path: Path) -> None:
    await _seed_extra(api, tmp_path, [record(
        40, model="+m", prompt="=cmd|' /C calc'!A0", response="-2+3", error="@SUM(A1)",
        user_agent="\tTAB", client_ip="\rCR", path="/api/=chat", duration=-1.5, ttft=-0.25,
        completion_tokens=-3, messages=[{"role": "user", "content": "=1+1"}])])
    async with http.get(api.url + "/analytics/export", params={"format": "csv",
                                                                "model": "+m"},
                        headers=AUTH) as resp:
        header, row = csv.reader(io.StringIO(await resp.text()))
    cells = dict(zip(header, row, strict=True))
    assert (cells["model"], cells["prompt"], cells["response"], cells["error"],
            cells["user_agent"], cells["client_ip"]) == (
        "'+m", "'=cmd|' /C calc'!A0", "'-2+3", "'@SUM(A1)", "'\tTAB", "'\rCR")
    assert cells["path"] == "/api/=chat"  # only a leading character makes a formula
    assert (cells["duration"], cells["ttft"], cells["completion_tokens"]) == (
        "-1.5", "-0.25", "-3")  # numbers stay numbers
    assert orjson.loads(cells["messages"]) == [{"role": "user", "content": "=1+1"}]


@pytest.mark.parametrize(("params", "reason"), [
    ({"start_time": "yesterday"}, "start_time: expected unix seconds"),
    ({"end_time": "-5"}, "end_time: expected unix seconds"),
    ({"start_time": "10", "end_time": "5"}, "end_time is before start_time"),
    ({"limit": "0"}, "limit: must be between 1 and 1000"),
    ({"limit": "5000"}, "limit: must be between 1 and 1000"),
    ({"limit": "ten"}, "limit: expected a whole number"),
    ({"prompt_category": "poetry"}, "prompt_category: one of"),
    ({"status": "fine"}, "status: one of"),
    ({"order": "random"}, "order: time or rank"),
    ({"since": "a while"}, "since: expected a duration"),
    ({"colour": "blue"}, "unknown parameter 'colour'"),
])
async def test_bad_parameters_get_400_with_reason(api_here: RunningProxy,
                                                  http: aiohttp.ClientSession,
                                                  params: dict[str, str], reason: str) -> None:
    for path in ("/analytics/search", "/analytics/stats", "/analytics/export"):
        status, body = await _get(http, api_here, path, **params)
        assert status == 400, (path, body)
        assert reason in body["error"]


INJECTIONS = ["x' OR '1'='1", "x\"; DROP TABLE interactions; --", "') OR 1=1 --",
              "llama3.2' UNION SELECT * FROM sqlite_master --", "%", "*", "\\", "\x00"]


@pytest.mark.parametrize("evil", INJECTIONS)
async def test_sql_injection_in_every_parameter(api_here: RunningProxy,
                                                http: aiohttp.ClientSession,
                                                evil: str) -> None:
    for name in ("model", "endpoint", "prompt_search", "prompt_category", "status", "start_time",
                 "end_time", "limit", "offset", "cursor", "order", "since"):
        status, body = await _get(http, api_here, "/analytics/search", **{name: evil})
        assert status in (200, 400), (name, body)
        if status == 200:
            assert body["results"] == [] or name == "prompt_search", (name, body)
    status, body = await _get(http, api_here, f"/analytics/messages/{evil}")
    assert status in (400, 404)
    assert len(await _ids(http, api_here)) == 24  # and the table is still there, whole


@pytest.mark.slow(reason="a 2 s stream")
async def test_live_shows_requests_in_flight_and_recent(fake: FakeOllama, start_any: StartProxy,
                                                       http: aiohttp.ClientSession) -> None:
    from fake_ollama import Scenario
    from helpers import settle

    fake.scenarios["slow:latest"] = Scenario(tokens=["a"] * 40, token_delay=0.05)
    proxy = await start_any(fake.url)
    async with aiohttp.ClientSession() as other:
        resp = await other.post(proxy.url + "/api/generate", data=b'{"model":"slow","prompt":"x"}')
        for _ in range(5):
            await resp.content.readline()
        for _ in range(20):  # another worker's requests show within its publishing interval
            async with http.get(proxy.url + "/analytics/live") as r:
                live = await r.json()
            if live["active"] and live["active"][0]["chunks"] >= 5:
                break
            await asyncio.sleep(0.05)
        (active,) = live["active"]
        assert (active["model"], active["endpoint"], active["stream"]) == (
            "slow:latest", "/api/generate", True)
        assert active["chunks"] >= 5 and active["elapsed"] > 0.1 and active["ttft"] > 0
        await resp.read()
        resp.release()
    await settle(lambda: proxy.sample("ollama_active_requests", model="slow:latest") == 0)
    for _ in range(40):  # with workers, another's view is at most 0.1 s old
        async with http.get(proxy.url + "/analytics/live", params={"recent": "5"}) as r:
            live = await r.json()
        if not live["active"]:
            break
        await asyncio.sleep(0.05)
    assert live["active"] == []
    (done,) = live["recent"]
    assert (done["model"], done["status"], done["completion_tokens"]) == (
        "slow:latest", "success", 40)
    assert live["models"][0]["tokens_per_second"] == 40 / live["window_seconds"]
