"""Metric values are exact: counts are Ollama's, nanoseconds become seconds, labels are bounded."""

from __future__ import annotations

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import StartProxy
from fake_ollama import FakeOllama, Scenario
from helpers import RunningProxy, settle
from ollama_metrics.observe.metrics import DURATION_BUCKETS, TTFT_BUCKETS


@pytest.fixture
async def proxy(fake: FakeOllama, start_any: StartProxy) -> RunningProxy:
    """Each test here also runs through `serve --workers 2` (conftest.start_any): the values
    read are then /metrics', the sum over the workers."""
    return await start_any(fake.url)

EXACT = Scenario(tokens=["The", " sky", " is", " blue"], prompt_eval_count=26, eval_count=4,
                 load_duration=6_338_219_291, prompt_eval_duration=130_079_000,
                 eval_duration=2_000_000_000, total_duration=10_706_818_083)


async def _done(proxy: RunningProxy, model: str, endpoint: str, n: int = 1) -> None:
    await settle(lambda: sum(
        proxy.sample("ollama_requests_total", model=model, endpoint=endpoint, status=s,
                     prompt_category=c)
        for s in ("success", "error", "cancelled")
        for c in ("question", "other", "explain", "summarize", "code_write", "empty")) >= n)


@pytest.mark.parametrize("stream", [True, False])
async def test_native_counts_and_durations(
    fake: FakeOllama, proxy: RunningProxy, http: aiohttp.ClientSession, stream: bool,
) -> None:
    fake.scenarios["exact:latest"] = EXACT
    body = b'{"model":"exact","prompt":"Why is the sky blue?","stream":%s}' % (
        b"true" if stream else b"false")
    async with http.post(proxy.url + "/api/generate", data=body) as resp:
        assert resp.status == 200
        await resp.read()
    await _done(proxy, "exact:latest", "/api/generate")
    s = proxy.sample
    assert s("ollama_requests_total", model="exact:latest", endpoint="/api/generate",
             status="success", prompt_category="question") == 1
    assert s("ollama_input_tokens_total", model="exact:latest") == 26
    assert s("ollama_output_tokens_total", model="exact:latest") == 4
    assert s("ollama_tokens_generated_sum", model="exact:latest", prompt_category="question") == 4
    assert s("ollama_tokens_per_second_sum", model="exact:latest",
             prompt_category="question") == pytest.approx(2.0)  # 4 / 2.0 s
    assert s("ollama_prompt_eval_tokens_per_second_sum", model="exact:latest") == pytest.approx(
        26 / 0.130079)
    assert s("ollama_model_load_duration_seconds_sum", model="exact:latest") == pytest.approx(
        6.338219291)
    assert s("ollama_active_requests", model="exact:latest") == 0
    ttft = s("ollama_time_to_first_token_seconds_count", model="exact:latest",
             endpoint="/api/generate")
    tpot = s("ollama_time_per_output_token_seconds_sum", model="exact:latest")
    if stream:
        assert ttft == 1
        assert s("ollama_streaming_duration_seconds_count", model="exact:latest") == 1
        assert 0 <= tpot < 0.5  # wall clock between chunks at the proxy, fake sends at once
    else:
        assert ttft == 0  # nothing streamed, so no first token to time
        assert tpot == pytest.approx(0.5)  # eval_duration / eval_count = 2 s / 4


async def test_warm_model_load_is_not_a_load(fake: FakeOllama, proxy: RunningProxy,
                                             http: aiohttp.ClientSession) -> None:
    fake.scenarios["warm:latest"] = Scenario(load_duration=1_334_875)
    async with http.post(proxy.url + "/api/generate", data=b'{"model":"warm","prompt":"x"}') as r:
        await r.read()
    await _done(proxy, "warm:latest", "/api/generate")
    assert proxy.sample("ollama_model_load_duration_seconds_count", model="warm:latest") == 0


