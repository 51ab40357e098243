"""The /analytics/* HTTP routes: search, one record, models, stats, time series, export.

The original proxy's routes and parameters are kept (/analytics/search with start_time,
end_time, model, prompt_search, prompt_category; /analytics/messages/{id}; /analytics/stats).
Every route here shows prompts, so each requires the token when one is configured: as a bearer
header, or as the cookie the dashboard sets (dashboard.routes). Bad parameters or bad
full-text syntax answer 400 with the reason, as does a search past the caps of
analytics.query (terms, characters, prefix stem). A query that runs past the search deadline
(ANALYTICS_SEARCH_TIMEOUT), or finds the store running as many searches as it may, answers 503
with the reason; a client that goes away cancels its query (aiohttp cancels the handler, the
store interrupts the query).
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import orjson
from aiohttp import web

from . import timeseries
from .query import BadQuery, parse
from .stores import FIELD_NAMES, JSON_FIELDS, QueryableStore, StoreBusy, StoreError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
log = logging.getLogger(__name__)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


COOKIE = "ollama_metrics_token"


def cookie_value(token: str) -> str:
    """What the dashboard's cookie holds: derived from the token, so the browser never stores
    the token itself (the cookie opens /analytics only; the token may also open /metrics)."""
    return hmac.new(token.encode("utf-8", "surrogateescape"), b"ollama-metrics dashboard cookie",
                    hashlib.sha256).hexdigest()


def same_secret(given: str, expected: str) -> bool:
    """Equal, in time that depends on neither value (their digests are compared, so not even on
    the length). Undecodable header bytes arrive surrogate-escaped: they compare, as unequal."""
    def digest(text: str) -> bytes:
        return hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()

    return hmac.compare_digest(digest(given), digest(expected))


def authorized(token: str, request: web.Request) -> bool:
    """Does the request carry `Authorization: Bearer <token>` (the scheme in any case, as RFC
    9110 has it), or, on /analytics routes, the dashboard's cookie?"""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    bearer = same_secret(given.lstrip(" "), token) and scheme.lower() == "bearer"
    cookie = same_secret(request.cookies.get(COOKIE, ""), cookie_value(token))
    return bearer or (cookie and (request.path + "/").startswith("/analytics/"))


