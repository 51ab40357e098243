"""One name per model, as Ollama resolves names: in metric labels, the /api/ps gauges, records,
analytics filters and groups, and in stores written before (migrated)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest

from analytics_helpers import records
from conftest import StartProxy
from fake_ollama import FakeOllama
from helpers import settle
from ollama_metrics.analytics.settings import AnalyticsConfig
from ollama_metrics.analytics.stores import postgres_migrations, sqlite_migrations
from ollama_metrics.analytics.stores.postgres import PostgresStore
from ollama_metrics.analytics.stores.sqlite import SqliteStore, _connect
from ollama_metrics.ollama.names import normalize_model
from services import new_postgres_schema


@pytest.mark.parametrize(("asked", "shown"), [
    ("llama3.2", "llama3.2:latest"),
    ("llama3.2:latest", "llama3.2:latest"),
    ("Llama3.2:Latest", "llama3.2:latest"),  # Ollama compares names ignoring case
    ("registry.ollama.ai/library/llama3.2", "llama3.2:latest"),
    ("https://registry.ollama.ai/library/llama3.2:3b", "llama3.2:3b"),
    ("library/qwen3:8b", "qwen3:8b"),
    ("me/mine", "me/mine:latest"),
    ("hf.co/Org/Repo-GGUF:Q4_K_M", "hf.co/org/repo-gguf:q4_k_m"),
    ("localhost:5000/team/model", "localhost:5000/team/model:latest"),
    ("gpt-oss:120b-cloud", "gpt-oss:120b-cloud"),
    # Not names Ollama accepts: kept as sent.
    ("a/b/c/d", "a/b/c/d"),
    ("two words", "two words"),
    (":latest", ":latest"),
    ("model@sha256-abc", "model@sha256-abc"),
    ("dots..here", "dots..here"),
    ("x" * 600, "x" * 600),
])
def test_names_as_ollama_resolves_them(asked: str, shown: str) -> None:
    assert normalize_model(asked) == shown


SPELLINGS = ["llama3.2", "Llama3.2:latest", "registry.ollama.ai/library/llama3.2"]


async def test_one_model_is_one_label_and_one_group(
        fake: FakeOllama, start_proxy: StartProxy, http: aiohttp.ClientSession,
        tmp_path: Path) -> None:
    proxy = await start_proxy(fake.url, AnalyticsConfig.build(analytics_dir=str(tmp_path)),
                              ps_interval=0.05)
    for name in SPELLINGS:
        body = b'{"model":"%s","prompt":"why?","stream":false}' % name.encode()
        async with http.post(proxy.url + "/api/generate", data=body) as resp:
            assert resp.status == 200
    await settle(lambda: proxy.sample("ollama_requests_total", model="llama3.2:latest",
                                      endpoint="/api/generate", status="success",
                                      prompt_category="question") == 3)
    families = {m.name: m for m in proxy.registry.collect()}
    request_models = {s.labels["model"] for s in families["ollama_requests"].samples if s.value}
    assert request_models == {"llama3.2:latest"}
    # The same value the loaded-model gauge carries, so the two join in PromQL.
    await settle(lambda: proxy.sample("ollama_model_loaded", model="llama3.2:latest") == 1)

    # Records: one name, found by any spelling of it.
    for name in ("llama3.2", "LLAMA3.2:latest"):
        found = await records(proxy, http, 3, model=name)
        assert {r["model"] for r in found} == {"llama3.2:latest"}
    async with http.get(proxy.url + "/analytics/models") as resp:
        models = (await resp.json())["models"]
    assert [(m["model"], m["requests"]) for m in models] == [("llama3.2:latest", 3)]
    async with http.get(proxy.url + "/analytics/stats") as resp:
        stats = await resp.json()
    assert [(m["model"], m["requests"]) for m in stats["models"]] == [("llama3.2:latest", 3)]


OLD_NAMES = ["fast", "Fast:latest", "fast:latest", "me/slow", "two words", None]
NEW_NAMES = ["fast:latest", "fast:latest", "fast:latest", "me/slow:latest", "two words", None]


async def test_sqlite_store_renames_old_records(tmp_path: Path) -> None:
    path = tmp_path / "interactions.db"
    db = _connect(path)
    before = [m for m in sqlite_migrations.MIGRATIONS
              if m is not sqlite_migrations.m006_model_names][:5]
    try:
        db.execute("CREATE TABLE _migrations (name TEXT PRIMARY KEY, applied_at REAL)")
        for step in before:
            step(db)
            db.execute("INSERT INTO _migrations VALUES (?, ?)", (step.__name__, time.time()))
        for n, model in enumerate(OLD_NAMES):
            db.execute("INSERT INTO interactions (id, started_at, model) VALUES (?, ?, ?)",
                       (f"r{n}", time.time(), model))
        db.commit()
    finally:
        db.close()
    store = SqliteStore(path)
    await store.open()
    await store.close()
    db = _connect(path)
    try:
        rows = db.execute("SELECT model FROM interactions ORDER BY id").fetchall()
    finally:
        db.close()
    assert [r[0] for r in rows] == NEW_NAMES


@pytest.mark.slow(reason="a real PostgreSQL server")
async def test_postgres_store_renames_old_records(postgres_dsn: str) -> None:
    dsn = await new_postgres_schema(postgres_dsn)
    before = [m for m in postgres_migrations.MIGRATIONS
              if m is not postgres_migrations.m004_model_names][:3]
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for step in before:
            async with conn.transaction():
                await step(conn)
        await conn.execute("CREATE TABLE ollama_metrics_migrations "
                           "(name text PRIMARY KEY, applied_at double precision NOT NULL)")
        for step in before:
            await conn.execute("INSERT INTO ollama_metrics_migrations VALUES (%s, %s)",
                               (step.__name__, time.time()))
        for n, model in enumerate(OLD_NAMES):
            await conn.execute("INSERT INTO interactions (id, started_at, model) "
                               "VALUES (%s, %s, %s)", (f"r{n}", time.time(), model))
    store = PostgresStore(dsn)
    await store.open()
    await store.close()
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute("SELECT model FROM interactions ORDER BY id")
        rows: list[Any] = await cur.fetchall()
    assert [r[0] for r in rows] == NEW_NAMES
