"""PostgreSQL schema migrations: plain numbered functions, each applied once, in order.

Each step runs in one transaction together with its bookkeeping row in
`ollama_metrics_migrations`, under a transaction-level advisory lock, so several proxies opening
the same database at once apply every step exactly once and never see a half-built schema. Add
new steps at the end; never edit an applied one. Tables are created unqualified, so they land in
the first schema of the connection's `search_path` (set it with the DSN's `options`).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ..fulltext import answered_text, asked_text
from . import FIELDS_V1, renamed_models

if TYPE_CHECKING:
    from psycopg import AsyncConnection
    from psycopg.rows import TupleRow

    Connection = AsyncConnection[TupleRow]

# Any fixed 64-bit number: ours alone among the advisory locks taken on a shared server.
_LOCK_KEY = 0x6F6C6C616D61_0001  # "ollama", 1

_SQL_TYPE = {"text": "text", "real": "double precision", "int": "bigint", "bool": "boolean",
             "json": "jsonb"}

# Only this many characters of each text are indexed: a tsvector must stay under 1 MB, and an
# insert that overflows it would fail and be retried forever. Search covers the start of very
# long texts; the texts themselves are stored whole.
_INDEXED_CHARS = 100_000


async def m001_interactions(db: Connection) -> None:
    # `seq` grows in write order, so "newest first" is `seq DESC` and a page cursor is a seq.
    columns = ",\n  ".join(
        f"{name} {_SQL_TYPE[kind]}{' NOT NULL UNIQUE' if name == 'id' else ''}"
        for name, kind in FIELDS_V1)
    await db.execute(f"CREATE TABLE interactions (\n  seq bigserial PRIMARY KEY,\n  {columns}\n)")
    await db.execute("CREATE INDEX interactions_started ON interactions (started_at)")
    await db.execute("CREATE INDEX interactions_model ON interactions (model, seq)")
    await db.execute("CREATE INDEX interactions_category ON interactions (prompt_category, seq)")
    await db.execute("CREATE INDEX interactions_outcome ON interactions (outcome, seq)")


async def m002_full_text(db: Connection) -> None:
    # A stored generated column keeps the index in step with inserts without triggers. The
    # 'simple' configuration lowercases and does not stem or drop stop words: prompts mix
    # languages and code, and any word a user typed should be findable. Prompt words carry
    # weight A and response words weight B, which ranking uses.
    await db.execute(
        "ALTER TABLE interactions ADD COLUMN search tsvector GENERATED ALWAYS AS ("
        f"setweight(to_tsvector('simple', left(coalesce(prompt, ''), {_INDEXED_CHARS})), 'A')"
        f" || setweight(to_tsvector('simple', left(coalesce(response, ''), {_INDEXED_CHARS})),"
        " 'B')) STORED")
    await db.execute("CREATE INDEX interactions_search ON interactions USING gin (search)")


async def m003_truncated_fields(db: Connection) -> None:
    await db.execute("ALTER TABLE interactions ADD COLUMN truncated_fields jsonb")


async def m004_model_names(db: Connection) -> None:
    # One name per model (ollama.names): `fast` recorded before is `fast:latest` now.
    cur = await db.execute("SELECT DISTINCT model FROM interactions WHERE model IS NOT NULL")
    for old, new in renamed_models([row[0] for row in await cur.fetchall()]):
        await db.execute("UPDATE interactions SET model = %s WHERE model = %s", (new, old))


async def m005_tokens_estimated(db: Connection) -> None:
    await db.execute("ALTER TABLE interactions ADD COLUMN tokens_estimated boolean")


async def m006_outcome_success(db: Connection) -> None:
    # Success was stored as `ok` while the metric label said `success`; one word now, end to end.
    await db.execute("UPDATE interactions SET outcome = 'success' WHERE outcome = 'ok'")


# The tsvector of a record, from its two indexed texts (analytics.fulltext): what was asked
# (weight A, which ranking counts 2.5 times) and what was answered (B).
SEARCH_VECTOR = (
    f"setweight(to_tsvector('simple', left(%s, {_INDEXED_CHARS})), 'A') || "
    f"setweight(to_tsvector('simple', left(%s, {_INDEXED_CHARS})), 'B')")
_REINDEX_BATCH = 2000


def search_texts(prompt: str | None, messages: Any, system: str | None, response: str | None,
                 thinking: str | None, tool_calls: Any) -> tuple[str, str]:
    """The two indexed texts, without NUL (PostgreSQL text cannot hold it)."""
    return (asked_text(prompt, messages, system).replace("\x00", "\ufffd"),
            answered_text(response, thinking, tool_calls).replace("\x00", "\ufffd"))


async def m007_every_text_indexed(db: Connection) -> None:
    # The generated column indexed the prompt (the last user message) and the reply only; now
    # every text of the record is (fulltext.asked_text, answered_text). Those are built in
    # Python, so `search` becomes a plain column the writer fills, and existing rows are
    # reindexed here, a batch at a time, before the index is made again. Other proxies' writes
    # wait on the table lock until this is done; their queues hold or drop and count.
    await db.execute("ALTER TABLE interactions DROP COLUMN search")
    await db.execute("ALTER TABLE interactions ADD COLUMN search tsvector")
    last = -1
    while True:
        cur = await db.execute(
            "SELECT seq, prompt, messages, system, response, thinking, tool_calls "
            "FROM interactions WHERE seq > %s ORDER BY seq LIMIT %s", (last, _REINDEX_BATCH))
        rows = await cur.fetchall()
        if not rows:
            break
        # One statement a batch: the texts are built here, the vectors by the server.
        texts = [search_texts(*row[1:]) for row in rows]
        await db.execute(
            "UPDATE interactions i SET search = "
            + SEARCH_VECTOR.replace("%s", "v.{}").format("asked", "answered")
            + " FROM unnest(%s::bigint[], %s::text[], %s::text[]) AS v(seq, asked, answered)"
            " WHERE i.seq = v.seq",
            ([row[0] for row in rows], [t[0] for t in texts], [t[1] for t in texts]))
        last = rows[-1][0]
    await db.execute("CREATE INDEX interactions_search ON interactions USING gin (search)")


MIGRATIONS: list[Callable[[Connection], Awaitable[None]]] = [
    m001_interactions, m002_full_text, m003_truncated_fields, m004_model_names,
    m005_tokens_estimated, m006_outcome_success, m007_every_text_indexed]


async def migrate(db: Connection,
                  until: Callable[[Connection], Awaitable[None]] | None = None) -> list[str]:
    """Apply the migrations this database lacks (those before `until` only, for making an
    older store in tests and benchmarks); returns the names applied.

    `db` must be in autocommit mode: every step opens its own transaction.
    """
    applied = []
    for step in MIGRATIONS[:MIGRATIONS.index(until)] if until else MIGRATIONS:
        async with db.transaction():
            await db.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            # Checked with to_regclass rather than IF NOT EXISTS, which would send a notice
            # on every start.
            cur = await db.execute("SELECT to_regclass('ollama_metrics_migrations')")
            row = await cur.fetchone()
            if row is None or row[0] is None:
                await db.execute("CREATE TABLE ollama_metrics_migrations "
                                 "(name text PRIMARY KEY, applied_at double precision NOT NULL)")
            cur = await db.execute("SELECT 1 FROM ollama_metrics_migrations WHERE name = %s",
                                   (step.__name__,))
            if await cur.fetchone() is not None:
                continue
            await step(db)
            await db.execute("INSERT INTO ollama_metrics_migrations VALUES (%s, %s)",
                             (step.__name__, time.time()))
        applied.append(step.__name__)
    return applied
