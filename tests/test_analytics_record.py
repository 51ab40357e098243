"""Every stored field, end to end: real clients → proxy → fake Ollama → the SQLite record."""

from __future__ import annotations

import gzip
import hashlib
import io
import time
from typing import Any

import aiohttp
import ollama
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionSystemMessageParam, ChatCompletionUserMessageParam

from analytics_helpers import records
from conftest import StartProxy
from fake_ollama import FakeOllama, Scenario
from helpers import RunningProxy
from ollama_metrics.analytics.settings import AnalyticsConfig
from ollama_metrics.config import ConfigError

EXACT = Scenario(tokens=["The", " sky", " is", " blue"], prompt_eval_count=26, eval_count=4,
                 load_duration=6_338_219_291, prompt_eval_duration=130_079_000,
                 eval_duration=2_000_000_000, total_duration=10_706_818_083)
SYSTEM: ChatCompletionSystemMessageParam = {"role": "system", "content": "Be brief."}
USER: ChatCompletionUserMessageParam = {"role": "user", "content": "Why is the sky blue?"}


@pytest.fixture
def settings(tmp_path: Any) -> AnalyticsConfig:
    return AnalyticsConfig.build(analytics_dir=str(tmp_path))


@pytest.fixture
async def proxy(fake: FakeOllama, start_proxy: StartProxy,
                settings: AnalyticsConfig) -> RunningProxy:
    fake.scenarios["exact:latest"] = EXACT
    return await start_proxy(fake.url, analytics=settings)


@pytest.mark.parametrize("stream", [True, False])
async def test_chat_record(proxy: RunningProxy, http: aiohttp.ClientSession,
                           stream: bool) -> None:
    before = time.time()
    async with ollama.AsyncClient(host=proxy.url) as client:
        reply = await client.chat(model="exact", messages=[SYSTEM, USER], stream=stream,
                                  options={"temperature": 0.1, "num_ctx": 2048})
        if stream:
            async for _ in reply:
                pass
    (r,) = await records(proxy, http, 1)
    assert before <= r["started_at"] <= r["ended_at"] <= time.time()
    assert len(r["id"]) == 22 and r["client_ip"] == "127.0.0.1"
    assert r["user_agent"].startswith("ollama-python")
    assert (r["method"], r["path"], r["endpoint"]) == ("POST", "/api/chat", "/api/chat")
    assert (r["model"], r["stream"], r["options"]) == ("exact:latest", stream,
                                                       {"temperature": 0.1, "num_ctx": 2048})
    assert (r["http_status"], r["outcome"], r["error"]) == (200, "success", None)
    assert r["prompt"] == "Why is the sky blue?"
    assert r["system"] == "Be brief."
    assert [(m["role"], m["content"]) for m in r["messages"]] == [
        ("system", "Be brief."), ("user", "Why is the sky blue?")]
    assert r["response"] == "The sky is blue"
    assert r["prompt_category"] == "question"
    assert (r["prompt_tokens"], r["completion_tokens"]) == (26, 4)
    assert r["total_duration"] == pytest.approx(10.706818083)
    assert r["load_duration"] == pytest.approx(6.338219291)
    assert r["prompt_eval_duration"] == pytest.approx(0.130079)
    assert r["eval_duration"] == pytest.approx(2.0)
    assert r["tokens_per_second"] == pytest.approx(2.0)
    assert r["done_reason"] == "stop"
    assert r["request_bytes"] > 50 and r["response_bytes"] > 50
    assert 0 < r["duration"] < 5
    assert (r["ttft"] is not None) == stream  # only a stream has a first token to time
    assert r["images"] is None and r["image_count"] == 0
    assert (r["truncated"], r["capture"]) == (False, "full")


