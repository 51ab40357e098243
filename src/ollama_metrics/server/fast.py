"""The data plane: proxied requests served on asyncio protocols, without aiohttp in the way.

aiohttp's server and client cost about 200 us of CPU a request before the proxy does anything
(bench/README.md, "Where the time goes": `bare-aiohttp` next to `bare-asyncio`), more than
nginx's whole request. Here a client connection is a plain asyncio Protocol: a request head is
matched whole by one regular expression, the request goes to Ollama on a pooled connection whose
reply httptools (llhttp) parses, and every reply byte is written to the client from the upstream
protocol's own callback, with no task, future or stream reader per request or per frame.

What it serves, and what it leaves to aiohttp:
- It serves the common request: HTTP/1.1, an origin-form target without `%`, `#` or dot
  segments, one of the methods in _METHODS (not HEAD), a head whose every line is well formed
  (token names, no obs-fold, ASCII values without control characters) with at most MAX_FIELDS
  fields and none of _SINGLETON twice, one Host that the Host check allows, no
  Transfer-Encoding, Expect or Upgrade, at most PARSE_INLINE bytes of body, and a path that is
  not one of the proxy's own routes.
- Anything else, on a connection's first request or a later one, goes to aiohttp with every
  byte read since that request began: the connection becomes an aiohttp connection for the rest
  of its life, served by the same app as before (the proxy's handler, the proxy's own routes,
  the Host check's 403, aiohttp's 400s for malformed requests, chunked and large uploads).
- It is off (every connection is aiohttp's) for an upstream that is not plain http or when an
  idle timeout is set; `Plane.usable` says so.

The exchange is the proxy's (proxy.py): the same Interaction, parse budget, observers, outcome
rules, error replies and messages, and what Ollama receives is what aiohttp's client would have
sent (Host first, the client's fields less hop-by-hop ones, Content-Length last, `0` for a body-
less method other than GET, HEAD, OPTIONS, TRACE). The reply keeps its status line and fields
less hop-by-hop ones, its Content-Length or else chunked framing, and gains what aiohttp's server
adds (Content-Type for a body without one, Date when missing, Connection: close when closing).
Its head leaves with the first body bytes that came with it; each later read leaves at once.

A client that reads slower than Ollama writes pauses reading from Ollama until it drains; one
that goes away closes the upstream connection (how Ollama learns to stop) and is recorded as
cancelled. Shutdown (Proxy.on_shutdown) closes idle connections, lets exchanges in flight finish
within the grace and then cuts them. A head that takes longer than the header timeout closes
its connection (the same clock as aiohttp's connections, connection.py); an idle connection
closes after KEEPALIVE seconds, an idle upstream connection after UPSTREAM_KEEPALIVE. A request
on a pooled connection that Ollama closes before replying is sent again on a new one if its
method is idempotent (as aiohttp's client does); an interim (1xx) reply is skipped, as there;
what Ollama sends after a whole reply is not the client's and ends the connection.
"""

from __future__ import annotations

import asyncio
import http
import re
import time
from collections.abc import Callable
from email.utils import formatdate
from typing import Any, Protocol, cast

import httptools
import orjson
from aiohttp import web

from ..config import Config
from ..observe.interaction import ErrorType, Interaction, Outcome
from ..ollama.errors import describe
from ..ollama.request import read_request
from ..ollama.wire import Kind, ReplyReader, reply_reader
from .errors import error_body
from .hosts import HostRule
from .proxy import PARSE_INLINE, Proxy, new_interaction

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
# A request head, whole: request line and fields, each strictly formed, ending in a blank line.
# Field values are ASCII: aiohttp's path reads other bytes as surrogates and does not send them
# on as they came.
_HEAD = re.compile(rb"([A-Z]{1,20}) (/[!-~]*) HTTP/1\.1\r\n((?:" + _TOKEN
                   + rb":[\t\x20-\x7e]*\r\n)*)\r\n")
