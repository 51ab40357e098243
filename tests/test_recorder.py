"""Analytics never in the way: full queues drop and count, failing stores are retried, several
backends get the same record, shutdown drains, retention is honoured."""

from __future__ import annotations

import asyncio
import gzip
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import ollama
import orjson
import pytest

from analytics_helpers import records
from conftest import StartProxy
from fake_ollama import FakeOllama
from helpers import RunningProxy, fake_process, proxy_process, settle
from loki_receiver import LokiReceiver
from ollama_metrics.analytics.settings import AnalyticsConfig
from ollama_metrics.analytics.stores.jsonl import JsonlStore
from ollama_metrics.server.app import RECORDER
from services import new_postgres_schema

CHAT = b'{"model":"llama3.2","messages":[{"role":"user","content":"Why is the sky blue?"}]}'


def _writes(proxy: RunningProxy, backend: str, status: str = "success") -> float:
    return proxy.sample("ollama_analytics_writes_total", backend=backend, status=status)


async def test_every_backend_stores_the_same_record(
    fake: FakeOllama, start_proxy: StartProxy, http: aiohttp.ClientSession, tmp_path: Path,
    loki: LokiReceiver, postgres_dsn: str,
) -> None:
    settings = AnalyticsConfig.build(
        analytics_backend="sqlite,postgres,jsonl,loki", analytics_dir=str(tmp_path),
        analytics_postgres_dsn=await new_postgres_schema(postgres_dsn),
        analytics_loki_url=loki.url)
    proxy = await start_proxy(fake.url, analytics=settings)
    async with ollama.AsyncClient(host=proxy.url) as client:
        await client.chat(model="llama3.2", messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Why is the sky blue?"}], options={"seed": 1})
    (from_sqlite,) = await records(proxy, http, 1)
    await settle(lambda: all(_writes(proxy, b) == 1 for b in ("postgres", "jsonl", "loki")))
    from ollama_metrics.analytics.stores.postgres import PostgresStore

    assert settings.postgres_dsn is not None
    store = PostgresStore(settings.postgres_dsn)  # the writer process's connections are its own
    await store.open()
    try:
        from_postgres = await store.get(from_sqlite["id"])
    finally:
        await store.close()
    (jsonl_file,) = tmp_path.glob("interactions-*.jsonl.gz")
    from_jsonl = [orjson.loads(line) for line in gzip.decompress(jsonl_file.read_bytes())
                  .splitlines()]
    assert from_postgres == from_sqlite
    assert from_jsonl == [from_sqlite]
    assert loki.lines() == [from_sqlite]
    assert from_sqlite["response"] == "Hello, world!"
    assert from_sqlite["options"] == {"seed": 1}


async def test_full_queue_drops_and_counts_never_delays(
    fake: FakeOllama, start_proxy: StartProxy, http: aiohttp.ClientSession, tmp_path: Path,
) -> None:
    settings = AnalyticsConfig.build(analytics_dir=str(tmp_path), analytics_queue_size=5,
                                     analytics_batch_size=2)
    proxy = await start_proxy(fake.url, analytics=settings)
    # Another process holds the database's write lock: the store's writer stalls (a slow disk,
    # a long backup), so its queue fills up.
    locked, release = threading.Event(), threading.Event()

    def hold_lock() -> None:
        db = sqlite3.connect(tmp_path / "interactions.db", isolation_level=None)
        db.execute("BEGIN EXCLUSIVE")
        locked.set()
        release.wait(10)
        db.execute("COMMIT")
        db.close()

    holder = threading.Thread(target=hold_lock)
    holder.start()
    locked.wait(5)
    try:
        durations = []
        for _ in range(40):
            started = time.perf_counter()
            async with http.post(proxy.url + "/api/chat", data=CHAT) as resp:
                assert resp.status == 200
                await resp.read()
            durations.append(time.perf_counter() - started)
        assert max(durations) < 2.0, durations  # never waited for the store (held 10 s)
        # At most the queue and a batch in the writer's hands get through while the store is
        # stuck.
        await settle(lambda: proxy.sample("ollama_analytics_dropped_total",
                                          backend="sqlite") >= 33)
        assert proxy.sample("ollama_analytics_queue_size", backend="sqlite") == 5
        assert proxy.sample("ollama_analytics_queue_capacity", backend="sqlite") == 5
    finally:
        release.set()
        holder.join()
    await settle(lambda: proxy.sample("ollama_analytics_queue_size", backend="sqlite") == 0, 10)
    dropped = proxy.sample("ollama_analytics_dropped_total", backend="sqlite")
    stored = len(await records(proxy, http, int(40 - dropped)))
    assert stored + dropped == 40  # every record either stored or counted as dropped


@pytest.mark.slow(reason="waits for retries")
async def test_failing_store_is_retried_and_others_carry_on(
    fake: FakeOllama, start_proxy: StartProxy, http: aiohttp.ClientSession, tmp_path: Path,
    loki: LokiReceiver,
) -> None:
    loki.fail_next(2, 503, "ingester unavailable")
    settings = AnalyticsConfig.build(analytics_backend="sqlite,loki",
                                     analytics_dir=str(tmp_path), analytics_loki_url=loki.url)
    proxy = await start_proxy(fake.url, analytics=settings)
    for _ in range(5):
        async with http.post(proxy.url + "/api/chat", data=CHAT) as resp:
            assert resp.status == 200
            await resp.read()
    await records(proxy, http, 5)  # SQLite is not held up by Loki's trouble
    await settle(lambda: len(loki.lines()) == 5, 10)  # 0.5 s, then 1 s of back-off
    # The writer process reports its figures a few tens of milliseconds after they change.
    await settle(lambda: _writes(proxy, "loki") == 5)
    assert _writes(proxy, "loki", "error") >= 2
    assert proxy.sample("ollama_analytics_dropped_total", backend="loki") == 0


@pytest.mark.slow(reason="hundreds of requests and searches")
async def test_sqlite_under_concurrent_requests_and_searches(
    fake: FakeOllama, start_proxy: StartProxy, tmp_path: Path,
) -> None:
    proxy = await start_proxy(fake.url, analytics=AnalyticsConfig.build(
        analytics_dir=str(tmp_path), analytics_batch_size=50))
    stop = asyncio.Event()
    searches = 0

    async def search(session: aiohttp.ClientSession) -> None:
        nonlocal searches
        while not stop.is_set():
            async with session.get(proxy.url + "/analytics/search",
                                   params={"prompt_search": "sky", "limit": "50"}) as resp:
                assert resp.status == 200, await resp.text()
                await resp.read()
            searches += 1

    async def chat(session: aiohttp.ClientSession, n: int) -> None:
        body = CHAT.replace(b"sky", b"sky %d" % n)
        async with session.post(proxy.url + "/api/chat", data=body) as resp:
            assert resp.status == 200
            await resp.read()

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        searchers = [asyncio.create_task(search(session)) for _ in range(4)]
        await asyncio.gather(*(chat(session, n) for n in range(200)))
        stop.set()
        await asyncio.gather(*searchers)
        assert searches > 4
        stored = await records(proxy, session, 200, timeout=15)
    assert len({r["id"] for r in stored}) == 200
    assert proxy.sample("ollama_analytics_writes_total", backend="sqlite", status="error") == 0


async def test_retention_is_honoured_periodically(
    fake: FakeOllama, start_proxy: StartProxy, http: aiohttp.ClientSession, tmp_path: Path,
) -> None:
    settings = AnalyticsConfig.build(
        analytics_backend="sqlite,jsonl", analytics_dir=str(tmp_path),
        analytics_retention_days=2, analytics_cleanup_interval=0.2)
    proxy = await start_proxy(fake.url, analytics=settings)
    recorder = proxy.app[RECORDER]
    now = time.time()
    for n, age_days in enumerate((10, 3, 1, 0)):
        recorder.submit(_record(n, now - age_days * 86400))
    await settle(lambda: _writes(proxy, "sqlite") == 4 and _writes(proxy, "jsonl") == 4)
    kept = await records(proxy, http, 2, timeout=3)
    assert [r["id"] for r in kept] == ["r3", "r2"]
    # JSONL files go by whole UTC days: those of the 10- and 3-day-old records.
    recent = {time.strftime("%Y-%m-%d", time.gmtime(now - d * 86400)) for d in (1, 0)}
    await settle(lambda: {p.name[13:23] for p in tmp_path.glob("interactions-*.jsonl.gz")}
                 == recent, 3)


def _record(n: int, started_at: float) -> dict[str, Any]:
    from ollama_metrics.analytics.stores import FIELD_NAMES

    record: dict[str, Any] = dict.fromkeys(FIELD_NAMES)
    record.update(id=f"r{n}", started_at=started_at, ended_at=started_at + 1, outcome="success",
                  prompt=f"prompt {n}", response="x" * 200, model="m", endpoint="/api/chat",
                  prompt_category="other", truncated=False, capture="full", image_count=0)
    return record


async def test_sqlite_size_cap(tmp_path: Path) -> None:
    from ollama_metrics.analytics.stores.sqlite import SqliteStore

    store = SqliteStore(tmp_path / "interactions.db")
    await store.open()
    try:
        await store.write_batch([_record(n, 1e9 + n) | {"response": "word " * 2000}
                                 for n in range(300)])
        files = [tmp_path / "interactions.db", tmp_path / "interactions.db-wal"]
        before = sum(f.stat().st_size for f in files if f.exists())
        assert before > 6_000_000
        # Not much less: what the full-text index keeps of deleted rows (until its segments
        # merge) must fit too, and its prefix index doubles every position of "word".
        deleted = await store.purge(None, 3_000_000)
        assert 0 < deleted < 300
        after = sum(f.stat().st_size for f in files if f.exists())
        assert after < 3_300_000  # pages given back to the file system, not just freed
    finally:
        await store.close()


async def test_jsonl_rotates_and_stays_readable(tmp_path: Path) -> None:
    store = JsonlStore(tmp_path, max_file_bytes=2000)
    await store.open()
    day = 1_767_225_600.0  # 2026-01-01T00:00:00Z
    for batch in range(6):
        await store.write_batch([_record(batch * 10 + n, day + n) for n in range(10)])
    await store.close()
    files = sorted(tmp_path.glob("interactions-2026-01-01*.jsonl.gz"))
    assert len(files) > 1  # rotated by size
    lines = [orjson.loads(line) for f in files
             for line in gzip.decompress(f.read_bytes()).splitlines()]
    assert sorted(r["id"] for r in lines) == sorted(f"r{n}" for n in range(60))


@pytest.mark.slow(reason="streams through a proxy process stopped by SIGTERM")
@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_drains_records_in_flight(tmp_path: Path, workers: str) -> None:
    """SIGTERM with streams in flight: they finish, and every one of them is stored."""
    scenarios = orjson.dumps({"slow:latest": {"tokens": ["a"] * 10, "token_delay": 0.1},
                              "llama3.2:latest": {}}).decode()
    with fake_process("--scenarios", scenarios) as fake, proxy_process(
            fake.url, "--analytics-dir", str(tmp_path), "--shutdown-grace", "10",
            "--workers", workers) as proxy:
        results: list[int] = []

        def stream() -> None:
            import urllib.request

            req = urllib.request.Request(proxy.url + "/api/generate",
                                         data=b'{"model":"slow","prompt":"hi"}')
            with urllib.request.urlopen(req) as resp:
                results.append(len(resp.read().splitlines()))

        threads = [threading.Thread(target=stream) for _ in range(10)]
        for t in threads:
            t.start()
        time.sleep(0.4)  # all ten are mid-stream
        assert proxy.stop() == 0
        for t in threads:
            t.join(10)
    assert results == [11] * 10  # every stream completed: 10 tokens and the final line
    db = sqlite3.connect(tmp_path / "interactions.db")
    assert db.execute("SELECT COUNT(*), MIN(outcome), MAX(outcome) FROM interactions"
                      ).fetchone() == (10, "success", "success")
    db.close()


def _sqlite_heap() -> int:
    """Bytes SQLite holds in this process: page caches, statements, schemas."""
    import _sqlite3
    import ctypes

    used = ctypes.CDLL(_sqlite3.__file__).sqlite3_memory_used
    used.restype = ctypes.c_int64
    return int(used())


async def test_sqlite_lets_its_caches_go_when_idle(tmp_path: Path) -> None:
    """After `idle_release` seconds without a call, the writer's cache is shrunk and the reader
    connections closed; reads and writes then go on as before."""
    from ollama_metrics.analytics.query import Query
    from ollama_metrics.analytics.stores.sqlite import SqliteStore

    store = SqliteStore(tmp_path / "interactions.db", idle_release=0.3)
    await store.open()
    try:
        at = time.time() - 100
        for batch in range(4):
            await store.write_batch([_record(n, at + n) | {"response": f"word{n} " * 1000}
                                     for n in range(batch * 500, batch * 500 + 500)])
        for group in range(0, 2000, 400):  # as many at once as the store lets wait
            searches = [store.search(Query(text=f"word{n}", limit=5))
                        for n in range(group, group + 400, 50)]
            assert all(len(page.records) == 1 for page in await asyncio.gather(*searches))
        busy = _sqlite_heap()
        await settle(lambda: _sqlite_heap() < busy / 3, 5.0)
        idle = _sqlite_heap()
        page = await store.search(Query(text="word1999"))  # on a new reader connection
        assert [r["id"] for r in page.records] == ["r1999"]
        await store.write_batch([_record(2000, at + 2000)])
        assert (await store.get("r2000")) is not None
    finally:
        await store.close()
    print(f"SQLite heap {busy / 2**20:.1f} MiB busy, {idle / 2**20:.2f} MiB idle")


async def test_sqlite_migration_renames_the_stored_ok_to_success(tmp_path: Path) -> None:
    """Rows stored as `ok` read as `success` after the migration; `ok` still filters them."""
    from ollama_metrics.analytics.query import Query
    from ollama_metrics.analytics.stores import sqlite_migrations
    from ollama_metrics.analytics.stores.sqlite import SqliteStore, _connect

    path = tmp_path / "interactions.db"
    db = _connect(path)
    try:
        sqlite_migrations.migrate(db, until=sqlite_migrations.m006_model_names)
        for n, outcome in enumerate(["ok", "error", "ok"]):
            db.execute("INSERT INTO interactions (id, started_at, outcome, truncated, capture, "
                       "image_count) VALUES (?, ?, ?, 0, 'full', 0)",
                       (f"old{n}", time.time(), outcome))
        db.commit()
    finally:
        db.close()
    store = SqliteStore(path)
    await store.open()
    try:
        for status in ("success", "ok"):
            page = await store.search(Query(status=status))
            assert sorted(str(r["id"]) for r in page.records) == ["old0", "old2"]
            assert {r["outcome"] for r in page.records} == {"success"}
    finally:
        await store.close()


async def test_sqlite_migrates_an_older_store_and_stats_read_only_the_index(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A store made by the first two migrations gains the figures index on open, keeps its
    rows, and stats and time series then read that index, never the rows."""
    from ollama_metrics.analytics.query import Query
    from ollama_metrics.analytics.stores import sqlite_migrations
    from ollama_metrics.analytics.stores.sqlite import SqliteStore, _connect, _grouped

    path = tmp_path / "interactions.db"
    db = _connect(path)
    try:
        sqlite_migrations.migrate(db, until=sqlite_migrations.m003_figures_index)
    finally:
        db.close()
    at = time.time() - 100
    store = SqliteStore(path)
    caplog.set_level("INFO")
    await store.open()
    assert "upgrading the SQLite store" in caplog.text and "m003_figures_index" in caplog.text
    try:
        await store.write_batch([_record(n, at + n) | {"duration": float(n)} for n in range(10)])
        stats = await store.stats(Query(start_time=at - 1))
        assert stats["totals"]["requests"] == 10
        assert (stats["totals"]["latency_p50"], stats["totals"]["latency_p95"]) == (4.0, 9.0)
        series = await store.timeseries(Query(start_time=at - 1), 3600)
        assert sum(b["requests"] for b in series) == 10
    finally:
        await store.close()
    db = sqlite3.connect(path)
    try:
        names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert "interactions_figures" in names and "interactions_started" not in names
        applied = [r[0] for r in db.execute("SELECT name FROM _migrations ORDER BY name")]
        assert applied == [m.__name__ for m in sqlite_migrations.MIGRATIONS]
    finally:
        db.close()
    # The statements stats and time series run, whatever the filters, read only the index.
    db = _connect(path, readonly=True)
    try:
        statements: list[str] = []
        db.set_trace_callback(statements.append)  # with the bound values expanded
        filtered = Query(start_time=at - 1, model="m", category="other", status="ok",
                         endpoint="/api/chat")
        for query in (Query(), Query(start_time=at - 1), filtered):
            for keys, key_params in ((["i.model", "i.prompt_category"], []),
                                     (["CAST(i.started_at / ? AS INTEGER)"], [60])):
                groups = _grouped(db, query, keys, key_params)
                assert sum(figures.requests for _, figures in groups) == 10
        db.set_trace_callback(None)
        assert len(statements) == 6
        for sql in statements:
            plan = " ".join(r[-1] for r in db.execute("EXPLAIN QUERY PLAN " + sql))
            assert "COVERING INDEX interactions_figures" in plan, (sql, plan)
    finally:
        db.close()


@pytest.mark.slow(reason="a store that takes longer than the open timeout to open")
async def test_a_long_store_upgrade_is_not_cancelled_at_start(
    fake: FakeOllama, start_proxy: StartProxy, http: aiohttp.ClientSession,
    postgres_dsn: str, caplog: pytest.LogCaptureFixture,
) -> None:
    """A store still opening after OPEN_TIMEOUT (a migration over a large store: minutes) is
    left to finish in the background, not cancelled and begun again: the proxy serves, the
    records queue, and are written once it is open."""
    import psycopg

    from ollama_metrics.analytics import recorder
    from ollama_metrics.analytics.stores.postgres_migrations import _LOCK_KEY

    dsn = await new_postgres_schema(postgres_dsn)
    # Another proxy is migrating the same database: this one's migration waits on its lock.
    holder = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    await holder.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
    try:
        settings = AnalyticsConfig.build(analytics_backend="postgres",
                                         analytics_postgres_dsn=dsn)
        started = time.monotonic()
        proxy = await start_proxy(fake.url, analytics=settings)
        assert time.monotonic() - started < recorder.OPEN_TIMEOUT + 5
        for _ in range(3):
            async with http.post(proxy.url + "/api/chat", data=CHAT) as resp:
                assert resp.status == 200
                await resp.read()
        assert "postgres is still opening" in caplog.text
    finally:
        await holder.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
        await holder.close()
    await settle(lambda: _writes(proxy, "postgres") == 3, 10)
    assert "cannot open postgres" not in caplog.text  # the first open was never given up
    assert proxy.sample("ollama_analytics_dropped_total", backend="postgres") == 0