async def test_ttft_is_wall_clock_at_the_proxy(fake: FakeOllama, proxy: RunningProxy,
                                               http: aiohttp.ClientSession) -> None:
    fake.scenarios["slowfirst:latest"] = Scenario(first_delay=0.3, token_delay=0.1)
    async with http.post(proxy.url + "/api/chat", data=b'{"model":"slowfirst","messages":'
                         b'[{"role":"user","content":"explain tides"}]}') as resp:
        await resp.read()
    await _done(proxy, "slowfirst:latest", "/api/chat")
    total = proxy.sample("ollama_time_to_first_token_seconds_sum", model="slowfirst:latest",
                         endpoint="/api/chat")
    assert 0.3 <= total < 0.45
    streaming = proxy.sample("ollama_streaming_duration_seconds_sum", model="slowfirst:latest")
    assert 0.25 <= streaming < 0.5  # 4 tokens, 0.1 s apart: first to last is ~0.3 s
    assert proxy.sample("ollama_time_per_output_token_seconds_sum",
                        model="slowfirst:latest") == pytest.approx(streaming / 3)


async def test_openai_usage(fake: FakeOllama, proxy: RunningProxy,
                            http: aiohttp.ClientSession) -> None:
    fake.scenarios["exact:latest"] = EXACT
    chat = b'{"model":"exact","messages":[{"role":"user","content":"summarize this"}]'
    for tail in (b"}", b',"stream":true,"stream_options":{"include_usage":true}}',
                 b',"stream":true}'):
        async with http.post(proxy.url + "/v1/chat/completions", data=chat + tail) as resp:
            await resp.read()
    await _done(proxy, "exact:latest", "/v1/chat/completions", 3)
    assert proxy.sample("ollama_requests_total", model="exact:latest",
                        endpoint="/v1/chat/completions", status="success",
                        prompt_category="summarize") == 3
    # Usage is known for the non-streamed reply and the one that asked for it; the third
    # carries none, so the proxy counts its four content chunks.
    assert proxy.sample("ollama_output_tokens_total", model="exact:latest") == 12
    assert proxy.sample("ollama_input_tokens_total", model="exact:latest") == 52
    assert proxy.sample("ollama_time_to_first_token_seconds_count", model="exact:latest",
                        endpoint="/v1/chat/completions") == 2


async def test_embed_counts_input_tokens(fake: FakeOllama, proxy: RunningProxy,
                                         http: aiohttp.ClientSession) -> None:
    fake.scenarios["emb:latest"] = Scenario(prompt_eval_count=8)
    async with http.post(proxy.url + "/api/embed", data=b'{"model":"emb","input":"x"}') as r:
        await r.read()
    await _done(proxy, "emb:latest", "/api/embed")
    assert proxy.sample("ollama_input_tokens_total", model="emb:latest") == 8
    assert proxy.sample("ollama_output_tokens_total", model="emb:latest") == 0


@pytest.mark.parametrize(("scenario", "error_type", "status_code"), [
    (Scenario(error_before=(500, "model runner has unexpectedly stopped")), "http_5xx", 500),
    (Scenario(error_before=(400, "bad")), "http_4xx", 400),
    (Scenario(error_after=2), "stream_error", 200),
])
async def test_errors_are_counted_by_cause(
    fake: FakeOllama, proxy: RunningProxy, http: aiohttp.ClientSession,
    scenario: Scenario, error_type: str, status_code: int,
) -> None:
    fake.scenarios["bad:latest"] = scenario
    async with http.post(proxy.url + "/api/generate", data=b'{"model":"bad","prompt":"x"}') as r:
        assert r.status == status_code
        body = await r.read()
    assert b'"error"' in body  # relayed verbatim
    await _done(proxy, "bad:latest", "/api/generate")
    assert proxy.sample("ollama_requests_total", model="bad:latest", endpoint="/api/generate",
                        status="error", prompt_category="other") == 1
    assert proxy.sample("ollama_errors_total", error_type=error_type) == 1


async def test_upstream_dies_mid_stream(fake: FakeOllama, proxy: RunningProxy) -> None:
    fake.scenarios["dies:latest"] = Scenario(tokens=["a"] * 10, drop_after=3, token_delay=0.01)
    got: list[bytes] = []
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + "/api/generate",
                                data=b'{"model":"dies","prompt":"x"}') as resp:
            with pytest.raises(aiohttp.ClientPayloadError):  # truncation is visible
                await _read_into(resp, got)
        assert b"".join(got).count(b"\n") == 3
        await _done(proxy, "dies:latest", "/api/generate")
        assert proxy.sample("ollama_errors_total", error_type="reset") == 1
        async with session.get(proxy.url + "/api/version") as resp:  # still serving
            assert resp.status == 200


