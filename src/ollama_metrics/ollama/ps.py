"""Gauges of what Ollama has loaded, read from /api/ps every `ps_interval` seconds.

One GET /api/ps per poll, with the app's upstream session, straight to Ollama (it never shows up
in the request metrics and does not extend a model's keep-alive). The version is read again only
when Ollama comes back. While Ollama does not answer, `ollama_up` is 0 and the model series are
gone: a model that is not in the latest answer is removed, not left at its last value. The
latest answer is also kept as a `Loaded` snapshot, for the dashboard (GET /analytics/loaded).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge

from ..config import Config
from ..printable import printable
from . import control

log = logging.getLogger(__name__)


def _number(value: Any) -> float | int | None:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


@dataclass
class Loaded:
    """The latest poll: is Ollama up, its version, and the models it has in memory."""

    up: bool = False
    version: str | None = None
    checked_at: float | None = None  # when the latest poll ended, answered or not
    models: list[dict[str, Any]] = field(default_factory=list)

    def update(self, models: dict[str, dict[str, Any]], version: str | None, now: float
               ) -> None:
        self.up, self.version, self.checked_at = True, version, now
        self.models = [{
            "name": name,
            "size": _number(m.get("size")),
            "size_vram": _number(m.get("size_vram")),
            "context_length": _number(m.get("context_length")),
            "expires_at": control.expires_at(m),
        } for name, m in models.items()]

    def down(self, now: float) -> None:
        self.up, self.checked_at, self.models = False, now, []

    def as_json(self) -> dict[str, Any]:
        return {"polling": True, "up": self.up, "version": self.version,
                "checked_at": self.checked_at, "models": self.models}


class ModelGauges:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.up = Gauge("ollama_up", "1 when Ollama answers the proxy's polls, else 0", registry=r)
        self.info = Gauge("ollama_upstream_info", "The version of the Ollama behind the proxy",
                                ["version"], registry=r)
        per_model = [
            ("ollama_model_loaded", "1 for each model Ollama has in memory"),
            ("ollama_model_vram_bytes", "Bytes of the loaded model in GPU memory"),
            ("ollama_model_size_bytes", "Bytes of the loaded model in memory, GPU and CPU"),
            ("ollama_model_expires_in_seconds", "Seconds until Ollama unloads the model"),
            ("ollama_model_context_length", "Context length the model is loaded with"),
        ]
        self.loaded, self.vram, self.size, self.expires, self.context = (
            Gauge(name, doc, ["model"], registry=r) for name, doc in per_model)
        self._models: set[str] = set()
        self._version: str | None = None

    @property
    def _per_model(self) -> tuple[Gauge, ...]:
        return self.loaded, self.vram, self.size, self.expires, self.context

    def down(self) -> None:
        self.up.set(0)
        self._show({})

    def version(self, version: str | None) -> None:
        if version == self._version:
            return
        if self._version is not None:
            self.info.remove(self._version)
        if version is not None:
            self.info.labels(version).set(1)
        self._version = version

    def update(self, models: dict[str, dict[str, Any]], now: float) -> None:
        """Set the gauges from the models of an /api/ps answer."""
        self.up.set(1)
        self._show(models, now)

    def _show(self, models: dict[str, dict[str, Any]], now: float = 0.0) -> None:
        for gone in self._models - models.keys():
            for gauge in self._per_model:
                with contextlib.suppress(KeyError):
                    gauge.remove(gone)
        for name, m in models.items():
            self.loaded.labels(name).set(1)
            for gauge, key in ((self.vram, "size_vram"), (self.size, "size"),
                               (self.context, "context_length")):
                value = m.get(key)
                if isinstance(value, (int, float)):
                    gauge.labels(name).set(value)
            expires = control.expires_at(m)
            if expires is not None:
                self.expires.labels(name).set(max(0.0, expires - now))
        self._models = set(models)


async def poll(session: aiohttp.ClientSession, config: Config, gauges: ModelGauges,
               interval: float, loaded: Loaded) -> None:
    """Keep the gauges and `loaded` in step with /api/ps, forever (cancel to stop)."""
    was_up = False
    version: str | None = None
    while True:
        try:
            models = await control.running(session, config.upstream)
            if not was_up:
                version = (await control.health(session, config.upstream)).version
                gauges.version(version)
            gauges.update(models, time.time())
            loaded.update(models, version, time.time())
            was_up = True
        except control.Unanswered as exc:
            if was_up:
                log.info("Ollama stopped answering /api/ps at %s: %s", config.upstream_shown,
                         printable(str(exc)))
            gauges.down()
            loaded.down(time.time())
            was_up = False
        await asyncio.sleep(interval)


def poller(config: Config, registry: CollectorRegistry,
           session: Callable[[], aiohttp.ClientSession], loaded: Loaded
           ) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup_ctx entry running `poll` while the app runs (after the session is open)."""
    interval = config.ps_interval
    assert interval is not None, "the model gauges are off"
    gauges = ModelGauges(registry)
    gauges.down()

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(poll(session(), config, gauges, interval, loaded))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return ctx
