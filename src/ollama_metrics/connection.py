"""What the proxy adds to aiohttp's handling of each client connection.

- **A body whose framing breaks fails.** aiohttp's C parser (3.14) drops a request body whose
  chunked framing breaks after the body has begun (`5\\r\\nhello\\r\\nzz\\r\\n`): it reports the
  error as a new, queued message and never tells the body already handed to the handler, so
  the handler, and Ollama behind it, would wait for the rest of the body until the client gave
  up. Here the body in progress fails with the error, as the pure-Python parser does (with its
  own HttpProcessingError first), so the proxy answers 400 and Ollama drops its half request.
- **A request head must arrive within the header timeout** (`--header-timeout`), counted from
  its first byte, as nginx's client_header_timeout does. aiohttp has no such limit, so a
  client sending its head a byte at a time would hold a connection (and a descriptor) for an
  hour. Idle keep-alive connections, bodies however slow, and replies however long are not
  timed: only a head that has begun and not ended, and a connection is closed for it only
  between replies, never during one.

`Runner` gives every connection a wrapper around its parser that sees each read. It needs
aiohttp's connection to keep its parser in `_parser`, and tells an idle connection by its
`_waiter` as aiohttp's keep-alive timer does; if a future aiohttp moves the first, a warning says
so once and connections run unguarded; without the second, no head is ever timed out. Either
way tests/test_hostile_http.py fails.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import StreamReader
from aiohttp.web import RequestPayloadError
from aiohttp.web_exceptions import HTTPBadRequest
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger("ollama_metrics")

_warned = False

# What reading a request body raises when the body broke its framing: aiohttp's C parser's
# error as this module delivers it, or the pure-Python parser's own.
BAD_BODY = (RequestPayloadError, HttpProcessingError)


class _HeadClock:
    """Closes connections whose request head began over `timeout` seconds ago and has not
    ended. One timer per server sweeps the heads in progress (usually none: a head almost always
    arrives in one read), so a connection costs nothing here unless its head is slow, and one
    that closes mid-head is let go at the next sweep."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._period = min(1.0, timeout / 4)
        self._loop = asyncio.get_running_loop()
        self._heads: dict[RequestHandler, float] = {}  # connection -> when its head began
        self._timer: asyncio.TimerHandle | None = None

    def begin(self, handler: RequestHandler) -> None:
        self._heads.setdefault(handler, self._loop.time())
        if self._timer is None:
            self._timer = self._loop.call_later(self._period, self._sweep)

    def end(self, handler: RequestHandler) -> None:
        self._heads.pop(handler, None)

    def _sweep(self) -> None:
        now = self._loop.time()
        for handler, since in list(self._heads.items()):
            if handler.transport is None:  # closed meanwhile
                del self._heads[handler]
            elif now - since >= self.timeout and _idle(handler):
                # Not while a reply is going out: a partial pipelined head, or a stray CRLF
                # after a body, must not cut the reply in flight. Once it is done, this head
                # has had its time.
                del self._heads[handler]
                log.debug("closing a connection whose request head took more than %ss to "
                          "arrive", self.timeout)
                handler.force_close()
        self._timer = self._loop.call_later(self._period, self._sweep) if self._heads else None


def _idle(handler: RequestHandler) -> bool:
    """Waiting for its next request, as aiohttp's keep-alive timer tells it."""
    waiter = getattr(handler, "_waiter", None)
    return waiter is not None and not waiter.done()


class _Guard:
    """Delegates to aiohttp's request parser; fails the body in progress when the parser
    raises, and starts the head clock when a read holds only the beginning of a head."""

    __slots__ = ("_body", "_clock", "_handler", "_in_head", "_parser")

    def __init__(self, parser: Any, handler: RequestHandler, clock: _HeadClock | None) -> None:
        self._parser = parser
        self._handler = handler
        self._clock = clock
        self._body: StreamReader | None = None  # the last body the parser began
        self._in_head = False  # on the head clock

    def feed_data(self, data: bytes) -> Any:
        body = self._body
        in_body = body is not None and not body.is_eof()
        try:
            result = self._parser.feed_data(data)
        except HttpProcessingError as exc:
            self._body = None
            if in_body and body is not None and body.exception() is None:
                body.set_exception(RequestPayloadError(f"bad request body: {exc.message}"), exc)
                # Ended too (reads still raise): aiohttp would otherwise linger to drain the
                # body after the 400, and log the error it finds there as unhandled.
                body.feed_eof()
            raise
        messages = result[0]
        if messages:
            self._body = messages[-1][1]
            if self._in_head and self._clock is not None:
                self._in_head = False
                self._clock.end(self._handler)
        elif (data and not in_body and not self._in_head and self._clock is not None
              and data.strip(b"\r\n")):
            # Bytes outside any body (not just the CRLF llhttp allows between requests), and
            # no request from them yet: a head has begun. A head whose first bytes share a read
            # with the end of the request before is timed from its next read; one that then
            # goes silent is an idle connection to aiohttp's keep-alive timer (an hour).
            self._in_head = True
            self._clock.begin(self._handler)
        return result

    def message_consumed(self) -> None:  # once a request: spared the __getattr__ lookup
        self._parser.message_consumed()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._parser, name)


def _guard(handler: RequestHandler, clock: _HeadClock | None) -> None:
    global _warned
    parser = getattr(handler, "_parser", None)
    if parser is not None and callable(getattr(parser, "feed_data", None)):
        handler._parser = _Guard(parser, handler, clock)  # type: ignore[assignment]
    elif not _warned:
        _warned = True
        log.warning("this aiohttp keeps no request parser where expected: a chunked request "
                    "body whose framing breaks midway waits for the client to close, and "
                    "request heads have no timeout")


class _Server(web.Server):
    header_timeout: float | None = None
    _clock: _HeadClock | None = None

    def __call__(self) -> RequestHandler:
        handler = super().__call__()
        if self._clock is None and self.header_timeout is not None:
            self._clock = _HeadClock(self.header_timeout)
        _guard(handler, self._clock)
        return handler


class Runner(web.AppRunner):
    """An AppRunner whose connections fail a request body when its framing breaks, and close
    when a request head takes longer than `header_timeout` seconds (None: no limit)."""

    def __init__(self, app: web.Application, *, header_timeout: float | None = None,
                 **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.header_timeout = header_timeout

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _Server  # the protocol factory is all that changes
        assert isinstance(server, _Server)
        server.header_timeout = self.header_timeout
        return server


def bad_body(exc: Exception) -> web.Response:
    """The answer to a request body that broke its own framing: 400, and the connection closes
    (nothing after a broken body can be read as the next request)."""
    response = web.Response(status=HTTPBadRequest.status_code, text=str(exc))
    response.force_close()
    return response