def require_token(token: str | None, handler: Handler) -> Handler:
    """`handler`, answering 401 unless the request is `authorized`."""
    if token is None:
        return handler

    async def guarded(request: web.Request) -> web.StreamResponse:
        if not authorized(token, request):
            return web.Response(
                status=401, body=orjson.dumps({"error": "analytics routes need "
                                               "'Authorization: Bearer <ANALYTICS_TOKEN>'"}),
                content_type="application/json", headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    return guarded


class AnalyticsApi:
    def __init__(self, store: Callable[[], QueryableStore | None], backends: tuple[str, ...]
                 ) -> None:
        self._store = store
        self._backends = backends

    def routes(self, token: str | None) -> list[web.RouteDef]:
        def get(path: str, handler: Handler) -> web.RouteDef:
            return web.get(path, require_token(token, self._guard(handler)))

        return [
            get("/analytics/search", self.search),
            get("/analytics/messages", self.search),
            get("/analytics/messages/{id}", self.message),
            get("/analytics/models", self.models),
            get("/analytics/stats", self.stats),
            get("/analytics/timeseries", self.timeseries),
            get("/analytics/export", self.export),
        ]

    def _guard(self, handler: Handler) -> Handler:
        async def run(request: web.Request) -> web.StreamResponse:
            if self._store() is None:
                backends = ",".join(self._backends) or "none"
                return _json({"error": "searching analytics needs the sqlite or postgres "
                              f"backend; ANALYTICS_BACKEND is {backends}"}, status=503)
            try:
                return await handler(request)
            except BadQuery as exc:
                return _json({"error": str(exc)}, status=400)
            except StoreBusy as exc:
                response = _json({"error": str(exc)}, status=503)
                response.headers["Retry-After"] = "1"
                return response
            except StoreError as exc:
                return _json({"error": str(exc)}, status=503)

        return run

    def _q(self) -> QueryableStore:
        store = self._store()
        assert store is not None
        return store

    async def search(self, request: web.Request) -> web.StreamResponse:
        query = parse(request.query)
        page = await self._q().search(query)
        return _json({"results": page.records, "count": len(page.records),
                      "next_cursor": page.next_cursor})

    async def message(self, request: web.Request) -> web.StreamResponse:
        record = await self._q().get(request.match_info["id"])
        if record is None:
            return _json({"error": "no such interaction"}, status=404)
        return _json(record)

    async def models(self, request: web.Request) -> web.StreamResponse:
        return _json({"models": await self._q().models(parse(request.query))})

    async def stats(self, request: web.Request) -> web.StreamResponse:
        query = parse(request.query)
        stats = await self._q().stats(query)
        stats["range"] = {"start_time": query.start_time, "end_time": query.end_time}
        return _json(stats)

    async def timeseries(self, request: web.Request) -> web.StreamResponse:
        """Per-bucket figures over a range (the hour before `end_time`, or now, when no start
        is given); `step` seconds per bucket, chosen from the range when absent. Every bucket
        is listed."""
        params = dict(request.query)
        raw_step = params.pop("step", None)
        query = parse(params)
        end = query.end_time if query.end_time is not None else time.time()
        start = query.start_time if query.start_time is not None \
            else end - timeseries.DEFAULT_SPAN
        step = timeseries.parse_step(raw_step, end - start)
        query = replace(query, start_time=start, end_time=end)
        buckets = await self._q().timeseries(query, step)
        return _json({"start_time": start, "end_time": end, "step": step,
                      "points": timeseries.fill(buckets, start, end, step)})

    async def export(self, request: web.Request) -> web.StreamResponse:
        fmt = request.query.get("format", "jsonl")
        if fmt not in ("jsonl", "csv"):
            raise BadQuery(f"format: jsonl or csv, got {fmt!r}")
        query = parse(request.query)
        records = self._q().export(query)
        first = await anext(records, None)  # a bad query fails here, before anything is sent
        response = web.StreamResponse(headers={
            "Content-Type": "application/x-ndjson" if fmt == "jsonl" else "text/csv; charset=utf-8",
            "Content-Disposition": f'attachment; filename="interactions.{fmt}"',
        })
        await response.prepare(request)
        try:
            if await self._send_export(request, response, fmt, first, records):
                await response.write_eof()
        except ConnectionResetError:  # the client went away mid-export: nothing to answer
            pass
        return response

    async def _send_export(self, request: web.Request, response: web.StreamResponse, fmt: str,
                           first: dict[str, Any] | None,
                           records: AsyncIterator[dict[str, Any]]) -> bool:
        """Write the records; False when the export was cut short (the store failed)."""
        line = jsonl_line if fmt == "jsonl" else csv_row
        if fmt == "csv":
            await response.write(csv_line(FIELD_NAMES))
        if first is not None:
            await response.write(line(first))
            try:
                async for record in records:
                    await response.write(line(record))
            except StoreError as exc:  # a later page failed (deadline): cut, not completed
                log.warning("analytics: export cut short: %s", exc)
                if request.transport is not None:
                    request.transport.close()
                return False
        return True


def jsonl_line(record: dict[str, Any]) -> bytes:
    return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)


def csv_line(values: list[Any]) -> bytes:
    out = io.StringIO()
    csv.writer(out).writerow(values)
    return out.getvalue().encode()


# A spreadsheet reads a cell starting with one of these as a formula (`=cmd|' /C calc'!A0`).
_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """OWASP's rule against CSV injection: text starting like a formula gets a leading `'`, so a
    spreadsheet shows it as text. Numbers stay numbers (-1.5 is not a formula); JSON fields
    start with `[`, `{` or `"`, or are numbers."""
    if isinstance(value, str) and value.startswith(_FORMULA):
        return "'" + value
    return value


def csv_row(record: dict[str, Any]) -> bytes:
    return csv_line([
        orjson.dumps(record[name]).decode() if name in JSON_FIELDS and record[name] is not None
        else csv_cell(record[name])
        for name in FIELD_NAMES
    ])
