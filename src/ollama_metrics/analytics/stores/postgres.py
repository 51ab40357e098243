"""PostgreSQL store: one database shared by several proxies (psycopg 3, async, pooled).

Same records, queries and answers as the SQLite store. Writes are idempotent on `id`, so a
batch retried after a lost reply is harmless, and proxies writing at once never collide. `seq`
orders records by when the server numbered them: a record whose transaction commits after a
newer one's can be missed by a reader already paging past it, but is never listed twice.

Full-text search is PostgreSQL's own over a tsvector the writer fills from the record's texts
(analytics.fulltext: what was asked, weight A; what was answered, weight B); a search text is
turned into a tsquery by fulltext (each word a phraseto_tsquery of its own, bound). A search
with nothing searchable in it (only punctuation) matches nothing. PostgreSQL text cannot hold
NUL characters, so NUL in any stored or searched string becomes U+FFFD. Values are always bound
parameters.

Budget: every read runs in a transaction whose `statement_timeout` is the search deadline, and
its waiter gives up at the same deadline (waiting for a pooled connection included); a waiter
that is cancelled (past the deadline, or its client went away) has psycopg cancel the query on
the server. At most MAX_SEARCHES full-text reads hold pooled connections at once, so searches
never take the connections that writes and the dashboard's figures need.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from .. import fulltext
from ..query import STATUSES, Page, Query
from . import (
    FIELD_NAMES,
    FIELDS,
    MAX_SEARCHES,
    MAX_WAITING_SEARCHES,
    QueryTimeout,
    Record,
    StoreBusy,
    StoreError,
    column_filters,
)
from .postgres_migrations import SEARCH_VECTOR, migrate, search_texts

try:
    from psycopg import AsyncConnection
    from psycopg.conninfo import conninfo_to_dict
    from psycopg.errors import QueryCanceled
    from psycopg.types.json import set_json_loads
    from psycopg_pool import AsyncConnectionPool
except ImportError as exc:  # pragma: no cover - depends on the install
    raise StoreError("the postgres backend needs psycopg: "
                     "pip install 'ollama-metrics[postgres]'") from exc

if TYPE_CHECKING:
    from psycopg.rows import TupleRow

    Connection = AsyncConnection[TupleRow]

T = TypeVar("T")
log = logging.getLogger(__name__)

_POOL_SIZE = 4
_TIMEOUT = 10.0  # seconds to connect, or to wait for a pooled connection
_EXPORT_PAGE = 1000
_PURGE_BATCH = 10_000  # rows per delete: short transactions, little lock time on a shared server

_INSERT = (
    f"INSERT INTO interactions ({', '.join(FIELD_NAMES)}, search) VALUES ("
    + ", ".join("%s::jsonb" if kind == "json" else "%s" for _, kind in FIELDS)
    + f", {SEARCH_VECTOR}) ON CONFLICT (id) DO NOTHING")
_COLUMNS = ", ".join(f"i.{name}" for name in FIELD_NAMES)


def _text(value: str) -> str:
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


def _json_clean(value: Any) -> Any:
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, list):
        return [_json_clean(v) for v in value]
    if isinstance(value, dict):
        return {_json_clean(k): _json_clean(v) for k, v in value.items()}
    return value


def _json(value: Any) -> str:
    # orjson, as the SQLite store: the same values serialize the same way (NaN becomes null).
    data = orjson.dumps(value)
    if b"\\u0000" in data:  # jsonb rejects the escape; walk only when it is there
        data = orjson.dumps(_json_clean(value))
    return data.decode()


def _params(record: Record) -> tuple[Any, ...]:
    values: list[Any] = []
    for name, kind in FIELDS:
        value = record.get(name)
        if value is None:
            pass
        elif kind == "json":
            value = _json(value)
        elif kind == "bool":
            value = bool(value)
        elif isinstance(value, str):
            value = _text(value)
        values.append(value)
    values.extend(search_texts(record.get("prompt"), record.get("messages"),
                               record.get("system"), record.get("response"),
                               record.get("thinking"), record.get("tool_calls")))
    return tuple(values)


def _row(values: tuple[Any, ...]) -> Record:
    return dict(zip(FIELD_NAMES, values, strict=True))


def _from(q: Query, params: list[Any]) -> str:
    """The tables of a query: with searchable full text, also its tsquery, as `tsq`."""
    if q.text is None or (tsquery := fulltext.parse(q.text).tsquery(params)) is None:
        return "interactions i"
    return f"interactions i, (SELECT {tsquery}) AS t(tsq)"


def _where(q: Query, params: list[Any], searchable: bool) -> str:
    """The WHERE clause for a query's filters; values go to `params`, never into the SQL."""
    filters = column_filters(q)
    clauses = [f"{column} {op} %s" for column, op, _ in filters]
    params.extend(_text(v) if isinstance(v, str) else v for _, _, v in filters)
    if q.outcomes:
        clauses.append("i.outcome = ANY(%s)")
        params.append(list(q.outcomes))
    if q.text is not None:  # with nothing searchable in it (only punctuation) nothing matches
        clauses.append("i.search @@ tsq" if searchable else "false")
    return " AND ".join(clauses) or "true"


