"""How long an older SQLite store takes to gain the every-text index (migration m009).

    python bench/search_migration.py [--records 1000000]

Builds a store at migration m008 (its index: prompt and reply) holding --records interactions
shaped as analytics_bench.py makes them, then times SqliteStore.open(), which applies m009 and
m010 on the store's writer thread (the proxy serves meanwhile; searches answer 503 until done).
Prints the seconds and the file size before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from analytics_bench import RecordMaker
from ollama_metrics.analytics.stores import FIELD_NAMES
from ollama_metrics.analytics.stores import sqlite_migrations as m
from ollama_metrics.analytics.stores.sqlite import SqliteStore, _connect, _params


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    args = parser.parse_args()
    maker = RecordMaker()
    with tempfile.TemporaryDirectory(prefix="search-migration-") as tmp:
        path = Path(tmp) / "interactions.db"
        db = _connect(path)
        db.execute("CREATE TABLE _migrations (name TEXT PRIMARY KEY, applied_at REAL)")
        steps = m.MIGRATIONS[:m.MIGRATIONS.index(m.m009_every_text_indexed)]
        for step in steps:
            step(db)
            db.execute("INSERT INTO _migrations VALUES (?, 0)", (step.__name__,))
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
