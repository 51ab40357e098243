"""describe(): an exception met while talking to Ollama, as one clean line for people.

aiohttp's texts carry its internals (`Cannot connect to host … ssl:default [Connect call failed
(…)]`, a multi-line `400, message='Bad status line …'`). The proxy's error replies, its log,
the record's `error` field and `status` show this line instead: what failed, where, and the
operating system's reason in its own words, e.g. `cannot connect to 127.0.0.1:11435 (connection
refused)`. A pure function, so any layer above may call it.
"""

from __future__ import annotations

import asyncio
import os
import socket

import aiohttp

from ..printable import printable

MAX_CHARS = 300


def _first_line(text: object) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return " ".join((lines[0] if lines else "").split())


def _reason(error: BaseException | None) -> str:
    """The operating system's reason, lower case (`connection refused`)."""
    if isinstance(error, socket.gaierror):
        return "name not resolved"
    if isinstance(error, (TimeoutError, asyncio.TimeoutError)):
        return "timed out"
    if isinstance(error, OSError) and (error.errno or error.strerror):
        # asyncio's strerror is `Connect call failed ('127.0.0.1', 1)`: the errno says it better.
        text = os.strerror(error.errno) if error.errno else str(error.strerror)
        return text[:1].lower() + text[1:]
    if error is None:
        return "no reason given"
    return _first_line(error) or type(error).__name__


def _short(text: str) -> str:
    text = printable(" ".join(text.split()))
    return text if len(text) <= MAX_CHARS else text[:MAX_CHARS - 1] + "…"


def describe(exc: BaseException) -> str:
    """One line saying what went wrong, without library internals; never empty."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        where = f"{exc.host}:{exc.port}"
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return _short(f"timed out connecting to {where}")
        return _short(f"cannot connect to {where} ({_reason(exc.os_error)})")
    if isinstance(exc, (aiohttp.ConnectionTimeoutError, aiohttp.ServerTimeoutError,
                        asyncio.TimeoutError, TimeoutError)):
        return "timed out"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    if isinstance(exc, aiohttp.ClientResponseError):
        message = _first_line(exc.message) or f"HTTP {exc.status}"
        return _short(f"invalid HTTP reply: {message}")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return _short(f"the reply's body broke off: {_first_line(exc) or 'no reason given'}")
    if isinstance(exc, aiohttp.ClientOSError):
        return _short(f"connection failed ({_reason(exc)})")
    if isinstance(exc, OSError) and (exc.errno or exc.strerror):
        return _short(_reason(exc))
    return _short(_first_line(exc) or type(exc).__name__)
