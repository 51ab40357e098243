"""What the proxy adds to aiohttp's handling of each client connection.

- **A body whose framing breaks fails.** aiohttp's C parser (3.14) drops a request body whose
  chunked framing breaks after the body has begun (`5\\r\\nhello\\r\\nzz\\r\\n`): it reports the
  error as a new, queued message and never tells the body already handed to the handler, so
  the handler, and Ollama behind it, would wait for the rest of the body until the client gave
  up. Here the body in progress fails with the error, as the pure-Python parser does (with its
  own HttpProcessingError first), so the proxy answers 400 and Ollama drops its half request.
- **A request head must arrive within the header timeout** (`--header-timeout`), as nginx's
  client_header_timeout does: a new connection's first head counted from accept, so one that
  sends nothing is closed too, and a later head on a keep-alive connection from its first
  byte. aiohttp has no such limit, so a client sending nothing, or its head a byte at a time,
  would hold a connection (and a descriptor) for an hour. Idle keep-alive connections (left to
  aiohttp's keep-alive timer), bodies however slow, and replies however long are not timed,
  and a connection is closed for its head only between replies, never during one.

`Runner` gives every connection a wrapper around its parser that sees each read, through the
aiohttp internals named in internals.py. `verify` checks at start that they are there; without
them the proxy does not run (a connection that still cannot be guarded is closed, not served).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection
from typing import Any, Protocol

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import StreamReader
from aiohttp.web import RequestPayloadError
from aiohttp.web_exceptions import HTTPBadRequest
from aiohttp.web_protocol import RequestHandler

from . import internals
from .internals import Unsupported

log = logging.getLogger("ollama_metrics")

_unguarded_logged = False

# What reading a request body raises when the body broke its framing: aiohttp's C parser's
# error as this module delivers it, or the pure-Python parser's own.
BAD_BODY = (RequestPayloadError, HttpProcessingError)


class Plane(Protocol):
    """The data plane (fast.py): it takes each new connection and hands aiohttp the ones it
    does not serve, through `make_handler`."""

    @property
    def clients(self) -> Collection[Any]: ...

    def connection(self, make_handler: Callable[[], RequestHandler], clock: _HeadClock | None
                   ) -> asyncio.Protocol: ...

    def pre_shutdown(self) -> None: ...


class _HeadClock:
    """Closes connections whose request head began over `timeout` seconds ago and has not
    ended. One timer per server sweeps the heads in progress; a connection costs a dict entry
    from accept to its first request (well under a microsecond), and a later head one only if it
    is slow. The dict is in order of beginning, so a sweep looks only at the heads overdue and
    the first one not: 10,000 silent connections cost it nothing until they are due."""

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
        overdue = []
        for handler, since in self._heads.items():  # oldest first
            if now - since < self.timeout:
                break
            overdue.append(handler)
        for handler in overdue:
            if handler.transport is None:  # closed meanwhile
                del self._heads[handler]
            elif _awaiting(handler):
                # Not while a reply is going out: a partial pipelined head, or a stray CRLF
                # after a body, must not cut the reply in flight. Once it is done, this head
                # has had its time.
                del self._heads[handler]
                log.debug("closing a connection whose request head took more than %ss to "
                          "arrive", self.timeout)
                handler.force_close()
        self._timer = self._loop.call_later(self._period, self._sweep) if self._heads else None


def _awaiting(handler: Any) -> bool:
    """Whether closing the connection cuts no reply: a data plane connection says so itself."""
    awaiting = getattr(handler, "awaiting_head", None)
    return bool(awaiting()) if awaiting is not None else internals.awaiting_request(handler)


class _Guard:
    """Delegates to aiohttp's request parser; fails the body in progress when the parser
    raises, and starts the head clock when a read holds only the beginning of a head (a new
    connection is on the clock from accept until its first request)."""

    __slots__ = ("_body", "_clock", "_handler", "_in_head", "_parser")

    def __init__(self, parser: Any, handler: RequestHandler, clock: _HeadClock | None) -> None:
        self._parser = parser
        self._handler = handler
        self._clock = clock
        self._body: StreamReader | None = None  # the last body the parser began
        self._in_head = clock is not None  # on the head clock (from accept, for a new one)

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


def _guard(handler: RequestHandler, clock: _HeadClock | None) -> bool:
    """Wrap the connection's parser; False if this aiohttp keeps none where expected."""
    parser = internals.request_parser(handler)
    if parser is None or not callable(getattr(parser, "feed_data", None)):
        return False
    internals.set_request_parser(handler, _Guard(parser, handler, clock))
    return True


