"""One contract for every queryable store: each test runs against SQLite and PostgreSQL.

Same records in, same answers out: round trips, filters, paging, stats, purging by age, bad
searches and injection attempts. Backend-specific behaviour lives in test_store_<name>.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ollama_metrics.analytics.query import BadQuery, Query, parse
from ollama_metrics.analytics.stores import FIELD_NAMES, QueryableStore, Record
from ollama_metrics.analytics.stores.sqlite import SqliteStore
from services import new_postgres_schema
from store_records import T0, full_record, sparse_record


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[QueryableStore]:
    s: QueryableStore
    if request.param == "sqlite":
        s = SqliteStore(tmp_path / "interactions.db")
    else:
        from ollama_metrics.analytics.stores.postgres import PostgresStore

        s = PostgresStore(await new_postgres_schema(request.getfixturevalue("postgres_dsn")))
    await s.open()
    yield s
    await s.close()


def ids(records: list[Record] | list[dict[str, object]]) -> list[Any]:
    return [r["id"] for r in records]


async def everything(store: QueryableStore, **filters: Any) -> list[Record]:
    page = await store.search(Query(limit=1000, **filters))
    assert page.next_cursor is None
    return page.records


# --- writing and reading back ---------------------------------------------------------------

async def test_every_field_round_trips(store: QueryableStore) -> None:
    record = full_record(1)
    await store.write_batch([record])
    assert await store.get(record["id"]) == record
    assert (await store.search(Query())).records == [record]
    got = await store.get(record["id"])
    assert got is not None
    assert [type(got[k]) for k in ("started_at", "stream", "http_status", "options")] == \
        [float, bool, int, dict]


async def test_missing_fields_read_back_as_none(store: QueryableStore) -> None:
    await store.write_batch([sparse_record(1)])
    got = await store.get("sparse-00001")
    assert got == {name: None for name in FIELD_NAMES} | {"id": "sparse-00001",
                                                         "started_at": T0 + 1}


async def test_writing_a_record_twice_keeps_one(store: QueryableStore) -> None:
    batch = [full_record(i) for i in range(3)]
    await store.write_batch(batch)
    await store.write_batch(batch)  # a retried batch
    await store.write_batch([full_record(1, prompt="changed"), full_record(3)])
    assert ids(await everything(store)) == ["rec-00003", "rec-00002", "rec-00001", "rec-00000"]
    got = await store.get("rec-00001")
    assert got is not None
    assert got["prompt"] == full_record(1)["prompt"]  # first write wins


async def test_get_unknown_is_none(store: QueryableStore) -> None:
    await store.write_batch([full_record(1)])
    assert await store.get("nope") is None
    assert await store.get("rec-00001' OR '1'='1") is None


async def test_empty_batch_is_harmless(store: QueryableStore) -> None:
    await store.write_batch([])
    assert await everything(store) == []


# --- filters ---------------------------------------------------------------------------------

@pytest.fixture
async def varied(store: QueryableStore) -> QueryableStore:
    """Ten records, written in order of their start times (rec-00000 oldest)."""
    outcomes = ["success", "success", "error", "upstream_error", "cancelled", "success", "success",
                "error", "success", "cancelled"]
    await store.write_batch([
        full_record(i, model="llama" if i % 2 else "qwen", outcome=outcomes[i],
                    prompt_category="code_write" if i < 3 else "question",
                    endpoint="/v1/chat/completions" if i in (4, 5) else "/api/chat",
                    prompt=f"prompt number {i} " + ("about giraffes" if i in (2, 7) else ""),
                    response=f"answer {i}")
        for i in range(10)])
    return store


@pytest.mark.parametrize(("filters", "expected"), [
    ({}, [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]),
    ({"start_time": T0 + 3.123456}, [9, 8, 7, 6, 5, 4, 3]),  # inclusive
    ({"end_time": T0 + 3.123456}, [2, 1, 0]),  # exclusive
    ({"start_time": T0 + 2, "end_time": T0 + 5}, [4, 3, 2]),
    ({"model": "llama"}, [9, 7, 5, 3, 1]),
    ({"model": "lla"}, []),
    ({"category": "code_write"}, [2, 1, 0]),
    ({"endpoint": "/v1/chat/completions"}, [5, 4]),
    ({"status": "ok"}, [8, 6, 5, 1, 0]),  # the old word, kept as an alias
    ({"status": "success"}, [8, 6, 5, 1, 0]),
    ({"status": "error"}, [7, 3, 2]),  # upstream errors are errors too
    ({"status": "upstream_error"}, [3]),
    ({"status": "cancelled"}, [9, 4]),
    ({"text": "giraffes"}, [7, 2]),
    ({"text": "GIRAFFES about"}, [7, 2]),  # every word, in any order, any case
    ({"text": '"about giraffes"'}, [7, 2]),  # a phrase
    ({"text": '"giraffes about"'}, []),
    ({"text": "giraffes OR answer"}, [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]),
    ({"text": "answer"}, [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]),  # responses are searched too
    ({"text": "elephants"}, []),
    ({"text": "giraffes", "model": "llama", "status": "error"}, [7]),
])
async def test_filters(varied: QueryableStore, filters: dict[str, Any], expected: list[int]
                       ) -> None:
    assert ids(await everything(varied, **filters)) == [f"rec-{i:05d}" for i in expected]


async def test_rank_puts_prompt_matches_first(store: QueryableStore) -> None:
    await store.write_batch([
        full_record(1, prompt="tell me about the zebra", response="it is an animal"),
        full_record(2, prompt="what is an animal", response="the zebra is one"),
        full_record(3, prompt="nothing here", response="nothing there"),
    ])
    by_time = await store.search(Query(text="zebra"))
    assert ids(by_time.records) == ["rec-00002", "rec-00001"]
    by_rank = await store.search(Query(text="zebra", order="rank"))
    assert ids(by_rank.records) == ["rec-00001", "rec-00002"]
    # Ranked pages have no cursor (seq does not continue a ranking): page by offset.
    ranked = await store.search(Query(text="zebra", order="rank", limit=1))
    assert ids(ranked.records) == ["rec-00001"]
    assert ranked.next_cursor is None
    ranked = await store.search(Query(text="zebra", order="rank", limit=1, offset=1))
    assert ids(ranked.records) == ["rec-00002"]


# --- paging -----------------------------------------------------------------------------------

async def test_cursor_pages_have_no_gaps_or_duplicates(store: QueryableStore) -> None:
    await store.write_batch([full_record(i) for i in range(25)])
    seen: list[Any] = []
    q = Query(limit=10)
    pages = 0
    while True:
        page = await store.search(q)
        pages += 1
        seen += ids(page.records)
        if page.next_cursor is None:
            break
        q = q.next_page(page.next_cursor)
    assert pages == 3
    assert seen == [f"rec-{i:05d}" for i in reversed(range(25))]


async def test_a_full_last_page_has_no_cursor(store: QueryableStore) -> None:
    await store.write_batch([full_record(i) for i in range(20)])
    first = await store.search(Query(limit=10))
    assert first.next_cursor is not None
    second = await store.search(Query(limit=10).next_page(first.next_cursor))
    assert len(second.records) == 10
    assert second.next_cursor is None


async def test_cursor_with_filters(store: QueryableStore) -> None:
    await store.write_batch([full_record(i, model="a" if i % 3 else "b") for i in range(30)])
    expected = [f"rec-{i:05d}" for i in reversed(range(30)) if i % 3]
    seen: list[Any] = []
    q = Query(model="a", limit=7)
    while True:
        page = await store.search(q)
        seen += ids(page.records)
        if page.next_cursor is None:
            break
        q = q.next_page(page.next_cursor)
    assert seen == expected


async def test_offset_pages(store: QueryableStore) -> None:
    await store.write_batch([full_record(i) for i in range(25)])
    seen: list[Any] = []
    for offset in (0, 10, 20, 30):
        seen += ids((await store.search(Query(limit=10, offset=offset))).records)
    assert seen == [f"rec-{i:05d}" for i in reversed(range(25))]


async def test_export_returns_every_match_across_pages(store: QueryableStore) -> None:
    await store.write_batch([sparse_record(i, model="m" if i % 2 else "n") for i in range(2100)])
    exported = [r async for r in store.export(Query(model="m", limit=5))]
    assert ids(exported) == [f"sparse-{i:05d}" for i in reversed(range(2100)) if i % 2]


# --- aggregates -------------------------------------------------------------------------------

async def test_models(varied: QueryableStore) -> None:
    await varied.write_batch([sparse_record(1, model="llama")])  # tokens unknown: count as 0
    models = await varied.models(Query())
    assert models == [
        {"model": "llama", "requests": 6, "last_used": T0 + 9.123456, "prompt_tokens": 60,
         "completion_tokens": 170},
        {"model": "qwen", "requests": 5, "last_used": T0 + 8.123456, "prompt_tokens": 60,
         "completion_tokens": 170},
    ]
    assert await varied.models(Query(text="giraffes", model="qwen")) == [
        {"model": "qwen", "requests": 1, "last_used": T0 + 2.123456, "prompt_tokens": 12,
         "completion_tokens": 34}]
    assert await varied.models(Query(model="none")) == []


def _stats_records() -> list[Record]:
    """Model "a": 20 requests with latencies 1..20 s (written shuffled) and TTFT 0.1..1.0 on
    the first ten; model "b": 4 requests, 2 errors (one upstream), 1 cancelled."""
    order = [7, 19, 2, 13, 1, 20, 5, 11, 17, 3, 9, 15, 4, 18, 6, 12, 8, 16, 10, 14]
    records = [full_record(n, model="a", duration=float(n), prompt_category="question",
                           ttft=n / 10 if n <= 10 else None, prompt_tokens=n,
                           completion_tokens=2 * n, outcome="success") for n in order]
    for n, outcome in zip(range(21, 25), ["error", "upstream_error", "cancelled", "success"],
                          strict=True):
        records.append(full_record(n, model="b", duration=100.0 + n, prompt_category="list",
                                   ttft=None, prompt_tokens=None, completion_tokens=1,
                                   outcome=outcome))
    return records


async def test_stats_are_exact(store: QueryableStore) -> None:
    await store.write_batch(_stats_records())
    stats = await store.stats(Query())
    a = {"requests": 20, "errors": 0, "cancelled": 0, "error_rate": 0.0, "prompt_tokens": 210,
         "completion_tokens": 420,
         # nearest rank: the ceil(p * n)-th smallest
         "latency_p50": 10.0, "latency_p95": 19.0, "ttft_p50": 0.5, "ttft_p95": 1.0}
    b = {"requests": 4, "errors": 2, "cancelled": 1, "error_rate": 0.5, "prompt_tokens": 0,
         "completion_tokens": 4, "latency_p50": 122.0, "latency_p95": 124.0, "ttft_p50": None,
         "ttft_p95": None}
    assert stats["models"] == [{"model": "a", **a}, {"model": "b", **b}]
    assert stats["categories"] == [{"prompt_category": "question", **a},
                                   {"prompt_category": "list", **b}]
    assert stats["totals"] == {
        "requests": 24, "errors": 2, "cancelled": 1, "error_rate": 2 / 24, "prompt_tokens": 210,
        "completion_tokens": 424, "latency_p50": 12.0, "latency_p95": 123.0, "ttft_p50": 0.5,
        "ttft_p95": 1.0}


async def test_stats_follow_filters(store: QueryableStore) -> None:
    await store.write_batch(_stats_records())
    stats = await store.stats(Query(model="b", status="error"))
    assert stats["totals"]["requests"] == 2
    assert stats["totals"]["errors"] == 2
    assert stats["totals"]["latency_p50"] == 121.0
    assert [m["model"] for m in stats["models"]] == ["b"]
    stats = await store.stats(Query(start_time=T0 + 20, end_time=T0 + 22))
    assert stats["totals"]["requests"] == 2  # records 20 and 21


async def test_stats_of_nothing(store: QueryableStore) -> None:
    assert await store.stats(Query(text="nothing")) == {
        "totals": {"requests": 0, "errors": 0, "cancelled": 0, "error_rate": 0.0,
                   "prompt_tokens": 0, "completion_tokens": 0, "latency_p50": None,
                   "latency_p95": None, "ttft_p50": None, "ttft_p95": None},
        "models": [], "categories": []}


async def test_timeseries_buckets_are_exact(store: QueryableStore) -> None:
    await store.write_batch(_stats_records())  # at T0+n+0.123456, n = 1..24; T0 % 10 == 0
    zero = {"errors": 0, "cancelled": 0, "error_rate": 0.0}
    assert await store.timeseries(Query(), 10.0) == [
        {"start": T0, "requests": 9, **zero, "prompt_tokens": 45, "completion_tokens": 90,
         "latency_p50": 5.0, "latency_p95": 9.0, "ttft_p50": 0.5, "ttft_p95": 0.9},
        {"start": T0 + 10, "requests": 10, **zero, "prompt_tokens": 145,
         "completion_tokens": 290, "latency_p50": 14.0, "latency_p95": 19.0, "ttft_p50": 1.0,
         "ttft_p95": 1.0},
        {"start": T0 + 20, "requests": 5, "errors": 2, "cancelled": 1, "error_rate": 0.4,
         "prompt_tokens": 20, "completion_tokens": 44, "latency_p50": 122.0,
         "latency_p95": 124.0, "ttft_p50": None, "ttft_p95": None},
    ]
    # One bucket holding everything has the figures of stats' totals.
    (whole,) = await store.timeseries(Query(), 3600.0)
    assert whole == {"start": T0 // 3600 * 3600, **(await store.stats(Query()))["totals"]}


async def test_timeseries_follow_filters(store: QueryableStore) -> None:
    await store.write_batch(_stats_records())
    assert [(b["start"], b["requests"]) for b in
            await store.timeseries(Query(model="b"), 10.0)] == [(T0 + 20, 4)]
    assert [(b["start"], b["requests"]) for b in await store.timeseries(
        Query(start_time=T0 + 5, end_time=T0 + 15), 10.0)] == [(T0, 5), (T0 + 10, 5)]
    assert len(await store.timeseries(Query(text="Berlin"), 10.0)) == 3
    assert await store.timeseries(Query(text="nothing"), 10.0) == []
    assert await store.timeseries(Query(text="!!!"), 10.0) == []


async def test_timeseries_bucket_edges_and_missing_figures(store: QueryableStore) -> None:
    await store.write_batch([sparse_record(1, started_at=T0 + 9.999),
                             sparse_record(2, started_at=T0 + 10.0)])  # a bucket's start is in
    empty = {"requests": 1, "errors": 0, "cancelled": 0, "error_rate": 0.0,
             "prompt_tokens": 0, "completion_tokens": 0, "latency_p50": None,
             "latency_p95": None, "ttft_p50": None, "ttft_p95": None}
    assert await store.timeseries(Query(), 10.0) == [{"start": T0, **empty},
                                                     {"start": T0 + 10, **empty}]


# --- retention --------------------------------------------------------------------------------

async def test_purge_by_age(store: QueryableStore) -> None:
    await store.write_batch([full_record(i) for i in range(10)])
    assert await store.purge(None, None) == 0
    assert await store.purge(T0 + 4, None) == 4  # started before T0+4: records 0..3
    assert ids(await everything(store)) == [f"rec-{i:05d}" for i in reversed(range(4, 10))]
    assert await store.purge(T0 + 4, None) == 0
    assert len((await store.search(Query(text="Berlin"))).records) == 6  # index in step


# --- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["!!!", "&|!", "***", "-"])
async def test_a_search_with_nothing_to_search_for_matches_nothing(
        store: QueryableStore, text: str) -> None:
    await store.write_batch([full_record(1)])
    assert (await store.search(Query(text=text))).records == []
    assert (await store.search(Query(text=text, order="rank"))).records == []
    assert (await store.stats(Query(text=text)))["totals"]["requests"] == 0
    assert await store.models(Query(text=text)) == []


# --- what is searchable (issue 15) --------------------------------------------------------------

async def test_every_text_of_a_record_is_searchable(store: QueryableStore) -> None:
    await store.write_batch([
        full_record(1, prompt="last question", response="the reply", system="sysword rules",
                    thinking="pondering quietly",
                    messages=[{"role": "system", "content": "sysword rules"},
                              {"role": "user", "content": "first aardvark message"},
                              {"role": "assistant", "content": "earlier bonobo answer",
                               "tool_calls": [{"function": {"name": "get_weather",
                                                            "arguments": {"city": "Reykjavik"}}}]},
                              {"role": "tool", "content": "cloudy capybara"},
                              {"role": "user", "content": "last question"}],
                    tool_calls=[{"function": {"name": "lookup", "arguments": '{"q": "narwhal"}'}}]),
        full_record(2, prompt="unrelated", response="unrelated", system=None, thinking=None,
                    messages=None, tool_calls=None),
    ])
    for word in ("aardvark", "bonobo", "Reykjavik", "get_weather", "capybara", "sysword",
                 "pondering", "narwhal", "reply", "question"):
        assert ids((await store.search(Query(text=word))).records) == ["rec-00001"], word


@pytest.mark.parametrize("text", ["gpt-4", "don't", "C++", "3.5", "user@example.com",
                                  "/etc/hosts", "e-mail"])
async def test_words_with_punctuation_are_literal(store: QueryableStore, text: str) -> None:
    await store.write_batch([
        full_record(1, prompt=f"about {text} here", response="ok"),
        full_record(2, prompt="nothing like it", response="ok"),
    ])
    assert ids((await store.search(Query(text=text))).records) == ["rec-00001"]
    assert ids((await store.search(Query(text=text, order="rank"))).records) == ["rec-00001"]


async def test_search_operators(store: QueryableStore) -> None:
    await store.write_batch([
        full_record(1, prompt="red apple pie", response="ok"),
        full_record(2, prompt="green apple tart", response="ok"),
        full_record(3, prompt="pie made of red plums", response="ok"),
    ])

    async def found(text: str) -> list[Any]:
        return sorted(ids((await store.search(Query(text=text))).records))

    assert await found("apple pie") == ["rec-00001"]  # every word
    assert await found('"red apple"') == ["rec-00001"]  # a phrase
    assert await found('"apple red"') == []
    assert await found("tart OR plums") == ["rec-00002", "rec-00003"]
    assert await found("apple -green") == ["rec-00001"]
    assert await found("apple NOT green") == ["rec-00001"]
    assert await found("pl*") == ["rec-00003"]
    assert await found("-green") == ["rec-00002"]  # nothing to exclude from: the word


@pytest.mark.parametrize("text", ["日本語", "説明", "本語で説", "ください", "ไทย"])
async def test_unspaced_scripts_are_found_by_any_substring(store: QueryableStore, text: str
                                                           ) -> None:
    await store.write_batch([
        full_record(1, prompt="日本語で説明してください", response="ok"),
        full_record(2, prompt="ภาษาไทยง่าย", response="ok"),
        full_record(3, prompt="中文的问题", response="ok"),
    ])
    expected = ["rec-00002"] if text == "ไทย" else ["rec-00001"]
    assert ids((await store.search(Query(text=text))).records) == expected


INJECTIONS = [
    "x' OR 1=1 --",
    "x' OR '1'='1",
    "'; DROP TABLE interactions; --",
    '"; DROP TABLE interactions; --',
    "%' OR model LIKE '%",
    "1); DELETE FROM interactions; --",
    "\\'; SELECT pg_sleep(5); --",
    "🦙' UNION SELECT * FROM interactions --",
]


@pytest.mark.parametrize("attack", INJECTIONS)
async def test_injection_in_every_filter_is_harmless(store: QueryableStore, attack: str) -> None:
    await store.write_batch([full_record(i) for i in range(3)])
    for name in ("model", "endpoint", "status", "prompt_category", "start_time", "cursor",
                 "limit", "offset", "order"):
        params = {name: attack}
        try:
            q = parse(params)
        except BadQuery:
            assert name not in ("model", "endpoint"), name  # free text there: must pass
            continue
        assert (await store.search(q)).records == [], name
        assert (await store.stats(q))["totals"]["requests"] == 0
        assert await store.models(q) == []
    for params in ({"prompt_search": attack}, {"q": attack, "order": "rank"}):
        try:
            page = await store.search(parse(params))
        except BadQuery:
            continue  # a clean refusal is fine too
        assert page.records == []
    assert await store.get(attack) is None
    assert len(await everything(store)) == 3  # nothing dropped or deleted


async def test_injection_in_stored_values_is_data(store: QueryableStore) -> None:
    records = [full_record(i, model=attack, prompt=attack, response=attack, id=f"{attack}{i}")
               for i, attack in enumerate(INJECTIONS)]
    await store.write_batch(records)
    assert await everything(store) == list(reversed(records))
    for record in records:
        assert await store.get(record["id"]) == record
        assert ids(await everything(store, model=record["model"])) == [record["id"]]


async def test_concurrent_reads_during_writes(store: QueryableStore) -> None:
    async def write() -> None:
        for chunk in range(10):
            await store.write_batch([full_record(chunk * 50 + i) for i in range(50)])

    async def read() -> None:
        for _ in range(20):
            await store.search(Query(text="Berlin", limit=5))
            await store.stats(Query())

    await asyncio.gather(write(), read(), read())
    assert (await store.stats(Query()))["totals"]["requests"] == 500


async def test_sqlite_migration_indexes_every_text_of_older_records(tmp_path: Path) -> None:
    """A store made before m009 (its index: prompt and reply) has every text of its records
    indexed once opened, and purging them afterwards keeps the index in step."""
    from ollama_metrics.analytics.stores import sqlite_migrations
    from ollama_metrics.analytics.stores.sqlite import _connect, _params

    path = tmp_path / "interactions.db"
    db = _connect(path)
    try:
        sqlite_migrations.migrate(db, until=sqlite_migrations.m009_every_text_indexed)
        old = full_record(1, messages=[{"role": "user", "content": "first aardvark message"},
                                       {"role": "user", "content": "last"}], prompt="last")
        db.execute(f"INSERT INTO interactions ({', '.join(FIELD_NAMES)}) "
                   f"VALUES ({', '.join('?' for _ in FIELD_NAMES)})", _params(old))
    finally:
        db.close()
    store = SqliteStore(path)
    await store.open()
    try:
        assert ids((await store.search(Query(text="aardvark"))).records) == ["rec-00001"]
        assert ids((await store.search(Query(text="答案"))).records) == ["rec-00001"]
        assert await store.purge(T0 + 10, None) == 1
        assert (await store.search(Query(text="aardvark"))).records == []
        await store.write_batch([full_record(2)])
        assert ids((await store.search(Query(text="Berlin"))).records) == ["rec-00002"]
    finally:
        await store.close()
    db = _connect(path)
    try:
        # FTS5 raises when the index disagrees with itself (a delete with other texts).
        db.execute("INSERT INTO interactions_fts (interactions_fts) VALUES ('integrity-check')")
    finally:
        db.close()


async def test_sqlite_index_follows_batches_retries_and_purges(tmp_path: Path) -> None:
    """Since m010 the writer indexes each batch it inserts, not a trigger per row: a
    retried batch adds no second index entry, the rows of a batch mixing old and new ids are
    each indexed once, purged rows leave the index, and FTS5's own check finds the index in
    step with the rows (a row indexed twice or not at all makes it raise)."""
    from ollama_metrics.analytics.stores.sqlite import _connect

    path = tmp_path / "interactions.db"
    store = SqliteStore(path)
    await store.open()
    try:
        batch = [full_record(i, prompt=f"zebra number {i}") for i in range(3)]
        await store.write_batch(batch)
        await store.write_batch(batch)  # retried
        await store.write_batch([full_record(1), full_record(3, prompt="zebra number 3")])
        assert len((await store.search(Query(text="zebra"))).records) == 4
        assert ids((await store.search(Query(text="zebra 3"))).records) == ["rec-00003"]
        assert await store.purge(T0 + 1.5, None) == 2  # rec-00000 and rec-00001
        assert ids((await store.search(Query(text="zebra"))).records) == ["rec-00003",
                                                                          "rec-00002"]
    finally:
        await store.close()
    db = _connect(path)
    try:
        db.execute("INSERT INTO interactions_fts (interactions_fts) VALUES ('integrity-check')")
        assert db.execute("SELECT 1 FROM sqlite_master WHERE name = 'interactions_fts_insert'"
                          ).fetchone() is None
    finally:
        db.close()


async def test_sqlite_migration_gives_the_index_room_for_a_whole_batch(tmp_path: Path) -> None:
    """m011 raises FTS5's in-memory limit for the terms of a transaction (1 MiB by default, which
    a batch of 500 records passed, making it two segments) on a store made before it; its
    records stay found, and a batch written afterwards, whose texts alone pass 1 MiB, is one
    segment of the index."""
    from ollama_metrics.analytics.stores import sqlite_migrations
    from ollama_metrics.analytics.stores.sqlite import _connect, _params

    path = tmp_path / "interactions.db"
    db = _connect(path)
    try:
        sqlite_migrations.migrate(db, until=sqlite_migrations.m011_one_segment_per_batch)
        db.execute(f"INSERT INTO interactions ({', '.join(FIELD_NAMES)}) "
                   f"VALUES ({', '.join('?' for _ in FIELD_NAMES)})", _params(full_record(1)))
        db.execute(sqlite_migrations.INDEX_NEW_ROWS, (0,))
        segments_before = _segments(db)
    finally:
        db.close()
    store = SqliteStore(path)
    await store.open()
    try:
        assert ids((await store.search(Query(text="Berlin"))).records) == ["rec-00001"]
        # Distinct words, so the pending terms take several times the texts' 1.2 MB.
        words = [f"w{n:06d}x" for n in range(120_000)]
        await store.write_batch([full_record(2 + n, prompt=" ".join(words[n::40]))
                                 for n in range(40)])
        assert ids((await store.search(Query(text=words[7]))).records) == ["rec-00009"]
    finally:
        await store.close()
    db = _connect(path)
    try:
        assert db.execute("SELECT v FROM interactions_fts_config WHERE k = 'hashsize'"
                          ).fetchone() == (sqlite_migrations.FTS_HASHSIZE,)
        assert _segments(db) == segments_before + 1
        db.execute("INSERT INTO interactions_fts (interactions_fts) VALUES ('integrity-check')")
    finally:
        db.close()


def _segments(db: Any) -> int:
    """How many segments the full-text index has: each has its own range of rowids in the
    index's data table (segment id << 37), after the structure records (below 2**37)."""
    return int(db.execute("SELECT COUNT(DISTINCT id >> 37) FROM interactions_fts_data "
                          "WHERE id >= 1 << 37").fetchone()[0])