# What a head served here can begin with (the whole of a short read): TLS, a stray CRLF or a
# lower-case method go to aiohttp at once, as they are read.
_START = re.compile(rb"[A-Z]{1,20}(?: (?:/|$)|$)")
_FIELD = re.compile(rb"(" + _TOKEN + rb"):[\t ]*([^\r\n]*?)[\t ]*\r\n")
MAX_HEAD = 1 << 16  # a head not ended within this many bytes goes to aiohttp (and its limits)
MAX_FIELDS = 100  # aiohttp's server takes 128
READ_AHEAD = 1 << 16  # bytes read beyond the request being served before reading pauses
KEEPALIVE = 3630.0  # as aiohttp's server: idle client connections close after an hour
UPSTREAM_KEEPALIVE = 30.0  # as the aiohttp client's pool (ollama/upstream.py)
SWEEP_EVERY = 5.0
# RFC 9110 §7.6.1 connection-specific fields, plus those this hop recomputes (proxy.py).
_HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
                  b"proxy-authorization", b"te", b"trailer", b"transfer-encoding", b"upgrade",
                  b"host", b"content-length", b"expect"))
_REFUSED = frozenset((b"transfer-encoding", b"expect", b"upgrade"))  # aiohttp's to handle
_SEEN = frozenset((b"user-agent", b"traceparent", b"tracestate"))  # read into the Interaction
# llhttp answers 400 to a method it does not know: only these are served here.
_METHODS = frozenset((b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS"))
# Fields aiohttp's parser refuses to see twice (http_parser.SINGLETON_HEADERS): a 400 there.
_SINGLETON = frozenset((b"content-length", b"content-location", b"content-range",
                        b"content-type", b"etag", b"host", b"max-forwards", b"server",
                        b"transfer-encoding", b"user-agent"))
_NO_LENGTH_WHEN_EMPTY = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE"))
# Sent again, once, when a pooled connection turns out closed before any reply (as aiohttp's
# client does: RFC 9112 §9.3.1): Ollama may close an idle connection as a request sets out.
_IDEMPOTENT = frozenset(("GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"))
_PHRASES = {s.value: s.phrase.encode() for s in http.HTTPStatus}


class Clock(Protocol):
    """The header timeout's clock (connection._HeadClock)."""

    def begin(self, handler: Any) -> None: ...

    def end(self, handler: Any) -> None: ...


_date: list[Any] = [0, b""]
PLANE: web.AppKey[Plane] = web.AppKey("plane")


def http_date() -> bytes:
    """The Date field's value for now, formatted once a second."""
    now = int(time.time())
    if now != _date[0]:
        _date[0], _date[1] = now, formatdate(now, usegmt=True).encode()
    return cast(bytes, _date[1])


class Plane:
    """What the data plane's connections share: the proxy, the upstream pool, the Host rule,
    the proxy's own routes, and the connections and exchanges in flight (for shutdown)."""

    def __init__(self, config: Config, proxy: Proxy, hosts: HostRule | None) -> None:
        self.proxy = proxy
        self.hosts = hosts
        self.usable = config.upstream.scheme == "http" and not config.idle_timeout
        self._own_exact: frozenset[str] = frozenset()
        self._own_prefixes: tuple[str, ...] = ()
        up = config.upstream
        assert up.host is not None or not self.usable
        self.upstream_host = up.host or ""
        self.upstream_port = up.port or 80
        host = f"[{up.host}]" if up.host and ":" in up.host else (up.host or "")
        authority = host if up.is_default_port() else f"{host}:{up.port}"
        self.host_line = b"Host: " + authority.encode("idna" if not host.isascii() else "ascii"
                                                       ) + b"\r\n"
        self.prefix = up.raw_path.rstrip("/").encode()
        self.auth_line = b"" if proxy.auth is None else (
            b"Authorization: " + proxy.auth.encode("latin-1") + b"\r\n")
        self.connect_timeout = config.connect_timeout
        self.upstream_name = config.upstream_shown
        self.pool: list[Upstream] = []
        self.clients: set[Client] = set()
        self.active: set[Exchange] = set()
        self.closing = False
        self.served = 0  # requests this plane served; handed: connections it gave aiohttp
        self.handed = 0
        self._drained: asyncio.Future[None] | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    def own_routes(self, paths: list[str]) -> None:
        """The proxy's own route templates (`/analytics/{id}`): requests for them go to aiohttp."""
        exact, prefixes = set(), []
        for path in paths:
            cut = path.find("{")
            if cut < 0:
                exact.add(path)
            else:
                prefixes.append(path[:cut])
        self._own_exact, self._own_prefixes = frozenset(exact), tuple(prefixes)

    def own(self, path: str) -> bool:
        return path in self._own_exact or path.startswith(self._own_prefixes)

    def connection(self, make_handler: Callable[[], asyncio.Protocol], clock: Clock | None
                   ) -> Client:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(SWEEP_EVERY, self._sweep)
        return Client(self, make_handler, clock)

    def _sweep(self) -> None:
        """Close idle client connections after KEEPALIVE, idle upstream ones after
        UPSTREAM_KEEPALIVE."""
        now = time.monotonic()
        for client in [c for c in self.clients if c.idle_for(now) > KEEPALIVE]:
            client.force_close()
        stale = [u for u in self.pool if now - u.idle_since > UPSTREAM_KEEPALIVE]
        for upstream in stale:
            upstream.close()
        self._sweeper = (asyncio.get_running_loop().call_later(SWEEP_EVERY, self._sweep)
                         if not self.closing else None)

    def ended(self, exchange: Exchange) -> None:
        self.active.discard(exchange)
        if not self.active and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # Shutdown (Proxy.on_shutdown)

    def pre_shutdown(self) -> None:
        """Stop taking requests: idle connections close now, busy ones after their reply."""
        self.closing = True
        for client in list(self.clients):
            if client.idle:
                client.force_close()

    def drained(self) -> asyncio.Future[None]:
        """Done once no exchange is in flight."""
        if self._drained is None or self._drained.done():
            self._drained = asyncio.get_running_loop().create_future()
        if not self.active:
            self._drained.set_result(None)
        return self._drained

    def cut(self, why: str) -> None:
        """End every exchange still in flight, as cut short by the shutdown."""
        for exchange in list(self.active):
            exchange.cut(why)
        for client in list(self.clients):  # a body still arriving: too late to serve it
            if client.exchange is None:
                client.force_close()
        for upstream in self.pool:
            upstream.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def close_all(self) -> None:
        """Close every connection at once (the second Ctrl-C)."""
        for client in list(self.clients):
            client.force_close()


class Client(asyncio.Protocol):
    """One client connection while it is the data plane's (until it is handed to aiohttp)."""

    def __init__(self, plane: Plane, make_handler: Callable[[], asyncio.Protocol],
                 clock: Clock | None) -> None:
        self.plane = plane
        self._make_handler = make_handler
        self._clock = clock
        self.transport: asyncio.Transport | None = None
        self.remote: str | None = None
        self._buf = b""  # read and not yet served: the request in progress and any after it
        # Of _buf: how much was searched for a head's end, and the size its request needs once
        # the head is in, so that a head or body arriving a byte a read is not re-read whole
        # at each read (quadratic: seconds of the loop's CPU for one 64 KiB head).
        self._scanned = 0
        self._want = 0
        self.exchange: Exchange | None = None
        self._close_after = False
        self._reading_paused = False
        self.writing_paused = False
        self._in_head = False  # on the head clock
        self._since = time.monotonic()  # idle since

    @property
    def idle(self) -> bool:
        return self.exchange is None and not self._buf

    def idle_for(self, now: float) -> float:
        return now - self._since if self.idle else 0.0

    def awaiting_head(self) -> bool:
        """For the head clock: no reply is going out, so closing cuts no one's answer."""
        return self.exchange is None

    def force_close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple) else None
        self.plane.clients.add(self)
        if self._clock is not None:  # from accept to the first head, as aiohttp's connections
            self._in_head = True
            self._clock.begin(self)

    def data_received(self, data: bytes) -> None:
        if self._buf:
            self._buf += data
        else:
            self._buf = data
            if (self._clock is not None and not self._in_head and self.exchange is None
                    and data.strip(b"\r\n")):
                self._in_head = True
                self._clock.begin(self)
        if self.exchange is None:
            self._next()
        elif len(self._buf) > READ_AHEAD and not self._reading_paused:
            self._reading_paused = True
            assert self.transport is not None
            self.transport.pause_reading()

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.exchange is not None:
            self.exchange.client_drained()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.plane.clients.discard(self)
        if self._in_head and self._clock is not None:
            self._clock.end(self)
        if self.exchange is not None:
            self.exchange.client_lost()

    def _end_head(self) -> None:
        if self._in_head:
            self._in_head = False
            if self._clock is not None:
                self._clock.end(self)

    def _next(self) -> None:
        """Serve the request at the start of the buffer once it is all here, or hand the
        connection to aiohttp if it is not one this plane serves."""
        if self.plane.closing and not self._want:
            # Shutting down: a head still arriving is not served (as aiohttp); a request whose
            # head came before, and its body after, is (until the cut).
            assert self.transport is not None
            self.transport.close()
            return
        buf = self._buf
        if len(buf) < self._want:
            return
        end = buf.find(b"\r\n\r\n", max(self._scanned - 3, 0), MAX_HEAD)
        if end < 0:
            new = buf[max(self._scanned - 1, 0):]  # the bytes not looked at yet (and one before)
            self._scanned = len(buf)
            if (len(buf) >= MAX_HEAD or not _START.match(buf)
                    or new.count(b"\n") != new.count(b"\r\n")):
                # Too long, not the start of a request served here, or lines ended by a bare
                # LF (whose head would never end in CRLF CRLF): aiohttp's to answer.
                self._hand_off()
            return
        plane = self.plane
        match = _HEAD.fullmatch(buf, 0, end + 4)
        if match is None:
            self._hand_off()
            return
        method, target, block = match.groups()
        path_b, ask, query = target.partition(b"?")
        if ask and not query:
            target = path_b  # an empty query is none, as aiohttp (yarl) sends it on
        if b"%" in path_b or b"#" in target or b"/." in path_b or method not in _METHODS:
            self._hand_off()
            return
        path = path_b.decode("ascii")
        if plane.own(path):
            self._hand_off()
            return
        fields = _FIELD.findall(block)
        if len(fields) > MAX_FIELDS:
            self._hand_off()
            return
        length = -1
        host: bytes | None = None
        named: set[bytes] | None = None  # fields Connection names as hop-by-hop
        close = False
        seen: dict[str, str] = {}
        once: set[bytes] = set()
        for name, value in fields:
            lname = name.lower()
            if lname in _SINGLETON:
                if lname in once:
                    self._hand_off()
                    return
                once.add(lname)
            if lname in _HOP:
                if lname == b"content-length":
                    if not value.isdigit():
                        self._hand_off()
                        return
                    length = int(value)
                elif lname == b"host":
                    host = value
                elif lname in _REFUSED:
                    self._hand_off()
                    return
                elif lname == b"connection":
                    tokens = {t.strip().lower() for t in value.split(b",")}
                    named = tokens if named is None else named | tokens
                    close = close or b"close" in tokens
            elif lname in _SEEN and lname.decode() not in seen:
                seen[lname.decode()] = value.decode("utf-8", "surrogateescape")
        if host is None or length > PARSE_INLINE or (
                plane.hosts is not None
                and not plane.hosts.allows(host.decode("utf-8", "surrogateescape"))):
            self._hand_off()
            return
        body_at = end + 4
        total = body_at + max(length, 0)
        if len(buf) < total:
            self._end_head()  # the head is in; the body may take its time, as through aiohttp
            self._want = total
            return
        i, kind = new_interaction(method.decode(), path, self.remote,
                                  lambda field: seen.get(field.lower()))
        held = [0]
        if length > 0 and kind.reads_request and not plane.proxy.hold(length, held):
            self._hand_off()  # past the parse budget: aiohttp's path streams it on unread
            return
        self._end_head()
        body = buf[body_at:total]
        self._buf = buf[total:]
        self._scanned = self._want = 0
        self._close_after = close
        lines = [plane.host_line]
        for name, value in fields:
            lname = name.lower()
            if lname not in _HOP and (named is None or lname not in named):
                lines.append(name + b": " + value + b"\r\n")
        if plane.auth_line:
            lines = [line for line in lines
                     if not line[:14].lower().startswith(b"authorization:")]
            lines.append(plane.auth_line)
        if body:
            lines.append(b"Content-Length: %d\r\n" % len(body))
            i.request_bytes = len(body)
        elif method not in _NO_LENGTH_WHEN_EMPTY:
            lines.append(b"Content-Length: 0\r\n")
        request = b"%s %s%s HTTP/1.1\r\n%s\r\n%s" % (method, plane.prefix, target,
                                                     b"".join(lines), body)
        plane.served += 1
        exchange = self.exchange = Exchange(self, i, kind, held)
        exchange.send(request)  # first: what follows is done while Ollama works
        if body and kind.reads_request:
            read_request(body, i)
        exchange.begin()

    def _hand_off(self) -> None:
        """The rest of this connection is aiohttp's, from the start of the request in hand."""
        transport = self.transport
        assert transport is not None
        self.transport = None
        self.plane.clients.discard(self)
        self.plane.handed += 1
        self._end_head()
        handler = self._make_handler()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        data, self._buf = self._buf, b""
        if self._reading_paused:
            transport.resume_reading()
        if data:
            handler.data_received(data)

    def exchange_ended(self) -> None:
        self.exchange = None
        self._since = time.monotonic()
        transport = self.transport
        if transport is None or transport.is_closing():
            return  # cut (a reply broken off): nothing after it may reach Ollama
        if self._close_after or self.plane.closing:
            transport.close()
            return
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        if self._buf:
            if self._clock is not None and not self._in_head and self._buf.strip(b"\r\n"):
                self._in_head = True
                self._clock.begin(self)
            self._next()


class Exchange:
    """One request through the data plane, from its send to Ollama to its reply's end."""

    __slots__ = ("_chunked", "_client", "_connecting", "_content_type", "_ended", "_held", "_i",
                 "_kind", "_out", "_proxy", "_reader", "_request", "_resend", "_started",
                 "_status", "_tokens", "_until_eof", "_upstream_paused", "upstream")

    def __init__(self, client: Client, i: Interaction, kind: Kind, held: list[int]) -> None:
        self._client = client
        self._proxy = client.plane.proxy
        self._i = i
        self._kind = kind
        self._held = held
        self._tokens: list[object] | None = None  # the observers', from begin()
        self.upstream: Upstream | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._out: list[bytes] = []
        self._reader: ReplyReader | None = None
        self._started = False  # the reply's head was written (or is about to be)
        self._chunked = False
        self._until_eof = False
        self._status = 0
        self._content_type = ""
        self._upstream_paused = False
        self._ended = False
        self._request = b""
        self._resend = False  # on a pooled connection closed before any reply: send it again
        client.plane.active.add(self)

    def begin(self) -> None:
        """Show the observers the exchange (its request read, sent, and parsed)."""
        if self._tokens is None:
            self._tokens = self._proxy.begin(self._i)

    def send(self, request: bytes) -> None:
        pool = self._client.plane.pool
        while pool:
            upstream = pool.pop()
            if upstream.usable:
                self._request, self._resend = request, self._i.method in _IDEMPOTENT
                upstream.take(self, request)
                return
        self._connecting = asyncio.ensure_future(self._connect(request))

    async def _connect(self, request: bytes) -> None:
        plane = self._client.plane
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await asyncio.wait_for(loop.create_connection(
                lambda: Upstream(plane), plane.upstream_host, plane.upstream_port),
                plane.connect_timeout)
        except (TimeoutError, asyncio.TimeoutError):
            self._fail(ErrorType.TIMEOUT, 504,
                       f"timed out connecting to Ollama at {plane.upstream_name}")
            return
        except OSError as exc:
            self._fail(ErrorType.CONNECT, 502,
                       f"cannot reach Ollama at {plane.upstream_name}: {describe(exc)}")
            return
        finally:
            self._connecting = None
        if self._ended:  # the client went away meanwhile
            upstream.close()
            return
        upstream.take(self, request)

    # From the upstream connection

    def head(self, status: int, reason: bytes, fields: list[tuple[bytes, bytes]]) -> None:
        self._request, self._resend = b"", False  # answered: not kept for a stream's length
        i = self._i
        i.http_status = self._status = status
        named: set[bytes] | None = None
        length: bytes | None = None
        chunked_in = False
        has_type = has_date = False
        for name, value in fields:
            lname = name.lower()
            if lname == b"connection":
                tokens = {t.strip().lower() for t in value.split(b",")}
                named = tokens if named is None else named | tokens
            elif lname == b"content-length" and value.isdigit():
                length = value
            elif lname == b"transfer-encoding":
                chunked_in = True
            elif lname == b"content-type":
                has_type = True
                if not self._content_type:
                    self._content_type = value.decode("latin-1")
            elif lname == b"date":
                has_date = True
        out = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
        for name, value in fields:
            lname = name.lower()
            if lname not in _HOP and (named is None or lname not in named):
                out.append(name + b": " + value + b"\r\n")
        empty = status < 200 or status in (204, 304)
        if not empty:
            if length is not None:
                out.append(b"Content-Length: " + length + b"\r\n")
            else:
                out.append(b"Transfer-Encoding: chunked\r\n")
                self._chunked = True
                self._until_eof = not chunked_in
            if not has_type and length != b"0":
                out.append(b"Content-Type: application/octet-stream\r\n")
        if not has_date:
            out.append(b"Date: " + http_date() + b"\r\n")
        if self._client._close_after or self._client.plane.closing:
            out.append(b"Connection: close\r\n")
        out.append(b"\r\n")
        self._out.append(b"".join(out))
        self._started = True
        self._reader = reply_reader(self._content_type, i, self._proxy.parse_cap)

    def body(self, data: bytes) -> None:
        now = time.perf_counter()
        if self._chunked:
            self._out.append(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self._out.append(data)
        self._i.response_bytes += len(data)
        assert self._reader is not None
        self._reader.feed(data, now)

    def flush(self) -> None:
        """Write what the last read from Ollama produced; pause Ollama if the client lags."""
        out = self._out
        if not out:
            return
        transport = self._client.transport
        if transport is not None:
            transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()
        if self._client.writing_paused and not self._upstream_paused and self.upstream:
            self._upstream_paused = True
            self.upstream.pause()

    def complete(self, reusable: bool) -> None:
        """The reply has ended as it should."""
        if self._chunked:
            self._out.append(b"0\r\n\r\n")
        self.flush()
        if self._reader is not None:
            self._reader.close()
        self._proxy.settle(self._i, self._kind, self._content_type, self._status)
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.release(reusable and not self._client.plane.closing)
        self._end()

    def upstream_lost(self, why: str, closed: bool = True) -> None:
        """Ollama's connection closed (or, not `closed`, sent what is not HTTP) before the
        reply's end."""
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.close()
        if self._resend and closed and not self._started and not self._ended:
            self._resend = False
            self._connecting = asyncio.ensure_future(self._connect(self._request))
            return
        if self._until_eof and why == "":  # a reply that runs to the connection's close
            self.complete(False)
            return
        if not self._started:
            self._fail(ErrorType.RESET, 502, f"connection to Ollama at "
                       f"{self._client.plane.upstream_name} failed: "
                       f"{why or 'the server closed the connection'}")
            return
        self.flush()
        if self._reader is not None:
            self._reader.close()
        i = self._i
        i.outcome, i.error_type = Outcome.UPSTREAM_ERROR, ErrorType.RESET
        i.error = ("Ollama closed the reply early: the reply's body broke off: "
                   f"{why or 'the connection closed before its end'}")
        if self._client.transport is not None:
            self._client.transport.close()  # no final chunk: the client can tell
        self._end()

    # From the client connection

    def client_drained(self) -> None:
        if self._upstream_paused and self.upstream is not None:
            self._upstream_paused = False
            self.upstream.resume()

    def client_lost(self) -> None:
        if self._ended:
            return
        if self._reader is not None:
            self._reader.close()  # what passed is counted, as for a reply cut short upstream
        self._i.outcome = Outcome.CANCELLED
        self._drop_upstream()
        self._end()

    def cut(self, why: str) -> None:
        if self._ended:
            return
        if self._reader is not None:
            self._reader.close()
        self._i.outcome, self._i.error = Outcome.CANCELLED, why
        self._drop_upstream()
        if self._client.transport is not None:
            self._client.transport.close()
        self._end()

    def _drop_upstream(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.close()  # how Ollama learns to stop

    def _fail(self, error_type: ErrorType, status: int, message: str) -> None:
        """Answer the client for an Ollama that could not be reached or broke before replying."""
        if self._ended:
            return
        i = self._i
        message, code = self._proxy.failed(i, error_type, status, message)
        body = orjson.dumps(error_body(i.path, message, code))
        close = self._client._close_after or self._client.plane.closing
        head = (b"HTTP/1.1 %d %s\r\nContent-Type: application/json; charset=utf-8\r\n"
                b"Content-Length: %d\r\nDate: %s\r\n%s\r\n"
                % (status, _PHRASES.get(status, b""), len(body), http_date(),
                   b"Connection: close\r\n" if close else b""))
        if self._client.transport is not None:
            self._client.transport.write(head + body)
        self._end()

    def _end(self) -> None:
        if self._ended:
            return
        self._ended = True
        self.begin()  # never skipped: each end has its start
        assert self._tokens is not None
        self._proxy.end(self._i, self._kind, self._tokens)
        self._proxy.release(self._held)
        self._client.plane.ended(self)
        self._client.exchange_ended()


class Upstream(asyncio.Protocol):
    """One pooled connection to Ollama; its replies go to the exchange it serves."""

    def __init__(self, plane: Plane) -> None:
        self._plane = plane
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        # As lax as aiohttp's client (its C parser, outside dev mode): what it relays, so does this.
        self._parser.set_dangerous_leniencies(lenient_headers=True,
                                              lenient_optional_cr_before_lf=True,
                                              lenient_spaces_after_chunk_size=True)
        self._exchange: Exchange | None = None
        self._reason = b""
        self._fields: list[tuple[bytes, bytes]] = []
        self._complete = False
        self._interim = False  # a 1xx reply before the real one: skipped, as aiohttp's client does
        self._keep_alive = False  # as the reply just ended says (asked before the parser resets)
        self.idle_since = 0.0

    @property
    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def take(self, exchange: Exchange, request: bytes) -> None:
        self._exchange = exchange
        exchange.upstream = self
        assert self.transport is not None
        self.transport.write(request)

    def release(self, reusable: bool) -> None:
        self._exchange = None
        if reusable and self.usable:
            assert self.transport is not None
            # A reply that ended while its client lagged left reading paused; pooled, the
            # connection must read (its next reply, or Ollama closing it).
            self.transport.resume_reading()
            self.idle_since = time.monotonic()
            self._plane.pool.append(self)
        else:
            self.close()

    def close(self) -> None:
        self._exchange = None
        if self.transport is not None:
            self.transport.close()

    def pause(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        exchange = self._exchange
        if exchange is None:  # nothing is asked of an idle connection
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if not self._complete:
                exchange.upstream_lost(f"invalid HTTP reply: {describe(exc)}", closed=False)
                return
            self._keep_alive = False  # junk after a whole reply: the reply stands, not the link
        if self._complete:
            self._complete = False
            exchange.complete(self._keep_alive)
        else:
            exchange.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self in self._plane.pool:
            self._plane.pool.remove(self)
        exchange, self._exchange = self._exchange, None
        if exchange is not None:
            exchange.upstream_lost("" if exc is None else describe(exc))

    # httptools' callbacks

    def on_message_begin(self) -> None:
        self._reason, self._fields = b"", []
        if self._complete:  # more after the reply, in the same read: never the client's, and
            self._keep_alive = False  # the connection is not one to use again

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self._interim = True
        elif self._exchange is not None and not self._complete:
            self._exchange.head(status, self._reason, self._fields)

    def on_body(self, body: bytes) -> None:
        if self._exchange is not None and not self._complete:
            self._exchange.body(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
        elif not self._complete:
            self._complete = True
            self._keep_alive = self._parser.should_keep_alive()
