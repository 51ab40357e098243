"""Shared by the failure-mode tests (tests/test_fm_*.py), the 25 failure modes of
shared/reference/failure-modes.md, each a test against the real proxy.

One test (or group) per numbered scenario, `test_fmNN_…`, its docstring quoting the expected
behaviour. Behaviour is tested on the in-process proxy (`start_proxy`, the app and runner
settings `serve` uses); what is about the process -- RSS, file descriptors, signals, raw sockets
-- on `python -m ollama_metrics serve` as a child process. Long scenarios are time-scaled: an
idle timeout of 2 s stands for minutes, gaps of 0.5 s for seconds; each docstring says how.
"""

from __future__ import annotations

import asyncio
import calendar
import time
from pathlib import Path
from typing import Any

import aiohttp

from ollama_metrics.analytics.settings import AnalyticsConfig

NDJSON = "application/x-ndjson"
JSON_UTF8 = "application/json; charset=utf-8"
SSE = "text/event-stream"


def _analytics(tmp_path: Path, **settings: Any) -> AnalyticsConfig:
    return AnalyticsConfig.build(analytics_dir=str(tmp_path), **settings)


def _go_epoch(stamp: str) -> float:
    """Epoch seconds of Go's RFC 3339 (nanoseconds, Z) created_at, as the fake writes it."""
    whole, _, frac = stamp.rstrip("Z").partition(".")
    return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + float("0." + (frac or "0"))


def _post(path: str, body: bytes, *extra: bytes) -> bytes:
    """A raw HTTP/1.1 POST with a Content-Length."""
    return (b"POST %s HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n%s\r\n%s" % (path.encode(), len(body), b"".join(extra), body))


async def _search(http: aiohttp.ClientSession, url: str, n: int, **params: str
                  ) -> list[dict[str, Any]]:
    """The `n` records a proxy process has stored (waiting for them to be written)."""
    deadline = time.monotonic() + 10
    while True:
        async with http.get(url + "/analytics/search", params=params) as resp:
            found: list[dict[str, Any]] = (await resp.json())["results"]
        if len(found) >= n or time.monotonic() > deadline:
            assert len(found) == n, found
            return found
        await asyncio.sleep(0.05)



def _percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]



async def _fake_requests(http: aiohttp.ClientSession, fake_url: str) -> list[dict[str, Any]]:
    async with http.get(fake_url + "/_fake/requests") as resp:
        found: list[dict[str, Any]] = await resp.json()
        return found