async def test_upstream_down_gives_fast_502(start_proxy: StartProxy,
                                            http: aiohttp.ClientSession) -> None:
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]  # bound, not listening: connections are refused
    proxy = await start_proxy(f"http://127.0.0.1:{port}")
    try:
        async with http.post(proxy.url + "/api/generate",
                             data=b'{"model":"m","prompt":"x"}') as resp:
            assert resp.status == 502
            error = (await resp.json())["error"]
        assert f"127.0.0.1:{port}" in error
        assert proxy.sample("ollama_errors_total", error_type="connect") == 1
        async with http.get(proxy.url + "/test") as resp:
            assert resp.status == 503
            assert (await resp.json())["upstream"]["reachable"] is False
    finally:
        sock.close()


async def test_health_route(proxy: RunningProxy, http: aiohttp.ClientSession) -> None:
    async with http.get(proxy.url + "/test") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["upstream"]["reachable"] is True
    assert body["upstream"]["version"] == "0.33.0"


async def test_model_labels_are_bounded(fake: FakeOllama, start_proxy: StartProxy,
                                        http: aiohttp.ClientSession) -> None:
    proxy = await start_proxy(fake.url, max_extra_models=2)
    await settle(lambda: "llama3.2:latest" in _known(proxy))
    names = ["llama3.2", "llama3.2:latest", "a1", "a2", "a3", "a4", "x" * 500]
    for name in names:
        async with http.post(proxy.url + "/api/show", data=b'{"model":"%s"}' % name.encode()):
            pass
    await settle(lambda: _total(proxy, "ollama_requests_total") == len(names))
    models = {labels["model"] for labels in _labels(proxy, "ollama_requests_total")}
    # `llama3.2` is `llama3.2:latest`: one model, one series (ollama.names). `none` is there
    # from the start (Metrics._expose_from_the_start).
    assert models == {"llama3.2:latest", "a1:latest", "a2:latest", "other", "none"}


async def test_cardinality_stays_bounded_under_junk(fake: FakeOllama, proxy: RunningProxy,
                                                    http: aiohttp.ClientSession) -> None:
    for n in range(300):
        async with http.post(proxy.url + f"/junk/{n}", data=b'{"model":"m%d"}' % n):
            pass
        async with http.head(proxy.url + f"/api/blobs/sha256:{n:064x}"):
            pass
    endpoints = {labels["endpoint"] for labels in _labels(proxy, "ollama_requests_total")}
    assert endpoints == {"other", "/api/blobs/:digest"}
    assert _series(proxy, "ollama_requests_total") <= 2 * 3


def test_buckets_reach_llm_scales() -> None:
    assert TTFT_BUCKETS[0] <= 0.001
    assert TTFT_BUCKETS[-1] >= 600
    assert DURATION_BUCKETS[-1] >= 7200


async def test_metrics_exposition(proxy: RunningProxy, http: aiohttp.ClientSession) -> None:
    async with http.post(proxy.url + "/api/generate", data=b'{"model":"llama3.2","prompt":"x"}'):
        pass
    async with http.get(proxy.url + "/metrics", headers={"Accept-Encoding": "identity"}) as resp:
        assert resp.status == 200
        text = await resp.text()
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"ollama_requests", "ollama_request_duration_seconds",
            "ollama_time_to_first_token_seconds", "ollama_time_per_output_token_seconds",
            "ollama_streaming_duration_seconds", "ollama_tokens_generated",
            "ollama_tokens_per_second", "ollama_input_tokens", "ollama_output_tokens",
            "ollama_model_load_duration_seconds", "ollama_prompt_eval_tokens_per_second",
            "ollama_active_requests", "ollama_client_disconnects", "ollama_errors",
            "process_resident_memory_bytes"} <= names
    assert "_created" not in text


async def _read_into(resp: aiohttp.ClientResponse, into: list[bytes]) -> None:
    async for chunk in resp.content.iter_any():
        into.append(chunk)


def _known(proxy: RunningProxy) -> frozenset[str]:
    from ollama_metrics.server.app import METRICS

    return proxy.app[METRICS].model_label.known


def _labels(proxy: RunningProxy, name: str) -> list[dict[str, str]]:
    return [s.labels for m in proxy.registry.collect() for s in m.samples if s.name == name]


def _series(proxy: RunningProxy, name: str) -> int:
    return len(_labels(proxy, name))


def _total(proxy: RunningProxy, name: str) -> float:
    return sum(s.value for m in proxy.registry.collect() for s in m.samples if s.name == name)
