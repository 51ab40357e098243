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
  timed: only a head that has begun and not ended.

`Runner` gives every connection a wrapper around its parser that sees each read. It needs
aiohttp's connection to keep its parser in `_parser`; if a future aiohttp moves it, a warning
says so once and connections run unguarded (tests/test_hostile_http.py fails on that).
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


class _Guard:
    """Delegates to aiohttp's request parser; fails the body in progress when the parser
    raises, and closes the connection when a request head outlasts the header timeout."""

    __slots__ = ("_body", "_handler", "_head_since", "_loop", "_parser", "_timeout", "_timer")

    def __init__(self, parser: Any, handler: RequestHandler, timeout: float | None) -> None:
        self._parser = parser
        self._handler = handler
        self._timeout = timeout
        self._loop = asyncio.get_running_loop()
        self._body: StreamReader | None = None  # the last body the parser began
        self._head_since: float | None = None  # when the head being read began
        self._timer: asyncio.TimerHandle | None = None

    def feed_data(self, data: bytes) -> Any:
        body = self._body
        in_body = body is not None and not body.is_eof()
        try:
            result = self._parser.feed_data(data)
        except HttpProcessingError as exc:
            self._body = self._head_since = None
            if in_body and body is not None and body.exception() is None:
                body.set_exception(RequestPayloadError(f"bad request body: {exc.message}"), exc)
                # Ended too (reads still raise): aiohttp would otherwise linger to drain the
                # body after the 400, and log the error it finds there as unhandled.
                body.feed_eof()
            raise
        messages = result[0]
        if messages:
            self._body = messages[-1][1]
            self._head_since = None
        elif data and not in_body and self._head_since is None and self._timeout is not None:
            # Bytes outside any body, and no request from them yet: a head has begun. (When a
            # body ends mid-read and a head begins after it, the clock starts at its next read.)
            self._head_since = self._loop.time()
            if self._timer is None:
                self._timer = self._loop.call_at(self._head_since + self._timeout, self._expire)
        return result

    def _expire(self) -> None:
        self._timer = None
        since = self._head_since
        if since is None or self._timeout is None:
            return
        due = since + self._timeout
        if self._loop.time() < due:  # an earlier head ended in time; this one began later
            self._timer = self._loop.call_at(due, self._expire)
            return
        log.debug("closing a connection whose request head took more than %ss to arrive",
                  self._timeout)
        self._handler.force_close()

    def message_consumed(self) -> None:  # once a request: spared the __getattr__ lookup
        self._parser.message_consumed()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._parser, name)


def _guard(handler: RequestHandler, header_timeout: float | None) -> None:
    global _warned
    parser = getattr(handler, "_parser", None)
    if parser is not None and callable(getattr(parser, "feed_data", None)):
        handler._parser = _Guard(parser, handler, header_timeout)  # type: ignore[assignment]
    elif not _warned:
        _warned = True
        log.warning("this aiohttp keeps no request parser where expected: a chunked request "
                    "body whose framing breaks midway waits for the client to close, and "
                    "request heads have no timeout")


class _Server(web.Server):
    header_timeout: float | None = None

    def __call__(self) -> RequestHandler:
        handler = super().__call__()
        _guard(handler, self.header_timeout)
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