@pytest.mark.slow(reason="starts PostgreSQL")
async def test_postgres_migration_indexes_every_text_of_older_records(
        request: pytest.FixtureRequest) -> None:
    """A PostgreSQL store made before m007 (its generated column: prompt and reply) has every
    text of its records indexed once opened; records written afterwards are found too."""
    import psycopg

    from ollama_metrics.analytics.stores import FIELDS
    from ollama_metrics.analytics.stores import postgres as pg
    from ollama_metrics.analytics.stores import postgres_migrations as pm

    dsn = await new_postgres_schema(request.getfixturevalue("postgres_dsn"))
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await pm.migrate(conn, until=pm.m007_every_text_indexed)
        insert = (f"INSERT INTO interactions ({', '.join(FIELD_NAMES)}) VALUES ("
                  + ", ".join("%s::jsonb" if kind == "json" else "%s" for _, kind in FIELDS)
                  + ")")
        for n, first in enumerate(["first aardvark message", "first okapi message"]):
            old = full_record(n, messages=[{"role": "user", "content": first},
                                           {"role": "user", "content": "last"}], prompt="last")
            await conn.execute(insert, pg._params(old)[:len(FIELDS)])
        cur = await conn.execute("SELECT count(*) FROM interactions "
                                 "WHERE search @@ plainto_tsquery('simple', 'aardvark')")
        assert (await cur.fetchone() or (None,))[0] == 0  # the old index lacks it
    store = pg.PostgresStore(dsn)
    await store.open()
    try:
        assert ids((await store.search(Query(text="aardvark"))).records) == ["rec-00000"]
        assert ids((await store.search(Query(text="okapi"))).records) == ["rec-00001"]
        assert ids((await store.search(Query(text="答案"))).records) == ["rec-00001",
                                                                         "rec-00000"]
        await store.write_batch([full_record(2)])
        assert ids((await store.search(Query(text="Berlin"))).records)[0] == "rec-00002"
    finally:
        await store.close()
