"""Failure modes 16 and 24: bounded label cardinality, and metric values, buckets and routes.

Part of the 25 failure modes of shared/reference/failure-modes.md, each a test against the
real proxy, `test_fmNN_…`, its docstring quoting the expected behaviour (fm_helpers.py says
how they are run and time-scaled).
"""

from __future__ import annotations

import asyncio
import random

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import StartProxy
from fake_ollama import FakeOllama, Scenario
from helpers import (
    RunningProxy,
    settle,
)
from ollama_metrics.observe.metrics import DURATION_BUCKETS, TTFT_BUCKETS

# --- 16. Cardinality --------------------------------------------------------------------------

@pytest.mark.slow(reason="10,000 requests")
async def test_fm16_cardinality_stays_bounded(fake: FakeOllama, start_proxy: StartProxy) -> None:
    """10,000 requests with random model names, random blob digests, random first words ⇒
    `/metrics` series count bounded (≤ configured models + "other"), size < fixed KB, no
    IP/user/prompt text in labels."""
    proxy = await start_proxy(fake.url, max_extra_models=5)
    from ollama_metrics.server.app import METRICS

    await settle(lambda: bool(proxy.app[METRICS].model_label.known))
    known = proxy.app[METRICS].model_label.known
    rng = random.Random(16)
    names = [f"model{rng.getrandbits(48):x}" for _ in range(500)]
    words = [f"zq{rng.getrandbits(48):x}" for _ in range(200)]  # no label may hold one
    agent = "cardinality-probe/9.9 (secret user)"
    gate = asyncio.Semaphore(32)

    async def one(http: aiohttp.ClientSession, n: int) -> None:
        word = rng.choice(words)
        async with gate:
            if n % 4 == 0:
                request = http.post(proxy.url + "/api/generate", data=orjson.dumps(
                    {"model": rng.choice(names), "prompt": f"{word} anything"}))
            elif n % 4 == 1:
                request = http.head(proxy.url + f"/api/blobs/sha256:{rng.getrandbits(256):064x}")
            elif n % 4 == 2:
                request = http.post(proxy.url + "/api/generate", data=orjson.dumps(
                    {"model": "llama3.2", "prompt": f"{word} {rng.choice(words)}?",
                     "stream": False}))
            else:
                request = http.post(proxy.url + f"/{word}/{n}", data=b"{}")
            async with request as resp:
                await resp.read()

    connector = aiohttp.TCPConnector(limit=32)
    async with aiohttp.ClientSession(connector=connector, headers={"User-Agent": agent}) as http:
        await asyncio.gather(*(one(http, n) for n in range(10_000)))
        async with http.get(proxy.url + "/metrics") as resp:
            exposition = await resp.text()
    series = [s for f in text_string_to_metric_families(exposition) for s in f.samples]
    values = {v for s in series for v in s.labels.values()}
    models = {s.labels["model"] for s in series if "model" in s.labels}
    extras = models - known - {k.removesuffix(":latest") for k in known} - {"none", "other"}
    assert "other" in models and len(extras) <= 5  # the first --max-extra-models, then other
    assert extras <= {f"{n}:latest" for n in names}  # as Ollama names them
    assert not [v for v in values if any(w in v for w in words)]  # no prompt words, no paths
    assert not [v for v in values if "127.0.0.1" in v or "probe" in v]  # no client, no agent
    requests = [s for s in series if s.name == "ollama_requests_total"]
    print(f"{len(series)} series, {len(requests)} of ollama_requests_total, "
          f"{len(exposition) / 1024:.0f} KiB of exposition")
    assert sum(s.value for s in requests) == 10_000
    assert len(requests) <= 40
    assert len(exposition) < 100 * 1024


# --- 24. Metrics correctness ------------------------------------------------------------------

async def test_fm24_metrics_correct_and_routes_not_shadowed(
    fake: FakeOllama, proxy: RunningProxy, http: aiohttp.ClientSession,
) -> None:
    """ns→s conversions, tokens/s from `eval_count/eval_duration`, TTFT measured at the first
    body line, histogram buckets reach ≥ 600 s; `/metrics` and analytics routes don't shadow
    any Ollama path; `/` and `/api/version` pass through."""
    fake.scenarios["exact:latest"] = Scenario(
        tokens=["The", " sky"], first_delay=0.3, prompt_eval_count=26, eval_count=200,
        load_duration=6_338_219_291, prompt_eval_duration=130_079_000,
        eval_duration=4_000_000_000, total_duration=10_706_818_083)
    async with http.post(proxy.url + "/api/generate",
                         data=b'{"model":"exact","prompt":"hi"}') as resp:
        await resp.read()
    await settle(lambda: proxy.sample("ollama_output_tokens_total", model="exact:latest") == 200)
    s = proxy.sample
    assert s("ollama_model_load_duration_seconds_sum", model="exact:latest") == pytest.approx(
        6.338219291)
    assert s("ollama_tokens_per_second_sum", model="exact:latest",
             prompt_category="other") == pytest.approx(50.0)  # 200 / 4 s
    assert s("ollama_prompt_eval_tokens_per_second_sum", model="exact:latest") == pytest.approx(
        26 / 0.130079)
    assert 0.3 <= s("ollama_time_to_first_token_seconds_sum", model="exact:latest",
                    endpoint="/api/generate") < 0.4  # the first line, after the 0.3 s wait
    assert TTFT_BUCKETS[-1] >= 600 and DURATION_BUCKETS[-1] >= 600
    async with http.get(proxy.url + "/metrics", headers={"Accept-Encoding": "identity"}) as resp:
        exposition = await resp.text()
    les = {float(sample.labels["le"]) for f in text_string_to_metric_families(exposition)
           if f.name == "ollama_time_to_first_token_seconds" for sample in f.samples
           if "le" in sample.labels and sample.labels["le"] != "+Inf"}
    assert max(les) >= 600
    # Every route of Ollama's reaches Ollama through the proxy, whatever the method.
    routes = [(m, path) for path, methods in fake._routes.items() for m in methods]
    routes += [(m, prefix + "sha256:" + "0" * 64) for prefix, methods in
               fake._param_routes.items() for m in methods]
    for method, path in routes:
        before = len(fake.requests)
        async with http.request(method, proxy.url + path) as resp:
            await resp.read()
        assert [(r.method, r.path_qs) for r in fake.requests[before:]] == [(method, path)], path
    own = {r.get_info().get("path") or r.get_info().get("formatter")
           for r in proxy.app.router.resources()} - {"/{tail}"}
    assert not own & set(fake._routes) and not [p for p in own if p and p.startswith(
        ("/api/", "/v1/"))]
    for path in ("/", "/api/version"):
        answers = []
        for base in (fake.url, proxy.url):
            async with http.get(base + path) as resp:
                answers.append((resp.status, resp.headers["Content-Type"], await resp.read()))
        assert answers[0] == answers[1]
