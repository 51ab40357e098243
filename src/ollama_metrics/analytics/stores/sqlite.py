"""SQLite store: the default. One writer thread, concurrent readers, FTS5 search.

WAL mode lets searches read while the writer writes; the writer owns one connection on one
thread, readers get a connection per reader thread. `busy_timeout` covers the rare checkpoint
overlap, so neither side sees "database is locked". Values are always bound parameters.

Memory: the page caches are small (the file is in the OS's cache anyway) and, once the store has
been idle for `idle_release` seconds, the writer's cache is shrunk, the reader connections are
closed (reopened by the next read) and the freed heap is handed back to the OS, so a proxy that
served a burst returns to its resting size.

Budget: every read ends by the search deadline (`search_timeout`): the waiting side stops
waiting and interrupts the connection (`Connection.interrupt()`), as it does when its caller is
cancelled (the client went away); a progress handler makes the statement check the same flags,
so an interrupt sent just before the statement started is not lost. Full-text reads run on
threads of their own, at most MAX_SEARCHES at once (a few more wait; beyond that StoreBusy), so
a costly search never holds the readers that lookups and the dashboard's figures use. A page of
results stops at PAGE_BYTES of text (with a cursor to the rest).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sqlite3
import threading
import time
from array import array
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import orjson

from ...observe.heap import release_free_heap
from .. import fulltext
from ..query import BadQuery, Page, Query
from . import (
    BOOL_FIELDS,
    FIELD_NAMES,
    JSON_FIELDS,
    MAX_SEARCHES,
    MAX_WAITING_SEARCHES,
    QueryTimeout,
    Record,
    StoreBusy,
    StoreError,
    column_filters,
)
from .sqlite_migrations import migrate, pending, register_functions

T = TypeVar("T")

_INSERT = (f"INSERT OR IGNORE INTO interactions ({', '.join(FIELD_NAMES)}) "
           f"VALUES ({', '.join('?' for _ in FIELD_NAMES)})")
_COLUMNS = ", ".join(f"i.{name}" for name in FIELD_NAMES)
_ID = FIELD_NAMES.index("id")
_ASKED = [FIELD_NAMES.index(name) for name in ("prompt", "messages", "system")]
_ANSWERED = [FIELD_NAMES.index(name) for name in ("response", "thinking", "tool_calls")]
_INDEX = "INSERT INTO interactions_fts (rowid, asked, answered) VALUES (?, ?, ?)"
_EXPORT_PAGE = 1000
RANK_WINDOW = 2_000  # ranked searches score the newest this many matches
PAGE_BYTES = 16 * 2**20  # text in one page of results, at most (about; the last row may pass it)
READERS = 2  # threads for reads without full text
_PROGRESS_STEPS = 100_000  # virtual machine steps between two checks of a read's flags
log = logging.getLogger(__name__)
IDLE_RELEASE = 10.0  # seconds without a read or a write before the caches are let go


def _connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    uri = f"{path.resolve().as_uri()}{'?mode=ro' if readonly else ''}"
    db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False,
                         timeout=30.0)
    db.execute("PRAGMA busy_timeout = 30000")
    # typeshed types aggregates as int -> int; SQLite passes and takes any value.
    db.create_aggregate("all_values", 1, _AllValues)  # type: ignore[arg-type]
    if readonly:
        # Searches read a few pages of the index and then rows scattered over the file; the
        # OS caches the file, so a big private cache per reader would only hold copies.
        db.execute("PRAGMA cache_size = -512")
    else:
        register_functions(db)
        # Deleted pages can only be given back to the OS with incremental vacuum, which must
        # be chosen before anything (even the WAL switch) writes the new file's header.
        if not db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone():
            db.execute("PRAGMA auto_vacuum = INCREMENTAL")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        # Inserts append: the hot pages are the right edges of the table, its indexes and the
        # full-text index. 2, 4, 16 and 64 MiB caches all wrote 6-7k records/s in
        # bench/analytics_bench.py, so the cache stays near SQLite's default.
        db.execute("PRAGMA cache_size = -4096")
    return db


def _row(values: tuple[Any, ...]) -> Record:
    record: Record = {}
    for name, value in zip(FIELD_NAMES, values, strict=True):
        if value is not None and name in JSON_FIELDS:
            value = orjson.loads(value)
        elif value is not None and name in BOOL_FIELDS:
            value = bool(value)
        record[name] = value
    return record


def _params(record: Record) -> tuple[Any, ...]:
    return tuple(
        orjson.dumps(record[name]).decode() if name in JSON_FIELDS and record.get(name) is not None
        else record.get(name)
        for name in FIELD_NAMES
    )


def _indexed(seq: int, row: tuple[Any, ...]) -> tuple[int, str, str]:
    """A stored row's full-text index entry: its seq and the texts of what was asked and what
    was answered, as the om_asked and om_answered functions build them from the columns."""
    return (seq, fulltext.asked_text_sql(*(row[n] for n in _ASKED)),
            fulltext.answered_text_sql(*(row[n] for n in _ANSWERED)))


def _where(q: Query, params: list[Any], covering: bool = False) -> str:
    """The WHERE clause for a query's filters; values go to `params`, never into the SQL.

    `covering`: a unary + on every column but started_at, so that SQLite reads the
    interactions_figures index rather than the model's, category's or outcome's own, which
    would fetch every matching row, prompt and reply included."""
    filters = column_filters(q)
    plus = "+" if covering else ""
    clauses = [f"{'' if column == 'i.started_at' else plus}{column} {op} ?"
               for column, op, _ in filters]
    params.extend(value for _, _, value in filters)
    if q.outcomes:
        clauses.append(f"{plus}i.outcome IN ({', '.join('?' for _ in q.outcomes)})")
        params.extend(q.outcomes)
    if q.text is not None:
        expression = fulltext.parse(q.text).fts5()
        if expression is None:  # nothing searchable (only punctuation): nothing matches
            clauses.append("0")
        else:
            clauses.append("interactions_fts MATCH ?")
            params.append(expression)
    return " AND ".join(clauses) or "1"


def _from(q: Query) -> str:
    if q.text is None:
        return "interactions i"
    return "interactions_fts JOIN interactions i ON i.seq = interactions_fts.rowid"


def _bad_search(exc: sqlite3.OperationalError) -> BadQuery:
    # fulltext quotes every word, so FTS5 should find no syntax error in what it writes; if
    # it ever does, the user still gets a reason rather than a server error.
    message = str(exc)
    if any(m in message for m in ("fts5", "no such column", "unterminated",
                                  "unknown special query")):
        return BadQuery(f"prompt_search: not a valid full-text query ({message})")
    raise exc


class _Read:
    """One read, shared by its reader thread and its waiter: the connection it runs on (to
    interrupt) and why the waiter gave up on it, if it did."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.lock = threading.Lock()
        self.db: sqlite3.Connection | None = None
        self.stopped: str | None = None

    def stop(self, why: str) -> None:
        with self.lock:
            self.stopped = why
            if self.db is not None:
                self.db.interrupt()

    def progress(self) -> bool:
        """SQLite's progress handler: true stops the statement."""
        return self.stopped is not None or time.monotonic() > self.deadline


