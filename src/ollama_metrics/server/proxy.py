"""The catch-all forwarder: every method and path to Ollama and back, untouched and unbuffered.

Contract:
- Request bodies stream to the upstream as they arrive. Only a JSON body on a route that names a
  model, and no larger than `max_parse_bytes`, is read first so it can be parsed (for the model,
  stream flag and prompt); blob uploads and everything else are never held in memory. Bodies
  held for parsing share a budget (twice `max_parse_bytes`, held until their exchange ends): one
  that does not fit goes on unread, like a larger one, and is marked. Bodies above
  `PARSE_INLINE` are parsed on a thread of their own, one at a time, so the loop serves other
  requests between parses; bodies above `PARSE_APART` in a process of their own (parsing.py:
  orjson holds the GIL while it parses, about 12 ms a MB of small messages, so on a thread a
  30 MB chat held the loop for 0.4 s), which sends back only what a record keeps of them.
- Replies stream back chunk by chunk with their status, reason, headers and bytes unchanged, less
  hop-by-hop headers. A reply keeps its Content-Length when it had one and is chunked otherwise.
- Host is rewritten to the upstream's authority (Ollama's loopback Host check would 403 a LAN
  name); Origin and Authorization pass unchanged.
- No total timeout. A client that goes away cancels the handler (the server runs with handler
  cancellation), which closes the upstream connection, which is how Ollama learns to stop.
- On shutdown, exchanges in flight get the shutdown grace to finish; then they are cut.
- Copies of reply bytes go to a ReplyReader after each write; the finished Interaction goes to the
  observers. Nothing observed can delay or fail the forwarded exchange.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from ..config import Config
from ..observe.categorize import categorize
from ..observe.interaction import ErrorType, Interaction, Outcome
from ..ollama.errors import describe
from ..ollama.request import read_request
from ..ollama.wire import Kind, expects_done, reply_reader, route
from ..printable import printable
from ..settings import masked_in
from .connection import BAD_BODY, bad_body
from .errors import error_reply
from .parsing import ParseProcess
from .relay import relay_body

log = logging.getLogger(__name__)

# RFC 9110 §7.6.1 connection-specific fields, plus those this hop recomputes (Host, framing) and
# Expect (the server already answered 100-continue to the client).
_HOP_BY_HOP = frozenset((
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
    "te", "trailer", "transfer-encoding", "upgrade", "host", "content-length", "expect",
))
_PROMPT_KINDS = (Kind.GENERATE, Kind.OPENAI, Kind.OPENAI_EVENTS, Kind.EMBED, Kind.OPENAI_EMBED)
_WHOLE = 1 << 16  # request bodies read whole up to this size are sent as one bytes object
_SLICE = 1 << 18  # larger ones in slices of this size
PARSE_INLINE = 1 << 16  # request bodies up to this size are parsed on the loop: a thread hop
# costs more than their parse
PARSE_APART = 1 << 20  # larger ones in a process of their own: on a thread, their parse would
# hold the loop's GIL for more than about 12 ms


class Observer(Protocol):
    """Sees each exchange: `started` once the request is read (its return value comes back as
    `token`), `finished` once the reply is over. Both run on the request path: keep them cheap,
    never block, never raise."""

    def started(self, interaction: Interaction) -> object: ...

    def finished(self, interaction: Interaction, token: object) -> None: ...


class InFlight(Protocol):
    """Exchanges served beside the proxy's handler (the data plane, fast.py), which shutdown
    waits for within the same grace and then cuts."""

    @property
    def active(self) -> Collection[object]: ...

    def drained(self) -> asyncio.Future[None]: ...

    def cut(self, why: str) -> None: ...


class ProxyResponse(web.StreamResponse):
    """A relayed reply. `upstream_server` tells the prepare hook whether a Server header is ours.

    Headers are held back until the first body bytes so both leave in one write, as they left
    Ollama (it writes nothing until the first token); `_relay` flushes them at once when the
    upstream sent headers alone.
    """

    _send_headers_immediately = False
    upstream_server: bool = False


async def strip_own_server_header(request: web.Request, response: web.StreamResponse) -> None:
    """aiohttp adds `Server: Python/… aiohttp/…`; Ollama sends none. Keep only the upstream's."""
    if not (isinstance(response, ProxyResponse) and response.upstream_server):
        response.headers.popall("Server", None)


