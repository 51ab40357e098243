"""Gauges of what Ollama has loaded, read from /api/ps every `ps_interval` seconds.

One GET /api/ps per poll, with the app's upstream session, straight to Ollama (it never shows up
in the request metrics and does not extend a model's keep-alive). The version is read again only
when Ollama comes back. While Ollama does not answer, `ollama_up` is 0 and the model series are
gone: a model that is not in the latest answer is removed, not left at its last value. The
latest answer is also kept as a `Loaded` snapshot, for the dashboard (GET /analytics/loaded).

With several workers (server/workers.py) only the main process polls: it publishes each
`Loaded` as a small JSON file, and every worker shows it with `LoadedCollector`, which makes the
same gauges from the snapshot at scrape time (the model series of the latest answer only, as
here: prometheus-client's multiprocess mode cannot remove a series).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

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

    def publish(self, path: Path) -> None:
        """Write the snapshot to `path` for the workers (atomically: they read it any time)."""
        part = path.with_suffix(".part")
        part.write_bytes(orjson.dumps(self.as_json()))
        os.replace(part, path)

    @classmethod
    def read(cls, path: Path) -> Loaded:
        """The snapshot published at `path`; down and never checked before the first poll."""
        try:
            data = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return cls()
        return cls(up=data["up"], version=data["version"], checked_at=data["checked_at"],
                   models=data["models"])


UP = ("ollama_up", "1 when Ollama answers the proxy's polls, else 0")
INFO = ("ollama_upstream_info", "The version of the Ollama behind the proxy")
PER_MODEL = (  # name, help, the Loaded field it shows
    ("ollama_model_loaded", "1 for each model Ollama has in memory", None),
    ("ollama_model_vram_bytes", "Bytes of the loaded model in GPU memory", "size_vram"),
    ("ollama_model_size_bytes", "Bytes of the loaded model in memory, GPU and CPU", "size"),
    ("ollama_model_expires_in_seconds", "Seconds until Ollama unloads the model", "expires_at"),
    ("ollama_model_context_length", "Context length the model is loaded with",
     "context_length"),
)


class LoadedCollector(Collector):
    """The model gauges, made at scrape time from the snapshot `read` returns."""

    def __init__(self, read: Callable[[], Loaded]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        loaded, now = self._read(), time.time()
        up = GaugeMetricFamily(*UP)
        up.add_metric([], 1.0 if loaded.up else 0.0)
        yield up
        info = GaugeMetricFamily(*INFO, labels=["version"])
        if loaded.version is not None:
            info.add_metric([loaded.version], 1.0)
        yield info
        for name, doc, key in PER_MODEL:
            family = GaugeMetricFamily(name, doc, labels=["model"])
            for m in loaded.models:
                value = 1.0 if key is None else m.get(key)
                if key == "expires_at" and value is not None:
                    value = max(0.0, value - now)
                if value is not None:
                    family.add_metric([m["name"]], float(value))
            yield family


class ModelGauges:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.up = Gauge(*UP, registry=r)
        self.info = Gauge(*INFO, ["version"], registry=r)
        self.loaded, self.vram, self.size, self.expires, self.context = (
            Gauge(name, doc, ["model"], registry=r) for name, doc, _ in PER_MODEL)
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


async def poll(session: aiohttp.ClientSession, config: Config, gauges: ModelGauges | None,
               interval: float, loaded: Loaded,
               published: Path | None = None) -> None:
    """Keep the gauges and `loaded` in step with /api/ps, forever (cancel to stop); with
    `published`, write `loaded` there after each poll (Loaded.publish)."""
    was_up = False
    version: str | None = None
    while True:
        try:
            models = await control.running(session, config.upstream)
            if not was_up:
                version = (await control.health(session, config.upstream)).version
                if gauges is not None:
                    gauges.version(version)
            if gauges is not None:
                gauges.update(models, time.time())
            loaded.update(models, version, time.time())
            was_up = True
        except control.Unanswered as exc:
            if was_up:
                log.info("Ollama stopped answering /api/ps at %s: %s", config.upstream_shown,
                         printable(str(exc)))
            if gauges is not None:
                gauges.down()
            loaded.down(time.time())
            was_up = False
        if published is not None:
            try:
                loaded.publish(published)
            except OSError as exc:
                log.warning("cannot publish the /api/ps snapshot to the workers: %s", exc)
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