async def test_images_stored_as_size_and_hash(proxy: RunningProxy,
                                              http: aiohttp.ClientSession) -> None:
    image = bytes(range(256)) * 300
    async with ollama.AsyncClient(host=proxy.url) as client:
        await client.generate(model="exact", prompt="describe this", images=[image, image[:10]])
        await client.chat(model="exact", messages=[{"role": "user", "content": "and this?",
                                                    "images": [image]}])
    chat, generate = await records(proxy, http, 2)
    expected = {"bytes": len(image), "sha256": hashlib.sha256(image).hexdigest()}
    assert generate["images"] == [expected, {"bytes": 10,
                                             "sha256": hashlib.sha256(image[:10]).hexdigest()}]
    assert generate["image_count"] == 2
    assert chat["messages"][0]["images"] == [expected] and chat["image_count"] == 1
    async with http.get(proxy.url + f"/analytics/messages/{chat['id']}") as resp:
        stored = await resp.text()
    assert "AAECAwQF" not in stored  # no base64 anywhere in the record


async def test_openai_stream_with_usage(proxy: RunningProxy, http: aiohttp.ClientSession) -> None:
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model="exact", messages=[SYSTEM, USER],
            stream=True, stream_options={"include_usage": True})
        async for _ in stream:
            pass
    finally:
        await client.close()
    (r,) = await records(proxy, http, 1)
    assert (r["endpoint"], r["stream"], r["outcome"]) == ("/v1/chat/completions", True, "success")
    assert r["user_agent"].startswith("AsyncOpenAI")
    assert r["response"] == "The sky is blue"
    assert (r["prompt_tokens"], r["completion_tokens"]) == (26, 4)
    assert r["ttft"] is not None and r["done_reason"] == "stop"
    assert r["system"] == "Be brief."


async def test_openai_default_stream_counts_tokens_by_chunk(
        fake: FakeOllama, proxy: RunningProxy, http: aiohttp.ClientSession) -> None:
    """The SDK's default stream (no stream_options) carries no usage, as Ollama's: the proxy
    counts one token per content chunk and marks the count as its own. A count the reply
    carries wins."""
    fake.scenarios["counted:latest"] = Scenario(tokens=["One", " two", " three", " four", "."],
                                                prompt_eval_count=3, eval_count=11)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    try:
        stream = await client.chat.completions.create(model="counted", messages=[USER],
                                                      stream=True)
        usage = [chunk.usage async for chunk in stream]
        assert usage and not any(usage)  # Ollama sends no usage then, and neither does the fake
        stream = await client.chat.completions.create(
            model="counted", messages=[USER], stream=True,
            stream_options={"include_usage": True})
        async for _ in stream:
            pass
    finally:
        await client.close()
    with_usage, default = await records(proxy, http, 2)  # newest first
    assert (default["completion_tokens"], default["tokens_estimated"]) == (5, True)
    assert default["prompt_tokens"] is None
    assert (with_usage["completion_tokens"], with_usage["tokens_estimated"]) == (11, False)
    model = {"model": "counted:latest"}
    assert proxy.sample("ollama_output_tokens_total", **model) == 5 + 11
    assert proxy.sample("ollama_tokens_generated_sum", **model, prompt_category="question") == 16
    assert proxy.sample("ollama_tokens_generated_count", **model,
                        prompt_category="question") == 2


async def test_content_parts_read_by_one_rule(proxy: RunningProxy,
                                              http: aiohttp.ClientSession) -> None:
    """The request is read once: the stored prompt, the message text and the system text are
    the same text of the content parts, joined by one rule."""
    parts = [{"type": "text", "text": "Why is the sky"},
             {"type": "image_url", "image_url": {"url": "https://i.example/sky.png"}},
             {"type": "text", "text": "blue?"}]
    async with http.post(proxy.url + "/v1/chat/completions", json={
            "model": "exact", "messages": [
                {"role": "system", "content": [{"type": "text", "text": "Be"},
                                               {"type": "text", "text": "brief."}]},
                {"role": "user", "content": parts}]}) as resp:
        assert resp.status == 200
    (r,) = await records(proxy, http, 1)
    assert r["prompt"] == r["messages"][1]["content"] == "Why is the sky\nblue?"
    assert r["system"] == r["messages"][0]["content"] == "Be\nbrief."
    assert r["messages"][1]["images"] == [{"url": "https://i.example/sky.png"}]
    assert r["image_count"] == 1


