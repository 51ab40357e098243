"""A fake Ollama server that speaks the real wire protocol, for testing the proxy.

Contract (see /work/shared/reference/ollama-api.md, sections 1-4 and 6-8):

* ``FakeOllama`` is a real aiohttp server on a real socket.  Every route of the real
  server exists with its methods; unknown paths answer ``404 page not found`` and
  known paths with a wrong method ``405 method not allowed`` (text/plain, like gin).
* The Host check and CORS rules of the real server apply (403 with an empty body).
* Behaviour per model comes from a ``Scenario`` chosen by the request's ``model``
  field (``name`` without a tag matches ``name:latest``): tokens, thinking,
  tool calls, delays, and toxic modes (error before the first byte, in-band error
  after N chunks, connection abort after N chunks, lines split across writes, gzip).
* "N chunks" counts upstream chunks: one NDJSON line, or for SSE one event per
  token; the closing events (finish, usage, ``[DONE]``) count as one.
* Nothing is written before the first chunk is ready: ``first_delay`` holds back
  even the status line.  Streams are flushed frame by frame.
* Every request is recorded (``RequestRecord``) with a streamed SHA-256 of its body;
  a client that goes away before the handler finishes is recorded as disconnected.
* ``/_fake/requests`` (GET), ``/_fake/scenarios`` (PUT), ``/_fake/reset`` (POST) let
  a test drive a fake running as a separate process
  (``python tests/fake_ollama.py --port 0`` prints ``LISTENING <port>``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import functools
import gzip as gzip_module
import hashlib
import http
import ipaddress
import random
import re
import signal
import socket
import struct
import sys
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

SPLIT_PAUSE = 0.05  # pause between the two halves of a split line
BODY_KEEP_LIMIT = 1 << 20  # request bodies up to this size are kept in the record
RUNNER_ERROR = (
    "model runner has unexpectedly stopped, this may be due to resource limitations "
    "or an internal error, check ollama server logs for details"
)
NDJSON = "application/x-ndjson"
JSON_UTF8 = "application/json; charset=utf-8"  # gin c.JSON
JSON_PLAIN = "application/json"  # stream-path errors, OpenAI writers, waitForStream
SSE = "text/event-stream"


@dataclass
class Scenario:
    """Behaviour of one fake model.  Counts and durations (ns) land in the final chunk;
    like Go's omitempty, a zero value is left out rather than sent as 0."""

    tokens: list[str] = field(default_factory=lambda: ["Hello", ",", " world", "!"])
    # streamed before the tokens: .thinking / message.thinking / delta.reasoning
    thinking: list[str] = field(default_factory=list)
    # native shape {"function": {"name", "arguments": {...}}}; one chunk after the tokens
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    first_delay: float = 0.0  # before any byte, status line included (load + prompt eval)
    token_delay: float = 0.0  # between chunks; also paces pull/push/create progress lines
    error_before: tuple[int, str] | None = None  # (status, message) instead of a reply
    error_after: int | None = None  # after N chunks: in-band error, stream ends unfinished
    drop_after: int | None = None  # after N chunks: abort the TCP connection
    split_lines: bool = False  # each line/event in two writes, SPLIT_PAUSE apart
    gzip: bool = False  # Content-Encoding: gzip on successful model replies
    prompt_eval_count: int = 26
    eval_count: int | None = None  # None: len(tokens)
    load_duration: int = 1_334_875
    prompt_eval_duration: int = 342_546_000
    eval_duration: int = 4_535_599_000
    total_duration: int | None = None  # None: the three durations plus a little
    embedding_dims: int = 4
    done_reason: str = "stop"

    @classmethod
    def from_json(cls, data: dict[str, Any], base: Scenario | None = None) -> Scenario:
        fields = dict(data)
        if fields.get("error_before") is not None:
            status, message = fields["error_before"]
            fields["error_before"] = (int(status), str(message))
        return dataclasses.replace(base or cls(), **fields)

    def metrics(self) -> dict[str, int]:
        """Final-chunk metrics in Go field order; zero values are omitted (omitempty)."""
        eval_count = len(self.tokens) if self.eval_count is None else self.eval_count
        total = self.total_duration
        if total is None:
            total = self.load_duration + self.prompt_eval_duration + self.eval_duration + 2_468_000
        values = {
            "total_duration": total,
            "load_duration": self.load_duration,
            "prompt_eval_count": self.prompt_eval_count,
            "prompt_eval_duration": self.prompt_eval_duration,
            "eval_count": eval_count,
            "eval_duration": self.eval_duration,
        }
        return {k: v for k, v in values.items() if v}


@dataclass
class RequestRecord:
    method: str
    path_qs: str
    headers: dict[str, str]
    started: float
    body_len: int = 0
    body_sha256: str = hashlib.sha256(b"").hexdigest()
    body: bytes = b""
    finished: float | None = None
    disconnected: bool = False
    disconnected_at: float | None = None
    status: int | None = None
    aborted: bool = False  # the fake itself cut the connection (drop_after)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        del data["body"]
        return data


