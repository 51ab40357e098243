"""Loki store: each batch is one push to Grafana Loki's HTTP push API; write-only.

The format follows Loki's HTTP API reference, "Ingest logs" (grafana/loki
docs/sources/reference/loki-http-api.md): `POST {url}/loki/api/v1/push` with
`Content-Type: application/json` and the body
`{"streams": [{"stream": {labels}, "values": [["<unix epoch ns as a string>", "<line>"], ...]}]}`.
Timestamps must be strings ("you must send the timestamp as a string and not a number, otherwise
the endpoint will return a 400 error"); `Content-Encoding: gzip` is accepted and used once a body
passes GZIP_OVER. No structured metadata (the optional third element) is sent: Loki before 3.0,
or a 3.x tenant with it disabled, rejects it, and the whole record is in the line anyway. A tenant
goes in `X-Scope-OrgID` (the multi-tenancy header of the same reference); user:password in the
URL becomes HTTP basic auth, since Loki leaves authentication to a proxy in front of it.

Streams are labelled {job, model, endpoint, prompt_category, outcome}, all bounded: endpoints are
route templates, categories and outcomes fixed sets, and models pass through ModelLabels (the
first MAX_MODELS names, then `other`; `none` when absent). The line is the whole record as
compact JSON, so LogQL's `| json` reaches every field. Each entry's timestamp is the record's
`started_at` to the microsecond, so a retried push carries identical entries, which Loki
de-duplicates (same stream, timestamp and line). Values are stably sorted by time within a
stream, as Loki before 2.4 rejects out-of-order entries.

Answers, as Promtail treats them ("only retry 429s, 500s and connection-level errors"):
* 2xx: done. Loki's `block_ingestion_status_code` (260 by default) is also 2xx: the operator has
  paused ingestion and asks clients not to retry, so it is logged and the batch is let go,
  counted as dropped.
* 400: Loki's distributor and ingester store every valid entry of a push and answer 400 listing
  the ones they ignored (too old, too new, too far behind, line too long) and, per stream, "total
  ignored: N out of M". Resending would store nothing more and be refused the same way for
  ever, stalling this store's queue, so the reason is logged as a warning and the N records
  (all of the batch, without such a count) are dropped and counted as such; the rest count as
  written. Loki counts those entries in `loki_discarded_samples_total`.
* 413 (a proxy's body limit): the batch is split in halves and each pushed; a single record that
  is still too large is logged and dropped.
* 429, 5xx, any other 4xx (401/403/404: credentials, tenant or URL not right yet), timeouts and
  connection errors: StoreError with Loki's answer, so the recorder retries with back-off.

`purge` deletes nothing: retention in Loki is Loki's configuration (`limits_config`
retention_period with the compactor's retention enabled), not a client's to enforce.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import logging
import re
import time
from collections.abc import Iterable
from typing import Any

import aiohttp
import orjson
from yarl import URL

from ... import __version__
from ...observe.labels import ModelLabels
from ...printable import printable
from . import Record, StoreError

log = logging.getLogger(__name__)

PUSH_PATH = "loki/api/v1/push"
JOB = "ollama-metrics"
MAX_MODELS = 50  # distinct model label values per process before `other`
MAX_VALUE = 200  # label value length; Loki refuses values over 2048 by default
GZIP_OVER = 64 * 1024  # bytes of JSON body
MAX_REASON = 1000  # characters of Loki's answer kept in errors and warnings
CONNECT_TIMEOUT = 5.0
TOTAL_TIMEOUT = 30.0

Labels = tuple[tuple[str, str], ...]


def _label(value: Any) -> str:
    """A label value Loki takes: non-empty (empty means no label at all), short, valid UTF-8."""
    text = str(value)[:MAX_VALUE] if value not in (None, "") else "none"
    return text.encode("utf-8", "replace").decode("utf-8")


def _ns(record: Record) -> int:
    """The entry's time: `started_at` in whole microseconds, so it is the same on every retry."""
    seconds = record.get("started_at") or record.get("ended_at") or time.time()
    return round(float(seconds) * 1_000_000) * 1000


def _line(record: Record) -> str:
    try:
        return orjson.dumps(record).decode()
    except TypeError:
        # Client-supplied values orjson refuses (lone surrogates, integers past 64 bits) must not
        # make the batch unwritable: the standard library writes them, and a lone surrogate
        # becomes "?", as the line must be valid UTF-8.
        text = json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str)
        return text.encode("utf-8", "replace").decode("utf-8")


