"""The dashboard's routes: GET /analytics (the page), /analytics/static/<file>, /dashboard.

Only files packaged under static/ are served. They are listed and read once, when the routes
are made; a request names one by its exact relative path, and any other name — `..`, encoded
or not, a directory, an absolute path — is a 404 without touching the file system. Every answer
carries the security headers: a Content-Security-Policy allowing no inline script and no other
origin (the page builds its DOM with textContent, so stored prompts stay text), nosniff, and no
referrer.

The token: when analytics has one, the page needs it as the API does. A browser cannot send a
bearer header when it loads a page, so visiting /analytics?token=<token> once sets a cookie
(HttpOnly, SameSite=Strict, Path=/analytics; see analytics.api.cookie_value) and redirects to
/analytics, so the token leaves the address bar and history. Static files hold no data and are
served without the token (the 401 page uses the stylesheet).
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING

from aiohttp import web

from ..analytics.api import COOKIE, authorized, cookie_value, same_secret

if TYPE_CHECKING:
    if sys.version_info >= (3, 11):
        from importlib.resources.abc import Traversable
    else:
        from importlib.abc import Traversable

PAGE = "/analytics"
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
}

_UNAUTHORIZED = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>ollama-metrics: token needed</title>
<link rel="icon" href="/analytics/static/favicon.svg">
<link rel="stylesheet" href="/analytics/static/app.css"></head>
<body class="gate"><main>
<h1>This dashboard needs the analytics token</h1>
<p>{reason}</p>
<p>Open <code>/analytics?token=YOUR_TOKEN</code> once, with the value of
<code>--analytics-token</code> (<code>ANALYTICS_TOKEN</code>). The proxy then keeps it in a
cookie for this browser and takes it out of the address bar.</p>
<p>Scripts reading <code>/analytics/*</code> send <code>Authorization: Bearer YOUR_TOKEN</code>
instead.</p>
</main></body></html>
"""


@dataclass(frozen=True)
class _File:
    body: bytes
    content_type: str
    etag: str


def _walk(directory: Traversable, prefix: str = "") -> dict[str, _File]:
    files: dict[str, _File] = {}
    for entry in directory.iterdir():
        name = prefix + entry.name
        if entry.is_dir():
            files.update(_walk(entry, name + "/"))
            continue
        suffix = "." + entry.name.rsplit(".", 1)[-1] if "." in entry.name else ""
        if suffix in _TYPES:
            body = entry.read_bytes()
            etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
            files[name] = _File(body, _TYPES[suffix], etag)
    return files


def static_files() -> dict[str, _File]:
    """Every servable file under static/, by its path relative to it."""
    return _walk(resources.files("ollama_metrics.dashboard").joinpath("static"))


def _respond(status: int, body: bytes, content_type: str, **headers: str) -> web.Response:
    response = web.Response(status=status, body=body, headers={**SECURITY_HEADERS, **headers})
    response.content_type, _, charset = content_type.partition("; charset=")
    response.charset = charset or None
    return response


def _unauthorized(reason: str) -> web.Response:
    body = _UNAUTHORIZED.format(reason=reason).encode()
    return _respond(401, body, _TYPES[".html"], **{"Cache-Control": "no-store"})


def routes(token: str | None) -> list[web.RouteDef]:
    files = static_files()
    index = files["index.html"]

    async def page(request: web.Request) -> web.StreamResponse:
        given = request.query.get("token")
        if given is not None:
            if token is not None and not same_secret(given, token):
                return _unauthorized("The token in the address is not the analytics token.")
            response = _respond(302, b"", _TYPES[".txt"], Location=PAGE)
            if token is not None:
                response.set_cookie(COOKIE, cookie_value(token), path=PAGE, httponly=True,
                                    samesite="Strict", secure=request.secure)
            return response
        if token is not None and not authorized(token, request):
            return _unauthorized("This browser has not given it yet.")
        return _respond(200, index.body, index.content_type, **{"Cache-Control": "no-store"})

    async def static(request: web.Request) -> web.StreamResponse:
        found = files.get(request.match_info["name"])
        if found is None:
            return _respond(404, b"not found\n", _TYPES[".txt"])
        headers = {"Cache-Control": "no-cache", "ETag": found.etag}
        if request.headers.get("If-None-Match") == found.etag:
            return _respond(304, b"", found.content_type, **headers)
        return _respond(200, found.body, found.content_type, **headers)

    async def dashboard(request: web.Request) -> web.StreamResponse:
        # The query as it came, still percent-encoded: decoded, a %0a would be a raw newline in
        # the Location header, which aiohttp refuses to write (the connection was dropped).
        query = request.rel_url.raw_query_string
        location = PAGE + (f"?{query}" if query else "")
        return _respond(302, b"", _TYPES[".txt"], Location=location)

    return [
        web.get(PAGE, page),
        web.get(PAGE + "/", page),
        web.get(PAGE + "/static/{name:.+}", static),
        web.get("/dashboard", dashboard),
    ]