@dataclass
class _Ctx:
    request: web.Request
    rec: RequestRecord
    param: str = ""  # the :digest / :model path segment
    body: bytes = b""
    cors_origin: str | None = None  # set when CORS headers must go on the reply


_Handler = Callable[[_Ctx], Awaitable[web.StreamResponse]]
_Frames = Callable[[], list[bytes]]  # one upstream chunk, built when it is due


_DEFAULT_ORIGINS = [
    f"{scheme}://{host}{port}"
    for host in ("localhost", "127.0.0.1", "0.0.0.0")
    for port in ("", ":*")
    for scheme in ("http", "https")
] + ["app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*"]
_CORS_ALLOW_HEADERS = ",".join(
    ["Authorization", "Content-Type", "User-Agent", "Accept", "X-Requested-With", "Openai-Beta"]
    + [
        "X-Stainless-" + s
        for s in (
            "Arch", "Async", "Custom-Poll-Interval", "Helper-Method", "Lang", "Os",
            "Package-Version", "Poll-Helper", "Retry-Count", "Runtime", "Runtime-Version",
            "Timeout",
        )
    ]
)
_DIGEST_RE = re.compile(r"sha256[:-][0-9a-fA-F]{64}")
_ZERO_DURATION_RE = re.compile(r"[+-]?(?:0+(?:\.0*)?(?:ns|us|µs|ms|s|m|h)?)+")
_PRIVATE_NETS = [  # Go's netip.Addr.IsPrivate
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
]
_GO_KINDS: dict[type, str] = {list: "array", dict: "object", str: "string", bool: "bool"}


# --- wire helpers -----------------------------------------------------------------


def _dumps(obj: Any) -> bytes:
    """JSON as Go's json.Marshal writes it: <, >, &, U+2028/9 escaped (only found in strings)."""
    raw = orjson.dumps(obj)
    for char, esc in ((b"<", b"\\u003c"), (b">", b"\\u003e"), (b"&", b"\\u0026"),
                      ("\u2028".encode(), b"\\u2028"), ("\u2029".encode(), b"\\u2029")):
        raw = raw.replace(char, esc)
    return raw


def _go_time(ns: int | None = None, *, local: bool = False) -> str:
    """RFC3339Nano as Go prints it: trailing zeros trimmed, 'Z' for UTC."""
    ns = time.time_ns() if ns is None else ns
    secs, frac = divmod(ns, 1_000_000_000)
    tm = time.localtime(secs) if local else time.gmtime(secs)
    offset = tm.tm_gmtoff if local else 0
    text = time.strftime("%Y-%m-%dT%H:%M:%S", tm)
    if frac:
        text += f".{frac:09d}".rstrip("0")
    if offset == 0:
        return text + "Z"
    sign = "+" if offset > 0 else "-"
    return f"{text}{sign}{abs(offset) // 3600:02d}:{abs(offset) % 3600 // 60:02d}"


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return f"status code {status}"  # what Go writes for e.g. 499


def _reply(status: int, body: bytes | None = None, ctype: str | None = None,
           headers: dict[str, str] | None = None) -> web.Response:
    hdrs = dict(headers or {})
    if ctype is not None:
        hdrs["Content-Type"] = ctype
    return web.Response(status=status, reason=_reason(status), body=body, headers=hdrs)


def _json(obj: Any, status: int = 200, ctype: str = JSON_UTF8, *, newline: bool = False,
          gzip: bool = False) -> web.Response:
    body = _dumps(obj) + (b"\n" if newline else b"")
    headers = {}
    if gzip:
        body = gzip_module.compress(body, mtime=0)
        headers["Content-Encoding"] = "gzip"
    return _reply(status, body, ctype, headers)


def _err(status: int, message: str, ctype: str = JSON_UTF8) -> web.Response:
    return _json({"error": message}, status, ctype)


def _oa_err(status: int, message: str, ctype: str = JSON_PLAIN) -> web.Response:
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    error = {"message": message, "type": kind, "param": None, "code": None}
    # Errors from the OpenAI writers go through json.Encoder (trailing newline);
    # errors from the middleware itself through c.JSON (charset, no newline).
    return _json({"error": error}, status, ctype, newline=ctype == JSON_PLAIN)


def _unknown_model(model: str) -> web.Response:
    return _err(404, f"model '{model}' not found") if model else _err(400, "model is required")


def _sse(obj: Any) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


def _ndjson_frame(obj: dict[str, Any] | Callable[[], dict[str, Any]]) -> _Frames:
    """One NDJSON line, built (and timestamped) only when it is due."""
    return lambda: [_dumps(obj() if callable(obj) else obj) + b"\n"]


