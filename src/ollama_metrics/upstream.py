"""The one connection pool to Ollama, and what the proxy asks Ollama for itself.

One ClientSession for the process: pooled keep-alive connections with no limit on their number
(Ollama queues requests itself), no total timeout, no cookie jar, no automatic headers,
decompression or redirects, so what the client sent is what Ollama sees.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import aiohttp
import orjson

from .config import Config
from .labels import ModelLabels

log = logging.getLogger(__name__)

# Headers aiohttp would otherwise invent for a request that lacked them.
_NO_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")


def open_session(config: Config) -> aiohttp.ClientSession:
    timeout = aiohttp.ClientTimeout(
        total=None, connect=None, sock_connect=config.connect_timeout,
        sock_read=config.idle_timeout)
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=_NO_AUTO_HEADERS,
        trust_env=False,
        read_bufsize=2**18,
        max_line_size=65536,
        max_field_size=65536,
    )


@dataclass(frozen=True)
class Health:
    ok: bool
    version: str | None = None
    error: str | None = None


async def check(session: aiohttp.ClientSession, config: Config, timeout: float = 3.0) -> Health:
    """Whether Ollama answers GET /api/version, and with which version."""
    url = config.upstream.joinpath("api/version")
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            body = await resp.read()
            if resp.status != 200:
                return Health(False, error=f"GET /api/version answered {resp.status}")
            version = orjson.loads(body).get("version")
            return Health(True, version=version if isinstance(version, str) else None)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, orjson.JSONDecodeError,
            AttributeError) as exc:
        return Health(False, error=str(exc) or type(exc).__name__)


async def model_names(session: aiohttp.ClientSession, config: Config) -> list[str] | None:
    """The names Ollama lists in /api/tags, or None when it does not answer sensibly."""
    url = config.upstream.joinpath("api/tags")
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
            if resp.status != 200:
                return None
            models = orjson.loads(await resp.read()).get("models") or []
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, orjson.JSONDecodeError,
            AttributeError):
        return None
    names: list[str] = []
    for m in models:
        if isinstance(m, dict):
            names.extend(v for v in (m.get("name"), m.get("model")) if isinstance(v, str))
    return names


async def refresh_models(session: aiohttp.ClientSession, config: Config, labels: ModelLabels
                         ) -> None:
    """Keep the model label set in step with /api/tags, forever (cancel to stop)."""
    while True:
        names = await model_names(session, config)
        if names is not None:
            labels.set_known(names)
        else:
            log.debug("could not list models at %s", config.upstream)
        await asyncio.sleep(config.model_refresh or 60.0)