class SqliteStore:
    name = "sqlite"

    def __init__(self, path: Path, idle_release: float = IDLE_RELEASE,
                 search_timeout: float = 5.0) -> None:
        self.path = path
        self.search_timeout = search_timeout
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
        self._readers = ThreadPoolExecutor(READERS, thread_name_prefix="sqlite-reader")
        self._searchers = ThreadPoolExecutor(MAX_SEARCHES, thread_name_prefix="sqlite-search")
        self._write_db: sqlite3.Connection | None = None
        self._local = threading.local()
        # Event-loop side: calls in flight, and the timer that lets memory go when none are.
        self._idle_release = idle_release
        self._busy = 0
        self._idle: asyncio.TimerHandle | None = None
        # Guarded by _lock: the reader connections, how many are inside a query, and their
        # generation (a reader thread whose connection is of an older one opens a new one).
        self._lock = threading.Lock()
        self._reader_dbs: list[sqlite3.Connection] = []
        self._reading = 0
        self._generation = 0
        # Full-text reads submitted and not yet over on their threads: one given up on by its
        # waiter counts until its thread has stopped it.
        self._searches = 0

    @contextlib.contextmanager
    def _active(self) -> Iterator[None]:
        """Counts a call in flight; when none is left, the memory is let go after
        `idle_release` seconds (unless another call comes first)."""
        loop = asyncio.get_running_loop()
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        self._busy += 1
        try:
            yield
        finally:
            self._busy -= 1
            if not self._busy and self._write_db is not None:
                self._idle = loop.call_later(self._idle_release, self._writer.submit,
                                             self._release_memory)

    async def _on(self, executor: ThreadPoolExecutor, fn: Callable[[], T]) -> T:
        with self._active():
            return await asyncio.get_running_loop().run_in_executor(executor, fn)

    async def _on_writer(self, fn: Callable[[], T]) -> T:
        return await self._on(self._writer, fn)

    async def _on_reader(self, fn: Callable[[sqlite3.Connection], T], full_text: bool = False
                         ) -> T:
        """`fn(connection)` on a reader thread (a search thread for a full-text read), within
        the search deadline: past it, or when the caller is cancelled, the read is
        interrupted."""
        if self._write_db is None:  # the schema may not exist yet
            raise StoreError(f"the SQLite store at {self.path} is not open (yet)")
        read = _Read(time.monotonic() + self.search_timeout)
        with self._lock:
            if full_text and self._searches >= MAX_SEARCHES + MAX_WAITING_SEARCHES:
                raise StoreBusy(MAX_SEARCHES)
            self._searches += full_text

        def done(_: Future[T]) -> None:
            with self._lock:
                self._searches -= full_text

        def run() -> T:
            db = self._reader_db()
            try:
                with read.lock:
                    read.db = db
                db.set_progress_handler(read.progress, _PROGRESS_STEPS)
                try:
                    return fn(db)
                except sqlite3.OperationalError as exc:
                    if str(exc) != "interrupted":
                        raise
                    why = read.stopped or "deadline"
                    log.info("analytics: a query was stopped (%s)", why)
                    raise QueryTimeout(self.search_timeout) from None
                finally:
                    db.set_progress_handler(None, 0)
                    with read.lock:
                        read.db = None
            finally:
                with self._lock:
                    self._reading -= 1

        with self._active():
            future = (self._searchers if full_text else self._readers).submit(run)
            future.add_done_callback(done)
            try:
                return await asyncio.wait_for(asyncio.wrap_future(future), self.search_timeout)
            except asyncio.TimeoutError:
                read.stop("deadline")  # its thread logs it, once it has stopped
                raise QueryTimeout(self.search_timeout) from None
            except asyncio.CancelledError:
                read.stop("client gone")
                raise

    def _reader_db(self) -> sqlite3.Connection:
        """This reader thread's connection, counted in `_reading` until the read is over."""
        with self._lock:
            db: sqlite3.Connection | None = getattr(self._local, "db", None)
            if db is not None and self._local.generation == self._generation:
                self._reading += 1
                return db
        try:  # this thread's first read, or its connection was let go
            db = _connect(self.path, readonly=True)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the SQLite store at {self.path}: {exc}") from None
        with self._lock:
            self._local.db, self._local.generation = db, self._generation
            self._reader_dbs.append(db)
            self._reading += 1
        return db

    def _release_memory(self) -> None:
        """On the writer thread, after `idle_release` seconds without a call: shrink the
        writer's cache, close the reader connections, give the freed heap back to the OS."""
        db = self._write_db
        if db is None:
            return
        try:
            db.execute("PRAGMA shrink_memory")
            with self._lock:
                if self._reading:  # a read began since: its connection stays
                    idle: list[sqlite3.Connection] = []
                else:
                    idle, self._reader_dbs = self._reader_dbs, []
                    self._generation += 1
            for reader in idle:
                reader.close()
            release_free_heap()
        except Exception as exc:  # only memory is at stake (nobody awaits this): note it
            log.debug("could not let the SQLite store's caches go: %s", exc)

    # --- writing ---------------------------------------------------------------------------

    async def open(self) -> None:
        def setup() -> None:
            if self._write_db is not None:  # an earlier open, given up on by its caller, won
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            existed = self.path.exists()
            db = _connect(self.path)
            try:
                steps = pending(db)
                if existed and steps:  # an index over a large store takes a while to build
                    log.info("analytics: upgrading the SQLite store at %s (%s)", self.path,
                             ", ".join(steps))
                migrate(db)
            except BaseException:
                db.close()
                raise
            self._write_db = db

        await self._on_writer(setup)

    def _db(self) -> sqlite3.Connection:
        if self._write_db is None:
            raise RuntimeError("store not open")
        return self._write_db

    async def write_batch(self, records: list[Record]) -> int:
        rows = [_params(r) for r in records]
        first: dict[str, tuple[Any, ...]] = {}
        for row in rows:
            first.setdefault(row[_ID], row)

        def write() -> None:
            db = self._db()
            db.execute("BEGIN IMMEDIATE")
            try:
                last = db.execute("SELECT COALESCE(MAX(seq), 0) FROM interactions").fetchone()[0]
                db.executemany(_INSERT, rows)
                # The rows this batch added (a retried batch adds none) are those above `last`;
                # each is indexed with the texts of the first row of its id (INSERT OR IGNORE
                # kept that one), built from the stored columns as the delete trigger builds
                # them. Built here rather than by the om_ functions in SQL, FTS5 runs without
                # the GIL, beside the event loop decoding the next frames.
                new = db.execute("SELECT seq, id FROM interactions WHERE seq > ?",
                                 (last,)).fetchall()
                db.executemany(_INDEX, [_indexed(seq, first[record_id])
                                        for seq, record_id in new])
                db.execute("COMMIT")
            except BaseException:
                # On a full disk SQLite has already rolled the transaction back, and a second
                # ROLLBACK would replace "database or disk is full" with "cannot rollback".
                if db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                raise

        await self._on_writer(write)
        return 0

    async def purge(self, older_than: float | None, max_bytes: int | None) -> int:
        def purge() -> int:
            db = self._db()
            deleted = 0
            if older_than is not None:
                deleted += db.execute("DELETE FROM interactions WHERE started_at < ?",
                                      (older_than,)).rowcount
            while max_bytes is not None and self._used_bytes(db) > max_bytes:
                # Oldest tenth at a time: few passes, and never the whole store at once.
                n = db.execute(
                    "DELETE FROM interactions WHERE seq IN (SELECT seq FROM interactions "
                    "ORDER BY seq LIMIT MAX(1, (SELECT COUNT(*) FROM interactions) / 10))"
                ).rowcount
                if not n:
                    break
                deleted += n
                db.executescript("PRAGMA incremental_vacuum")  # execute() frees only one page
            if deleted:
                db.executescript("PRAGMA incremental_vacuum")  # execute() frees only one page
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            return deleted

        return await self._on_writer(purge)

    @staticmethod
    def _used_bytes(db: sqlite3.Connection) -> int:
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        free = db.execute("PRAGMA freelist_count").fetchone()[0]
        size = db.execute("PRAGMA page_size").fetchone()[0]
        return int((pages - free) * size)

    async def close(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

        def close_writer() -> None:
            if self._write_db is not None:
                self._write_db.execute("PRAGMA optimize")
                self._write_db.close()
                self._write_db = None

        await self._on_writer(close_writer)
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        self._searchers.shutdown(wait=True)
        with self._lock:
            for db in self._reader_dbs:
                db.close()
            self._reader_dbs.clear()

    # --- reading ---------------------------------------------------------------------------

    async def search(self, query: Query) -> Page:
        params: list[Any] = []
        where = _where(query, params)
        # Newest first is write order: `seq DESC`. With a full-text query, order by the index's
        # own rowid (the same number): FTS5 then walks its matches newest first and stops at
        # the limit, instead of collecting every match of a common word and sorting them.
        seq = "i.seq" if query.text is None else "interactions_fts.rowid"
        if query.cursor is not None:
            where += f" AND {seq} < ?"
            params.append(query.cursor)
        if query.order == "rank":
            # bm25 with matches in what was asked weighted twice those in the answer (people
            # search for what they asked), over the newest RANK_WINDOW matches so that a
            # common word stays fast in a large store; newest first among equals.
            sql = (f"SELECT i.seq, {_COLUMNS} FROM (SELECT interactions_fts.rowid AS seq, "
                   "bm25(interactions_fts, 2.0, 1.0) AS score "
                   f"FROM {_from(query)} WHERE {where} "
                   f"ORDER BY interactions_fts.rowid DESC LIMIT {RANK_WINDOW}) AS ranked "
                   "JOIN interactions i ON i.seq = ranked.seq "
                   "ORDER BY ranked.score, ranked.seq DESC LIMIT ? OFFSET ?")
        else:
            sql = (f"SELECT i.seq, {_COLUMNS} FROM {_from(query)} WHERE {where} "
                   f"ORDER BY {seq} DESC LIMIT ? OFFSET ?")
        params += [query.limit + 1, query.offset]

        def run(db: sqlite3.Connection) -> Page:
            try:
                rows, more = _fetch_page(db.execute(sql, params), query)
            except sqlite3.OperationalError as exc:
                raise _bad_search(exc) from None
            cursor = rows[-1][0] if more and rows and query.order == "time" else None
            return Page([_row(r[1:]) for r in rows], cursor)

        return await self._on_reader(run, full_text=query.text is not None)

    async def get(self, record_id: str) -> Record | None:
        sql = f"SELECT {_COLUMNS} FROM interactions i WHERE i.id = ?"

        def run(db: sqlite3.Connection) -> Record | None:
            row = db.execute(sql, (record_id,)).fetchone()
            return None if row is None else _row(row)

        return await self._on_reader(run)

    async def export(self, query: Query) -> AsyncIterator[Record]:
        """Every matching record, newest first, fetched a page at a time."""
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
        where = _where(query, params, covering=True)  # as _grouped: the figures index only
        sql = (f"SELECT i.model AS m, COUNT(*), MAX(i.started_at), SUM(i.prompt_tokens), "
               f"SUM(i.completion_tokens) FROM {_from(query)} WHERE {where} "
               f"GROUP BY +m ORDER BY COUNT(*) DESC")

        def run(db: sqlite3.Connection) -> list[dict[str, Any]]:
            try:
                rows = db.execute(sql, params).fetchall()
            except sqlite3.OperationalError as exc:
                raise _bad_search(exc) from None
            return [{"model": m, "requests": n, "last_used": last, "prompt_tokens": pt or 0,
                     "completion_tokens": ct or 0} for m, n, last, pt, ct in rows]

        return await self._on_reader(run, full_text=query.text is not None)

    async def stats(self, query: Query) -> dict[str, Any]:
        def run(db: sqlite3.Connection) -> dict[str, Any]:
            try:
                groups = _grouped(db, query, ["i.model", "i.prompt_category"])
            except sqlite3.OperationalError as exc:
                raise _bad_search(exc) from None
            totals, models, categories = _Figures(), _by_key(), _by_key()
            for (model, category), figures in groups:
                for whole in (totals, models[model], categories[category]):
                    whole.merge(figures)
            return {
                "totals": totals.row(),
                "models": [{"model": m, **f.row()} for m, f in _most_first(models)],
                "categories": [{"prompt_category": c, **f.row()}
                               for c, f in _most_first(categories)],
            }

        return await self._on_reader(run, full_text=query.text is not None)

    async def timeseries(self, query: Query, step: float) -> list[dict[str, Any]]:
        # The bucket is an integer computed in SQL, so 7 days of records are grouped where
        # they lie (through the figures index) and only one row per bucket comes back.
        def run(db: sqlite3.Connection) -> list[dict[str, Any]]:
            try:
                groups = _grouped(db, query, ["CAST(i.started_at / ? AS INTEGER)"], [step])
            except sqlite3.OperationalError as exc:
                raise _bad_search(exc) from None
            return [{"start": bucket * step, **figures.row()}
                    for (bucket,), figures in sorted(groups, key=lambda g: g[0])]

        return await self._on_reader(run, full_text=query.text is not None)


def _fetch_page(cursor: sqlite3.Cursor, query: Query) -> tuple[list[Any], bool]:
    """Up to `query.limit` rows, and whether more follow. In time order the page also ends
    once its text passes PAGE_BYTES (the rest is one cursor away), so a page of very long
    records is not held whole."""
    rows: list[Any] = []
    size = 0
    try:
        for row in cursor:
            if len(rows) == query.limit or (size > PAGE_BYTES and query.order == "time"):
                return rows, True
            rows.append(row)
            size += sum(len(v) for v in row if isinstance(v, str))
        return rows, False
    finally:
        cursor.close()


def _grouped(db: sqlite3.Connection, query: Query, keys: list[str],
             key_params: list[Any] | None = None) -> list[tuple[tuple[Any, ...], _Figures]]:
    """The figures of each group of the SQL expressions `keys` (their `?` values in
    `key_params`), in one pass over the interactions_figures index: `+k0` keeps SQLite from
    grouping through the model's or category's own index, which would fetch every row,
    prompt and reply included."""
    params: list[Any] = []
    where = _where(query, params, covering=True)
    names = [f"k{n}" for n in range(len(keys))]
    rows = db.execute(
        f"SELECT {', '.join(f'{key} AS {name}' for key, name in zip(keys, names, strict=True))}, "
        "COUNT(*), SUM(i.outcome IN ('error', 'upstream_error')), "
        "SUM(i.outcome = 'cancelled'), COALESCE(SUM(i.prompt_tokens), 0), "
        "COALESCE(SUM(i.completion_tokens), 0), all_values(i.duration), all_values(i.ttft) "
        f"FROM {_from(query)} WHERE {where} GROUP BY {', '.join(f'+{n}' for n in names)}",
        (key_params or []) + params).fetchall()
    width = len(keys)
    return [(tuple(row[:width]), _Figures(*row[width:])) for row in rows]


class _AllValues:
    """SQLite aggregate `all_values(x)`: the group's non-NULL values as packed doubles, so
    that Python sorts each group's values once (ranking them with window functions took
    several times longer), and groups can be merged."""

    def __init__(self) -> None:
        self.values = array("d")

    def step(self, value: float | None) -> None:
        if value is not None:
            self.values.append(value)

    def finalize(self) -> bytes:
        return self.values.tobytes()


class _Figures:
    """Counts, tokens, error rate and nearest-rank p50/p95 of latency and TTFT of a group."""

    def __init__(self, requests: int = 0, errors: int | None = 0, cancelled: int | None = 0,
                 prompt_tokens: int = 0, completion_tokens: int = 0,
                 durations: bytes = b"", ttfts: bytes = b"") -> None:
        self.requests, self.errors, self.cancelled = requests, errors or 0, cancelled or 0
        self.prompt_tokens, self.completion_tokens = prompt_tokens, completion_tokens
        self.durations, self.ttfts = array("d", durations), array("d", ttfts)

    def merge(self, other: _Figures) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.cancelled += other.cancelled
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.durations.extend(other.durations)
        self.ttfts.extend(other.ttfts)

    def row(self) -> dict[str, Any]:
        row: dict[str, Any] = dict(
            requests=self.requests, errors=self.errors, cancelled=self.cancelled,
            error_rate=self.errors / self.requests if self.requests else 0.0,
            prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens)
        for label, values in (("latency", self.durations), ("ttft", self.ttfts)):
            ordered = sorted(values)
            for p in (50, 95):  # nearest rank: the smallest value with rank >= p% of n
                rank = max(1, math.ceil(p / 100 * len(ordered)))
                row[f"{label}_p{p}"] = ordered[rank - 1] if ordered else None
        return row


def _by_key() -> defaultdict[Any, _Figures]:
    return defaultdict(_Figures)


def _most_first(groups: dict[Any, _Figures]) -> list[tuple[Any, _Figures]]:
    return sorted(groups.items(), key=lambda g: -g[1].requests)