def _decode(body: bytes, go_type: str) -> dict[str, Any] | str:
    """Parse a request body the way gin's ShouldBindJSON does; a str is the error text."""
    if not body.strip():
        return "EOF"
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        text = body.decode("utf-8", "replace")
        if exc.pos >= len(text.rstrip()):
            return "unexpected EOF"
        return f"invalid character {text[exc.pos]!r} looking for beginning of value"
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        kind = _GO_KINDS.get(type(obj), "number")
        return f"json: cannot unmarshal {kind} into Go value of type {go_type}"
    for key, want, go in (("model", str, "string"), ("stream", bool, "bool")):
        value = obj.get(key)
        if value is not None and not isinstance(value, want):
            kind, struct_name = _GO_KINDS.get(type(value), "number"), go_type.split(".")[-1]
            return (f"json: cannot unmarshal {kind} into Go struct field "
                    f"{struct_name}.{key} of type {go}")
    return obj


def _parse(body: bytes, go_type: str) -> dict[str, Any] | web.Response:
    req = _decode(body, go_type)
    if isinstance(req, str):
        return _err(400, "missing request body" if req == "EOF" else req)
    return req


def _header_dict(request: web.BaseRequest) -> dict[str, str]:
    """Headers as received, plain-str keys in their original case; a repeated name keeps
    its last value (dict(CIMultiDict) would keep the first, and istr keys upset orjson)."""
    headers: dict[str, str] = {}
    seen: dict[str, str] = {}
    for name, value in request.headers.items():
        key = str(name)
        previous = seen.pop(key.lower(), None)
        if previous is not None:
            del headers[previous]
        headers[key] = value
        seen[key.lower()] = key
    return headers


def _is_zero_duration(value: Any) -> bool:
    if isinstance(value, bool) or value is None:
        return False
    if isinstance(value, int | float):
        return value == 0
    return isinstance(value, str) and bool(_ZERO_DURATION_RE.fullmatch(value.strip()))


def _split_host_port(hostport: str) -> str:
    """net.SplitHostPort's host, or the whole value when that fails (as Ollama does)."""
    if hostport.startswith("["):
        end = hostport.find("]")
        return hostport[1:end] if end != -1 and hostport[end + 1:end + 2] == ":" else hostport
    return hostport.split(":")[0] if hostport.count(":") == 1 else hostport


