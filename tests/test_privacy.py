"""Capture levels, caps and redaction: applied before a record is queued, at every level."""

from __future__ import annotations

import contextlib
import re
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
