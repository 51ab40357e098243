"""The one connection pool to Ollama, and the model names kept in step with /api/tags.

One ClientSession for the process: pooled keep-alive connections with no limit on their number
(Ollama queues requests itself), no total timeout, no cookie jar, no automatic headers,
decompression or redirects, so what the client sent is what Ollama sees.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from ..config import Config
from ..observe.labels import ModelLabels
from . import control

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


async def refresh_models(session: aiohttp.ClientSession, config: Config, labels: ModelLabels
                         ) -> None:
    """Keep the model label set in step with /api/tags, forever (cancel to stop)."""
    while True:
        names = await control.model_names(session, config.upstream)
        if names is not None:
            labels.set_known(names)
        else:
            log.debug("could not list models at %s", config.upstream_shown)
        await asyncio.sleep(config.model_refresh or 60.0)
