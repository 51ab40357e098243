"""Capture levels, caps and redaction: applied before a record is queued, at every level."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import pytest

from analytics_helpers import records
from conftest import StartProxy
from fake_ollama import FakeOllama, Scenario
from ollama_metrics.analytics.privacy import Privacy
from ollama_metrics.analytics.settings import AnalyticsConfig

SECRETS = {
    "jane.doe+ai@example.co.uk": "[REDACTED_EMAIL]",
    "sk-proj-abcdefghijklmnopqrstuvwx1234": "[REDACTED_SECRET]",
    "ghp_abcdefghijklmnopqrstuvwxyz0123456789": "[REDACTED_SECRET]",
    "AKIAIOSFODNN7EXAMPLE": "[REDACTED_SECRET]",
    "xoxb-123456789012-abcdefghijkl": "[REDACTED_SECRET]",
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U":
        "[REDACTED_SECRET]",
    "4111 1111 1111 1111": "[REDACTED_CARD]",
    "5500-0000-0000-0004": "[REDACTED_CARD]",
}


@pytest.mark.parametrize(("secret", "tag"), SECRETS.items())
def test_builtin_redactions(secret: str, tag: str) -> None:
    out = Privacy().scrub(f"please use {secret} for this.")
    assert secret not in out and tag in out


@pytest.mark.parametrize("text", [
    "order 1234 5678 9012 3456 arrived",  # fails the Luhn check: not a card
    "the year 2024 and 42 apples",
    "email me at the usual place",
])
def test_ordinary_text_is_untouched(text: str) -> None:
    assert Privacy().scrub(text) == text


def test_key_value_secrets_keep_the_key() -> None:
    assert Privacy().scrub("api_key=abc123def456 and password: hunter22!") == (
        "api_key=[REDACTED_SECRET] and password: [REDACTED_SECRET]")


def test_user_patterns_and_switching_builtins_off() -> None:
    p = Privacy(redact=False, patterns=(re.compile(r"ACME-\d+"),))
    assert p.scrub("ticket ACME-1234 from a@b.io") == "ticket [REDACTED] from a@b.io"


def test_caps_mark_truncation_and_never_split_a_secret() -> None:
    p = Privacy(max_text=20)
    text, cut = p.text("x" * 15 + "sk-abcdefghijklmnopqrstuvwxyz")
    assert cut and text is not None and text.endswith("…[truncated]")
    assert "sk-abc" not in text  # redacted before the cut, not cut mid-key
    assert p.text("short") == ("short", False)


def test_capture_levels() -> None:
    assert Privacy(capture="truncated", truncate_chars=5).text("hello world") == (
        "hello …[truncated]", True)
    assert Privacy(capture="metadata").text("hello world") == (None, False)


@pytest.mark.parametrize(("capture", "prompt", "response"), [
    ("full", "Mail [REDACTED_EMAIL] about it", "Hello, world!"),
    ("truncated", "Mail …[truncated]", "Hell …[truncated]"),
    ("metadata", None, None),
])
async def test_levels_end_to_end(fake: FakeOllama, start_proxy: StartProxy,
                                 http: aiohttp.ClientSession, tmp_path: Any, capture: str,
                                 prompt: str | None, response: str | None) -> None:
    settings = AnalyticsConfig.build(analytics_dir=str(tmp_path), analytics_capture=capture,
                                     analytics_truncate_chars=4)
    proxy = await start_proxy(fake.url, analytics=settings)
    body = (b'{"model":"llama3.2","stream":false,"messages":[{"role":"system","content":'
            b'"secret system"},{"role":"user","content":"Mail bob@example.com about it"}]}')
    async with http.post(proxy.url + "/api/chat", data=body) as resp:
        assert resp.status == 200
    (r,) = await records(proxy, http, 1)
    assert (r["prompt"], r["response"], r["capture"]) == (prompt, response, capture)
    assert "bob@example.com" not in str(r)
    if capture == "metadata":
        assert r["system"] is None
        assert r["messages"] == [{"role": "system", "content": None},
                                 {"role": "user", "content": None}]
        assert r["prompt_tokens"] == 26  # numbers are kept at every level


async def test_prompt_text_never_in_info_logs(fake: FakeOllama, start_proxy: StartProxy,
                                              http: aiohttp.ClientSession, tmp_path: Any,
                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    fake.scenarios["dies:latest"] = Scenario(drop_after=1)
    proxy = await start_proxy(fake.url, analytics=AnalyticsConfig.build(
        analytics_dir=str(tmp_path)))
    for model in ("llama3.2", "dies", "missing"):
        async with http.post(proxy.url + "/api/generate", data=b'{"model":"%s","prompt":'
                             b'"my very private words"}' % model.encode()) as resp:
            with contextlib.suppress(aiohttp.ClientPayloadError):  # "dies" cuts the reply
                await resp.read()
    await records(proxy, http, 3)
    assert not [r for r in caplog.records if "private words" in r.getMessage()]


# Every text-bearing field a record can hold, each seeded alone with `seed`: a marker word next to
# an e-mail address. A field stored unredacted keeps the address; a field kept at `metadata` keeps
# the marker. The whole record is walked, so a field added without privacy fails here.
Seeded = tuple[str, dict[str, Any], dict[str, Any]]  # (route, request body, Scenario fields)


def _chat(*messages: dict[str, Any], **body: Any) -> Seeded:
    return "/api/chat", {"model": "seeded", "stream": False,
                         "messages": [*messages, {"role": "user", "content": "go on"}], **body}, {}


def _call(**function: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": "", "tool_calls": [{"function": function}]}


SEEDED: dict[str, Callable[[str], Seeded]] = {
    "system prompt": lambda s: _chat({"role": "system", "content": s}),
    "message content": lambda s: _chat({"role": "user", "content": s}),
    "content part": lambda s: _chat({"role": "user", "content": [{"type": "text", "text": s}]}),
    "image URL": lambda s: _chat({"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"https://img.example/{s}"}}]}),
    "message thinking": lambda s: _chat({"role": "assistant", "content": "", "thinking": s}),
    "unknown role": lambda s: _chat({"role": s, "content": "hi"}),
    "tool call arguments": lambda s: _chat(_call(name="f", arguments={"to": s})),
    "tool call argument key": lambda s: _chat(_call(name="f", arguments={s: 1})),
    "tool call arguments text": lambda s: _chat(_call(name="f", arguments=f'{{"to": "{s}"}}')),
    "tool call name": lambda s: _chat(_call(name=s, arguments={})),
    "tool call id": lambda s: _chat({"role": "assistant", "content": "", "tool_calls": [
        {"id": s, "type": "function", "function": {"name": "f", "arguments": "{}"}}]}),
    "tool message name": lambda s: _chat({"role": "tool", "content": "42", "name": s}),
    "tool message tool_name": lambda s: _chat({"role": "tool", "content": "42", "tool_name": s}),
    "tool message tool_call_id": lambda s: _chat({"role": "tool", "content": "42",
                                                  "tool_call_id": s}),
    "options stop": lambda s: _chat(options={"stop": [s]}),
    "options string": lambda s: _chat(options={"temperature": s}),
    "generate prompt": lambda s: ("/api/generate", {"model": "seeded", "prompt": s,
                                                    "stream": False}, {}),
    "generate system": lambda s: ("/api/generate", {"model": "seeded", "prompt": "hi",
                                                    "system": s, "stream": False}, {}),
    "embedding input": lambda s: ("/api/embed", {"model": "seeded", "input": ["a", s]}, {}),
    "reply": lambda s: ("/api/generate", {"model": "seeded", "prompt": "hi", "stream": False},
                        {"tokens": ["ok ", s]}),
    "reply thinking": lambda s: ("/api/generate", {"model": "seeded", "prompt": "hi"},
                                 {"thinking": [s]}),
    "reply tool call": lambda s: (*_chat()[:2], {"tool_calls": [
        {"function": {"name": "f", "arguments": {"to": s}}}]}),
    "reply tool call name": lambda s: (*_chat()[:2], {"tool_calls": [
        {"function": {"name": s, "arguments": {}}}]}),
    "error": lambda s: ("/api/generate", {"model": "seeded", "prompt": "hi"},
                        {"error_before": (500, f"failed: {s}")}),
}


def _strings(value: Any) -> Iterator[str]:
    """Every string in a stored record: values and keys, at any depth."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)


@pytest.mark.parametrize("capture", ["full", "truncated", "metadata"])
@pytest.mark.parametrize("where", SEEDED)
async def test_every_field_is_redacted_and_metadata_keeps_none(
        fake: FakeOllama, start_proxy: StartProxy, http: aiohttp.ClientSession, tmp_path: Any,
        where: str, capture: str) -> None:
    marker, secret = "zqmarkzq", "eve.seed@example.org"
    route, body, scenario = SEEDED[where](f"{marker}:{secret}")
    fake.scenarios["seeded:latest"] = Scenario.from_json(scenario)
    proxy = await start_proxy(fake.url, analytics=AnalyticsConfig.build(
        analytics_dir=str(tmp_path), analytics_capture=capture))
    async with http.post(proxy.url + route, json=body) as resp:
        await resp.read()
    (r,) = await records(proxy, http, 1)
    stored = list(_strings(r))
    assert not [s for s in stored if secret in s], r  # redacted at every level
    kept = [s for s in stored if marker in s]
    assert bool(kept) == (capture != "metadata"), r  # stored, unless at `metadata`
