"""The fake Ollama's HTTP server core (see fake_ollama.py for the contract)."""

from __future__ import annotations

import asyncio
import hashlib
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import orjson
from aiohttp import web

from fake.scenario import (
    BODY_KEEP_LIMIT,
    SPLIT_PAUSE,
    RequestRecord,
    Scenario,
    _Ctx,
    _Frames,
    _Handler,
)
from fake.wire import (
    _CORS_ALLOW_HEADERS,
    _DEFAULT_ORIGINS,
    _dumps,
    _err,
    _header_dict,
    _hostname_allowed,
    _ip_allowed,
    _json,
    _norm_name,
    _oa_err,
    _origin_matches,
    _reason,
    _reply,
    _split_host_port,
)


class FakeServer:
    """The server itself: lifecycle, request records, dispatch through `_routes` (filled by
    FakeOllama), the Host/CORS precheck, the streaming engine, and the /_fake/ remote control."""

    _routes: dict[str, dict[str, _Handler]]
    _param_routes: dict[str, dict[str, _Handler]]

    def __init__(self, scenarios: dict[str, Scenario] | None = None, *, check_host: bool = True,
                 version: str = "0.33.0", extra_origins: Sequence[str] = ()) -> None:
        if scenarios is None:
            scenarios = {"llama3.2:latest": Scenario(), "all-minilm:latest": Scenario()}
        self.scenarios: dict[str, Scenario] = scenarios
        self.requests: list[RequestRecord] = []
        self.blobs: set[str] = set()
        self.kept_alive: dict[str, float] = {}  # model → the last keep_alive asked, in seconds
        self.check_host = check_host
        self.version = version
        self.origins = [*extra_origins, *_DEFAULT_ORIGINS]  # OLLAMA_ORIGINS entries come first
        self.url = ""
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._closing = False
        self._disconnect_seen = asyncio.Event()
        self._born_ns = time.time_ns()

    # --- lifecycle ---

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        app = web.Application()
        app.on_response_prepare.append(self._on_prepare)
        app.router.add_route("*", "/{tail:.*}", self._entry)
        # handler_cancellation: a client closing its socket cancels the handler, which is
        # how Ollama notices a disconnect (request context cancelled) even before the first byte.
        # Go's net/http as Ollama runs it: up to 1 MB of headers (DefaultMaxHeaderBytes), however
        # many, and request bodies read as sent (no Content-Encoding decoding).
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                                     shutdown_timeout=1.0, max_line_size=1 << 20,
                                     max_field_size=1 << 20, max_headers=1 << 16,
                                     auto_decompress=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        url_host = f"[{host}]" if ":" in host else host
        self.url = f"http://{url_host}:{self.port}"

    async def close(self) -> None:
        self._closing = True
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def wait_disconnected(self, timeout: float = 2.0) -> RequestRecord:
        """The newest record whose client went away, waiting up to timeout for one."""

        async def newest() -> RequestRecord:
            while True:
                for rec in reversed(self.requests):
                    if rec.disconnected:
                        return rec
                self._disconnect_seen.clear()
                await self._disconnect_seen.wait()

        try:
            return await asyncio.wait_for(newest(), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"no client disconnect seen within {timeout} s") from None

    # --- plumbing ---

    @staticmethod
    async def _on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        # aiohttp adds "Server: Python/x aiohttp/y" in _prepare_headers, which runs
        # before this signal; Go's net/http sends no Server header at all.
        response.headers.popall("Server", None)

    @staticmethod
    def _finish_headers(ctx: _Ctx, response: web.StreamResponse) -> None:
        """Last touches before a reply is sent: CORS headers, and the status for the record."""
        if ctx.cors_origin and "Access-Control-Allow-Origin" not in response.headers:
            response.headers["Access-Control-Allow-Origin"] = ctx.cors_origin
            response.headers.add("Vary", "Origin")
        rec = ctx.rec
        if rec.status is None and not (rec.aborted or rec.disconnected):
            rec.status = response.status

    def _gone(self, rec: RequestRecord) -> None:
        if not rec.aborted and not self._closing and not rec.disconnected:
            rec.disconnected = True
            rec.disconnected_at = time.monotonic()
            self._disconnect_seen.set()

    async def _entry(self, request: web.Request) -> web.StreamResponse:
        if request.path.startswith("/_fake/"):
            return await self._control(request)
        rec = RequestRecord(request.method, request.raw_path, _header_dict(request),
                            time.monotonic())
        self.requests.append(rec)
        ctx = _Ctx(request, rec)
        try:
            resp = await self._dispatch(ctx)
            if not resp.prepared:
                self._finish_headers(ctx, resp)
            return resp
        except asyncio.CancelledError:
            self._gone(rec)
            raise
        except ConnectionError:
            # A write to (or a body read from) a closed connection.  Returning a fresh
            # response lets aiohttp fail quietly on the dead socket instead of logging
            # the exception as a 500.
            self._gone(rec)
            return web.Response(status=499, reason=_reason(499))
        finally:
            rec.finished = time.monotonic()

    def _route(self, path: str) -> tuple[dict[str, _Handler], str] | None:
        if path in self._routes:
            return self._routes[path], ""
        for prefix, methods in self._param_routes.items():
            rest = path[len(prefix):]
            if path.startswith(prefix) and rest and "/" not in rest:
                return methods, rest
        return None

    async def _dispatch(self, ctx: _Ctx) -> web.StreamResponse:
        request = ctx.request
        refusal = self._precheck(ctx)
        route = self._route(request.path)
        handler = route[0].get(request.method) if route else None
        ctx.param = route[1] if route else ""
        if refusal is not None or handler is None or handler != self._blob_upload:
            # Blob uploads stream their body themselves; everything else is read up
            # front so the record holds its length and hash even when refused.
            ctx.body = await self._read_body(ctx, keep_all=refusal is None and handler is not None)
        if refusal is not None:
            return refusal
        if route is None:
            return self._not_found(request)
        if handler is None:
            allow = ", ".join(route[0])
            return _reply(405, b"405 method not allowed", "text/plain", {"Allow": allow})
        return await handler(ctx)

    def _not_found(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        alt = self._route(path[:-1]) if len(path) > 1 and path.endswith("/") else None
        if alt is not None and request.method in alt[0]:
            # gin RedirectTrailingSlash
            location = path[:-1] + (f"?{request.query_string}" if request.query_string else "")
            if request.method == "GET":
                body = f'<a href="{location}">Moved Permanently</a>.\n\n'.encode()
                return _reply(301, body, "text/html; charset=utf-8", {"Location": location})
            return _reply(307, None, None, {"Location": location})
        return _reply(404, b"404 page not found", "text/plain")

    def _precheck(self, ctx: _Ctx) -> web.StreamResponse | None:
        """gin-contrib/cors, then allowedHostsMiddleware, as Ollama chains them."""
        request = ctx.request
        host = request.headers.get("Host", "")
        origin = request.headers.get("Origin", "")
        if origin and origin not in (f"http://{host}", f"https://{host}"):
            if not _origin_matches(origin, self.origins):
                return _reply(403)
            ctx.cors_origin = origin
            if request.method == "OPTIONS":
                resp = _reply(204, headers={
                    "Access-Control-Allow-Methods": "GET,POST,PUT,PATCH,DELETE,HEAD",
                    "Access-Control-Allow-Headers": _CORS_ALLOW_HEADERS,
                    "Access-Control-Max-Age": "43200",
                    "Access-Control-Allow-Origin": origin,
                })
                for vary in ("Origin", "Access-Control-Request-Method",
                             "Access-Control-Request-Headers"):
                    resp.headers.add("Vary", vary)
                return resp
        if self.check_host:
            name = _split_host_port(host)
            by_ip = _ip_allowed(name)
            if by_ip is None and _hostname_allowed(name):
                return _reply(204) if request.method == "OPTIONS" else None
            if not by_ip:
                return _reply(403)
        return None

    async def _read_body(self, ctx: _Ctx, *, keep_all: bool) -> bytes:
        """Stream the body through SHA-256; memory stays bounded unless keep_all."""
        rec, digest, buf = ctx.rec, hashlib.sha256(), bytearray()
        try:
            async for chunk in ctx.request.content.iter_any():
                digest.update(chunk)
                rec.body_len += len(chunk)
                if keep_all or rec.body_len <= BODY_KEEP_LIMIT:
                    buf += chunk
                elif buf:
                    buf = bytearray()
        finally:
            rec.body_sha256 = digest.hexdigest()
        body = bytes(buf)
        rec.body = body if rec.body_len <= BODY_KEEP_LIMIT else b""
        return body

    def _key(self, name: str) -> str | None:
        """The scenarios key a request's model name selects ("x" matches "x:latest")."""
        wanted = _norm_name(name)
        return next((key for key in self.scenarios if _norm_name(key) == wanted), None)

    def _find(self, name: str) -> Scenario | None:
        key = self._key(name)
        return None if key is None else self.scenarios[key]

    def _models(self) -> list[str]:
        return [_norm_name(k) for k in self.scenarios]

    # --- streaming engine ---

    async def _write(self, resp: web.StreamResponse, data: bytes, sc: Scenario,
                     comp: Any | None) -> None:
        if comp is not None:
            data = comp.compress(data) + comp.flush(zlib.Z_SYNC_FLUSH)
        if sc.split_lines and len(data) > 1:
            half = len(data) // 2
            await resp.write(data[:half])
            await asyncio.sleep(SPLIT_PAUSE)
            data = data[half:]
        await resp.write(data)

    async def _abort(self, ctx: _Ctx, resp: web.StreamResponse | None) -> web.StreamResponse:
        transport = ctx.request.transport
        if transport is not None and not transport.is_closing():
            # abort() discards what is still buffered; let the frames already
            # written reach the client first so exactly N chunks arrive.
            for _ in range(200):
                if not transport.get_write_buffer_size():
                    break
                await asyncio.sleep(0.005)
            ctx.rec.aborted = True
            transport.abort()
        ctx.rec.aborted = True
        # aiohttp's attempt to finish this response hits the closed socket and is
        # dropped silently (ConnectionError inside finish_response).
        return resp if resp is not None else web.Response()

    async def _stream(self, ctx: _Ctx, sc: Scenario, ctype: str, items: Sequence[_Frames],
                      error_frame: Callable[[], bytes], error_reply: Callable[[], web.Response],
                      ) -> tuple[web.StreamResponse, bool]:
        """Write the chunks paced by token_delay, applying the toxic modes.

        Returns the response and whether the stream completed normally.
        """
        resp: web.StreamResponse | None = None
        comp = zlib.compressobj(wbits=31) if sc.gzip else None
        completed = True
        for i, make in enumerate(items):
            if i and sc.token_delay > 0:
                await asyncio.sleep(sc.token_delay)
            if sc.drop_after is not None and i >= sc.drop_after:
                return await self._abort(ctx, resp), False
            if sc.error_after is not None and i >= sc.error_after:
                if resp is None:  # nothing written yet: a real status code (streamResponse)
                    return error_reply(), False
                await self._write(resp, error_frame(), sc, comp)
                completed = False
                break
            frames = make()
            if resp is None:
                headers = {"Content-Type": ctype}
                if comp is not None:
                    headers["Content-Encoding"] = "gzip"
                resp = web.StreamResponse(status=200, headers=headers)
                self._finish_headers(ctx, resp)
                await resp.prepare(ctx.request)
            for frame in frames:
                await self._write(resp, frame, sc, comp)
            ctx.rec.written.append(time.monotonic())
        assert resp is not None
        if comp is not None:
            await resp.write(comp.flush())
        return resp, completed

    async def _pace(self, ctx: _Ctx, sc: Scenario, n_items: int,
                    error_reply: Callable[[], web.Response]) -> web.StreamResponse | None:
        """The time a non-streamed reply takes to generate; a response replaces the result."""
        for i in range(n_items):
            if i and sc.token_delay > 0:
                await asyncio.sleep(sc.token_delay)
            if sc.drop_after is not None and i >= sc.drop_after:
                return await self._abort(ctx, None)
            if sc.error_after is not None and i >= sc.error_after:
                return error_reply()
        return None

    async def _prelude(self, sc: Scenario, openai: bool = False) -> web.Response | None:
        """Model load + prompt eval, then a scripted pre-stream error, if any."""
        if sc.first_delay > 0:
            await asyncio.sleep(sc.first_delay)
        if sc.error_before is not None:
            status, message = sc.error_before
            return _oa_err(status, message) if openai else _err(status, message)
        return None

    # --- remote control ---

    async def _control(self, request: web.Request) -> web.StreamResponse:
        action = (request.method, request.path)
        if action == ("GET", "/_fake/requests"):
            return _json([r.to_json() for r in self.requests])
        if action == ("POST", "/_fake/reset"):
            self.requests.clear()
            return _json({})
        if action == ("PUT", "/_fake/scenarios"):
            try:
                updates = orjson.loads(await request.read())
                for name, fields in updates.items():
                    key = self._key(name) or name
                    self.scenarios[key] = Scenario.from_json(fields, self.scenarios.get(key))
            except (ValueError, TypeError, AttributeError) as exc:
                return _err(400, f"bad scenarios: {exc}")
            return _json({"scenarios": list(self.scenarios)})
        if request.path in ("/_fake/requests", "/_fake/reset", "/_fake/scenarios"):
            return _reply(405, b"405 method not allowed", "text/plain")
        return _reply(404, b"404 page not found", "text/plain")


    # --- shared by the native and OpenAI routes ---

    def _native_tool_calls(self, sc: Scenario) -> list[dict[str, Any]]:
        calls = []
        for i, call in enumerate(sc.tool_calls):
            fn = call.get("function", {})
            name = str(fn.get("name", ""))
            digest = hashlib.sha256(f"{name}/{i}".encode()).hexdigest()
            call_id = call.get("id") or "call_" + digest[:8]
            function = {"index": fn.get("index", i), "name": name,
                        "arguments": fn.get("arguments", {})}
            calls.append({"id": call_id, "function": function})
        return calls

    def _oa_tool_calls(self, sc: Scenario) -> list[dict[str, Any]]:
        return [{"id": c["id"], "index": c["function"]["index"], "type": "function",
                 "function": {"name": c["function"]["name"],
                              "arguments": _dumps(c["function"]["arguments"]).decode()}}
                for c in self._native_tool_calls(sc)]

    def _embed_inputs(self, value: Any) -> list[str] | None:
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        if isinstance(value, list):
            return [v if isinstance(v, str) else _dumps(v).decode() for v in value]
        return None

    async def _blob_upload(self, ctx: _Ctx) -> web.StreamResponse:  # native.py
        raise NotImplementedError