async def test_embeddings_keep_input_not_vectors(fake: FakeOllama, proxy: RunningProxy,
                                                 http: aiohttp.ClientSession) -> None:
    fake.scenarios["emb:latest"] = Scenario(embedding_dims=7, prompt_eval_count=3)
    async with ollama.AsyncClient(host=proxy.url) as client:
        await client.embed(model="emb", input=["first text", "second text"])
    (r,) = await records(proxy, http, 1)
    assert r["prompt"] == "first text\nsecond text"
    assert (r["embedding_dims"], r["prompt_tokens"], r["response"]) == (7, 3, None)
    assert r["endpoint"] == "/api/embed"


async def test_thinking_and_tool_calls(fake: FakeOllama, proxy: RunningProxy,
                                       http: aiohttp.ClientSession) -> None:
    call = {"function": {"name": "get_weather", "arguments": {"city": "Tokyo"}}}
    fake.scenarios["tools:latest"] = Scenario(thinking=["Let me ", "check."], tool_calls=[call],
                                              tokens=[""])
    async with ollama.AsyncClient(host=proxy.url) as client:
        async for _ in await client.chat(model="tools", messages=[USER], stream=True,
                                         think=True):
            pass
    (r,) = await records(proxy, http, 1)
    assert r["thinking"] == "Let me check."
    assert [c["function"]["name"] for c in r["tool_calls"]] == ["get_weather"]
    assert r["tool_calls"][0]["function"]["arguments"] == {"city": "Tokyo"}


async def test_failures_are_recorded(fake: FakeOllama, start_proxy: StartProxy,
                                     settings: AnalyticsConfig, http: aiohttp.ClientSession
                                     ) -> None:
    proxy = await start_proxy(fake.url, analytics=settings)
    fake.scenarios["broken:latest"] = Scenario(error_after=2)
    async with http.post(proxy.url + "/api/chat", data=b'{"model":"missing","messages":[]}'):
        pass
    async with http.post(proxy.url + "/api/generate",
                         data=b'{"model":"broken","prompt":"hi"}') as resp:
        await resp.read()
    missing = (await records(proxy, http, 1, model="missing"))[0]
    assert (missing["http_status"], missing["outcome"]) == (404, "error")
    assert "not found" in missing["error"]
    broken = (await records(proxy, http, 1, model="broken"))[0]
    assert (broken["http_status"], broken["outcome"]) == (200, "error")
    assert broken["error"] and broken["response"] == "Hello,"

    import socket

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        down = await start_proxy(f"http://127.0.0.1:{closed.getsockname()[1]}",
                                 analytics=AnalyticsConfig.build(
                                     analytics_dir=str(settings.dir / "down")))
        async with http.post(down.url + "/api/generate", data=b'{"model":"m","prompt":"x"}'):
            pass
        (r,) = await records(down, http, 1)
    assert (r["outcome"], r["http_status"]) == ("upstream_error", 502)
    assert "cannot reach Ollama" in r["error"]


async def test_cancelled_is_recorded(fake: FakeOllama, proxy: RunningProxy,
                                     http: aiohttp.ClientSession) -> None:
    fake.scenarios["slow:latest"] = Scenario(tokens=["a"] * 50, token_delay=0.05)
    async with aiohttp.ClientSession() as session:
        resp = await session.post(proxy.url + "/api/generate",
                                  data=b'{"model":"slow","prompt":"hi"}')
        await resp.content.readline()
        resp.close()
    (r,) = await records(proxy, http, 1)
    assert r["outcome"] == "cancelled"
    assert r["response"].startswith("a")


def _message(content: str) -> bytes:
    return b'{"role":"user","content":"%s"}' % content.encode()


