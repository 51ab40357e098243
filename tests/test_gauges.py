"""The loaded-model gauges from /api/ps: values, models that unload, Ollama going away."""

from __future__ import annotations

import time
from datetime import datetime, timezone

import aiohttp
import pytest

from conftest import StartProxy
from fake_ollama import FakeOllama
from helpers import RunningProxy, settle
from ollama_metrics.ollama.control import parse_go_time

FAST = {"ps_interval": 0.05}


def loaded(proxy: RunningProxy) -> set[str]:
    return {s.labels["model"] for m in proxy.registry.collect() if m.name == "ollama_model_loaded"
            for s in m.samples}


def value(proxy: RunningProxy, name: str, **labels: str) -> float | None:
    return proxy.registry.get_sample_value(name, labels)


async def test_gauges_follow_api_ps(fake: FakeOllama, start_any: StartProxy) -> None:
    """With workers too: the main process polls, every worker shows what it saw."""
    proxy = await start_any(fake.url, **FAST)
    await settle(lambda: value(proxy, "ollama_up") == 1 and len(loaded(proxy)) == 2)
    assert loaded(proxy) == {"llama3.2:latest", "all-minilm:latest"}
    size = fake._model_entry("llama3.2:latest")["size"]  # what the fake reports
    model = {"model": "llama3.2:latest"}
    assert value(proxy, "ollama_model_loaded", **model) == 1
    assert value(proxy, "ollama_model_size_bytes", **model) == size
    assert value(proxy, "ollama_model_vram_bytes", **model) == size
    assert value(proxy, "ollama_model_context_length", **model) == 4096
    expires = value(proxy, "ollama_model_expires_in_seconds", **model)
    assert expires is not None
    assert 290 < expires <= 300  # the fake keeps models 5 minutes
    assert value(proxy, "ollama_upstream_info", version="0.33.0") == 1

    # A model that unloads disappears from every per-model gauge.
    del fake.scenarios["all-minilm:latest"]
    await settle(lambda: loaded(proxy) == {"llama3.2:latest"})
    for name in ("ollama_model_loaded", "ollama_model_size_bytes", "ollama_model_vram_bytes",
                 "ollama_model_context_length", "ollama_model_expires_in_seconds"):
        assert value(proxy, name, model="all-minilm:latest") is None

    # Ollama gone: down, and nothing is loaded.
    await fake.close()
    await settle(lambda: value(proxy, "ollama_up") == 0)
    assert loaded(proxy) == set()


async def test_loaded_shows_the_latest_poll(fake: FakeOllama, start_any: StartProxy,
                                            http: aiohttp.ClientSession) -> None:
    proxy = await start_any(fake.url, **FAST)
    await settle(lambda: len(loaded(proxy)) == 2)
    async with http.get(proxy.url + "/analytics/loaded") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert (body["polling"], body["up"], body["version"]) == (True, True, "0.33.0")
    assert time.time() - 1 < body["checked_at"] <= time.time()
    size = fake._model_entry("llama3.2:latest")["size"]
    llama = next(m for m in body["models"] if m["name"] == "llama3.2:latest")
    assert llama == {"name": "llama3.2:latest", "size": size, "size_vram": size,
                     "context_length": 4096, "expires_at": pytest.approx(time.time() + 300, abs=2)}
    assert {m["name"] for m in body["models"]} == {"llama3.2:latest", "all-minilm:latest"}

    await fake.close()
    await settle(lambda: value(proxy, "ollama_up") == 0)
    async with http.get(proxy.url + "/analytics/loaded") as resp:
        body = await resp.json()
    assert (body["up"], body["models"]) == (False, [])


async def test_loaded_when_not_polling(fake: FakeOllama, start_proxy: StartProxy,
                                       http: aiohttp.ClientSession) -> None:
    proxy = await start_proxy(fake.url, ps_interval=0)
    async with http.get(proxy.url + "/analytics/loaded") as resp:
        assert resp.status == 200
        assert await resp.json() == {"polling": False}


async def test_poll_goes_straight_to_ollama(fake: FakeOllama, start_proxy: StartProxy) -> None:
    proxy = await start_proxy(fake.url, **FAST)
    await settle(lambda: sum(r.path_qs == "/api/ps" for r in fake.requests) >= 3)
    # Not requests through the proxy: no request metrics for them.
    assert not [s for m in proxy.registry.collect() if m.name == "ollama_requests"
                for s in m.samples if s.value]
    # The version is asked once, when Ollama is first seen, not on every poll.
    assert sum(r.path_qs == "/api/version" for r in fake.requests) == 1


async def test_up_is_zero_when_ollama_never_answered(start_proxy: StartProxy) -> None:
    proxy = await start_proxy("http://127.0.0.1:9", **FAST)
    await settle(lambda: value(proxy, "ollama_up") == 0)
    assert loaded(proxy) == set()


async def test_gauges_off(fake: FakeOllama, start_proxy: StartProxy) -> None:
    proxy = await start_proxy(fake.url, ps_interval=0)
    assert value(proxy, "ollama_up") is None
    assert not any(r.path_qs == "/api/ps" for r in fake.requests)


@pytest.mark.parametrize(("text", "expected"), [
    ("2024-06-04T14:38:31.83753-07:00", datetime(2024, 6, 4, 21, 38, 31, 837530, timezone.utc)),
    ("2025-05-04T17:37:44.706015396+02:00",
     datetime(2025, 5, 4, 15, 37, 44, 706015, timezone.utc)),
    ("2025-01-01T00:00:00Z", datetime(2025, 1, 1, tzinfo=timezone.utc)),
])
def test_go_times(text: str, expected: datetime) -> None:
    parsed = parse_go_time(text)
    assert parsed is not None
    assert parsed == pytest.approx(expected.timestamp(), abs=1e-6)


@pytest.mark.parametrize("text", ["", "yesterday", "2025-13-01T00:00:00Z"])
def test_unreadable_go_times(text: str) -> None:
    assert parse_go_time(text) is None
