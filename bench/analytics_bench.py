"""Analytics benchmark: sustained SQLite write rate and full-text search latency at scale.

    python bench/analytics_bench.py [--records 1000000] [--searches 200] [--quick] [--json]

1. Writes: realistic records (chats of one to three user turns and replies drawn from a fixed
   vocabulary, one in ten in Japanese, every field filled) go through the Recorder into the
   SQLite store, as the proxy sends them: submit() into the writer process and its bounded
   queue, batching into SQLite with its FTS5 index. Reported as sustained records/s, next to two
   baselines measured in the same run: plain sqlite3 executemany of the same rows into a table
   with no index and no full-text triggers, and the store as it was before issue 15 (schema up
   to m008: an index of the prompt and the reply only, kept by a trigger per row). The size of
   each full-text index per record is reported too (SQLite's dbstat).
2. Search: once the store holds --records interactions, --searches full-text queries (common
   words, rare words, two-word phrases; newest-first and ranked; some with a model filter)
   through the store's search(), the same path the API takes; with the search syntax of issue
   15: plain words, a "phrase", `a OR b`, `a -b`, a `stem*` and Japanese substrings. Reported as
   p50/p95/max ms.
3. Dashboard: over the same store, /analytics/stats and an hourly time series for the last 7
   days (every stored record falls in them), median of 3, in ms. No target; before the figures
   index (SQLite migration 3) and the one-pass grouping, stats took 7.5 s over 300,000.

Targets (issues 4 and 15): >= 5,000 records/s written; full-text search p95 <= 100 ms over one
million interactions. Medians and percentiles, not means: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from ollama_metrics.analytics.query import Query
from ollama_metrics.analytics.recorder import Recorder
from ollama_metrics.analytics.settings import AnalyticsConfig
from ollama_metrics.analytics.stores import FIELD_NAMES, sqlite_migrations
from ollama_metrics.analytics.stores.sqlite import SqliteStore, _connect, _params

WRITE_TARGET = 5_000.0
SEARCH_P95_TARGET_MS = 100.0
MODELS = ["llama3.2:latest", "qwen3:8b", "mistral:latest", "gemma3:4b", "phi4:latest"]
CATEGORIES = ["question", "explain", "code_write", "summarize", "other"]


def vocabulary(rng: random.Random, size: int = 5000) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = {"".join(rng.choice(letters) for _ in range(rng.randint(3, 9))) for _ in range(size)}
    return sorted(words)


class RecordMaker:
    """Interactions shaped like real chats: Zipf-ish word frequencies, every field filled."""

    def __init__(self, seed: int = 7) -> None:
        self.rng = random.Random(seed)
        self.words = vocabulary(self.rng)
        # Low ranks are common words, as in natural language.
        self.weights = [1.0 / (rank + 1) for rank in range(len(self.words))]
        self.n = 0
        self.t0 = time.time() - 86400

        # Sentences are drawn once; records combine them, so making a million is quick while
        # every record's text stays different.
        self.sentences = [self.text(self.rng.randint(6, 20)) for _ in range(20_000)]
        # Japanese: words of two to four characters drawn from common kanji and kana, written
        # without spaces as the language is.
        han = "日本語説明文書問題解決方法情報技術開発設計実装確認結果理由意味場合時間会社仕事"
        kana = "をにはがでとのもからまでよりへやかなたてしすれるいうえおくけこさ"
        self.ja_words = sorted({"".join(self.rng.choices(han, k=self.rng.randint(2, 3)))
                                + self.rng.choice(kana) for _ in range(3000)})
        self.ja_sentences = ["".join(self.rng.choices(self.ja_words, k=self.rng.randint(5, 15)))
                             + "。" for _ in range(5000)]

    def text(self, length: int) -> str:
        return " ".join(self.rng.choices(self.words, self.weights, k=length))

    def make(self) -> dict[str, Any]:
        self.n += 1
        pick = self.rng.choices
        sentences = self.ja_sentences if self.n % 10 == 0 else self.sentences
        turns = [" ".join(pick(sentences, k=2)) for _ in range(self.rng.choice((1, 1, 2, 3)))]
        messages: list[dict[str, Any]] = []
        for n, turn in enumerate(turns):
            if n:
                messages.append({"role": "assistant", "content": " ".join(pick(sentences, k=3))})
            messages.append({"role": "user", "content": turn})
        prompt = turns[-1]
        response = " ".join(pick(sentences, k=6))
        started = self.t0 + self.n * 0.05
        return {
            "id": f"bench{self.n:010d}", "started_at": started, "ended_at": started + 2.5,
            "client_ip": "127.0.0.1", "user_agent": "ollama-python/0.6.3", "method": "POST",
            "path": "/api/chat", "endpoint": "/api/chat", "model": self.rng.choice(MODELS),
            "stream": True, "options": {"temperature": 0.7}, "http_status": 200,
            "outcome": "success" if self.rng.random() > 0.02 else "error", "error": None,
            "prompt": prompt, "messages": messages,
            "system": "You are helpful.", "response": response, "thinking": None,
            "tool_calls": None, "images": None, "image_count": 0,
            "prompt_category": self.rng.choice(CATEGORIES), "ttft": 0.21, "duration": 2.5,
            "total_duration": 2.4, "load_duration": 0.01, "prompt_eval_duration": 0.1,
            "eval_duration": 2.2, "prompt_tokens": 40, "completion_tokens": 110,
            "tokens_per_second": 50.0, "request_bytes": 600, "response_bytes": 9000,
            "done_reason": "stop", "embedding_dims": None, "truncated": False,
            "capture": "full",
        }


async def measure_recorder(directory: Path, records: list[dict[str, Any]]) -> float:
    """Records/s from submit() to committed rows, through the real writer process and its
    queue, as its reports show them."""
    settings = AnalyticsConfig.build(analytics_dir=str(directory), analytics_retention_days=0,
                                     analytics_queue_size=20_000, analytics_batch_size=500)
    store = SqliteStore(directory / "interactions.db")
    registry = CollectorRegistry()
    recorder = Recorder([store], settings, registry)
    await recorder.start()

    def sample(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, {"backend": "sqlite", **labels}) or 0.0

    start = time.perf_counter()
    pending = records
    while pending or sample("ollama_analytics_writes_total", status="success") < len(records):
        room = settings.queue_size - int(sample("ollama_analytics_queue_size"))
        for record in pending[:room]:
            recorder.submit(record)
        pending = pending[room:]
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - start
    await recorder.close()
    if sample("ollama_analytics_dropped_total"):
        raise RuntimeError("records were dropped: the figure would not be of all of them")
    return len(records) / elapsed


def _inserts(db: sqlite3.Connection, sql: str, records: list[dict[str, Any]]) -> float:
    """Records/s of `sql` over the records' rows, 500 a transaction as the Recorder batches."""
    start = time.perf_counter()
    for i in range(0, len(records), 500):
        rows = [_params(r) for r in records[i:i + 500]]
        db.execute("BEGIN IMMEDIATE")
        db.executemany(sql, rows)
        db.execute("COMMIT")
    elapsed = time.perf_counter() - start
    db.close()
    return len(records) / elapsed


