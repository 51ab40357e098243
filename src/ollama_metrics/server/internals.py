"""Every part of aiohttp the proxy uses that is not aiohttp's API, named here and only here.

aiohttp has no public hook for what connection.py and relay.py do, so they reach into it through
the accessors below. pyproject.toml pins aiohttp to the minor series these were verified on
(`VERIFIED`); tests/test_internals.py checks each one against the installed aiohttp and fails
when one changes. What the proxy's safety depends on is checked again at start
(`connection.verify`), and the proxy refuses to start without it (`Unsupported`); the speed-up
may fall back, and says so in the log.

Required: the request guard and the header timeout (connection.py)
- `RequestHandler._parser`: the connection's request parser. The guard wraps it to see every
  read. Without it, a chunked body whose framing breaks midway waits for the client to give up
  (aiohttp's C parser loses that error), and request heads have no timeout.
- `RequestHandler._waiter`: set while the connection waits for its next request (aiohttp's own
  keep-alive timer reads it the same way). The head clock closes a connection only then, never
  during a reply; without it no head would ever time out.
- A `web.Server` instance takes a subclass as its class, and aiohttp calls its `__call__` (the
  protocol factory, once a connection) and its `connection_made` / `connection_lost` (from
  each RequestHandler, at accept and at close): where the guard is installed on each
  connection and its head clock started and stopped.

Optional: the streaming fast path (relay.py); without any of these, replies take the plain relay
- aiohttp's C response parser (`HttpResponseParser` is not `HttpResponseParserPy`): it stops the
  moment reading pauses; the pure-Python one can park the last read of a reply.
- A `StreamReader` instance takes a subclass as its class, and the parser feeds the reply through
  its `feed_data`, `feed_eof`, `set_exception` and `begin_/end_http_chunk_receiving`, counting
  `total_bytes`: the subclass forwards each chunk from inside those calls.
- `client_proto.ResponseHandler.pause_reading` / `resume_reading` on the reply's connection, and
  `writing_paused` on the client's: reading from Ollama pauses while the client is behind.
"""

from __future__ import annotations

from typing import Any

import aiohttp
from aiohttp import http_parser
from aiohttp.web_protocol import RequestHandler

VERIFIED = "3.14"  # the aiohttp minor series all of the above was verified on
PIN = "aiohttp>=3.14.5,<3.15"  # as pyproject.toml says


class Unsupported(RuntimeError):
    """The installed aiohttp lacks an internal the proxy's safety needs."""

    def __init__(self, missing: str) -> None:
        super().__init__(
            f"aiohttp {aiohttp.__version__} lacks {missing}, which the proxy needs for its "
            f"request guard and header timeout; it will not run without them. Install the "
            f"aiohttp it was verified with: pip install '{PIN}'")
        self.missing = missing


def request_parser(handler: RequestHandler) -> Any | None:
    """The connection's request parser, None if aiohttp no longer keeps it there."""
    return getattr(handler, "_parser", None)


def set_request_parser(handler: RequestHandler, parser: Any) -> None:
    handler._parser = parser


def awaiting_request(handler: RequestHandler) -> bool:
    """Waiting for its next request, as aiohttp's keep-alive timer tells it."""
    waiter = handler._waiter
    return waiter is not None and not waiter.done()


def has_waiter(handler: RequestHandler) -> bool:
    try:
        handler._waiter  # noqa: B018  (only whether aiohttp still keeps it)
    except AttributeError:
        return False
    return True


def switch_class(obj: object, cls: type) -> bool:
    """Give `obj` the class `cls` (a subclass of its own that adds no state); False if
    Python refuses (another layout)."""
    try:
        obj.__class__ = cls
    except TypeError:
        return False
    return True


def c_response_parser() -> bool:
    return http_parser.HttpResponseParser is not http_parser.HttpResponseParserPy
