"""Request framing errors that would otherwise leave a request hanging.

aiohttp's C parser (3.14) drops a request body whose chunked framing breaks after the body has
begun (`5\\r\\nhello\\r\\nzz\\r\\n`): it reports the error as a new, queued message and never
tells the body already handed to the handler, so the handler, and Ollama behind it, wait for the
rest of the body until the client gives up. (The pure-Python parser fails the body, with its
own HttpProcessingError first.)

`Runner` gives every connection a parser wrapper that does what the pure-Python parser does:
when the parser raises, the body still being read fails with the error, so the proxy answers 400
and Ollama's half-sent request is dropped. The wrapper needs aiohttp's connection to keep its
parser in `_parser`; if a future aiohttp moves it, a warning says so once and the connection runs
unwrapped (tests/test_hostile_http.py fails on that, by design).
"""

from __future__ import annotations

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


class _FailingBody:
    """Delegates to aiohttp's request parser; fails the body in progress when the parser raises."""

    __slots__ = ("_body", "_parser")

    def __init__(self, parser: Any) -> None:
        self._parser = parser
        self._body: StreamReader | None = None  # the last body the parser began

    def feed_data(self, data: bytes) -> Any:
        try:
            result = self._parser.feed_data(data)
        except HttpProcessingError as exc:
            body, self._body = self._body, None
            if body is not None and not body.is_eof() and body.exception() is None:
                body.set_exception(RequestPayloadError(f"bad request body: {exc.message}"), exc)
                # Ended too (reads still raise): aiohttp would otherwise linger to drain the
                # body after the 400, and log the error it finds there as unhandled.
                body.feed_eof()
            raise
        messages = result[0]
        if messages:
            self._body = messages[-1][1]
        return result

    def message_consumed(self) -> None:  # once a request: spared the __getattr__ lookup
        self._parser.message_consumed()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._parser, name)


def _guard(handler: RequestHandler) -> None:
    global _warned
    parser = getattr(handler, "_parser", None)
    if parser is not None and callable(getattr(parser, "feed_data", None)):
        handler._parser = _FailingBody(parser)  # type: ignore[assignment]
    elif not _warned:
        _warned = True
        log.warning("this aiohttp keeps no request parser where expected: a chunked request "
                    "body whose framing breaks midway waits for the client to close")


class _Server(web.Server):
    def __call__(self) -> RequestHandler:
        handler = super().__call__()
        _guard(handler)
        return handler


class Runner(web.AppRunner):
    """An AppRunner whose connections fail a request body when its framing breaks."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _Server  # the protocol factory is all that changes
        return server


def bad_body(exc: Exception) -> web.Response:
    """The answer to a request body that broke its own framing: 400, and the connection closes
    (nothing after a broken body can be read as the next request)."""
    response = web.Response(status=HTTPBadRequest.status_code, text=str(exc))
    response.force_close()
    return response
