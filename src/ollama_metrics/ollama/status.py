"""`status`: is the proxy up, is Ollama up, their versions, the loaded models, where data goes.

Asks the running proxy (its /test route and /api/ps through it); when no proxy answers, asks the
configured Ollama address directly, so the report also says what runs without the proxy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from yarl import URL

from .. import units
from ..config import Config
from . import control, probe
from .passthrough import proxy_url


@dataclass(frozen=True)
class Status:
    proxy_url: URL
    proxy: probe.Answer
    ollama_url: str
    ollama_up: bool
    ollama_version: str | None = None
    ollama_error: str | None = None
    models: list[dict[str, Any]] = field(default_factory=list)
    metrics_url: str = ""
    analytics: Any = None

    @property
    def ok(self) -> bool:
        return self.proxy.who is probe.Who.PROXY and self.ollama_up


def _loaded(base: URL, up: bool) -> list[dict[str, Any]]:
    return list(control.running_now(base).values()) if up else []


def gather(config: Config) -> Status:
    url = proxy_url(config)
    proxy = probe.identify(url)
    metrics_url = str(url.with_path(config.metrics_path))
    if proxy.who is probe.Who.PROXY:
        up = proxy.health.get("upstream") or {}
        reachable = bool(up.get("reachable"))
        return Status(url, proxy, str(up.get("url")), reachable, up.get("version"),
                      up.get("error"), _loaded(url, reachable), metrics_url,
                      proxy.health.get("analytics"))
    direct = probe.identify(config.upstream)
    reachable = direct.who is probe.Who.OLLAMA
    return Status(url, proxy, config.upstream_shown, reachable, direct.version,
                  None if reachable else f"{direct.who.value} answers there",
                  _loaded(config.upstream, reachable), metrics_url)


def _model_line(m: dict[str, Any], now: float) -> str:
    name = units.shorten(m.get("model") or m.get("name") or units.MISSING, 80)
    size, vram = m.get("size"), m.get("size_vram")
    where = ""
    if isinstance(size, (int, float)) and isinstance(vram, (int, float)) and size > 0:
        where = f", {round(100 * vram / size)}% GPU"
    expires = control.expires_at(m)
    left = units.until(expires - now) if expires is not None else None
    until = ("" if left is None else ", kept loaded forever" if left == "forever"
             else f", unloads in {left}")
    return f"{name} ({units.size(size)}{where}, context {m.get('context_length', '?')}{until})"


def _analytics(reported: Any) -> str:
    if not isinstance(reported, dict) or not isinstance(reported.get("backends"), list):
        return "not reported by this proxy"
    if not reported["backends"]:
        return "off (nothing is recorded)"
    return ", ".join(f"{b} in {reported.get('dir')}" if b in ("sqlite", "jsonl") else str(b)
                     for b in reported["backends"])


def render(s: Status, now: float | None = None) -> list[str]:
    now = time.time() if now is None else now
    if s.proxy.who is probe.Who.PROXY:
        proxy = f"running at {s.proxy_url} (ollama-metrics {s.proxy.version})"
    elif s.proxy.who is probe.Who.NOTHING:
        proxy = f"not running at {s.proxy_url}; start it with `ollama-metrics serve`"
    elif s.proxy.who is probe.Who.OLLAMA:
        proxy = (f"not running: Ollama {s.proxy.version} itself answers at {s.proxy_url}, so "
                 "requests there are not measured (`ollama-metrics serve` explains the way out)")
    else:
        proxy = f"not running: another program answers at {s.proxy_url}"
    if s.ollama_up:
        ollama = f"up at {s.ollama_url} (version {s.ollama_version or 'unknown'})"
    else:
        ollama = f"not answering at {s.ollama_url}" + (f": {s.ollama_error}"
                                                        if s.ollama_error else "")
    lines = [f"proxy      {proxy}", f"ollama     {ollama}"]
    if s.ollama_up:
        models = [_model_line(m, now) for m in s.models] or ["none loaded"]
        lines += [f"{'models' if i == 0 else '':<11}{m}" for i, m in enumerate(models)]
    if s.proxy.who is probe.Who.PROXY:
        lines.append(f"metrics    {s.metrics_url}")
        lines.append(f"analytics  {_analytics(s.analytics)}")
    return lines