class _Server(web.Server):
    """aiohttp's Server (the switch of class in `Runner.setup` is all that changes): guards
    each connection it makes, and times its first head from accept."""

    header_timeout: float | None = None
    plane: Plane | None = None  # the data plane, which hands aiohttp what it does not serve
    _clock: _HeadClock | None = None

    def __call__(self) -> Any:  # RequestHandler, or the data plane's connection
        if self._clock is None and self.header_timeout is not None:
            self._clock = _HeadClock(self.header_timeout)
        if self.plane is not None:
            return self.plane.connection(self._handler, self._clock)
        return self._handler()

    @property
    def connections(self) -> list[Any]:
        """aiohttp's connections and the data plane's."""
        return [*super().connections, *(self.plane.clients if self.plane is not None else ())]

    def pre_shutdown(self) -> None:
        super().pre_shutdown()
        if self.plane is not None:
            self.plane.pre_shutdown()

    def _handler(self) -> RequestHandler:
        global _unguarded_logged
        handler = super().__call__()
        if not _guard(handler, self._clock):
            # verify() passed at start, so this should not happen; if it does, the
            # connection closes unserved rather than served without the guard.
            handler.force_close()
            if not _unguarded_logged:
                _unguarded_logged = True
                log.error("closing connections: %s", Unsupported("RequestHandler._parser"))
        return handler

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        if self._clock is not None:
            self._clock.begin(handler)

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None
                        ) -> None:
        super().connection_lost(handler, exc)
        if self._clock is not None:
            self._clock.end(handler)


class Runner(web.AppRunner):
    """An AppRunner whose connections fail a request body when its framing breaks, and close
    when a request head takes longer than `header_timeout` seconds (None: no limit)."""

    def __init__(self, app: web.Application, *, header_timeout: float | None = None,
                 plane: Plane | None = None, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.header_timeout = header_timeout
        self.plane = plane

    async def setup(self) -> None:
        await super().setup()
        server = self.server
        assert server is not None
        if not internals.switch_class(server, _Server):
            raise Unsupported("a web.Server whose class can be switched to a subclass")
        assert isinstance(server, _Server)
        server.header_timeout = self.header_timeout
        server.plane = self.plane


async def _never(request: web.BaseRequest) -> web.StreamResponse:
    raise AssertionError("the probe connection serves nothing")


_PROBE_REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def verify(server_class: type[web.Server] = web.Server,
           handler_class: type[RequestHandler] = RequestHandler) -> None:
    """Raise Unsupported, naming what is missing, unless this aiohttp lets the guard and head
    clock be installed: checked on a connection built as aiohttp builds one, never connected.
    (The classes are parameters so that the check itself can be tested.)"""
    loop = asyncio.new_event_loop()
    try:
        server = server_class(_never, loop=loop)
        if not internals.switch_class(server, _Server):
            raise Unsupported("a web.Server whose class can be switched to a subclass")
        for hook in ("connection_made", "connection_lost"):
            if not callable(getattr(server_class, hook, None)):
                raise Unsupported(f"web.Server.{hook} (called by each connection)")
        handler = handler_class(server, loop=loop)
        if not internals.has_waiter(handler):
            raise Unsupported("RequestHandler._waiter (set while a connection is idle)")
        if not _guard(handler, None):
            raise Unsupported("RequestHandler._parser (the connection's request parser)")
        guarded: Any = internals.request_parser(handler)
        try:
            messages = guarded.feed_data(_PROBE_REQUEST)[0]
        except Exception as exc:  # any way a changed parser fails is the same answer
            raise Unsupported(f"a request parser that reads requests as 3.14's does ({exc!r})"
                              ) from None
        if len(messages) != 1:
            raise Unsupported("a request parser that returns the requests it read")
    finally:
        loop.close()


def bad_body(exc: Exception) -> web.Response:
    """The answer to a request body that broke its own framing: 400, and the connection closes
    (nothing after a broken body can be read as the next request)."""
    response = web.Response(status=HTTPBadRequest.status_code, text=str(exc))
    response.force_close()
    return response
