"""A Loki push endpoint for tests: a real aiohttp server that checks pushes strictly.

Contract (Loki HTTP API reference, "Ingest logs"):

* ``POST /loki/api/v1/push`` only (other methods 405, other paths 404); ``GET /ready`` answers
  ``ready`` as Loki does.
* ``Content-Type: application/json`` (Loki reads any other type as snappy protobuf and fails);
  ``Content-Encoding`` absent, ``identity`` or ``gzip``, and a gzip body must really be gzip.
* Body ``{"streams": [{"stream": {name: value}, "values": [[ts, line], ...]}]}`` and nothing
  else: at least one label per stream, names per the Prometheus data model
  (``[a-zA-Z_][a-zA-Z0-9_]*``, ``__`` prefix reserved), values non-empty strings (empty means
  no label); ``ts`` a decimal string of Unix nanoseconds (a number is a 400 in Loki; a value
  before 2001 is taken to be seconds or milliseconds by mistake); ``line`` a string; an
  optional third element of string-to-string structured metadata. Stricter than Loki 2.4+:
  values must be sorted by time within each stream, as older Loki requires.
* Anything wrong: 400 with the reason as text, also kept in ``errors``. Success: 204, empty.

Knobs, settable while running: ``fail_next(n, status, text)`` answers the next n pushes with
that status without storing; ``auth`` requires that basic auth (401 otherwise); ``require_tenant``
answers 401 "no org id" without ``X-Scope-OrgID``, like Loki with auth_enabled; ``max_body``
answers 413 above that many bytes on the wire, as a proxy in front of Loki would;
``reject_before`` (ns) ignores older entries as Loki's "too old" validation does: the rest of the
push is stored and the answer is 400 listing what was ignored.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
import socket
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import hdrs, web

PUSH_PATH = "/loki/api/v1/push"
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
NS_SINCE = 10**18  # 2001-09-09 in ns; a smaller "ns" timestamp is s, ms or us by mistake
INT64_MAX = 2**63 - 1


class BadPush(ValueError):
    """The push breaks the documented format; the message is the 400 answer."""


@dataclass
class Push:
    """One stored push: what arrived on the wire and the decoded body."""

    headers: dict[str, str]
    encoding: str | None  # Content-Encoding as sent
    size: int  # body bytes on the wire
    body: dict[str, Any]


@dataclass
class Entry:
    labels: dict[str, str]
    ns: int
    line: str


def _check(body: Any) -> list[tuple[dict[str, str], list[tuple[int, str]]]]:
    """The streams of a decoded push as (labels, [(ns, line)]), or BadPush."""
    if not isinstance(body, dict) or set(body) != {"streams"}:
        raise BadPush('the body must be an object with exactly one key, "streams"')
    if not isinstance(body["streams"], list):
        raise BadPush('"streams" must be an array')
    streams = []
    for i, stream in enumerate(body["streams"]):
        where = f"streams[{i}]"
        if not isinstance(stream, dict) or set(stream) != {"stream", "values"}:
            raise BadPush(f'{where} must be an object with the keys "stream" and "values"')
        labels = stream["stream"]
        if not isinstance(labels, dict) or not labels:
            raise BadPush(f"{where}.stream: at least one label pair is required per stream")
        for name, value in labels.items():
            if not LABEL_NAME.fullmatch(name) or name.startswith("__"):
                raise BadPush(f"{where}.stream: invalid label name {name!r}")
            if not isinstance(value, str) or not value:
                raise BadPush(f"{where}.stream: label {name!r} must have a non-empty string value")
        values = stream["values"]
        if not isinstance(values, list):
            raise BadPush(f'{where}.values must be an array')
        entries: list[tuple[int, str]] = []
        for j, value in enumerate(values):
            at = f"{where}.values[{j}]"
            if not isinstance(value, list) or len(value) not in (2, 3):
                raise BadPush(f"{at} must be [timestamp, line] or [timestamp, line, metadata]")
            ts, line = value[0], value[1]
            if not isinstance(ts, str) or not ts.isascii() or not ts.isdigit():
                raise BadPush(f"{at}: the timestamp must be a string of decimal digits, got "
                              f"{ts!r}")
            ns = int(ts)
            if not NS_SINCE <= ns <= INT64_MAX:
                raise BadPush(f"{at}: {ts} is not a Unix epoch in nanoseconds")
            if not isinstance(line, str):
                raise BadPush(f"{at}: the log line must be a string")
            if len(value) == 3:
                meta = value[2]
                if not isinstance(meta, dict) or not all(
                        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
                    raise BadPush(f"{at}: structured metadata must map strings to strings")
            if entries and ns < entries[-1][0]:
                raise BadPush(f"{at}: entry out of order within its stream")
            entries.append((ns, line))
        streams.append((labels, entries))
    return streams


class LokiReceiver:
    def __init__(self) -> None:
        self.pushes: list[dict[str, Any]] = []  # decoded bodies of stored pushes
        self.received: list[Push] = []  # the same pushes with their headers and wire size
        self.entries: list[Entry] = []  # every stored entry, in arrival order
        self.errors: list[str] = []  # reasons of format violations answered 400
        self.attempts = 0  # every request to the push path
        self.auth: tuple[str, str] | None = None  # (user, password) required when set
        self.require_tenant = False
        self.max_body: int | None = None
        self.reject_before: int | None = None
        self._fail: list[tuple[int, str]] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """The base URL, as configured for the store (it appends the push path)."""
        return f"http://127.0.0.1:{self.port}"

    def fail_next(self, n: int, status: int = 500, text: str = "internal server error") -> None:
        self._fail += [(status, text)] * n

    def lines(self) -> list[dict[str, Any]]:
        """Every stored log line, decoded from JSON (the standard library's decoder, which
        keeps integers past 64 bits as Loki's `| json` reads them: numbers, not errors)."""
        return [json.loads(e.line) for e in self.entries]

    def _auth_header(self) -> str:
        assert self.auth is not None
        user, password = self.auth
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")

    async def start(self) -> None:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", PUSH_PATH, self._push)
        app.router.add_get("/ready", self._ready)
        # The body is decoded here, by the documented rules, not by aiohttp's parser.
        self._runner = web.AppRunner(app, access_log=None, auto_decompress=False)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _ready(self, request: web.Request) -> web.Response:
        return web.Response(text="ready\n")

    async def _push(self, request: web.Request) -> web.Response:
        self.attempts += 1
        if request.method != "POST":
            return web.Response(status=405, text="405 method not allowed\n")
        if self.auth is not None and request.headers.get(hdrs.AUTHORIZATION) != self._auth_header():
            return web.Response(status=401, text="401 Unauthorized\n")
        if self.require_tenant and not request.headers.get("X-Scope-OrgID"):
            return web.Response(status=401, text="no org id\n")
        raw = await request.read()
        if self.max_body is not None and len(raw) > self.max_body:
            return web.Response(status=413, text="413 Request Entity Too Large\n")
        if self._fail:
            status, text = self._fail.pop(0)
            return web.Response(status=status, text=text + "\n")
        try:
            body = self._decode(request, raw)
            streams = _check(body)
        except BadPush as exc:
            self.errors.append(str(exc))
            return web.Response(status=400, text=f"{exc}\n")
        ignored = []
        for labels, entries in streams:
            for ns, line in entries:
                if self.reject_before is not None and ns < self.reject_before:
                    ignored.append(f"entry with timestamp {ns} ignored, reason: 'entry for "
                                   f"stream {labels} has timestamp too old: {ns}'")
                else:
                    self.entries.append(Entry(labels, ns, line))
        total = sum(len(entries) for _, entries in streams)
        if len(ignored) < total:
            self.pushes.append(body)
            self.received.append(Push(dict(request.headers),
                                      request.headers.get(hdrs.CONTENT_ENCODING), len(raw), body))
        if ignored:
            text = ",\n".join(ignored) + f"\ntotal ignored: {len(ignored)} out of {total}"
            return web.Response(status=400, text=text)
        return web.Response(status=204)

    @staticmethod
    def _decode(request: web.Request, raw: bytes) -> Any:
        if request.content_type != "application/json":
            raise BadPush(f"Content-Type must be application/json, got {request.content_type!r}")
        encoding = request.headers.get(hdrs.CONTENT_ENCODING, "identity").lower()
        if encoding == "gzip":
            try:
                raw = gzip.decompress(raw)
            except (OSError, EOFError) as exc:
                raise BadPush(f"Content-Encoding is gzip but the body is not: {exc}") from None
        elif encoding != "identity":
            raise BadPush(f"unsupported Content-Encoding {encoding!r}")
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise BadPush(f"the body is not JSON: {exc}") from None
