"""What is happening now: requests in flight and the latest completions, for `top` and the page.

An observer like the others: `started` puts the Interaction in the in-flight table, `finished`
moves a short summary of it to a bounded ring. Nothing here is stored or holds prompt text; the
snapshot is computed when someone asks (GET /analytics/live), never per request. Every value kept
or shown is bounded (model names arrive capped, see interaction.CAPS), and so is the snapshot:
at most `keep` recent entries and `shown` (ACTIVE_SHOWN) requests in flight (`active_count` has
them all).

With several workers, each publishes what `published()` returns (its own requests, as plain
JSON) and the worker asked merges the others' into its snapshot (`others`): the requests in
flight of every worker, counted in `active_count`, their latest completions and rates.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from typing import Any

from .interaction import Interaction
from .metrics import status_label

RATE_WINDOW = 60.0  # seconds over which per-model rates are computed
ACTIVE_SHOWN = 1000  # requests in flight listed in a snapshot, the longest-running first


class Live:
    def __init__(self, keep: int = 500, shown: int = ACTIVE_SHOWN) -> None:
        self.shown = shown
        self._active: dict[str, Interaction] = {}
        self._recent: deque[dict[str, Any]] = deque(maxlen=keep)
        self.changes = 0  # counts starts and ends: a publisher writes only after a change

    def started(self, i: Interaction) -> object:
        self._active[i.id] = i
        self.changes += 1
        return None

    def finished(self, i: Interaction, token: object) -> None:
        self._active.pop(i.id, None)
        self.changes += 1
        self._recent.append({
            "id": i.id,
            "model": i.model,
            "endpoint": i.endpoint,
            "status": status_label(i.outcome),
            "http_status": i.http_status,
            "ended_at": i.ended_at,
            "duration": i.duration,
            "ttft": i.ttft,
            "prompt_tokens": i.prompt_eval_count,
            "completion_tokens": i.eval_count,
            "tokens_per_second": i.tokens_per_second,
        })

    @property
    def in_flight(self) -> int:
        return len(self._active)

    def published(self) -> dict[str, Any]:
        """This process's requests, for the other workers to merge (bounded like a snapshot)."""
        clock = time.perf_counter()
        active: list[dict[str, Any]] = [{
            "id": i.id,
            "model": i.model,
            "endpoint": i.endpoint,
            "stream": i.stream,
            "elapsed": clock - i.started,
            "ttft": i.ttft,
            # Ollama streams about one token a chunk; the exact count comes with the last one.
            "chunks": i.chunks,
        } for i in list(self._active.values())]
        active.sort(key=lambda a: -a["elapsed"])
        count = len(active)
        del active[self.shown:]
        return {"time": time.time(), "active": active, "active_count": count,
                "recent": list(self._recent)}

    def snapshot(self, recent: int = 20, others: Iterable[dict[str, Any]] = ()
                 ) -> dict[str, Any]:
        own = self.published()
        now = own["time"]
        active, count, done = own["active"], own["active_count"], own["recent"]
        merged = False
        for other in others:  # published a moment ago: their requests have run that much more
            lag = max(0.0, now - other["time"])
            active.extend({**a, "elapsed": a["elapsed"] + lag} for a in other["active"])
            count += other["active_count"]
            done.extend(other["recent"])
            merged = True
        if merged:
            active.sort(key=lambda a: -a["elapsed"])
            del active[self.shown:]
            done.sort(key=lambda r: r["ended_at"] or 0)
        window = [r for r in done if (r["ended_at"] or 0) >= now - RATE_WINDOW]
        models: dict[str, dict[str, Any]] = {}
        for r in window:
            # No model: null, which every view writes as its one word for it (units.MISSING).
            m = models.setdefault(r["model"] or "", {
                "model": r["model"] or None, "requests": 0, "errors": 0, "tokens": 0})
            m["requests"] += 1
            m["errors"] += r["status"] == "error"
            m["tokens"] += r["completion_tokens"] or 0
        for m in models.values():
            m["requests_per_second"] = m["requests"] / RATE_WINDOW
            m["tokens_per_second"] = m["tokens"] / RATE_WINDOW
        return {
            "time": now,
            "active": active,
            "active_count": count,
            "recent": done[-recent:][::-1] if recent > 0 else [],
            "models": sorted(models.values(), key=lambda m: -m["requests"]),
            "window_seconds": RATE_WINDOW,
        }
