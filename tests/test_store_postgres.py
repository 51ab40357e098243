"""What only the PostgreSQL store has: a server shared by several proxies, migrations under a
lock, web-search syntax, PostgreSQL's text limits. The shared semantics are in
test_store_contract.py. Every test gets a fresh schema on the session's real server."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from ollama_metrics.analytics.query import Query
from ollama_metrics.analytics.stores import QueryTimeout, StoreError
from ollama_metrics.analytics.stores import postgres as pg_module
from ollama_metrics.analytics.stores import postgres_migrations as migrations_module
from ollama_metrics.analytics.stores.postgres import PostgresStore
from ollama_metrics.analytics.stores.postgres_migrations import MIGRATIONS, migrate
from services import new_postgres_schema
from store_records import full_record, sparse_record

pytestmark = pytest.mark.slow(reason="a real PostgreSQL server")


@pytest.fixture
async def dsn(postgres_dsn: str) -> str:
    return await new_postgres_schema(postgres_dsn)


@pytest.fixture
async def store(dsn: str) -> AsyncIterator[PostgresStore]:
    s = PostgresStore(dsn)
    await s.open()
    yield s
    await s.close()


async def sql(dsn: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(query, params)
        return await cur.fetchall() if cur.description else []


async def search_ids(store: PostgresStore, text: str) -> list[Any]:
    return [r["id"] for r in (await store.search(Query(text=text, limit=1000))).records]


# --- several proxies, one database -----------------------------------------------------------

async def test_stores_opening_at_once_migrate_once(dsn: str) -> None:
    stores = [PostgresStore(dsn) for _ in range(6)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        rows = await sql(dsn, "SELECT name FROM ollama_metrics_migrations ORDER BY name")
        assert [r[0] for r in rows] == [m.__name__ for m in MIGRATIONS]
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            assert await migrate(conn) == []
        await stores[0].write_batch([full_record(1)])
        assert await stores[-1].get("rec-00001") == full_record(1)
    finally:
        for s in stores:
            await s.close()


async def test_a_failing_migration_leaves_no_trace(dsn: str, monkeypatch: pytest.MonkeyPatch
                                                  ) -> None:
    async def m003_broken(db: Any) -> None:
        await db.execute("CREATE TABLE half_done (x int)")
        await db.execute("SELECT 1 / 0")

    monkeypatch.setattr(migrations_module, "MIGRATIONS", [*MIGRATIONS, m003_broken])
    store = PostgresStore(dsn)
    with pytest.raises(psycopg.errors.DivisionByZero):
        await store.open()
    await store.close()
    assert await sql(dsn, "SELECT to_regclass('half_done')") == [(None,)]
    rows = await sql(dsn, "SELECT name FROM ollama_metrics_migrations ORDER BY name")
    assert [r[0] for r in rows] == [m.__name__ for m in MIGRATIONS]  # the good steps stay


async def test_concurrent_writers_lose_nothing(dsn: str) -> None:
    a, b = PostgresStore(dsn), PostgresStore(dsn)
    await a.open()
    await b.open()
    try:
        async def write(store: PostgresStore, first: int) -> None:
            for start in range(first, first + 500, 50):
                # The 10 records after each batch are written by the other store as well.
                await store.write_batch([sparse_record(n) for n in range(start, start + 60)
                                         if n < 1010])

        await asyncio.gather(write(a, 0), write(b, 500))
        assert await sql(dsn, "SELECT count(*), count(DISTINCT id) FROM interactions") == \
            [(1010, 1010)]
        assert (await a.stats(Query()))["totals"]["requests"] == 1010
        exported = [r["id"] async for r in b.export(Query())]
        assert sorted(exported) == [f"sparse-{n:05d}" for n in range(1010)]
    finally:
        await a.close()
        await b.close()


async def test_tables_go_to_the_schema_of_the_dsn(store: PostgresStore, dsn: str,
                                                  postgres_dsn: str) -> None:
    await store.write_batch([full_record(1)])
    [(schema,)] = await sql(dsn, "SELECT current_schema()")
    [(where,)] = await sql(postgres_dsn, "SELECT relnamespace::regnamespace::text FROM pg_class "
                           "WHERE relname = 'interactions' AND relnamespace::regnamespace::text "
                           "= %s", schema)
    assert where == schema
    assert await sql(postgres_dsn, "SELECT to_regclass('public.interactions')") == [(None,)]


async def test_sessions_are_named_on_the_server(store: PostgresStore, dsn: str) -> None:
    await store.search(Query())
    [(n,)] = await sql(dsn, "SELECT count(*) FROM pg_stat_activity "
                            "WHERE application_name = 'ollama-metrics'")
    assert n >= 1


# --- connections ----------------------------------------------------------------------------

async def test_an_unreachable_server_raises_and_open_can_be_retried() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: refused
        store = PostgresStore(f"postgresql://postgres@127.0.0.1:{port}/test")
        for _ in range(2):  # as the recorder's retries do
            with pytest.raises(psycopg.OperationalError):
                await store.open()
    with pytest.raises(RuntimeError, match="not open"):
        await store.write_batch([full_record(1)])
    await store.close()


def test_a_malformed_dsn_is_a_store_error() -> None:
    with pytest.raises(StoreError, match="DSN"):
        PostgresStore("host=localhost port")


async def test_dropped_connections_are_replaced(store: PostgresStore, dsn: str,
                                                postgres_dsn: str) -> None:
    await store.write_batch([full_record(1)])
    await store.search(Query())
    killed = await sql(postgres_dsn, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                       "WHERE application_name = 'ollama-metrics'")
    assert killed
    assert all(ok for (ok,) in killed)
    await store.write_batch([full_record(2)])
    assert [r["id"] for r in (await store.search(Query())).records] == ["rec-00002",
                                                                        "rec-00001"]


# --- PostgreSQL's full-text search -----------------------------------------------------------

async def test_web_search_syntax(store: PostgresStore) -> None:
    await store.write_batch([
        full_record(1, prompt="the quick brown fox", response="jumps"),
        full_record(2, prompt="a quick red fox", response="sleeps"),
        full_record(3, prompt="foo-bar baz", response="user@example.com wrote"),
    ])
    assert await search_ids(store, "quick fox") == ["rec-00002", "rec-00001"]
    assert await search_ids(store, '"quick brown"') == ["rec-00001"]
    assert await search_ids(store, "quick -brown") == ["rec-00002"]
    assert await search_ids(store, "brown OR red") == ["rec-00002", "rec-00001"]
    assert await search_ids(store, "foo-bar") == ["rec-00003"]  # hyphenated words are words
    assert await search_ids(store, "bar") == ["rec-00003"]
    assert await search_ids(store, "user@example.com") == ["rec-00003"]
    assert await search_ids(store, '"quick brown') == ["rec-00001"]  # forgiving, like a web box
    assert await search_ids(store, "qui") == []  # no prefix matching


async def test_nothing_to_search_for_finds_nothing(store: PostgresStore) -> None:
    """Text with no letters or digits is no error (plain input never answers 400): it matches
    nothing."""
    await store.write_batch([full_record(1)])
    assert await search_ids(store, "?!") == []


async def test_nul_characters_are_replaced_not_fatal(store: PostgresStore) -> None:
    record = full_record(1, prompt="before\x00after", model="m\x00",
                         options={"k\x00": ["v\x00"], "plain": 1})
    await store.write_batch([record])  # PostgreSQL text and jsonb cannot hold NUL
    got = await store.get("rec-00001")
    assert got is not None
    assert got["prompt"] == "before\ufffdafter"
    assert got["options"] == {"k\ufffd": ["v\ufffd"], "plain": 1}
    assert [r["id"] for r in (await store.search(Query(model="m\x00"))).records] == \
        ["rec-00001"]
    assert await search_ids(store, "before\x00") == []


async def test_long_texts_are_stored_whole_and_searched_by_their_start(
        store: PostgresStore) -> None:
    words = [f"w{n}" for n in range(300_000)]  # ~2 MB of distinct words: too many for a
    prompt = " ".join(words)  # whole tsvector, which must stay under 1 MB
    await store.write_batch([full_record(1, prompt=prompt)])
    got = await store.get("rec-00001")
    assert got is not None
    assert got["prompt"] == prompt
    assert await search_ids(store, "w10") == ["rec-00001"]
    assert await search_ids(store, "w299999") == []


# --- retention -------------------------------------------------------------------------------

async def test_purge_deletes_in_batches(store: PostgresStore, monkeypatch: pytest.MonkeyPatch
                                        ) -> None:
    monkeypatch.setattr(pg_module, "_PURGE_BATCH", 7)
    await store.write_batch([sparse_record(n) for n in range(40)])
    assert await store.purge(sparse_record(30)["started_at"], None) == 30
    assert len((await store.search(Query())).records) == 10


async def test_purge_ignores_a_size_cap(store: PostgresStore) -> None:
    await store.write_batch([full_record(n) for n in range(20)])
    assert await store.purge(None, 1) == 0
    assert len((await store.search(Query())).records) == 20


# --- the search budget -----------------------------------------------------------------------

async def _waiting_for_lock(dsn: str) -> list[Any]:
    return await sql(dsn, "SELECT query FROM pg_stat_activity WHERE application_name = "
                     "'ollama-metrics' AND state = 'active' AND wait_event_type = 'Lock'")


async def test_queries_end_at_the_deadline_and_with_their_caller(dsn: str) -> None:
    """A query held up on the server (here: behind a lock) ends at the search deadline, and
    when its caller is cancelled (a client gone): on the server too, not only for us."""
    quick, patient = PostgresStore(dsn, search_timeout=0.3), PostgresStore(dsn, search_timeout=60)
    await quick.open()
    await patient.open()
    try:
        await quick.write_batch([full_record(1)])
        async with await psycopg.AsyncConnection.connect(dsn) as locker:
            await locker.execute("LOCK TABLE interactions IN ACCESS EXCLUSIVE MODE")
            for call in (quick.search(Query(text="hello")), quick.stats(Query()),
                         quick.timeseries(Query(), 60.0), quick.get("rec-00001")):
                with pytest.raises(QueryTimeout, match="ANALYTICS_SEARCH_TIMEOUT"):
                    await call
                assert await _waiting_for_lock(dsn) == []
            task = asyncio.create_task(patient.search(Query(text="hello")))
            for _ in range(100):
                if await _waiting_for_lock(dsn):
                    break
                await asyncio.sleep(0.05)
            assert len(await _waiting_for_lock(dsn)) == 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await _waiting_for_lock(dsn) == []
            await locker.rollback()
        assert len((await quick.search(Query(text="hello"))).records) <= 1  # still usable
    finally:
        await quick.close()
        await patient.close()
