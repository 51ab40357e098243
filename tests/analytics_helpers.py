"""Helpers for analytics tests: a seeded data set, and reading records back through the
proxy's own HTTP API."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp

from helpers import RunningProxy
from ollama_metrics.analytics.stores import FIELD_NAMES
from ollama_metrics.analytics.stores.sqlite import SqliteStore


async def records(proxy: RunningProxy, http: aiohttp.ClientSession, n: int,
                  timeout: float = 5.0, headers: dict[str, str] | None = None,
                  **params: str) -> list[dict[str, Any]]:
    """Wait until the store holds exactly `n` records matching `params` (more may still be on
    their way, or fewer after a purge); returns them, newest first."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    found: list[dict[str, Any]] = []
    while True:
        async with http.get(proxy.url + "/analytics/search", params={"limit": "1000", **params},
                            headers=headers or {}) as resp:
            assert resp.status == 200, await resp.text()
            found = (await resp.json())["results"]
        if len(found) == n or loop.time() > deadline:
            assert len(found) == n, found
            return found
        await asyncio.sleep(0.02)


T0 = 1_700_000_000.0


def record(n: int, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {name: None for name in FIELD_NAMES}
    base.update(id=f"rec{n:05d}", started_at=T0 + n, ended_at=T0 + n + 1, method="POST",
                path="/api/chat", endpoint="/api/chat", model="llama3.2:latest", stream=True,
                http_status=200, outcome="success", prompt=f"question number {n}",
                response=f"answer number {n}", prompt_category="question", duration=float(n),
                ttft=n / 10, prompt_tokens=10, completion_tokens=n, truncated=False,
                capture="full", image_count=0)
    base.update(fields)
    return base


async def _seed(directory: Path, records: list[dict[str, Any]]) -> None:
    store = SqliteStore(directory / "interactions.db")
    await store.open()
    await store.write_batch(records)
    await store.close()


DATA = [record(n) for n in range(1, 21)] + [
    record(21, model="qwen3:latest", prompt="summarize the meeting notes",
           prompt_category="summarize", response="The team agreed", duration=100.0),
    record(22, model="qwen3:latest", outcome="error", http_status=500, error="runner crashed",
           prompt="translate hello", prompt_category="translate"),
    record(23, model="qwen3:latest", outcome="upstream_error", http_status=502,
           endpoint="/api/generate", path="/api/generate", prompt="explain tides",
           prompt_category="explain"),
    record(24, outcome="cancelled", prompt="write a poem about the sea",
           prompt_category="creative", response="The sea, the sea"),
]
