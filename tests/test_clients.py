"""The official `ollama` and `openai` Python clients work through the proxy, streamed and not."""

from __future__ import annotations

import ollama
import openai
import pytest
from fake_ollama import FakeOllama
from helpers import RunningProxy, settle

MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Why is the sky blue?"}]


async def test_ollama_client(fake: FakeOllama, proxy: RunningProxy) -> None:
    client = ollama.AsyncClient(host=proxy.url)
    reply = await client.chat(model="llama3.2", messages=MESSAGES, stream=False)
    assert reply.message.content == "Hello, world!"
    assert reply.eval_count == 4
    pieces = [part.message.content async for part in
              await client.chat(model="llama3.2", messages=MESSAGES, stream=True)]
    assert "".join(pieces) == "Hello, world!"
    generated = await client.generate(model="llama3.2", prompt="hi")
    assert generated.response == "Hello, world!"
    listed = await client.list()
    assert [m.model for m in listed.models] == [m.model for m in
                                                (await ollama.AsyncClient(host=fake.url).list()).models]
    embedded = await client.embed(model="all-minilm", input=["a", "b"])
    assert len(embedded.embeddings) == 2
    with pytest.raises(ollama.ResponseError) as err:
        await client.chat(model="missing", messages=MESSAGES)
    assert err.value.status_code == 404
    await settle(lambda: proxy.sample("ollama_requests_total", model="llama3.2",
                                      endpoint="/api/chat", status="success",
                                      prompt_category="question") == 2)
    assert proxy.sample("ollama_output_tokens_total", model="llama3.2") == 12


async def test_openai_client(fake: FakeOllama, proxy: RunningProxy) -> None:
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="ollama", max_retries=0)
    try:
        reply = await client.chat.completions.create(model="llama3.2", messages=MESSAGES)  # type: ignore[arg-type]
        assert reply.choices[0].message.content == "Hello, world!"
        assert reply.usage is not None and reply.usage.completion_tokens == 4
        stream = await client.chat.completions.create(
            model="llama3.2", messages=MESSAGES, stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True})
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            usage = chunk.usage or usage
        assert text == "Hello, world!"
        assert usage is not None and usage.prompt_tokens == 26
        models = await client.models.list()
        assert "llama3.2:latest" in [m.id for m in models.data]
        emb = await client.embeddings.create(model="all-minilm", input="hello")
        assert len(emb.data[0].embedding) == 4
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="missing", messages=MESSAGES)  # type: ignore[arg-type]
    finally:
        await client.close()
    await settle(lambda: proxy.sample("ollama_requests_total", model="llama3.2",
                                      endpoint="/v1/chat/completions", status="success",
                                      prompt_category="question") == 2)
    assert proxy.sample("ollama_output_tokens_total", model="llama3.2") == 8
