"""Two bare proxies: the floor under ollama-metrics' own code, measured beside it.

    python bench/bare.py --kind aiohttp|asyncio --upstream-port P [--port 0]

prints ``LISTENING <port>`` once it accepts connections, then forwards every request to the
upstream on 127.0.0.1 until killed. Neither measures, records or checks anything: they are what
a proxy costs before metering begins, so the benchmark can say how much of ollama-metrics' time is
its own and how much is the machinery it stands on.

- ``aiohttp``: the same framework calls ollama-metrics makes (``web.Application`` with one
  catch-all route, one ``ClientSession`` with pooled keep-alive connections, the reply relayed
  chunk by chunk), and nothing else.
- ``asyncio``: uvloop protocols and no HTTP framework: each request's head is read up to its
  blank line and forwarded with its body (Content-Length framing), each reply's head is read for
  its framing (Content-Length or chunked, followed chunk by chunk to its last chunk) and every
  byte is relayed as it arrives; upstream connections are pooled. It handles only what the
  benchmark sends (no chunked requests, no pipelining, no 1xx, no Expect): a floor for a
  framework-free data plane, not a proxy to use.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from typing import cast

try:
    import uvloop

    install_uvloop = uvloop.install
except ImportError:  # a platform without it: asyncio's own loop
    def install_uvloop() -> None:
        pass

_HOP = frozenset(("host", "content-length", "connection", "transfer-encoding", "keep-alive"))


async def serve_aiohttp(port: int, upstream_port: int) -> int:
    import aiohttp
    from aiohttp import web

    base = f"http://127.0.0.1:{upstream_port}"
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"))

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        async with session.request(request.method, base + request.raw_path, headers=headers,
                                   data=body, allow_redirects=False) as upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for key, value in upstream.headers.items():
                if key.lower() not in _HOP:
                    response.headers.add(key, value)
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app = web.Application()
    app.router.add_route("*", "/{path:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.create_server(("127.0.0.1", port))
    await web.SockSite(runner, sock).start()
    return int(sock.getsockname()[1])


class _Framing:
    """Where one HTTP/1.1 message body ends: Content-Length, or chunked followed to its end."""

    def __init__(self, length: int | None) -> None:
        self.left = length  # bytes of body left (Content-Length), or None for chunked
        self.buf = b""  # chunked: bytes not yet accounted for
        self.chunk_left = 0  # chunked: bytes of the current chunk's data (with its CRLF)
        self.done = length == 0

    def feed(self, data: bytes) -> None:
        if self.left is not None:
            self.left -= len(data)
            self.done = self.left <= 0
            return
        self.buf += data
        while self.buf:
            if self.chunk_left:
                take = min(self.chunk_left, len(self.buf))
                self.chunk_left -= take
                self.buf = self.buf[take:]
                continue
            line_end = self.buf.find(b"\r\n")
            if line_end < 0:
                return
            size = int(self.buf[:line_end].split(b";")[0], 16)
            self.buf = self.buf[line_end + 2:]
            if size == 0:
                self.done = True  # no trailers from the bench's upstream: the final CRLF follows
                return
            self.chunk_left = size + 2


def _head_length(head: bytes) -> tuple[int | None, bool, bool]:
    """(Content-Length or None, chunked, Connection: close) from a message head."""
    length, chunked, close = None, False, False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        lowered = name.strip().lower()
        if lowered == b"content-length":
            length = int(value)
        elif lowered == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
        elif lowered == b"connection" and b"close" in value.lower():
            close = True
    return length, chunked, close


class _Upstream(asyncio.Protocol):
    """One pooled connection to the upstream; relays each reply to the client it serves."""

    def __init__(self, pool: list[_Upstream]) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.client: _Client | None = None
        self.head = b""
        self.body: _Framing | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None or client.transport is None:
            return
        if self.body is None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, rest = self.head[:end], self.head[end + 4:]
            self.head = b""
            length, chunked, _ = _head_length(head)
            status_no_body = head.split(b" ", 2)[1] in (b"204", b"304")
            self.body = _Framing(0 if status_no_body else (None if chunked else length or 0))
            client.transport.write(head + b"\r\n\r\n" + rest)
            self.body.feed(rest)
        else:
            client.transport.write(data)
            self.body.feed(data)
        if self.body.done:
            self.body, self.client = None, None
            self.pool.append(self)
            client.reply_done()

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.pool:
            self.pool.remove(self)
        if self.client is not None and self.client.transport is not None:
            self.client.transport.close()


class _Client(asyncio.Protocol):
    def __init__(self, upstream_port: int, pool: list[_Upstream]) -> None:
        self.upstream_port = upstream_port
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.busy = False
        self.close_after = False
        self.connecting: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._next()

    def _next(self) -> None:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        length, _, self.close_after = _head_length(self.buf[:end])
        total = end + 4 + (length or 0)
        if len(self.buf) < total:
            return
        request, self.buf = self.buf[:total], self.buf[total:]
        self.busy = True
        if self.pool:
            self._send(self.pool.pop(), request)
        else:
            task = asyncio.ensure_future(self._connect(request))
            self.connecting.add(task)
            task.add_done_callback(self.connecting.discard)

    async def _connect(self, request: bytes) -> None:
        loop = asyncio.get_running_loop()
        _, upstream = await loop.create_connection(
            lambda: _Upstream(self.pool), "127.0.0.1", self.upstream_port)
        self._send(upstream, request)

    def _send(self, upstream: _Upstream, request: bytes) -> None:
        upstream.client = self
        assert upstream.transport is not None
        upstream.transport.write(request)

    def reply_done(self) -> None:
        self.busy = False
        if self.close_after and self.transport is not None:
            self.transport.close()
            return
        if self.buf:
            self._next()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve_asyncio(port: int, upstream_port: int) -> int:
    pool: list[_Upstream] = []
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Client(upstream_port, pool), "127.0.0.1", port)
    return int(server.sockets[0].getsockname()[1])


async def main(kind: str, port: int, upstream_port: int) -> None:
    listening = await (serve_aiohttp if kind == "aiohttp" else serve_asyncio)(port, upstream_port)
    print(f"LISTENING {listening}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=("aiohttp", "asyncio"), required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--upstream-port", type=int, required=True)
    args = parser.parse_args()
    install_uvloop()
    try:
        asyncio.run(main(args.kind, args.port, args.upstream_port))
    except KeyboardInterrupt:
        sys.exit(130)
