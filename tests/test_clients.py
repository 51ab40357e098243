"""The official `ollama` and `openai` Python clients work through the proxy, streamed and not."""

from __future__ import annotations

import socket

import ollama
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from conftest import StartProxy
from fake_ollama import FakeOllama
from helpers import RunningProxy, settle

MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Why is the sky blue?"},
]


async def test_ollama_client(fake: FakeOllama, proxy: RunningProxy) -> None:
    async with ollama.AsyncClient(host=proxy.url) as client, \
            ollama.AsyncClient(host=fake.url) as direct:
        await _ollama_calls(client, direct)
    await settle(lambda: proxy.sample("ollama_requests_total", model="llama3.2:latest",
                                      endpoint="/api/chat", status="success",
                                      prompt_category="question") == 2)
    assert proxy.sample("ollama_output_tokens_total", model="llama3.2:latest") == 12


async def _ollama_calls(client: ollama.AsyncClient, direct: ollama.AsyncClient) -> None:
    reply = await client.chat(model="llama3.2", messages=MESSAGES, stream=False)
    assert reply.message.content == "Hello, world!"
    assert reply.eval_count == 4
    pieces = [part.message.content or "" async for part in
              await client.chat(model="llama3.2", messages=MESSAGES, stream=True)]
    assert "".join(pieces) == "Hello, world!"
    generated = await client.generate(model="llama3.2", prompt="hi")
    assert generated.response == "Hello, world!"
    assert (await client.list()).models == (await direct.list()).models
    embedded = await client.embed(model="all-minilm", input=["a", "b"])
    assert len(embedded.embeddings) == 2
    with pytest.raises(ollama.ResponseError) as err:
        await client.chat(model="missing", messages=MESSAGES)
    assert err.value.status_code == 404


async def test_openai_client(fake: FakeOllama, proxy: RunningProxy) -> None:
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="ollama", max_retries=0)
    try:
        reply = await client.chat.completions.create(model="llama3.2", messages=MESSAGES)
        assert reply.choices[0].message.content == "Hello, world!"
        assert reply.usage is not None
        assert reply.usage.completion_tokens == 4
        stream = await client.chat.completions.create(
            model="llama3.2", messages=MESSAGES, stream=True,
            stream_options={"include_usage": True})
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            usage = chunk.usage or usage
        assert text == "Hello, world!"
        assert usage is not None
        assert usage.prompt_tokens == 26
        models = await client.models.list()
        assert "llama3.2:latest" in [m.id for m in models.data]
        emb = await client.embeddings.create(model="all-minilm", input="hello")
        assert len(emb.data[0].embedding) == 4
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="missing", messages=MESSAGES)
    finally:
        await client.close()
    await settle(lambda: proxy.sample("ollama_requests_total", model="llama3.2:latest",
                                      endpoint="/v1/chat/completions", status="success",
                                      prompt_category="question") == 2)
    assert proxy.sample("ollama_output_tokens_total", model="llama3.2:latest") == 8


async def test_proxy_errors_speak_each_api(start_proxy: StartProxy) -> None:
    """With Ollama down, the openai SDK's exception says why (the OpenAI error object on
    /v1/*); the ollama client gets Ollama's own shape on the native routes."""
    with socket.socket() as refused:
        refused.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        proxy = await start_proxy(f"http://127.0.0.1:{refused.getsockname()[1]}")
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="ollama", max_retries=0)
        with pytest.raises(openai.InternalServerError) as err:
            await client.chat.completions.create(model="llama3.2", messages=MESSAGES)
        await client.close()
        assert err.value.status_code == 502
        assert "cannot reach Ollama at http://127.0.0.1:" in err.value.message
        assert err.value.code == "ollama_connect" and err.value.type == "api_error"
        async with ollama.AsyncClient(host=proxy.url) as native:
            with pytest.raises(ollama.ResponseError) as native_err:
                await native.chat(model="llama3.2", messages=MESSAGES)
        assert native_err.value.status_code == 502
        assert native_err.value.error.startswith("cannot reach Ollama at http://127.0.0.1:")
