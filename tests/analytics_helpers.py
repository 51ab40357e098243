"""Helpers for analytics tests: read records back through the proxy's own HTTP API."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from helpers import RunningProxy


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