def _base(q: Query, params: list[Any]) -> str:
    """`FROM … WHERE …` for a query; `params` receives its values in SQL order."""
    source = _from(q, params)
    return f"FROM {source} WHERE {_where(q, params, searchable='tsq' in source)}"


async def _configure(conn: Connection) -> None:
    set_json_loads(orjson.loads, conn)


class PostgresStore:
    name = "postgres"

    def __init__(self, dsn: str, search_timeout: float = 5.0) -> None:
        try:
            given = conninfo_to_dict(dsn)
        except Exception as exc:
            raise StoreError(f"not a valid PostgreSQL DSN: {exc}") from None
        self._dsn = dsn
        # Defaults the DSN may override: a name to spot our sessions on a shared server, and
        # a bound on connecting (libpq would otherwise wait on an unanswering host forever).
        self._connect_args: dict[str, Any] = {}
        if "application_name" not in given:
            self._connect_args["application_name"] = "ollama-metrics"
        if "connect_timeout" not in given:
            self._connect_args["connect_timeout"] = int(_TIMEOUT)
        self._pool_: AsyncConnectionPool[Connection] | None = None
        self.search_timeout = search_timeout
        self._search_slots = asyncio.Semaphore(MAX_SEARCHES)
        self._searches = 0  # full-text reads running or waiting for a slot

    # --- writing ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Migrate on a connection of its own, then open the pool. Raises when the server is
        unreachable; the recorder retries."""
        if self._pool_ is not None:
            return
        conn = await AsyncConnection.connect(self._dsn, autocommit=True, **self._connect_args)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        pool: AsyncConnectionPool[Connection] = AsyncConnectionPool(
            self._dsn, kwargs={"autocommit": True, **self._connect_args}, min_size=1,
            max_size=_POOL_SIZE, open=False, configure=_configure,
            check=AsyncConnectionPool.check_connection, timeout=_TIMEOUT,
            name="ollama-metrics")
        try:
            await pool.open(wait=True, timeout=_TIMEOUT)
        except BaseException:
            await pool.close()
            raise
        self._pool_ = pool

    def _pool(self) -> AsyncConnectionPool[Connection]:
        if self._pool_ is None:
            raise RuntimeError("store not open")
        return self._pool_

    async def write_batch(self, records: list[Record]) -> int:
        if not records:
            return 0
        # The indexed texts are built here: off the event loop, as SQLite's on its writer.
        rows = await asyncio.to_thread(lambda: [_params(r) for r in records])
        async with self._pool().connection() as conn, conn.transaction(), \
                conn.cursor() as cur:
            await cur.executemany(_INSERT, rows)
        return 0

    async def purge(self, older_than: float | None, max_bytes: int | None) -> int:
        """Delete records that started before `older_than`; returns how many.

        `max_bytes` is ignored. In PostgreSQL a DELETE does not make a table smaller (the space
        is reused by later inserts; only VACUUM FULL, which locks out every proxy, gives it
        back), so deleting "until the table is under N bytes" would delete everything. The
        size of a shared server is its administrator's; retention by age is ours.
        """
        if older_than is None:
            return 0
        deleted = 0
        async with self._pool().connection() as conn:
            while True:
                cur = await conn.execute(
                    "DELETE FROM interactions WHERE seq IN (SELECT seq FROM interactions "
                    "WHERE started_at < %s LIMIT %s)", (older_than, _PURGE_BATCH))
                deleted += cur.rowcount
                if cur.rowcount < _PURGE_BATCH:
                    return deleted

    async def close(self) -> None:
        pool, self._pool_ = self._pool_, None
        if pool is not None:
            await pool.close()

    # --- reading ---------------------------------------------------------------------------

    async def _read(self, query: Query | None, work: Callable[[Connection], Awaitable[T]]
                    ) -> T:
        """`work(connection)` within the search deadline, in a transaction bounded by the same
        `statement_timeout`; a full-text `query` first waits for one of MAX_SEARCHES slots."""
        full_text = query is not None and query.text is not None
        if full_text and self._searches >= MAX_SEARCHES + MAX_WAITING_SEARCHES:
            raise StoreBusy(MAX_SEARCHES)
        timeout_ms = max(1, int(self.search_timeout * 1000))

        async def run() -> T:
            async with self._pool().connection() as conn, conn.transaction():
                await conn.execute("SELECT set_config('statement_timeout', %s, true)",
                                   (f"{timeout_ms}ms",))
                return await work(conn)

        async def bounded() -> T:
            if not full_text:
                return await run()
            async with self._search_slots:
                return await run()

        self._searches += full_text
        try:
            return await asyncio.wait_for(bounded(), self.search_timeout)
        except (asyncio.TimeoutError, QueryCanceled):
            log.info("analytics: a query ran past %g s (ANALYTICS_SEARCH_TIMEOUT)",
                     self.search_timeout)
            raise QueryTimeout(self.search_timeout) from None
        except asyncio.CancelledError:
            log.info("analytics: a query was stopped (client gone)")
            raise
        finally:
            self._searches -= full_text

    async def search(self, query: Query) -> Page:
        params: list[Any] = []
        base = _base(query, params)
        if query.cursor is not None:
            base += " AND i.seq < %s"
            params.append(query.cursor)
        # Newest first is write order. Ranked: ts_rank_cd (cover density) with its default
        # weights, so a prompt match (A, 1.0) counts 2.5 times a response match (B, 0.4):
        # people search for what they asked. Newest first among equals.
        ranked = query.order == "rank" and "tsq" in base
        order = "ts_rank_cd(i.search, tsq) DESC, i.seq DESC" if ranked else "i.seq DESC"
        sql = f"SELECT i.seq, {_COLUMNS} {base} ORDER BY {order} LIMIT %s OFFSET %s"
        params += [query.limit + 1, query.offset]
        rows = await self._read(query, _fetch_all(sql, params))
        more = len(rows) > query.limit
        rows = rows[: query.limit]
        cursor = rows[-1][0] if more and rows and query.order == "time" else None
        return Page([_row(r[1:]) for r in rows], cursor)

    async def get(self, record_id: str) -> Record | None:
        rows = await self._read(None, _fetch_all(
            f"SELECT {_COLUMNS} FROM interactions i WHERE i.id = %s", [_text(record_id)]))
        return _row(rows[0]) if rows else None

    async def export(self, query: Query) -> AsyncIterator[Record]:
        """Every matching record, newest first, a page at a time: no connection or snapshot is
        held while a slow client reads."""
        q = replace(query, limit=_EXPORT_PAGE, offset=0, order="time")
        while True:
            page = await self.search(q)
            for record in page.records:
                yield record
            if page.next_cursor is None:
                return
            q = q.next_page(page.next_cursor)

    async def models(self, query: Query) -> list[dict[str, Any]]:
        params: list[Any] = []
        sql = (f"SELECT i.model, count(*), max(i.started_at), sum(i.prompt_tokens)::bigint, "
               f"sum(i.completion_tokens)::bigint {_base(query, params)} "
               "GROUP BY i.model ORDER BY count(*) DESC")
        rows = await self._read(query, _fetch_all(sql, params))
        return [{"model": m, "requests": n, "last_used": last, "prompt_tokens": pt or 0,
                 "completion_tokens": ct or 0} for m, n, last, pt, ct in rows]

    async def stats(self, query: Query) -> dict[str, Any]:
        """Counts, tokens, error rate and nearest-rank p50/p95 of latency and TTFT, overall,
        per model and per category, in one scan (grouping sets)."""
        params: list[Any] = []
        sql = (
            "SELECT GROUPING(i.model, i.prompt_category), i.model, i.prompt_category, "
            f"{_figures(params)} {_base(query, params)} "
            "GROUP BY GROUPING SETS ((), (i.model), (i.prompt_category)) ORDER BY 1, 4 DESC")
        rows = await self._read(query, _fetch_all(sql, params))
        out: dict[str, Any] = {"totals": None, "models": [], "categories": []}
        for grouping, model, category, *figures in rows:
            row: dict[str, Any] = {}
            if grouping == 1:  # grouped by model
                row["model"] = model
            elif grouping == 2:  # grouped by category
                row["prompt_category"] = category
            row.update(_row_figures(figures))
            if grouping == 1:
                out["models"].append(row)
            elif grouping == 2:
                out["categories"].append(row)
            else:
                out["totals"] = row
        return out

    async def timeseries(self, query: Query, step: float) -> list[dict[str, Any]]:
        """The figures of `stats` per bucket of `step` seconds (buckets with no requests left
        out), oldest first; grouped by an integer bucket number in SQL."""
        params: list[Any] = [step]
        sql = (f"SELECT floor(i.started_at / %s)::bigint AS bucket, {_figures(params)} "
               f"{_base(query, params)} GROUP BY bucket ORDER BY bucket")
        rows = await self._read(query, _fetch_all(sql, params))
        return [{"start": bucket * step, **_row_figures(figures)} for bucket, *figures in rows]


def _fetch_all(sql: str, params: list[Any]) -> Callable[[Connection], Awaitable[list[Any]]]:
    async def fetch(conn: Connection) -> list[Any]:
        cur = await conn.execute(sql, params)
        return await cur.fetchall()

    return fetch


def _figures(params: list[Any]) -> str:
    """The aggregate columns read by `_row_figures`; their values go to `params`."""
    params += [list(STATUSES["error"]), list(STATUSES["cancelled"])]
    return (
        "count(*), "
        "count(*) FILTER (WHERE i.outcome = ANY(%s)), "
        "count(*) FILTER (WHERE i.outcome = ANY(%s)), "
        "coalesce(sum(i.prompt_tokens), 0)::bigint, "
        "coalesce(sum(i.completion_tokens), 0)::bigint, "
        # percentile_disc is nearest-rank: the first value whose rank reaches p * n.
        "percentile_disc(0.5) WITHIN GROUP (ORDER BY i.duration), "
        "percentile_disc(0.95) WITHIN GROUP (ORDER BY i.duration), "
        "percentile_disc(0.5) WITHIN GROUP (ORDER BY i.ttft), "
        "percentile_disc(0.95) WITHIN GROUP (ORDER BY i.ttft)")


def _row_figures(figures: list[Any]) -> dict[str, Any]:
    n, errors, cancelled, pt, ct, *quantiles = figures
    row: dict[str, Any] = dict(requests=n, errors=errors, cancelled=cancelled,
                               error_rate=errors / n if n else 0.0, prompt_tokens=pt,
                               completion_tokens=ct)
    row.update(zip(("latency_p50", "latency_p95", "ttft_p50", "ttft_p95"), quantiles,
                   strict=True))
    return row