@pytest.mark.slow(reason="a million-message chat built and stored")
async def test_a_million_messages_store_a_bounded_marked_record(
        fake: FakeOllama, start_proxy: StartProxy, http: aiohttp.ClientSession,
        tmp_path: Any) -> None:
    proxy = await start_proxy(fake.url, analytics=AnalyticsConfig.build(
        analytics_backend="sqlite,jsonl", analytics_dir=str(tmp_path)))
    n = 1_000_000
    body = (b'{"model":"llama3.2","stream":false,"messages":[' + _message("first") + b","
            + b",".join([_message("hi")] * (n - 2)) + b"," + _message("last") + b"]}")
    async with http.post(proxy.url + "/api/chat", data=io.BytesIO(body)) as resp:
        assert resp.status == 200
    (r,) = await records(proxy, http, 1, timeout=30)
    messages = r["messages"]
    assert len(messages) == 101  # the first 50, the marker, the last 50
    assert messages[0]["content"] == "first" and messages[-1]["content"] == "last"
    assert messages[50] == {"elided": n - 100}
    assert r["truncated"] is True and r["truncated_fields"] == ["messages"]
    assert len(orjson.dumps(r)) < 16 * 1024
    (line,) = gzip.decompress(next(tmp_path.glob("*.jsonl.gz")).read_bytes()).splitlines()
    assert orjson.loads(line)["truncated_fields"] == ["messages"]  # in every store's output


async def test_record_size_cap_shares_the_room_between_texts(
        fake: FakeOllama, start_proxy: StartProxy, http: aiohttp.ClientSession,
        tmp_path: Any) -> None:
    proxy = await start_proxy(fake.url, analytics=AnalyticsConfig.build(
        analytics_dir=str(tmp_path), analytics_max_record_kb=64))
    messages = [{"role": "user", "content": "keep me whole"}] + [
        {"role": "user", "content": f"{n} " + "y" * 20_000} for n in range(10)]
    async with http.post(proxy.url + "/api/chat", json={
            "model": "llama3.2", "stream": False, "messages": messages}) as resp:
        assert resp.status == 200
    (r,) = await records(proxy, http, 1)
    assert len(orjson.dumps(r)) <= 64 * 1024
    contents = [m["content"] for m in r["messages"]]
    assert contents[0] == "keep me whole"  # short texts whole, long ones an equal share
    assert {len(c) for c in contents[1:]} == {len(contents[1])}
    assert all(c.endswith("…[truncated]") for c in contents[1:])
    assert r["prompt"].endswith("…[truncated]")  # the last message, as `prompt`, too
    assert r["truncated_fields"] == ["messages.content", "prompt", "record"]


async def test_tool_calls_options_and_images_are_capped(
        fake: FakeOllama, start_proxy: StartProxy, http: aiohttp.ClientSession,
        tmp_path: Any) -> None:
    proxy = await start_proxy(fake.url, analytics=AnalyticsConfig.build(
        analytics_dir=str(tmp_path), analytics_max_text=1000))
    calls = [{"function": {"name": "f" * 10_000, "arguments": {"a": "z" * 50_000}}}] * 100
    images = [{"type": "image_url", "image_url": {"url": f"https://i.example/{n}"}}
              for n in range(100)]
    options = {"temperature": 0.5, "stop": ["a"] * 100, "junk": "x" * 10_000,
               "num_ctx": {"deep": [1]}, "seed": -1}
    body = orjson.dumps({"model": "llama3.2", "stream": False, "options": options,
                         "messages": [{"role": "assistant", "content": "", "tool_calls": calls},
                                      {"role": "user", "content": images}]})
    async with http.post(proxy.url + "/api/chat", data=io.BytesIO(body)) as resp:
        assert resp.status == 200
    (r,) = await records(proxy, http, 1)
    kept = r["messages"][0]["tool_calls"]
    assert len(kept) == 32
    assert len(kept[0]["function"]["name"]) == 256 + len(" …[truncated]")
    arguments = kept[0]["function"]["arguments"]  # too long to keep as JSON: its text, cut
    assert arguments.startswith('{"a":"zzz') and len(arguments) == 1000 + len(" …[truncated]")
    assert r["options"] == {"temperature": 0.5, "stop": ["a"] * 16, "seed": -1}
    assert (len(r["images"]), r["image_count"]) == (64, 100)
    assert r["truncated_fields"] == ["images", "messages.tool_calls", "options"]


def test_caps_are_settings_checked_at_start() -> None:
    with pytest.raises(ConfigError) as info:
        AnalyticsConfig.build(analytics_max_messages=1)
    assert info.value.setting == "analytics_max_messages"
    with pytest.raises(ConfigError) as info:
        AnalyticsConfig.build(analytics_max_record_kb=8)
    assert info.value.setting == "analytics_max_record_kb"
