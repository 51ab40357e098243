"""Ollama's control routes: the one client for asking Ollama (or the proxy) about itself.

`/api/version`, `/api/tags` and `/api/ps` are read here and nowhere else, in two forms:
asynchronously over the proxy's upstream session (the health check, the supervisor, the model
labels and the /api/ps gauges), and blocking over one urllib opener for the command line
(`status`, the probe, `top`), which ignores http_proxy and friends: these are local addresses.
What their answers hold (model names, loaded models, Go's timestamps) is read here too.
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from yarl import URL

from ..settings import masked_in
from .names import normalize_model

if TYPE_CHECKING:  # the command line reads these routes without importing aiohttp
    import aiohttp


class Unanswered(Exception):
    """Ollama did not answer a control route sensibly; the message says how."""


async def get(session: aiohttp.ClientSession, base: URL, route: str, timeout: float) -> Any:
    """The parsed JSON of GET base/route; Unanswered unless it is a 200 with a JSON object."""
    import aiohttp
    import orjson

    from .errors import describe

    try:
        async with session.get(base.joinpath(route),
                               timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise Unanswered(f"GET /{route} answered {resp.status}")
            parsed = orjson.loads(body)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, orjson.JSONDecodeError) as exc:
        raise Unanswered(masked_in(describe(exc), base)) from None
    if not isinstance(parsed, dict):
        raise Unanswered(f"GET /{route} answered something else than a JSON object")
    return parsed


@dataclass(frozen=True)
class Health:
    ok: bool
    version: str | None = None
    error: str | None = None


async def health(session: aiohttp.ClientSession, base: URL, timeout: float = 3.0) -> Health:
    """Whether Ollama answers GET /api/version, and with which version."""
    try:
        body = await get(session, base, "api/version", timeout)
    except Unanswered as exc:
        return Health(False, error=str(exc))
    version = body.get("version")
    return Health(True, version=version if isinstance(version, str) else None)


async def model_names(session: aiohttp.ClientSession, base: URL) -> list[str] | None:
    """The names Ollama lists in /api/tags, or None when it does not answer sensibly."""
    try:
        body = await get(session, base, "api/tags", 10.0)
    except Unanswered:
        return None
    names: list[str] = []
    for m in body.get("models") or []:
        if isinstance(m, dict):
            names.extend(normalize_model(v) for v in (m.get("name"), m.get("model"))
                         if isinstance(v, str))
    return names


async def running(session: aiohttp.ClientSession, base: URL) -> dict[str, dict[str, Any]]:
    """The models /api/ps lists, by name; Unanswered when Ollama does not answer."""
    return by_name((await get(session, base, "api/ps", 5.0)).get("models"))


# --- blocking, for the command line ---

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def open_url(url: URL | str | urllib.request.Request, timeout: float) -> Any:
    """urlopen through the one opener that never goes through an HTTP proxy."""
    return _opener.open(url if isinstance(url, urllib.request.Request) else str(url),
                        timeout=timeout)


def get_json(url: URL | str, timeout: float = 3.0,
             headers: Mapping[str, str] | None = None) -> tuple[int, Any]:
    """(status, parsed JSON body or None). Raises OSError when nothing answers."""
    request = urllib.request.Request(str(url), headers=dict(headers or {}))
    try:
        with open_url(request, timeout) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            status, body = exc.code, exc.read()
    try:
        return status, json.loads(body)
    except ValueError:
        return status, None


def running_now(base: URL, timeout: float = 3.0) -> dict[str, dict[str, Any]]:
    """The models /api/ps at `base` lists, by name; empty when it does not answer."""
    try:
        status, body = get_json(base.joinpath("api/ps"), timeout)
    except OSError:
        return {}
    return by_name(body.get("models")) if status == 200 and isinstance(body, dict) else {}


# --- what the answers hold ---

def by_name(models: Any) -> dict[str, dict[str, Any]]:
    """The well-formed entries of an /api/ps (or /api/tags) `models` list, by model name."""
    seen: dict[str, dict[str, Any]] = {}
    for m in models if isinstance(models, list) else ():
        if isinstance(m, dict):
            name = m.get("model") or m.get("name")
            if isinstance(name, str) and name:
                seen[normalize_model(name)] = m
    return seen


# Go's RFC 3339 with up to nine fractional digits, which datetime (3.10) does not read.
_GO_TIME = re.compile(r"^(.{19})(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$")


def parse_go_time(text: str) -> float | None:
    """Seconds since the epoch of a Go time.Time in JSON, or None when unreadable."""
    m = _GO_TIME.match(text)
    if m is None:
        return None
    base, fraction, zone = m.groups()
    try:
        moment = datetime.fromisoformat(base + ("+00:00" if zone == "Z" else zone))
    except ValueError:
        return None
    return moment.timestamp() + (float("0." + fraction) if fraction else 0.0)


def expires_at(model: Mapping[str, Any]) -> float | None:
    """When Ollama will unload a model of /api/ps, in epoch seconds (None if it does not say)."""
    value = model.get("expires_at")
    return parse_go_time(value) if isinstance(value, str) else None
