"""How long an older SQLite store takes to gain the every-text index (migration m009).

    python bench/search_migration.py [--records 1000000]

Builds a store at migration m008 (its index: prompt and reply) holding --records interactions
shaped as analytics_bench.py makes them, then times SqliteStore.open(), which applies m009 and
m010 on the store's writer thread (the proxy serves meanwhile; searches answer 503 until done).
Prints the seconds and the file size before and after.

    python bench/search_migration.py --postgres postgresql://user@host/db [--records N]

The same for PostgreSQL: a new schema at migration m006 (its generated column: prompt and reply),
--records interactions inserted, then PostgresStore.open() timed, which applies m007 (every
text of every record indexed again, a batch at a time, then the GIN index made again).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from analytics_bench import RecordMaker
from ollama_metrics.analytics.stores import FIELD_NAMES, FIELDS
from ollama_metrics.analytics.stores import sqlite_migrations as m
from ollama_metrics.analytics.stores.sqlite import SqliteStore, _connect, _params


async def postgres(dsn: str, records: int) -> int:
    import uuid

    import psycopg
    from psycopg import sql
    from psycopg.conninfo import make_conninfo

    from ollama_metrics.analytics.stores import postgres as pg
    from ollama_metrics.analytics.stores import postgres_migrations as pm

    maker = RecordMaker()
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    dsn = make_conninfo(dsn, options=f"-c search_path={schema}")
    try:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await pm.migrate(conn, until=pm.m007_every_text_indexed)
            insert = (f"INSERT INTO interactions ({', '.join(FIELD_NAMES)}) VALUES ("
                      + ", ".join("%s::jsonb" if kind == "json" else "%s"
                                  for _, kind in FIELDS) + ")")
            for done in range(0, records, 5_000):
                rows = [pg._params(maker.make())[:len(FIELDS)]
                        for _ in range(min(5_000, records - done))]
                async with conn.transaction(), conn.cursor() as cur:
                    await cur.executemany(insert, rows)
            cur = await conn.execute("SELECT pg_total_relation_size('interactions')")
            before = (await cur.fetchone() or (0,))[0] / 2**20
        store = pg.PostgresStore(dsn)
        start = time.perf_counter()
        await store.open()
        seconds = time.perf_counter() - start
        await store.close()
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            cur = await conn.execute("SELECT pg_total_relation_size('interactions')")
            after = (await cur.fetchone() or (0,))[0] / 2**20
    finally:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
    print(f"PostgreSQL m007 over {records:,} records: {seconds:.1f} s "
          f"({records / seconds:,.0f} records/s); table {before:,.0f} MiB -> {after:,.0f} MiB")
    return 0


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--postgres", metavar="DSN", help="time PostgreSQL's m007 instead")
    args = parser.parse_args()
    if args.postgres:
        return await postgres(args.postgres, args.records)
    maker = RecordMaker()
    with tempfile.TemporaryDirectory(prefix="search-migration-") as tmp:
        path = Path(tmp) / "interactions.db"
        db = _connect(path)
        m.migrate(db, until=m.m009_every_text_indexed)
        insert = (f"INSERT INTO interactions ({', '.join(FIELD_NAMES)}) "
                  f"VALUES ({', '.join('?' for _ in FIELD_NAMES)})")
        for done in range(0, args.records, 10_000):
            rows = [_params(maker.make()) for _ in range(min(10_000, args.records - done))]
            db.execute("BEGIN")
            db.executemany(insert, rows)
            db.execute("COMMIT")
        db.close()
        before = path.stat().st_size / 2**20
        store = SqliteStore(path)
        start = time.perf_counter()
        await store.open()
        seconds = time.perf_counter() - start
        await store.close()
        after = path.stat().st_size / 2**20
    print(f"m009 over {args.records:,} records: {seconds:.1f} s "
          f"({args.records / seconds:,.0f} records/s); store {before:,.0f} MiB -> {after:,.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
