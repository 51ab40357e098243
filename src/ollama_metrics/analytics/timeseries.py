"""Time series for the dashboard's charts: choosing a bucket size and filling in the gaps.

Stores return only the buckets that hold requests (see QueryableStore.timeseries); a chart
needs every bucket of its range, zero where nothing happened. Buckets start at multiples of
`step` since the epoch, so they stay put while a live chart's window slides; the first and last
ones may reach beyond the range, and `seconds` says how much of each lies inside it (divide by
it for rates that do not dip at the edges).
"""

from __future__ import annotations

import math
from typing import Any

from .query import BadQuery

# Round bucket sizes, in seconds; the chosen one gives at most TARGET_POINTS buckets.
STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200,
         86400)
TARGET_POINTS = 120
MAX_POINTS = 10_000
DEFAULT_SPAN = 3600.0  # the range when a request names no start

_EMPTY: dict[str, Any] = {
    "requests": 0, "errors": 0, "cancelled": 0, "error_rate": 0.0, "prompt_tokens": 0,
    "completion_tokens": 0, "latency_p50": None, "latency_p95": None, "ttft_p50": None,
    "ttft_p95": None}


def auto_step(span: float) -> float:
    """The smallest round step that draws `span` seconds in at most TARGET_POINTS buckets (a
    second of slack: `since=1h` measures a hair over an hour by the time it is read)."""
    for step in STEPS:
        if span - 1 <= step * TARGET_POINTS:
            return float(step)
    return float(math.ceil(span / TARGET_POINTS / STEPS[-1]) * STEPS[-1])


def parse_step(raw: str | None, span: float) -> float:
    """`step` from a request (seconds, at least 1), or the automatic one when absent."""
    if raw is None or raw == "":
        return auto_step(span)
    try:
        step = float(raw)
    except ValueError:
        raise BadQuery(f"step: expected seconds, got {raw!r}") from None
    if not math.isfinite(step) or step < 1:
        raise BadQuery(f"step: must be at least 1 second, got {raw!r}")
    if span - 1 > step * MAX_POINTS:
        raise BadQuery(f"step: {raw} s makes {round(span / step)} buckets of the range; at most "
                       f"{MAX_POINTS}: use at least {math.ceil(round(span) / MAX_POINTS)} s")
    return step


def fill(buckets: list[dict[str, Any]], start: float, end: float, step: float
         ) -> list[dict[str, Any]]:
    """Every bucket overlapping [start, end), from the stored ones or empty, oldest first."""
    stored = {round(b["start"] / step): b for b in buckets}
    out = []
    n = math.floor(start / step)
    while n * step < end:
        low = n * step
        point = {**_EMPTY, **stored.get(n, {}), "start": low}
        point["seconds"] = min(end, low + step) - max(start, low)
        out.append(point)
        n += 1
    return out