_VALUES = f"({', '.join(FIELD_NAMES)}) VALUES ({', '.join('?' for _ in FIELD_NAMES)})"


def measure_baseline(directory: Path, records: list[dict[str, Any]]) -> float:
    """Plain executemany of the same rows: no FTS, no indexes, same batch size and pragmas."""
    db = _connect(directory / "baseline.db")
    db.execute(f"CREATE TABLE t ({', '.join(FIELD_NAMES)})")
    return _inserts(db, f"INSERT INTO t {_VALUES}", records)


def measure_before_issue_15(directory: Path, records: list[dict[str, Any]]) -> float:
    """The store's write path before issue 15, same rows and batches: the schema up to m008,
    whose full-text index (prompt and reply only) a trigger kept a row at a time."""
    db = _connect(directory / "before.db")
    sqlite_migrations.migrate(db, until=sqlite_migrations.m009_every_text_indexed)
    return _inserts(db, f"INSERT OR IGNORE INTO interactions {_VALUES}", records)


def index_bytes_per_record(path: Path) -> float:
    """The full-text index's bytes (its shadow tables, from dbstat) per stored record."""
    db = sqlite3.connect(path)
    try:
        size = db.execute("SELECT COALESCE(SUM(pgsize), 0) FROM dbstat "
                          "WHERE name LIKE 'interactions_fts%'").fetchone()[0]
        rows = db.execute("SELECT COUNT(*) FROM interactions").fetchone()[0]
    finally:
        db.close()
    return float(size) / max(1, int(rows))