def _ip_allowed(host: str) -> bool | None:
    """None when host is not an IP literal."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    private = any(addr in net for net in _PRIVATE_NETS if net.version == addr.version)
    return addr.is_loopback or addr.is_unspecified or private


def _hostname_allowed(host: str) -> bool:
    host = host.lower()
    return (host in ("", "localhost", socket.gethostname().lower())
            or host.endswith((".localhost", ".local", ".internal")))


def _origin_matches(origin: str, patterns: Sequence[str]) -> bool:
    for pattern in patterns:
        if pattern in ("*", origin):
            return True
        if "*" in pattern:
            prefix, suffix = pattern.split("*", 1)
            if origin.startswith(prefix) and origin.endswith(suffix):
                return True
    return False


def _norm_name(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    return (name if ":" in base else name + ":latest").lower()


def _is_embedding_model(name: str) -> bool:
    return any(s in name.lower() for s in ("minilm", "embed", "bge", "e5"))


def _vector(model: str, text: str, dims: int) -> list[float]:
    """Deterministic unit vector (float32-rounded) for a (model, text) pair."""
    rng = random.Random(hashlib.sha256(f"{model}\0{text}".encode()).digest())
    values = [rng.uniform(-1.0, 1.0) for _ in range(dims)]
    norm = sum(v * v for v in values) ** 0.5 or 1.0
    return [struct.unpack("f", struct.pack("f", v / norm))[0] for v in values]


# --- the server -----------------------------------------------------------------


class FakeOllama:
    def __init__(self, scenarios: dict[str, Scenario] | None = None, *, check_host: bool = True,
                 version: str = "0.33.0", extra_origins: Sequence[str] = ()) -> None:
        if scenarios is None:
            scenarios = {"llama3.2:latest": Scenario(), "all-minilm:latest": Scenario()}
        self.scenarios: dict[str, Scenario] = scenarios
        self.requests: list[RequestRecord] = []
        self.blobs: set[str] = set()
        self.check_host = check_host
        self.version = version
        self.origins = [*extra_origins, *_DEFAULT_ORIGINS]  # OLLAMA_ORIGINS entries come first
        self.url = ""
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._closing = False
        self._disconnect_seen = asyncio.Event()
        self._born_ns = time.time_ns()
        get, post, head, delete = "GET", "POST", "HEAD", "DELETE"
        self._routes: dict[str, dict[str, _Handler]] = {
            "/": {head: self._root, get: self._root},
            "/api/version": {head: self._version, get: self._version},
            "/api/status": {get: self._status},
            "/api/pull": {post: self._pull},
            "/api/push": {post: self._push},
            "/api/tags": {head: self._tags, get: self._tags},
            "/api/show": {post: self._show},
            "/api/delete": {delete: self._delete},
            "/api/me": {post: self._unauthorized},
            "/api/signout": {post: self._signout},
            "/api/create": {post: self._create},
            "/api/copy": {post: self._copy},
            "/api/experimental/web_search": {post: self._unauthorized},
            "/api/experimental/web_fetch": {post: self._unauthorized},
            "/api/experimental/model-recommendations": {get: self._recommendations},
            "/api/ps": {get: self._ps},
            "/api/generate": {post: self._generate},
            "/api/chat": {post: self._chat},
            "/api/embed": {post: self._embed},
            "/api/embeddings": {post: self._embeddings},
            "/v1/chat/completions": {post: self._v1_chat},
            "/v1/completions": {post: self._v1_completions},
            "/v1/embeddings": {post: self._v1_embeddings},
            "/v1/models": {get: self._v1_models},
            "/v1/responses": {post: self._not_implemented},
            "/v1/audio/transcriptions": {post: self._not_implemented},
            "/v1/messages": {post: self._not_implemented},
        }
        # gin ":param" routes: one non-empty path segment after the prefix
        self._param_routes: dict[str, dict[str, _Handler]] = {
            "/api/blobs/": {post: self._blob_upload, head: self._blob_head},
            "/api/user/keys/": {delete: self._signout},
            "/v1/models/": {get: self._v1_model},
        }

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

    # --- trivial routes ---

    async def _root(self, ctx: _Ctx) -> web.StreamResponse:
        return _reply(200, b"Ollama is running", "text/plain; charset=utf-8")

    async def _version(self, ctx: _Ctx) -> web.StreamResponse:
        return _json({"version": self.version})

    async def _status(self, ctx: _Ctx) -> web.StreamResponse:
        return _json({"cloud": {"disabled": False, "source": "none"}})

    async def _recommendations(self, ctx: _Ctx) -> web.StreamResponse:
        return _json({"recommendations": []})

    async def _unauthorized(self, ctx: _Ctx) -> web.StreamResponse:
        signin = f"https://ollama.com/connect?name={socket.gethostname()}&key=ZmFrZQ"
        return _json({"error": "unauthorized", "signin_url": signin}, 401)

    async def _signout(self, ctx: _Ctx) -> web.StreamResponse:
        return _err(401, "you are not currently signed in")

    async def _not_implemented(self, ctx: _Ctx) -> web.StreamResponse:
        return _err(501, f"{ctx.request.path} is not implemented by fake_ollama")

    # --- model management ---

    def _details(self, name: str) -> dict[str, Any]:
        if _is_embedding_model(name):
            return {"parent_model": "", "format": "gguf", "family": "bert", "families": ["bert"],
                    "parameter_size": "23M", "quantization_level": "F16"}
        return {"parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
                "parameter_size": "3.2B", "quantization_level": "Q4_K_M"}

    def _model_entry(self, name: str) -> dict[str, Any]:
        digest = hashlib.sha256(name.encode()).hexdigest()
        size = 45_960_996
        if not _is_embedding_model(name):
            size = 1_000_000_000 + int(digest[:8], 16) % 3_000_000_000
        return {"name": name, "model": name, "modified_at": _go_time(self._born_ns, local=True),
                "size": size, "digest": digest, "details": self._details(name)}

    async def _tags(self, ctx: _Ctx) -> web.StreamResponse:
        return _json({"models": [self._model_entry(n) for n in self._models()]})

    async def _ps(self, ctx: _Ctx) -> web.StreamResponse:
        expires = _go_time(time.time_ns() + 300 * 1_000_000_000, local=True)
        models = []
        for name in self._models():
            entry = self._model_entry(name)
            del entry["modified_at"]
            entry.update(expires_at=expires, size_vram=entry["size"], context_length=4096)
            models.append(entry)
        return _json({"models": models})

    async def _show(self, ctx: _Ctx) -> web.StreamResponse:
        req = _parse(ctx.body, "api.ShowRequest")
        if isinstance(req, web.Response):
            return req
        name = str(req.get("model") or req.get("name") or "")
        sc = self._find(name)
        if sc is None:
            return _err(404, f"model '{name}' not found")
        details = self._details(name)
        family = details["family"]
        embedding = _is_embedding_model(name)
        caps = ["completion", "tools"] + (["thinking"] if sc.thinking else [])
        if embedding:
            caps = ["embedding"]
        return _json({
            "modelfile": f"# Modelfile generated by \"ollama show\"\nFROM {_norm_name(name)}\n",
            "parameters": 'stop                           "<|eot_id|>"',
            "template": "{{ .Prompt }}",
            "details": details,
            "model_info": {"general.architecture": family,
                           f"{family}.context_length": 131072,
                           f"{family}.embedding_length": sc.embedding_dims if embedding else 3072},
            "capabilities": caps,
            "modified_at": _go_time(self._born_ns, local=True),
        })

    async def _delete(self, ctx: _Ctx) -> web.StreamResponse:
        req = _parse(ctx.body, "api.DeleteRequest")
        if isinstance(req, web.Response):
            return req
        name = str(req.get("model") or req.get("name") or "")
        key = self._key(name)
        if key is None:
            return _err(404, f"model '{name}' not found")
        del self.scenarios[key]
        return _reply(200)

    async def _copy(self, ctx: _Ctx) -> web.StreamResponse:
        req = _parse(ctx.body, "api.CopyRequest")
        if isinstance(req, web.Response):
            return req
        source, dest = str(req.get("source") or ""), str(req.get("destination") or "")
        sc = self._find(source)
        if sc is None:
            return _err(404, f'model "{source}" not found')
        self.scenarios[_norm_name(dest)] = dataclasses.replace(sc)
        return _reply(200)

    def _progress(self, kind: str, name: str, sc: Scenario) -> list[dict[str, Any]]:
        """Progress objects like the real pull/push/create; steps per layer = len(tokens)."""
        steps = max(1, len(sc.tokens))
        if kind == "create":
            digest = hashlib.sha256(name.encode()).hexdigest()
            return [{"status": "parsing GGUF"}, {"status": f"using existing layer sha256:{digest}"},
                    {"status": "writing manifest"}, {"status": "success"}]
        verb = "pulling" if kind == "pull" else "pushing"
        first = "pulling manifest" if kind == "pull" else "retrieving manifest"
        lines: list[dict[str, Any]] = [{"status": first}]
        for layer, total in enumerate((2_019_377_376, 1_429)):
            digest = "sha256:" + hashlib.sha256(f"{name}/{layer}".encode()).hexdigest()
            line = {"status": f"{verb} {digest[7:19]}", "digest": digest, "total": total}
            lines.append(line)  # "completed" is omitempty: absent until > 0
            lines += [{**line, "completed": total * k // steps} for k in range(1, steps + 1)]
        if kind == "pull":
            lines += [{"status": "verifying sha256 digest"}, {"status": "writing manifest"},
                      {"status": "removing unused layers"}]
        else:
            lines.append({"status": "pushing manifest"})
        return [*lines, {"status": "success"}]

    async def _progress_route(self, ctx: _Ctx, kind: str) -> web.StreamResponse:
        req = _parse(ctx.body, f"api.{kind.capitalize()}Request")
        if isinstance(req, web.Response):
            return req
        name = str(req.get("model") or req.get("name") or "")
        if not name:
            return _err(400, "model is required" if kind == "create" else "invalid model name")
        # pull honours the pulled model's scenario (delays, toxic modes) when there is one
        sc = self._find(name) or Scenario()
        source = self._find(str(req.get("from") or "")) if kind == "create" else None
        prelude = await self._prelude(sc)
        if prelude is not None:
            return prelude
        lines = self._progress(kind, name, sc)
        message = "max retries exceeded: unexpected EOF"

        def on_success() -> None:
            if kind != "push" and self._find(name) is None:
                self.scenarios[_norm_name(name)] = dataclasses.replace(source or Scenario())

        if req.get("stream") is False:
            failed = await self._pace(ctx, sc, len(lines), lambda: _err(500, message, JSON_PLAIN))
            if failed is not None:
                return failed
            on_success()
            return _json(lines[-1], ctype=JSON_PLAIN)
        items = [_ndjson_frame(line) for line in lines]
        resp, completed = await self._stream(
            ctx, sc, NDJSON, items, lambda: _dumps({"error": message}) + b"\n",
            lambda: _err(500, message, JSON_PLAIN))
        if completed:
            on_success()
        return resp

    async def _pull(self, ctx: _Ctx) -> web.StreamResponse:
        return await self._progress_route(ctx, "pull")

    async def _push(self, ctx: _Ctx) -> web.StreamResponse:
        return await self._progress_route(ctx, "push")

    async def _create(self, ctx: _Ctx) -> web.StreamResponse:
        return await self._progress_route(ctx, "create")

    async def _blob_upload(self, ctx: _Ctx) -> web.StreamResponse:
        digest = ctx.param
        await self._read_body(ctx, keep_all=False)
        if not _DIGEST_RE.fullmatch(digest):
            return _err(400, "invalid digest format")
        if digest in self.blobs:
            return _reply(200)
        got = "sha256:" + ctx.rec.body_sha256
        if got != digest:  # exact comparison, as Ollama does
            return _err(400, f'digest mismatch, expected "{digest}", got "{got}"')
        self.blobs.add(digest)
        return _reply(201)

    async def _blob_head(self, ctx: _Ctx) -> web.StreamResponse:
        if not _DIGEST_RE.fullmatch(ctx.param):
            return _err(400, "invalid digest format")
        if ctx.param in self.blobs:
            return _reply(200)
        return _err(404, f'blob "{ctx.param}" not found')

    # --- native inference ---

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

    def _native_chunks(self, chat: bool, model: str, sc: Scenario, raw: bool) -> tuple[
            list[Callable[[], dict[str, Any]]], Callable[[], dict[str, Any]]]:
        """Builders for each streamed chunk, and for the aggregated stream:false reply."""

        def chunk(content: str = "", thinking: str = "", tools: list[dict[str, Any]] | None = None,
                  final: bool = False) -> dict[str, Any]:
            obj: dict[str, Any] = {"model": model, "created_at": _go_time()}
            if chat:
                msg: dict[str, Any] = {"role": "assistant", "content": content}
                if thinking:
                    msg["thinking"] = thinking
                if tools:
                    msg["tool_calls"] = tools
                obj["message"] = msg
            else:
                obj["response"] = content
                if thinking:
                    obj["thinking"] = thinking
            obj["done"] = final
            if final:
                obj["done_reason"] = sc.done_reason
                metrics = sc.metrics()
                n_context = sc.prompt_eval_count + metrics.get("eval_count", 0)
                if not chat and not raw and n_context > 0:
                    obj["context"] = list(range(1, 1 + n_context))
            if tools and not chat:
                obj["tool_calls"] = tools
            if final:
                obj.update(metrics)
            return obj

        tools = self._native_tool_calls(sc)
        items: list[Callable[[], dict[str, Any]]]
        items = [functools.partial(chunk, thinking=t) for t in sc.thinking]
        items += [functools.partial(chunk, content=t) for t in sc.tokens]
        if tools:
            items.append(functools.partial(chunk, tools=tools))
        items.append(functools.partial(chunk, final=True))

        def whole() -> dict[str, Any]:
            return chunk("".join(sc.tokens), "".join(sc.thinking), tools, final=True)

        return items, whole

    async def _native(self, ctx: _Ctx, chat: bool) -> web.StreamResponse:
        req = _parse(ctx.body, "api.ChatRequest" if chat else "api.GenerateRequest")
        if isinstance(req, web.Response):
            return req
        model = req.get("model") or ""
        sc = self._find(model)
        if sc is None:
            return _unknown_model(model)
        empty = not (req.get("messages") if chat else req.get("prompt"))
        if empty and _is_zero_duration(req.get("keep_alive")):
            return _json(self._load_reply(chat, model, "unload"))
        prelude = await self._prelude(sc)
        if prelude is not None:
            return prelude
        if empty:  # load only; a single JSON object even when streaming
            return _json(self._load_reply(chat, model, "load"))
        items, whole = self._native_chunks(chat, model, sc, bool(req.get("raw")))
        if req.get("stream") is False:
            failed = await self._pace(ctx, sc, len(items), lambda: _err(500, RUNNER_ERROR))
            return failed if failed is not None else _json(whole(), gzip=sc.gzip)
        resp, _ = await self._stream(
            ctx, sc, NDJSON, [_ndjson_frame(make) for make in items],
            lambda: _dumps({"error": RUNNER_ERROR}) + b"\n",
            lambda: _err(500, RUNNER_ERROR, JSON_PLAIN))
        return resp

    def _load_reply(self, chat: bool, model: str, reason: str) -> dict[str, Any]:
        obj: dict[str, Any] = {"model": model, "created_at": _go_time()}
        if chat:
            obj["message"] = {"role": "assistant", "content": ""}
        else:
            obj["response"] = ""
        obj.update(done=True, done_reason=reason)
        return obj

    async def _generate(self, ctx: _Ctx) -> web.StreamResponse:
        return await self._native(ctx, chat=False)

    async def _chat(self, ctx: _Ctx) -> web.StreamResponse:
        return await self._native(ctx, chat=True)

    def _embed_inputs(self, value: Any) -> list[str] | None:
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        if isinstance(value, list):
            return [v if isinstance(v, str) else _dumps(v).decode() for v in value]
        return None

    async def _embed(self, ctx: _Ctx) -> web.StreamResponse:
        req = _parse(ctx.body, "api.EmbedRequest")
        if isinstance(req, web.Response):
            return req
        model = req.get("model") or ""
        sc = self._find(model)
        if sc is None:
            return _unknown_model(model)
        inputs = self._embed_inputs(req.get("input"))
        if inputs is None:
            return _err(400, "invalid input type")
        prelude = await self._prelude(sc)
        if prelude is not None:
            return prelude
        dims = int(req.get("dimensions") or sc.embedding_dims)
        metrics = sc.metrics()
        vectors = [_vector(model, t, dims) for t in inputs]
        reply: dict[str, Any] = {"model": model, "embeddings": vectors}
        for key in ("total_duration", "load_duration", "prompt_eval_count"):  # omitempty
            if key in metrics:
                reply[key] = metrics[key]
        return _json(reply, gzip=sc.gzip)

    async def _embeddings(self, ctx: _Ctx) -> web.StreamResponse:
        req = _parse(ctx.body, "api.EmbeddingRequest")
        if isinstance(req, web.Response):
            return req
        model = req.get("model") or ""
        sc = self._find(model)
        if sc is None:
            return _unknown_model(model)
        prelude = await self._prelude(sc)
        if prelude is not None:
            return prelude
        prompt = req.get("prompt") or ""
        vector = _vector(model, prompt, sc.embedding_dims) if prompt else []
        return _json({"embedding": vector}, gzip=sc.gzip)

    # --- OpenAI compatibility ---

    def _oa_request(self, ctx: _Ctx, go_type: str,
                    ) -> tuple[dict[str, Any], Scenario] | web.Response:
        req = _decode(ctx.body, go_type)
        if isinstance(req, str):
            return _oa_err(400, req, JSON_UTF8)
        if go_type == "openai.ChatCompletionRequest" and not req.get("messages"):
            return _oa_err(400, "[] is too short - 'messages'", JSON_UTF8)
        model = req.get("model") or ""
        sc = self._find(model)
        if sc is None:
            if not model:
                return _oa_err(400, "model is required")
            return _oa_err(404, f"model '{model}' not found")
        return req, sc

    @staticmethod
    def _usage(sc: Scenario) -> dict[str, int]:
        completion = sc.metrics().get("eval_count", 0)
        return {"prompt_tokens": sc.prompt_eval_count, "completion_tokens": completion,
                "total_tokens": sc.prompt_eval_count + completion}

    @staticmethod
    def _include_usage(req: dict[str, Any]) -> bool:
        options = req.get("stream_options")
        return isinstance(options, dict) and options.get("include_usage") is True

    async def _v1_chat(self, ctx: _Ctx) -> web.StreamResponse:
        parsed = self._oa_request(ctx, "openai.ChatCompletionRequest")
        if isinstance(parsed, web.Response):
            return parsed
        req, sc = parsed
        model: str = req["model"]
        prelude = await self._prelude(sc, openai=True)
        if prelude is not None:
            return prelude
        cid = f"chatcmpl-{random.randrange(999)}"
        tools = self._oa_tool_calls(sc)
        usage = self._usage(sc)
        finish = "tool_calls" if tools and sc.done_reason == "stop" else sc.done_reason
        n_items = len(sc.thinking) + len(sc.tokens) + bool(tools) + 1
        if req.get("stream") is not True:
            failed = await self._pace(ctx, sc, n_items, lambda: _oa_err(500, RUNNER_ERROR))
            if failed is not None:
                return failed
            message: dict[str, Any] = {"role": "assistant", "content": "".join(sc.tokens)}
            if sc.thinking:
                message["reasoning"] = "".join(sc.thinking)
            if tools:
                message["tool_calls"] = tools
            choice = {"index": 0, "message": message, "finish_reason": finish}
            return _json({"id": cid, "object": "chat.completion", "created": int(time.time()),
                          "model": model, "system_fingerprint": "fp_ollama", "choices": [choice],
                          "usage": usage}, ctype=JSON_PLAIN, newline=True, gzip=sc.gzip)

        # Current format: role only on the first chunk, created pinned to the first
        # chunk, a separate finish chunk, usage chunk only with include_usage.
        state: dict[str, Any] = {"created": None, "role": True}

        def chunk(delta: dict[str, Any], finish_reason: str | None = None,
                  name: str = model) -> dict[str, Any]:
            if state["created"] is None:
                state["created"] = int(time.time())
            if state["role"] and finish_reason is None:
                delta = {"role": "assistant", **delta}
                state["role"] = False
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
            return {"id": cid, "object": "chat.completion.chunk", "created": state["created"],
                    "model": name, "system_fingerprint": "fp_ollama", "choices": [choice]}

        def event(delta: dict[str, Any]) -> _Frames:
            return lambda: [_sse(chunk(delta))]

        def closing() -> list[bytes]:
            frames = [_sse(chunk({"content": ""}))] if state["role"] else []  # empty completion
            frames.append(_sse(chunk({}, finish)))
            if self._include_usage(req):
                frames.append(_sse({**chunk({}, finish), "choices": [], "usage": usage}))
            return [*frames, b"data: [DONE]\n\n"]

        items = [event({"content": "", "reasoning": t}) for t in sc.thinking]
        items += [event({"content": t}) for t in sc.tokens]
        if tools:
            items.append(event({"content": "", "tool_calls": tools}))
        items.append(closing)
        # Ollama's in-band {"error"} line becomes an empty-delta chunk with no model,
        # and the stream then ends without [DONE].
        resp, _ = await self._stream(ctx, sc, SSE, items,
                                     lambda: _sse(chunk({"content": ""}, name="")),
                                     lambda: _oa_err(500, RUNNER_ERROR))
        return resp

    async def _v1_completions(self, ctx: _Ctx) -> web.StreamResponse:
        parsed = self._oa_request(ctx, "openai.CompletionRequest")
        if isinstance(parsed, web.Response):
            return parsed
        req, sc = parsed
        model: str = req["model"]
        prelude = await self._prelude(sc, openai=True)
        if prelude is not None:
            return prelude
        cid = f"cmpl-{random.randrange(999)}"
        usage = self._usage(sc)
        texts = [""] * len(sc.thinking) + list(sc.tokens) + ([""] if sc.tool_calls else [])
        if req.get("stream") is not True:
            failed = await self._pace(ctx, sc, len(texts) + 1, lambda: _oa_err(500, RUNNER_ERROR))
            if failed is not None:
                return failed
            choice = {"text": "".join(texts), "index": 0, "finish_reason": sc.done_reason}
            return _json({"id": cid, "object": "text_completion", "created": int(time.time()),
                          "model": model, "system_fingerprint": "fp_ollama", "choices": [choice],
                          "usage": usage}, ctype=JSON_PLAIN, newline=True, gzip=sc.gzip)
        include_usage = self._include_usage(req)

        def chunk(text: str, finish_reason: str | None = None, name: str = model) -> dict[str, Any]:
            choice = {"text": text, "index": 0, "finish_reason": finish_reason}
            obj: dict[str, Any] = {"id": cid, "object": "text_completion",
                                   "created": int(time.time()), "choices": [choice],
                                   "model": name, "system_fingerprint": "fp_ollama"}
            if include_usage:  # quirk: every chunk carries zero usage
                obj["usage"] = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
            return obj

        def closing() -> list[bytes]:
            frames = [_sse(chunk("", sc.done_reason))]
            if include_usage:
                frames.append(_sse({**chunk(""), "choices": [], "usage": usage}))
            return [*frames, b"data: [DONE]\n\n"]

        def event(text: str) -> _Frames:
            return lambda: [_sse(chunk(text))]

        items = [event(t) for t in texts]
        items.append(closing)
        resp, _ = await self._stream(ctx, sc, SSE, items, lambda: _sse(chunk("", name="")),
                                     lambda: _oa_err(500, RUNNER_ERROR))
        return resp

    async def _v1_embeddings(self, ctx: _Ctx) -> web.StreamResponse:
        parsed = self._oa_request(ctx, "openai.EmbedRequest")
        if isinstance(parsed, web.Response):
            return parsed
        req, sc = parsed
        model: str = req["model"]
        inputs = self._embed_inputs(req.get("input"))
        if not inputs:
            return _oa_err(400, "invalid input", JSON_UTF8)
        prelude = await self._prelude(sc, openai=True)
        if prelude is not None:
            return prelude
        dims = int(req.get("dimensions") or sc.embedding_dims)
        data = []
        for i, text in enumerate(inputs):
            vec: Any = _vector(model, text, dims)
            if str(req.get("encoding_format", "")).lower() == "base64":
                vec = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
            data.append({"object": "embedding", "embedding": vec, "index": i})
        usage = {"prompt_tokens": sc.prompt_eval_count, "total_tokens": sc.prompt_eval_count}
        return _json({"object": "list", "data": data, "model": model, "usage": usage},
                     ctype=JSON_PLAIN, newline=True, gzip=sc.gzip)

    def _oa_model(self, name: str) -> dict[str, Any]:
        parts = name.split("/")
        owner = parts[-2] if len(parts) > 1 else "library"
        created = self._born_ns // 1_000_000_000
        return {"id": name, "object": "model", "created": created, "owned_by": owner}

    async def _v1_models(self, ctx: _Ctx) -> web.StreamResponse:
        data = [self._oa_model(n) for n in self._models()] or None
        return _json({"object": "list", "data": data}, ctype=JSON_PLAIN, newline=True)

    async def _v1_model(self, ctx: _Ctx) -> web.StreamResponse:
        if self._find(ctx.param) is None:
            return _oa_err(404, f"model '{ctx.param}' not found")
        return _json(self._oa_model(ctx.param), ctype=JSON_PLAIN, newline=True)

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


# --- process mode -----------------------------------------------------------------


async def _serve(host: str, port: int, scenarios: dict[str, Scenario] | None,
                 check_host: bool) -> None:
    fake = FakeOllama(scenarios, check_host=check_host)
    await fake.start(host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"LISTENING {fake.port}", flush=True)
    await stop.wait()
    await fake.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fake Ollama server for tests.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--scenarios",
                        help='JSON {"model:tag": {scenario fields}}; replaces the defaults')
    parser.add_argument("--no-check-host", action="store_true",
                        help="disable Ollama's Host header check")
    args = parser.parse_args(argv)
    scenarios = None
    if args.scenarios:
        given = orjson.loads(args.scenarios)
        scenarios = {name: Scenario.from_json(fields) for name, fields in given.items()}
    serve = _serve(args.host, args.port, scenarios, not args.no_check_host)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve)
    else:
        uvloop.run(serve)
    return 0


if __name__ == "__main__":
    sys.exit(main())