def filter_headers(headers: Mapping[str, str]) -> CIMultiDict[str]:
    """A copy of `headers` without hop-by-hop fields or those named by Connection."""
    drop: frozenset[str] | set[str] = _HOP_BY_HOP
    connection = headers.get("Connection")
    if connection:
        drop = _HOP_BY_HOP | {t.strip().lower() for t in connection.split(",")}
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in headers.items():
        if key.lower() not in drop:
            out.add(key, value)
    return out


def new_interaction(method: str, path: str, remote: str | None,
                    header: Callable[[str], str | None]) -> tuple[Interaction, Kind]:
    """The Interaction of a request just read (`header` looks up its headers), and its kind."""
    endpoint, kind = route(path)
    return Interaction(
        method=method,
        path=path,
        endpoint=endpoint,
        started_at=time.time(),
        started=time.perf_counter(),
        client_ip=remote,
        user_agent=header("User-Agent"),
        traceparent=header("traceparent"),
        tracestate=header("tracestate"),
        stream=kind.streams_by_default,
    ), kind


class Proxy:
    def __init__(
        self,
        config: Config,
        session: Callable[[], aiohttp.ClientSession],
        observers: Sequence[Observer],
        keep_messages: int = 100,
    ) -> None:
        self._config = config
        self._keep_messages = keep_messages  # of a body parsed apart: all a record keeps
        self._session = session
        self._observers = tuple(observers)
        # Credentials in the upstream URL go as our own Authorization header (replacing a
        # client's, which is meant for us, not Ollama's gateway): aiohttp refuses a request
        # with both the header and credentials in its URL.
        self._base = str(config.upstream.with_user(None)).rstrip("/")
        self._auth = None if config.upstream.user is None else aiohttp.encode_basic_auth(
            config.upstream.user, config.upstream.password or "")
        self._upstream_name = config.upstream_shown
        self._parse_cap = config.max_parse_bytes
        self._parse_budget = 2 * config.max_parse_bytes  # bytes of bodies held for parsing at once
        self._parse_held = 0
        self._parser: ThreadPoolExecutor | None = None  # started with the first large body
        self._parser_apart = ParseProcess()  # started with the first huge one
        self._inflight: set[asyncio.Task[Any]] = set()  # handlers of exchanges in flight
        self._cutting = False
        self.plane: InFlight | None = None  # the data plane (fast.py), when it serves

    @property
    def auth(self) -> str | None:
        """The Authorization header sent to Ollama in place of the client's, if any."""
        return self._auth

    @property
    def parse_cap(self) -> int:
        return self._parse_cap

    async def on_shutdown(self, app: web.Application) -> None:
        """Give exchanges in flight the shutdown grace to finish, then cut them.

        Runs once the listening socket is closed and idle connections are told to close. Left
        to itself, aiohttp waits the grace for handlers, then as long again after cancelling only
        their request bodies (which a streaming reply no longer reads), so a long stream would
        hold shutdown for twice the grace. A cut stream ends without its final chunk, so the
        client can tell, and the exchange is still recorded.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._config.shutdown_grace
        plane = self.plane
        while (self._inflight or (plane is not None and plane.active)) and (
                left := deadline - loop.time()) > 0:
            waits: set[asyncio.Future[Any]] = set(self._inflight)
            if plane is not None and plane.active:
                waits.add(plane.drained())
            await asyncio.wait(waits, timeout=left)
        if self._inflight or (plane is not None and plane.active):
            self._cutting = True
            for task in self._inflight:
                task.cancel()
            if plane is not None:
                plane.cut(self.cut_message)
            if self._inflight:
                await asyncio.wait(set(self._inflight), timeout=5.0)
        elif plane is not None:
            plane.cut(self.cut_message)  # nothing in flight: closes the idle upstream pool
        if self._parser is not None:
            self._parser.shutdown(wait=False)
            self._parser = None
        await self._parser_apart.close()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None  # aiohttp runs each request's handler in a task of its own
        self._inflight.add(task)
        held = [0]  # bytes of the parse budget this exchange holds, until it ends
        try:
            return await self._handle(request, held)
        finally:
            self._inflight.discard(task)
            self.release(held)

    async def _handle(self, request: web.Request, held: list[int]) -> web.StreamResponse:
        coding = request.headers.get("Transfer-Encoding")
        if coding is not None and coding.strip().lower() != "chunked":
            # aiohttp lets an empty or layered coding (`gzip, chunked`) through, reading such a
            # body as absent or as plain chunks. Ollama (Go) refuses both, and reading either
            # differently from the next hop is how requests get smuggled: refuse as Go does,
            # and close, so no byte after these headers is read as another request.
            response = web.Response(status=501, text="Unsupported transfer encoding")
            response.force_close()
            return response
        if coding is not None and "Content-Length" in request.headers:
            # Both framings at once is the classic smuggling probe (RFC 9112 §6.1 lets a server
            # refuse it): refuse and close, so neither reading reaches Ollama.
            response = web.Response(status=400, text="Content-Length with Transfer-Encoding")
            response.force_close()
            return response
        i, kind = new_interaction(request.method, request.path, request.remote,
                                  request.headers.get)
        try:
            body = await self._request_body(request, kind, i, held)
        except BAD_BODY as exc:
            return bad_body(exc)  # never reached Ollama: nothing to record
        tokens = self.begin(i)
        try:
            return await self._exchange(request, kind, body, i)
        except asyncio.CancelledError:
            i.outcome = Outcome.CANCELLED
            if self._cutting:
                i.error = self.cut_message
            raise
        finally:
            self.end(i, kind, tokens)

    @property
    def cut_message(self) -> str:
        return f"cut short by the proxy's shutdown after {self._config.shutdown_grace}s"

    def begin(self, i: Interaction) -> list[object]:
        """Show the observers an exchange whose request was read; their tokens for `end`."""
        return [o.started(i) for o in self._observers]

    def end(self, i: Interaction, kind: Kind, tokens: list[object]) -> None:
        """Close `i` and hand it to the observers; an observer's fault is logged, never raised."""
        i.ended = time.perf_counter()
        i.ended_at = time.time()
        if kind in _PROMPT_KINDS:
            i.prompt_category = categorize(i.prompt or "")
        i.apply_caps()
        for observer, token in zip(self._observers, tokens, strict=True):
            try:
                observer.finished(i, token)
            except Exception:  # an observer's fault must not become the client's
                log.exception("observer %s failed on %s %s", type(observer).__name__,
                              i.method, i.endpoint)

    async def _request_body(
        self, request: web.Request, kind: Kind, i: Interaction, held: list[int]
    ) -> bytearray | AsyncIterator[bytes | memoryview] | aiohttp.StreamReader | None:
        if not request.body_exists:
            return None
        length = request.content_length
        if not kind.reads_request:
            i.request_bytes = length or 0
            return request.content
        if length is not None and not self.hold(length, held):
            i.request_bytes = length
            i.capped.add("request_json")
            return request.content
        # Read up to the cap; a body that turns out larger goes on as a stream, unparsed. One
        # growing buffer, not a list of chunks joined at the end: a 20 MB body is held once.
        body = bytearray()
        while len(body) <= self._parse_cap:
            chunk = await request.content.readany()
            if not chunk:
                i.request_bytes = len(body)
                await self._parse(body, i)
                return body
            body += chunk
            if length is None and not self.hold(len(body) - held[0], held):
                break  # chunked, and past what the budget has left
        i.request_bytes = length or 0
        i.capped.add("request_json")
        return _chain(body, request.content)

    def hold(self, size: int, held: list[int]) -> bool:
        """Take `size` bytes of the parse budget for this exchange, if it has them."""
        if size > self._parse_cap - held[0] or self._parse_held + size > self._parse_budget:
            return False
        self._parse_held += size
        held[0] += size
        return True

    async def _parse(self, body: bytearray, i: Interaction) -> None:
        if len(body) <= PARSE_INLINE:
            read_request(body, i)
            return
        if len(body) > PARSE_APART and await self._parse_apart(body, i):
            return
        if self._parser is None:
            self._parser = ThreadPoolExecutor(1, thread_name_prefix="request-parse")
        await asyncio.get_running_loop().run_in_executor(self._parser, read_request, body, i)

    async def _parse_apart(self, body: bytearray, i: Interaction) -> bool:
        """Parse `body` in the parse process; False if that could not be done (then the caller
        parses it on the thread)."""
        fields = await self._parser_apart.parse(body, self._keep_messages, i.stream)
        if fields is None:
            return False
        i.capped |= fields.pop("capped")
        for name, value in fields.items():
            setattr(i, name, value)
        return True

    async def _exchange(
        self,
        request: web.Request,
        kind: Kind,
        body: bytearray | AsyncIterator[bytes | memoryview] | aiohttp.StreamReader | None,
        i: Interaction,
    ) -> web.StreamResponse:
        headers = filter_headers(request.headers)
        if self._auth is not None:
            headers["Authorization"] = self._auth
        data: bytes | AsyncIterator[bytes | memoryview] | aiohttp.StreamReader | None
        if isinstance(body, bytearray):
            # A body read whole goes on with its exact length. A large one goes as slices of
            # the buffer: handed over whole, aiohttp would copy it, then copy it again to join
            # it to the headers, tripling a 20 MB request in memory.
            headers["Content-Length"] = str(len(body))
            data = bytes(body) if len(body) <= _WHOLE else _slices(body)
        else:
            data = body
            if request.content_length is not None and body is not None:
                headers["Content-Length"] = str(request.content_length)  # uploads un-chunked
        target = request.raw_path
        if not target.startswith("/"):
            # Absolute form (`GET http://host/path`, RFC 9112 §3.2.2): Ollama serves its own
            # paths whatever the authority says, and the whole URL glued onto the upstream's
            # would name another host or port.
            target = request.rel_url.raw_path_qs
        url = URL(self._base + target, encoded=True)
        try:
            upstream = await self._session().request(
                request.method, url, headers=headers, data=data, allow_redirects=False
            )
        except aiohttp.ConnectionTimeoutError:
            return self._fail(i, ErrorType.TIMEOUT, 504, f"timed out connecting to Ollama at "
                              f"{self._upstream_name}")
        except aiohttp.ClientConnectorError as exc:
            return self._fail(i, ErrorType.CONNECT, 502, f"cannot reach Ollama at "
                              f"{self._upstream_name}: {describe(exc.os_error or exc)}")
        except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
            return self._fail(i, ErrorType.TIMEOUT, 504, f"Ollama at {self._upstream_name} did "
                              "not answer in time")
        except (aiohttp.ClientError, OSError, ValueError) as exc:  # ValueError: unsendable URL
            broken = request.content.exception()
            if isinstance(broken, BAD_BODY):
                # The client's body broke its framing midway through the upload; Ollama got a
                # request cut short, which it drops. The fault and the answer are the client's.
                i.outcome, i.error_type, i.http_status = Outcome.ERROR, ErrorType.HTTP_4XX, 400
                i.error = str(broken)
                return bad_body(broken)
            return self._fail(i, ErrorType.RESET, 502, f"connection to Ollama at "
                              f"{self._upstream_name} failed: {describe(exc)}")
        try:
            return await self._relay(request, upstream, kind, i)
        finally:
            upstream.close()  # no-op after a full read; otherwise drops the connection

    async def _relay(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        kind: Kind,
        i: Interaction,
    ) -> web.StreamResponse:
        i.http_status = status = upstream.status
        response = ProxyResponse(status=status, reason=upstream.reason)
        response.headers.extend(filter_headers(upstream.headers))
        response.upstream_server = "Server" in upstream.headers
        length = upstream.headers.get("Content-Length")
        if length is not None and length.isdigit():
            response.content_length = int(length)
        content_type = upstream.headers.get("Content-Type", "")
        reader = reply_reader(content_type, i, self._parse_cap)
        try:
            await response.prepare(request)
            await relay_body(request, response, upstream, reader, i,
                             fast=not self._config.idle_timeout)
            reader.close()
            self.settle(i, kind, content_type, status)
            await response.write_eof()
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError,
                aiohttp.ClientOSError, asyncio.TimeoutError) as exc:
            reader.close()
            i.outcome = Outcome.UPSTREAM_ERROR
            if isinstance(exc, asyncio.TimeoutError):
                i.error_type = ErrorType.TIMEOUT
                i.error = f"Ollama sent nothing for {self._config.idle_timeout}s mid-reply"
            else:
                i.error_type = ErrorType.RESET
                i.error = f"Ollama closed the reply early: {describe(exc)}"
            await _abort(request, response)
        except ConnectionResetError:  # the client went away
            reader.close()  # what passed is counted, as for a reply cut short upstream
            i.outcome = Outcome.CANCELLED
        except asyncio.CancelledError:
            reader.close()
            raise
        return response

    @staticmethod
    def settle(i: Interaction, kind: Kind, content_type: str, status: int) -> None:
        """Decide the outcome of a reply that was relayed to its end."""
        if status >= 400:
            i.outcome = Outcome.ERROR
            i.error_type = ErrorType.HTTP_5XX if status >= 500 else ErrorType.HTTP_4XX
            if i.error is None:
                i.error = f"HTTP {status}"
        elif i.error is not None:
            i.outcome, i.error_type = Outcome.ERROR, ErrorType.STREAM_ERROR
        elif not i.done and expects_done(kind, content_type):
            i.outcome, i.error_type = Outcome.ERROR, ErrorType.STREAM_ERROR
            i.error = "stream ended without its final message"

    def _fail(self, i: Interaction, error_type: ErrorType, status: int, message: str
              ) -> web.Response:
        return error_reply(i.path, status, *self.failed(i, error_type, status, message))

    def failed(self, i: Interaction, error_type: ErrorType, status: int, message: str
               ) -> tuple[str, str]:
        """Mark `i` as failed on Ollama's side and log it: the message and code to answer."""
        message = masked_in(message, self._config.upstream)
        i.outcome, i.error_type, i.error, i.http_status = (
            Outcome.UPSTREAM_ERROR, error_type, message, status)
        log.warning("%s %s: %s", i.method, printable(i.path), printable(message))
        return message, f"ollama_{error_type.value}"

    def release(self, held: list[int]) -> None:
        """Give back the parse budget an exchange held."""
        self._parse_held -= held[0]
        held[0] = 0


async def _abort(request: web.Request, response: web.StreamResponse) -> None:
    """End a reply the upstream cut short so the client can tell: no final chunk, just a close.

    close(), not abort(): what was already written, headers included, is flushed first.
    """
    with contextlib.suppress(ConnectionResetError):
        await response.write(b"")
    if request.transport is not None:
        request.transport.close()
    response.force_close()


async def _slices(data: bytearray) -> AsyncIterator[memoryview]:
    view = memoryview(data)
    for at in range(0, len(view), _SLICE):
        yield view[at:at + _SLICE]


async def _chain(head: bytearray, rest: aiohttp.StreamReader
                 ) -> AsyncIterator[bytes | memoryview]:
    async for part in _slices(head):
        yield part
    async for chunk in rest.iter_any():
        yield chunk
