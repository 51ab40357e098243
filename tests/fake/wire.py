"""How Ollama writes and checks things on the wire: JSON as Go writes it, Go times, error
replies, SSE and NDJSON frames, body decoding, the Host check and CORS origins, embeddings."""

from __future__ import annotations

import gzip as gzip_module
import hashlib
import http
import ipaddress
import random
import re
import socket
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson
from aiohttp import web

from fake.scenario import (
    JSON_PLAIN,
    JSON_UTF8,
    _Frames,
)

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


_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
                   "h": 3600.0}


def _keep_alive_seconds(value: Any) -> float | None:
    """A request's keep_alive in seconds (negative: kept forever), or None when it gives none:
    a number is seconds, a string a Go duration (`"5m"`, `"-1m"`, `"1h30m"`)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str):
        return None
    text = value.strip()
    sign = -1.0 if text.startswith("-") else 1.0
    text = text.lstrip("+-")
    if text in ("0", ""):
        return 0.0 if text else None
    parts = _DURATION_PART_RE.findall(text)
    if "".join(n + u for n, u in parts) != text:
        return None
    return sign * sum(float(n) * _DURATION_UNITS[u] for n, u in parts)


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
    """As Ollama resolves a name: case ignored, default host, namespace and tag filled in."""
    name = name.lower().removeprefix("registry.ollama.ai/").removeprefix("library/")
    base = name.rsplit("/", 1)[-1]
    return name if ":" in base else name + ":latest"


def _is_embedding_model(name: str) -> bool:
    return any(s in name.lower() for s in ("minilm", "embed", "bge", "e5"))


def _vector(model: str, text: str, dims: int) -> list[float]:
    """Deterministic unit vector (float32-rounded) for a (model, text) pair."""
    rng = random.Random(hashlib.sha256(f"{model}\0{text}".encode()).digest())
    values = [rng.uniform(-1.0, 1.0) for _ in range(dims)]
    norm = sum(v * v for v in values) ** 0.5 or 1.0
    return [struct.unpack("f", struct.pack("f", v / norm))[0] for v in values]
