"""describe(): upstream trouble as one clean line, for the proxy's replies, its records and
`status`. Real sockets: a refused port, an unresolvable name, a server that speaks no HTTP."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest

from conftest import StartProxy
from ollama_metrics.ollama.errors import describe

INTERNALS = ("ssl:default", "message=", "Connect call failed", "Cannot connect to host", "\n")


@pytest.fixture
async def not_http() -> AsyncIterator[int]:
    """A server that answers every connection with a line that is no HTTP status line."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1000)
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\nnot http at all\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


async def _error_of(url: str) -> BaseException:
    async with aiohttp.ClientSession() as session:
        try:
            async with session.get(url) as resp:
                await resp.read()
        except Exception as exc:
            return exc
    raise AssertionError(f"{url} answered")


def _clean(text: str) -> None:
    assert text and text.isprintable(), text
    assert not any(part in text for part in INTERNALS), text


async def test_refused_names_address_and_reason() -> None:
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))  # bound, never listening
    try:
        port = refused.getsockname()[1]
        text = describe(await _error_of(f"http://127.0.0.1:{port}/"))
    finally:
        refused.close()
    assert text == f"cannot connect to 127.0.0.1:{port} (connection refused)"


async def test_unresolvable_name() -> None:
    text = describe(await _error_of("http://nosuchhost.invalid:11435/"))
    assert text == "cannot connect to nosuchhost.invalid:11435 (name not resolved)"


async def test_bad_status_line_is_one_line(not_http: int) -> None:
    exc = await _error_of(f"http://127.0.0.1:{not_http}/")
    assert "\n" in str(exc) or "message=" in str(exc)  # what aiohttp says by itself
    text = describe(exc)
    _clean(text)
    assert text.startswith("invalid HTTP reply: "), text


def test_any_other_exception_is_its_first_line() -> None:
    assert describe(ValueError("first\n\n  second")) == "first"
    assert describe(RuntimeError()) == "RuntimeError"
    assert describe(ValueError("\x1b[31mred")) == "\\x1b[31mred"


async def test_proxy_reply_and_record_carry_the_clean_line(
        start_proxy: StartProxy, not_http: int) -> None:
    proxy = await start_proxy(f"http://127.0.0.1:{not_http}")
    async with aiohttp.ClientSession() as http, \
            http.post(proxy.url + "/api/generate", data=b'{"model":"m","prompt":"x"}') as resp:
        assert resp.status == 502
        error = (await resp.json())["error"]
    error = error["message"] if isinstance(error, dict) else error
    _clean(error)
    assert f"Ollama at http://127.0.0.1:{not_http} failed: invalid HTTP reply" in error, error