def _basic_auth(user: str, password: str) -> str:
    """The Authorization header value (RFC 7617, UTF-8), as aiohttp deprecates BasicAuth."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


_IGNORED = re.compile(r"total ignored: (\d+) out of \d+")


def _reason(text: str) -> str:
    text = printable(" ".join(text.split()))  # Loki may echo a record's labels: a model name
    return text if len(text) <= MAX_REASON else text[:MAX_REASON] + "…"


class LokiStore:
    name = "loki"

    def __init__(self, url: str, *, tenant: str | None = None) -> None:
        base = URL(url)
        self._auth = (_basic_auth(base.user, base.password or "")
                      if base.user is not None else None)
        # Credentials stay out of the URL, which appears in errors and logs.
        self.url = str(base.with_user(None).with_query(None).with_fragment(None) / PUSH_PATH)
        self.tenant = tenant
        self._models = ModelLabels(MAX_MODELS)
        self._session: aiohttp.ClientSession | None = None
        self._blocked_status: int | None = None

    async def open(self) -> None:
        headers = {"User-Agent": f"ollama-metrics/{__version__}"}
        if self.tenant:
            headers["X-Scope-OrgID"] = self.tenant
        if self._auth:
            headers["Authorization"] = self._auth
        self._session = aiohttp.ClientSession(
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=TOTAL_TIMEOUT, connect=CONNECT_TIMEOUT))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def purge(self, older_than: float | None, max_bytes: int | None) -> int:
        return 0

    def labels(self, record: Record) -> dict[str, str]:
        """The stream labels of `record`."""
        return {
            "job": JOB,
            "model": self._models(record.get("model")),
            "endpoint": _label(record.get("endpoint")),
            "prompt_category": _label(record.get("prompt_category")),
            "outcome": _label(record.get("outcome")),
        }

    def body(self, records: Iterable[Record]) -> bytes:
        """The push body: one stream per label set, in order of first appearance."""
        streams: dict[Labels, list[tuple[int, str]]] = {}
        for record in records:
            key = tuple(self.labels(record).items())
            streams.setdefault(key, []).append((_ns(record), _line(record)))
        return orjson.dumps({"streams": [
            {"stream": dict(key),
             "values": [[str(ns), line] for ns, line in sorted(values, key=lambda v: v[0])]}
            for key, values in streams.items()
        ]})

    async def write_batch(self, records: list[Record]) -> int:
        return await self._push(records) if records else 0

    async def _push(self, records: list[Record]) -> int:
        """Push `records`; how many Loki refused for good (raises for what is worth a retry)."""
        if self._session is None:
            raise RuntimeError("store not open")
        data = self.body(records)
        headers = {"Content-Type": "application/json"}
        if len(data) > GZIP_OVER:
            # Off the event loop: a batch of long conversations is megabytes of JSON.
            data = await asyncio.to_thread(gzip.compress, data, 6)
            headers["Content-Encoding"] = "gzip"
        try:
            async with self._session.post(self.url, data=data, headers=headers) as resp:
                status, text = resp.status, await resp.text(errors="replace")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            why = str(exc) or ("timed out" if isinstance(exc, asyncio.TimeoutError)
                               else type(exc).__name__)
            raise StoreError(f"cannot push to Loki at {self.url}: {why}") from None
        if 200 <= status < 300:
            return self._accepted(status, text, len(records))
        if status == 400:
            # Loki stores the valid entries of a push and says how many of each stream's it
            # ignored; without that count, it refused the push as a whole.
            ignored = [int(n) for n in _IGNORED.findall(text)]
            refused = min(sum(ignored), len(records)) if ignored else len(records)
            log.warning("analytics: Loki refused %d of a batch of %d records, which will not "
                        "be resent: %s", refused, len(records), _reason(text))
            return refused
        if status == 413 and len(records) > 1:
            half = len(records) // 2
            return await self._push(records[:half]) + await self._push(records[half:])
        if status == 413:
            log.warning("analytics: record %s is too large for Loki at %s (%d bytes), dropped: "
                        "%s", records[0].get("id"), self.url, len(data), _reason(text))
            return 1
        raise StoreError(f"Loki at {self.url} answered {status}: {_reason(text)}")

    def _accepted(self, status: int, text: str, pushed: int) -> int:
        """A 2xx: 200 and 204 store the push; any other (Loki's block_ingestion_status_code,
        260 by default) stores nothing and asks not to be retried."""
        if status in (200, 204):
            if self._blocked_status is not None:
                log.warning("analytics: Loki accepts pushes again")
                self._blocked_status = None
            return 0
        if self._blocked_status != status:
            self._blocked_status = status
            log.warning("analytics: Loki answered %d, not storing what it receives (blocked "
                        "ingestion?): %s", status, _reason(text))
        return pushed