async def fill(store: SqliteStore, maker: RecordMaker, total: int) -> None:
    done = 0
    while done < total:
        n = min(5000, total - done)
        await store.write_batch([maker.make() for _ in range(n)])
        done += n
        if done % 100_000 == 0:
            print(f"  … {done:,} records stored", file=sys.stderr)


KINDS = ["common word", "rare word", "phrase", "common rare", "rare OR rare", "rare -common",
         "stem*", "Japanese"]


def queries(maker: RecordMaker, n: int) -> list[tuple[str, Query]]:
    rng = random.Random(11)
    common, rare = maker.words[:50], maker.words[-2000:]
    out = []
    for i in range(n):
        kind = i % 8
        if kind == 0:
            text = rng.choice(common)
        elif kind == 1:
            text = rng.choice(rare)
        elif kind == 2:
            text = f'"{rng.choice(common)} {rng.choice(common)}"'
        elif kind == 3:
            text = f"{rng.choice(common)} {rng.choice(rare)}"
        elif kind == 4:
            text = f"{rng.choice(rare)} OR {rng.choice(rare)}"
        elif kind == 5:
            text = f"{rng.choice(rare)} -{rng.choice(common)}"
        elif kind == 6:
            text = rng.choice(rare)[:3] + "*"
        else:  # a Japanese substring: part of a word, or across two
            word = rng.choice(maker.ja_words)
            text = word[:2] if i % 16 < 8 else word[-2:] + rng.choice(maker.ja_words)[:1]
        out.append((KINDS[kind], Query(text=text, limit=100,
                                       order="rank" if i % 3 == 0 else "time",
                                       model=rng.choice(MODELS) if i % 5 == 0 else None)))
    return out


async def measure_search(store: SqliteStore, qs: list[tuple[str, Query]]
                         ) -> dict[str, list[float]]:
    """ms per search, by kind of search text."""
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for kind, q in qs:
        start = time.perf_counter()
        await store.search(q)
        times[kind].append((time.perf_counter() - start) * 1000)
    return times


