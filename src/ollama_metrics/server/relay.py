"""A reply's body relayed to the client chunk by chunk, with the proxy's streaming fast path.

A streamed reply (NDJSON or SSE, chunked) goes out frame by frame. The plain way, a task that
awaits `content.iter_any()` and then `response.write()`, wakes a task and builds futures and
coroutines for every frame: about a third of the proxy's CPU per frame (52 us, now 36).
Here the upstream reply's StreamReader is switched to a subclass whose `feed_data` writes each
chunk to the client's socket the moment aiohttp's parser has decoded it, then tees it to the
ReplyReader. The handler only waits for the end of the reply, or, when the client reads slower
than Ollama writes, for the client's socket to drain: reading from Ollama pauses meanwhile (as
aiohttp's own StreamReader pauses it when its buffer is full), so nothing piles up here.

Contract, the same as the plain path's: bytes and order unchanged, each chunk sent as soon as
it was decoded (what is buffered when the body starts goes out at once, in one write); the
headers leave with the first bytes; the reply's end, an upstream failure or timeout, and a
client gone away reach the handler as they would have through `iter_any()` and `write()`.

It relies on the aiohttp internals internals.py lists under the fast path (checked once, at
import: `UNAVAILABLE` says why not, and the proxy logs it at start). Replies it cannot take (not
chunked, already ended, another reader type, an idle timeout set, or an aiohttp without those)
go the plain way.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.client_proto import ResponseHandler
from aiohttp.streams import StreamReader

from ..observe.interaction import Interaction
from ..ollama.wire import ReplyReader
from . import internals


class _Forwarding(StreamReader):
    """A reply's StreamReader while its chunks are forwarded as they are fed."""

    __slots__ = ()

    def feed_data(self, data: bytes, size: int = 0) -> bool:
        relay = _relays.get(id(self))
        if relay is None:
            return super().feed_data(data, size)
        if data:
            self.total_bytes += len(data)
            relay.forward(data)
        return False

    def feed_eof(self) -> None:
        super().feed_eof()  # runs aiohttp's end-of-reply callbacks: the connection goes back
        relay = _relays.get(id(self))
        if relay is not None:
            relay.end(None)

    def set_exception(self, exc: BaseException, *args: Any) -> None:
        super().set_exception(exc, *args)
        relay = _relays.get(id(self))
        if relay is not None:
            relay.end(exc)

    def begin_http_chunk_receiving(self) -> None:
        if id(self) not in _relays:
            super().begin_http_chunk_receiving()

    def end_http_chunk_receiving(self) -> None:
        if id(self) not in _relays:
            super().end_http_chunk_receiving()


def _unavailable() -> str | None:
    """Why the fast path cannot be used with this aiohttp, None if it can."""
    # The C parser stops the moment reading pauses and keeps the rest for the resume. The
    # pure-Python one (no C extensions) acts on a pause only at its next chunk, so a read that
    # ended on a chunk boundary would be parked in it, unread, until more data came (for the
    # last read of a reply: for ever). The fast path is for the C parser only.
    if not internals.c_response_parser():
        return "aiohttp's C extensions are off"
    if not internals.switch_class(StreamReader.__new__(StreamReader), _Forwarding):
        return "aiohttp's StreamReader no longer takes a subclass as its class"
    return None


UNAVAILABLE = _unavailable()
AVAILABLE = UNAVAILABLE is None  # False: every reply goes the plain way
_relays: dict[int, _Relay] = {}  # id(StreamReader) -> its relay, while it relays


class _Relay:
    __slots__ = ("_client", "_ended", "_error", "_i", "_paused", "_tee", "_transport", "_upstream",
                 "_waiter")

    def __init__(self, transport: asyncio.Transport, request: web.Request,
                 upstream: ResponseHandler, tee: ReplyReader,
                 i: Interaction) -> None:
        self._transport = transport
        self._client = request.protocol
        self._upstream = upstream
        self._tee = tee
        self._i = i
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False  # reading from Ollama paused until the client catches up
        self._ended = False
        self._error: BaseException | None = None

    def forward(self, data: bytes) -> None:
        if self._ended:
            return
        transport = self._transport
        if transport.is_closing():
            self.end(ConnectionResetError("Cannot write to closing transport"))
            return
        now = time.perf_counter()
        transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        self._i.response_bytes += len(data)  # as _send counts
        self._tee.feed(data, now)
        if self._client.writing_paused and not self._paused:
            self._paused = True
            self._upstream.pause_reading()
            self._wake()

    def end(self, error: BaseException | None) -> None:
        if not self._ended:
            self._ended, self._error = True, error
            self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait(self, writer: AbstractStreamWriter) -> None:
        """Until the reply has ended; raises what ended it, if not its end."""
        loop = asyncio.get_running_loop()
        while not self._ended:
            if self._paused:
                await writer.drain()  # raises if the client goes away meanwhile
                self._paused = False
                self._upstream.resume_reading()
                continue
            self._waiter = loop.create_future()
            await self._waiter
        if self._error is not None:
            raise self._error


async def relay_body(request: web.Request, response: web.StreamResponse,
                     upstream: aiohttp.ClientResponse, tee: ReplyReader, i: Interaction,
                     fast: bool = True) -> None:
    """Relay `upstream`'s body to `response` (prepared), each chunk as it comes, tee'd.

    A chunked reply takes the fast path if `fast`; any other (a Content-Length body, a reply
    already ended, one aiohttp reads some other way) goes the plain way. The proxy passes
    `fast=False` when an idle timeout is set: aiohttp re-arms its read timer on resuming a
    connection even when the parser pauses it again at once, so a client reading slower than
    the timeout would get the reply cut as Ollama's silence, and a pooled connection could
    keep the timer. Raises as the plain way does:
    aiohttp's client errors and timeouts for Ollama's side, ConnectionResetError for the
    client's."""
    body = upstream.content
    if not body.total_bytes and not body.is_eof():
        await response.write(b"")  # nothing to coalesce with: headers go now
    transport = request.transport
    connection = upstream.connection
    if not (fast and AVAILABLE and type(body) is StreamReader and transport is not None
            and connection is not None and connection.protocol is not None
            and response.headers.get("Transfer-Encoding") == "chunked"):
        async for chunk in body.iter_any():
            await _send(response, chunk, tee, i)
        return
    # What arrived with the headers goes first, and the headers with it (they leave together,
    # as they left Ollama). The reader is switched the moment it is found empty, with no await
    # in between, so nothing fed meanwhile can overtake what was already read.
    while chunk := body.read_nowait():
        await _send(response, chunk, tee, i)
    if body.is_eof():
        return
    relay = _Relay(transport, request, connection.protocol, tee, i)
    _relays[id(body)] = relay
    internals.switch_class(body, _Forwarding)  # cannot fail: AVAILABLE checked it
    try:
        await relay.wait(request.writer)
    finally:
        del _relays[id(body)]
        internals.switch_class(body, StreamReader)


async def _send(response: web.StreamResponse, chunk: bytes, tee: ReplyReader, i: Interaction
                ) -> None:
    now = time.perf_counter()
    await response.write(chunk)
    # Counted as delivered, so a reply cut short (by either side) records its part.
    i.response_bytes += len(chunk)
    tee.feed(chunk, now)
