"""SQLite schema migrations: plain numbered functions, each applied once, in order.

Each runs in one transaction together with its bookkeeping row in `_migrations`, so a database
is always at a whole-numbered version. Add new steps at the end; never edit an applied one.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable

from ..fulltext import answered_text_sql, asked_text_sql
from . import FIELDS_V1, renamed_models

_SQL_TYPE = {"text": "TEXT", "real": "REAL", "int": "INTEGER", "bool": "INTEGER", "json": "TEXT"}


def m001_interactions(db: sqlite3.Connection) -> None:
    # `seq` is the stable rowid the full-text index points at (VACUUM may renumber an implicit
    # rowid); it grows in write order, so "newest first" is `seq DESC`.
    columns = ",\n  ".join(
        f"{name} {_SQL_TYPE[kind]}{' NOT NULL UNIQUE' if name == 'id' else ''}"
        for name, kind in FIELDS_V1)
    db.execute(f"CREATE TABLE interactions (\n  seq INTEGER PRIMARY KEY,\n  {columns}\n)")
    db.execute("CREATE INDEX interactions_started ON interactions (started_at)")
    db.execute("CREATE INDEX interactions_model ON interactions (model, seq)")
    db.execute("CREATE INDEX interactions_category ON interactions (prompt_category, seq)")
    db.execute("CREATE INDEX interactions_outcome ON interactions (outcome, seq)")


def m002_full_text(db: sqlite3.Connection) -> None:
    # An external-content index: the text lives once, in `interactions`; triggers keep the
    # index in step with inserts and deletes (rows are never updated).
    db.execute(
        "CREATE VIRTUAL TABLE interactions_fts USING fts5("
        "prompt, response, content='interactions', content_rowid='seq', "
        "tokenize='unicode61 remove_diacritics 2')")
    db.execute(
        "CREATE TRIGGER interactions_fts_insert AFTER INSERT ON interactions BEGIN "
        "INSERT INTO interactions_fts (rowid, prompt, response) "
        "VALUES (new.seq, new.prompt, new.response); END")
    db.execute(
        "CREATE TRIGGER interactions_fts_delete AFTER DELETE ON interactions BEGIN "
        "INSERT INTO interactions_fts (interactions_fts, rowid, prompt, response) "
        "VALUES ('delete', old.seq, old.prompt, old.response); END")


def m003_figures_index(db: sqlite3.Connection) -> None:
    # Stats and time series read only these columns of a time range: from this index alone
    # they never touch the rows, whose prompts and replies span overflow pages. It starts with
    # started_at, so it also serves everything interactions_started did.
    db.execute(
        "CREATE INDEX interactions_figures ON interactions (started_at, model, "
        "prompt_category, outcome, endpoint, duration, ttft, prompt_tokens, completion_tokens)")
    db.execute("DROP INDEX interactions_started")


def m004_truncated_fields(db: sqlite3.Connection) -> None:
    db.execute("ALTER TABLE interactions ADD COLUMN truncated_fields TEXT")


def m005_prefix_index(db: sqlite3.Connection) -> None:
    # Without a prefix index FTS5 answers `ka*` by merging the lists of every word starting
    # with "ka" into one list in memory, per term: 200 such terms over 200,000 records took
    # 70 s and 1.3 GB. With one, a 2- or 3-character prefix is read like a word (200 terms of
    # `aa*` there: 44 ms, 25 MB). The cost is a larger index (about a third more on disk). FTS5
    # options cannot be altered: the index is made again, from the rows (the triggers
    # name it and stay as they are).
    db.execute("DROP TABLE interactions_fts")
    db.execute(
        "CREATE VIRTUAL TABLE interactions_fts USING fts5("
        "prompt, response, content='interactions', content_rowid='seq', "
        "tokenize='unicode61 remove_diacritics 2', prefix='2 3')")
    db.execute("INSERT INTO interactions_fts (interactions_fts) VALUES ('rebuild')")


def m006_model_names(db: sqlite3.Connection) -> None:
    # One name per model (ollama.names): `fast` recorded before is `fast:latest` now. A store
    # holds few distinct names, so each is renamed with one indexed UPDATE.
    names = [row[0] for row in db.execute("SELECT DISTINCT model FROM interactions "
                                          "WHERE model IS NOT NULL")]
    for old, new in renamed_models(names):
        db.execute("UPDATE interactions SET model = ? WHERE model = ?", (new, old))


def m007_tokens_estimated(db: sqlite3.Connection) -> None:
    db.execute("ALTER TABLE interactions ADD COLUMN tokens_estimated INTEGER")


def m008_outcome_success(db: sqlite3.Connection) -> None:
    # Success was stored as `ok` while the metric label said `success`; one word now, end to
    # end. Only `outcome` changes, which the full-text index does not hold.
    db.execute("UPDATE interactions SET outcome = 'success' WHERE outcome = 'ok'")


_ASKED = "om_asked(new.prompt, new.messages, new.system)"
_ANSWERED = "om_answered(new.response, new.thinking, new.tool_calls)"


def register_functions(db: sqlite3.Connection) -> None:
    """The functions that build the indexed texts (analytics.fulltext) from the stored
    columns, called by the writer's INDEX_NEW_ROWS and the delete trigger: a connection that
    inserts or deletes rows must have them."""
    db.create_function("om_asked", 3, asked_text_sql, deterministic=True)
    db.create_function("om_answered", 3, answered_text_sql, deterministic=True)


def m009_every_text_indexed(db: sqlite3.Connection) -> None:
    # The index covered the prompt (the last user message) and the reply only; now it holds
    # every text of the record, in two columns: what was asked (system, every message, their
    # thinking and tool calls) and what was answered (reply, thinking, tool calls). Those texts
    # are built by Python functions (fulltext.asked_text, answered_text) and not stored twice:
    # the table is contentless, and the delete trigger recomputes the texts a row was indexed
    # with. So the functions' output is part of the schema: a change to them needs a migration
    # that rebuilds the index, as this one does. Runs on the writer's thread at open: the proxy
    # serves meanwhile, and searches answer 503 until it is done.
    register_functions(db)
    db.execute("DROP TRIGGER interactions_fts_insert")
    db.execute("DROP TRIGGER interactions_fts_delete")
    db.execute("DROP TABLE interactions_fts")
    db.execute(
        "CREATE VIRTUAL TABLE interactions_fts USING fts5(asked, answered, content='', "
        "tokenize='unicode61 remove_diacritics 2', prefix='2 3')")
    db.execute(
        "CREATE TRIGGER interactions_fts_insert AFTER INSERT ON interactions BEGIN "
        "INSERT INTO interactions_fts (rowid, asked, answered) "
        f"VALUES (new.seq, {_ASKED}, {_ANSWERED}); END")
    old = (_ASKED + ", " + _ANSWERED).replace("new.", "old.")
    db.execute(
        "CREATE TRIGGER interactions_fts_delete AFTER DELETE ON interactions BEGIN "
        "INSERT INTO interactions_fts (interactions_fts, rowid, asked, answered) "
        f"VALUES ('delete', old.seq, {old}); END")
    every = (_ASKED + ", " + _ANSWERED).replace("new.", "")
    db.execute(f"INSERT INTO interactions_fts (rowid, asked, answered) "
               f"SELECT seq, {every} FROM interactions")


# Indexes every row above a `seq` in one statement; m010 indexes the whole table with it. Since
# m010 the writer indexes each batch it inserts (the rows above the highest `seq` before it; an
# AFTER INSERT trigger did this a row at a time, and each row's statement savepoint made FTS5
# flush its pending terms into a segment of their own: 4x slower). It ran this statement at first;
# SqliteStore.write_batch now builds the same texts in Python and inserts them (FTS5 then runs
# without the GIL).
INDEX_NEW_ROWS = (
    "INSERT INTO interactions_fts (rowid, asked, answered) SELECT seq, "
    + (_ASKED + ", " + _ANSWERED).replace("new.", "") + " FROM interactions WHERE seq > ?")


def m010_index_by_batch(db: sqlite3.Connection) -> None:
    # The writer indexes each batch it inserts with INDEX_NEW_ROWS; the insert trigger goes.
    # The index is made again with a prefix index of 2 characters only (m005 had 2 and 3):
    # every word went into three indexes, and writes spent most of their time there. A stem
    # of 3 or more characters is now looked up as a range of the index's terms (under the
    # search budget like any query): ~40 % more records/s written, an index 29 % smaller,
    # 3-character prefix searches ~10 ms slower at 200k records (bench/analytics_bench.py).
    db.execute("DROP TRIGGER interactions_fts_insert")
    db.execute("DROP TRIGGER interactions_fts_delete")
    db.execute("DROP TABLE interactions_fts")
    db.execute(
        "CREATE VIRTUAL TABLE interactions_fts USING fts5(asked, answered, content='', "
        "tokenize='unicode61 remove_diacritics 2', prefix='2')")
    old = (_ASKED + ", " + _ANSWERED).replace("new.", "old.")
    db.execute(
        "CREATE TRIGGER interactions_fts_delete AFTER DELETE ON interactions BEGIN "
        "INSERT INTO interactions_fts (interactions_fts, rowid, asked, answered) "
        f"VALUES ('delete', old.seq, {old}); END")
    # Each committed batch is a new segment of the index; FTS5 merges a level's segments into
    # one once there are `automerge` of them (default 4). At 16 (and a crisis merge at 64, not
    # 16) the index is rewritten fewer times as it grows: 40 % more records/s written at 200k
    # stored, searches within 1 ms of before.
    db.execute("INSERT INTO interactions_fts (interactions_fts, rank) VALUES ('automerge', 16)")
    db.execute("INSERT INTO interactions_fts (interactions_fts, rank) VALUES ('crisismerge', 64)")
    db.execute(INDEX_NEW_ROWS, (0,))


# FTS5 holds the terms of the rows indexed since the last commit in memory and writes them out as
# a new segment of the index at the commit, or sooner, once they take `hashsize` bytes (1 MiB by
# default). A batch of 500 records took 1-2 MiB: each batch became two segments, and the index
# was merged (rewritten) twice as often.
FTS_HASHSIZE = 8 * 2**20


def m011_one_segment_per_batch(db: sqlite3.Connection) -> None:
    # Room for a whole batch's terms (a few times the default batch of records like those of
    # bench/analytics_bench.py), so each batch is one segment: 36 % more records/s written there
    # (3,733 -> 5,065/s over 100,000 records, median of 3 interleaved runs). The memory is only
    # taken while a batch is written. A setting of the index, kept in its own config table.
    db.execute("INSERT INTO interactions_fts (interactions_fts, rank) VALUES ('hashsize', ?)",
               (FTS_HASHSIZE,))


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    m001_interactions, m002_full_text, m003_figures_index, m004_truncated_fields,
    m005_prefix_index, m006_model_names, m007_tokens_estimated, m008_outcome_success,
    m009_every_text_indexed, m010_index_by_batch, m011_one_segment_per_batch]


def pending(db: sqlite3.Connection) -> list[str]:
    """The migrations this database lacks; all of them for a new one."""
    if not db.execute("SELECT 1 FROM sqlite_master WHERE name = '_migrations'").fetchone():
        return [step.__name__ for step in MIGRATIONS]
    done = {row[0] for row in db.execute("SELECT name FROM _migrations")}
    return [step.__name__ for step in MIGRATIONS if step.__name__ not in done]


def migrate(db: sqlite3.Connection,
            until: Callable[[sqlite3.Connection], None] | None = None) -> list[str]:
    """Apply the migrations this database lacks (those before `until` only, for making an
    older store in tests and benchmarks); returns the names applied."""
    db.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at REAL)")
    done = {row[0] for row in db.execute("SELECT name FROM _migrations")}
    applied = []
    for step in MIGRATIONS[:MIGRATIONS.index(until)] if until else MIGRATIONS:
        if step.__name__ in done:
            continue
        with db:  # one transaction: the step and its bookkeeping row
            db.execute("BEGIN IMMEDIATE")
            step(db)
            db.execute("INSERT INTO _migrations VALUES (?, ?)", (step.__name__, time.time()))
        applied.append(step.__name__)
    return applied