async def measure_dashboard(store: SqliteStore, rounds: int = 3) -> tuple[float, float]:
    """Median ms of what the dashboard asks over the last 7 days: /analytics/stats (totals, per
    model, per category) and an hourly time series."""
    week = Query(start_time=time.time() - 7 * 86400)
    stats, series = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        await store.stats(week)
        stats.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        await store.timeseries(week, 3600)
        series.append((time.perf_counter() - start) * 1000)
    return statistics.median(stats), statistics.median(series)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p * len(ordered)) - 1))]


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--write-records", type=int, default=100_000)
    parser.add_argument("--searches", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.records, args.write_records, args.searches = 20_000, 10_000, 40
    print(f"machine: nproc {os.cpu_count()}, Python {platform.python_version()}, "
          f"SQLite {sqlite3.sqlite_version}", file=sys.stderr)
    maker = RecordMaker()
    with tempfile.TemporaryDirectory(prefix="analytics-bench-") as tmp:
        root = Path(tmp)
        batch = [maker.make() for _ in range(args.write_records)]
        rates, baselines, befores = [], [], []
        for round_ in range(3):  # interleaved rounds: noise hits all alike
            (root / f"w{round_}").mkdir()
            baselines.append(measure_baseline(root / f"w{round_}", batch))
            befores.append(measure_before_issue_15(root / f"w{round_}", batch))
            rates.append(await measure_recorder(root / f"w{round_}", batch))
        write_rate, baseline = statistics.median(rates), statistics.median(baselines)
        before = statistics.median(befores)
        index_now = index_bytes_per_record(root / "w0" / "interactions.db")
        index_before = index_bytes_per_record(root / "w0" / "before.db")

        print(f"filling a store with {args.records:,} interactions …", file=sys.stderr)
        store = SqliteStore(root / "big" / "interactions.db")
        await store.open()
        await fill(store, maker, args.records)
        await measure_search(store, queries(maker, 10))  # warm the page cache
        by_kind = await measure_search(store, queries(maker, args.searches))
        times = [t for kind in KINDS for t in by_kind[kind]]
        stats_ms, series_ms = await measure_dashboard(store)
        size_mb = (root / "big" / "interactions.db").stat().st_size / 2**20
        await store.close()
    result = {
        "write_records_per_s": write_rate, "baseline_records_per_s": baseline,
        "before_issue_15_records_per_s": before, "index_bytes_per_record": index_now,
        "index_bytes_per_record_before_issue_15": index_before,
        "stored": args.records, "db_mb": size_mb,
        "search_p95_ms_by_kind": {k: pct(v, 0.95) for k, v in by_kind.items() if v},
        "search_p50_ms": pct(times, 0.5), "search_p95_ms": pct(times, 0.95),
        "search_max_ms": max(times), "searches": len(times),
        "stats_7d_ms": stats_ms, "timeseries_7d_ms": series_ms,
    }
    print()
    print(f"{'metric':34} {'value':>12}  {'baseline / target':>22}")
    print(f"{'-' * 34} {'-' * 12}  {'-' * 22}")
    print(f"{'records/s, Recorder → SQLite+FTS':34} {write_rate:12,.0f}  "
          f"{baseline:12,.0f} plain ({write_rate / baseline:.2f}x)")
    print(f"{'records/s, before issue 15':34} {before:12,.0f}  "
          f"{'(prompt+reply, trigger)':>22}")
    print(f"{'full-text index bytes/record':34} {index_now:12,.0f}  "
          f"{index_before:12,.0f} before ({index_now / index_before:.2f}x)")
    print(f"{'full-text search p50 ms':34} {result['search_p50_ms']:12.1f}")
    print(f"{'full-text search p95 ms':34} {result['search_p95_ms']:12.1f}  "
          f"{'target <= ' + str(int(SEARCH_P95_TARGET_MS)):>22}")
    print(f"{'full-text search max ms':34} {result['search_max_ms']:12.1f}")
    for kind, values in by_kind.items():
        if values:
            print(f"{'  p95 ms, ' + kind:34} {pct(values, 0.95):12.1f}  "
                  f"{len(values):>12} searches")
    print(f"{'/analytics/stats, 7 days, ms':34} {stats_ms:12.0f}")
    print(f"{'hourly time series, 7 days, ms':34} {series_ms:12.0f}")
    print(f"over {args.records:,} stored interactions ({size_mb:,.0f} MiB), "
          f"{len(times)} searches")
    print()
    print(f"{'PASS' if write_rate >= WRITE_TARGET else 'FAIL'}  sustained writes "
          f"{write_rate:,.0f}/s (target >= {WRITE_TARGET:,.0f}/s)")
    print(f"{'PASS' if result['search_p95_ms'] <= SEARCH_P95_TARGET_MS else 'FAIL'}  search p95 "
          f"{result['search_p95_ms']:.1f} ms (target <= {SEARCH_P95_TARGET_MS:.0f} ms)")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
