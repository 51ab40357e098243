"""The Loki store against a receiver that checks Loki's documented push format."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from helpers import settle
from loki_receiver import LokiReceiver
from ollama_metrics.analytics.recorder import Recorder
from ollama_metrics.analytics.settings import AnalyticsConfig
from ollama_metrics.analytics.stores import (
    FIELD_NAMES,
    QueryableStore,
    Record,
    StoreError,
    open_stores,
)
from ollama_metrics.analytics.stores.loki import GZIP_OVER, MAX_MODELS, LokiStore

T0 = 1_700_000_000.0
LABELS = {"job", "model", "endpoint", "prompt_category", "outcome"}


def record(n: int, **fields: Any) -> Record:
    rec: Record = dict.fromkeys(FIELD_NAMES)
    rec.update(id=f"r{n:04d}", started_at=T0 + n, ended_at=T0 + n + 0.5, method="POST",
               path="/api/chat", endpoint="/api/chat", model="llama3.2:latest", stream=True,
               http_status=200, outcome="success", prompt=f"question {n}", response=f"answer {n}",
               prompt_category="qa", image_count=0, truncated=False, capture="full")
    rec.update(fields)
    return rec


@pytest.fixture
async def store(loki: LokiReceiver) -> AsyncIterator[LokiStore]:
    s = LokiStore(loki.url)
    await s.open()
    yield s
    await s.close()
    assert loki.errors == []  # a 400 is let go by the store, so format faults show only here


async def test_one_push_per_batch_with_streams_grouped_by_labels(
        loki: LokiReceiver, store: LokiStore) -> None:
    batch = [record(5, model="a"), record(1, model="b"), record(3, model="a"),
             record(2, model="a", prompt_category="code"), record(4, model="a", outcome="error"),
             record(0, model="a")]
    await store.write_batch(batch)
    assert loki.errors == []
    assert len(loki.pushes) == 1
    streams = loki.pushes[0]["streams"]
    by_labels = {tuple(sorted(s["stream"].items())): s["values"] for s in streams}
    assert len(by_labels) == len(streams) == 4
    for stream in streams:
        assert set(stream["stream"]) == LABELS
        assert stream["stream"]["job"] == "ollama-metrics"
        assert stream["stream"]["endpoint"] == "/api/chat"
    main = {"job": "ollama-metrics", "model": "a", "endpoint": "/api/chat",
            "prompt_category": "qa", "outcome": "success"}
    values = by_labels[tuple(sorted(main.items()))]
    # Sorted by started_at, whatever the batch order.
    assert [v[0] for v in values] == [str(int(T0 + n) * 10**9) for n in (0, 3, 5)]
    await store.write_batch([record(6)])
    assert len(loki.pushes) == 2


async def test_equal_timestamps_keep_batch_order(loki: LokiReceiver, store: LokiStore) -> None:
    batch = [record(9, id="late"), record(1, id="x", started_at=T0), record(2, id="y",
             started_at=T0), record(3, id="z", started_at=T0)]
    await store.write_batch(batch)
    assert [line["id"] for line in loki.lines()] == ["x", "y", "z", "late"]


async def test_the_record_round_trips_as_the_line(loki: LokiReceiver, store: LokiStore) -> None:
    rec = record(1, started_at=T0 + 0.1234567, prompt="Grüße, 世界 \"quoted\"\n🦙",
                 messages=[{"role": "user", "content": "hi", "images": [{"bytes": 3}]}],
                 options={"temperature": 0.2, "num_ctx": 8192}, ttft=0.25, truncated=True,
                 tool_calls=[{"function": {"name": "f", "arguments": {"x": [1, None]}}}])
    await store.write_batch([rec])
    assert loki.lines() == [rec]
    entry = loki.entries[0]
    assert entry.ns == 1_700_000_000_123_457_000  # started_at to the microsecond
    raw = loki.pushes[0]["streams"][0]["values"][0][1]
    assert "\n" not in raw  # one line
    assert raw.startswith('{"id":"r0001","started_at":')  # compact


async def test_records_orjson_refuses_still_go_out(loki: LokiReceiver, store: LokiStore) -> None:
    rec = record(1, prompt="lone \ud800 surrogate", options={"seed": 2**70})
    await store.write_batch([rec])
    assert loki.errors == []
    line = loki.lines()[0]
    assert line["options"] == {"seed": 2**70}
    assert line["prompt"] == "lone ? surrogate"


async def test_model_label_is_bounded(loki: LokiReceiver, store: LokiStore) -> None:
    await store.write_batch([record(n, model=f"model-{n}") for n in range(60)])
    assert len({e.labels["model"] for e in loki.entries}) == MAX_MODELS + 1
    await store.write_batch([record(60, model=None), record(61, model="x" * 500),
                             record(62, model="model-3")])
    assert loki.errors == []
    models = {e.labels["model"] for e in loki.entries}
    assert models == {f"model-{n}" for n in range(MAX_MODELS)} | {"other", "none"}
    # The line keeps the real name.
    assert {line["model"] for line in loki.lines()} >= {"model-59", "x" * 500}
    assert loki.entries[-1].labels["model"] == "model-3"


async def test_label_values_are_never_empty_or_invalid(loki: LokiReceiver,
                                                       store: LokiStore) -> None:
    await store.write_batch([record(1, endpoint=None, prompt_category="", outcome=None,
                                    model="bad\ud800name")])
    assert loki.errors == []
    assert loki.entries[0].labels == {"job": "ollama-metrics", "model": "other",
                                      "endpoint": "none", "prompt_category": "none",
                                      "outcome": "none"}


async def test_tenant_header(loki: LokiReceiver) -> None:
    loki.require_tenant = True
    anonymous = LokiStore(loki.url)
    tenant = LokiStore(loki.url, tenant="team-a")
    for s in (anonymous, tenant):
        await s.open()
    try:
        with pytest.raises(StoreError, match="401: no org id"):
            await anonymous.write_batch([record(1)])
        await tenant.write_batch([record(2)])
    finally:
        for s in (anonymous, tenant):
            await s.close()
    assert [p.headers["X-Scope-OrgID"] for p in loki.received] == ["team-a"]
    assert [line["id"] for line in loki.lines()] == ["r0002"]


async def test_large_batches_are_gzipped(loki: LokiReceiver, store: LokiStore) -> None:
    await store.write_batch([record(1)])
    big = [record(n, response="token " * 4000) for n in range(20)]
    await store.write_batch(big)
    assert loki.errors == []
    small, large = loki.received
    assert small.encoding is None
    assert large.encoding == "gzip"
    assert small.headers["Content-Type"] == large.headers["Content-Type"] == "application/json"
    assert large.size < GZIP_OVER < 20 * 24_000  # compressed on the wire
    assert loki.lines()[1:] == big


@pytest.mark.parametrize("status", [500, 502, 503, 429, 404])
async def test_retryable_answers_raise_then_a_later_push_delivers(
        loki: LokiReceiver, store: LokiStore, status: int) -> None:
    loki.fail_next(1, status, f"upstream said {status}")
    batch = [record(1), record(2)]
    with pytest.raises(StoreError, match=f"answered {status}: upstream said {status}"):
        await store.write_batch(batch)
    assert loki.entries == []
    await store.write_batch(batch)
    assert loki.lines() == batch


async def test_unreachable_loki_raises() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = LokiStore(f"http://user:secret@127.0.0.1:{port}")
    await store.open()
    try:
        with pytest.raises(StoreError, match=f"127.0.0.1:{port}/loki/api/v1/push") as info:
            await store.write_batch([record(1)])
    finally:
        await store.close()
    assert "secret" not in str(info.value)


async def test_basic_auth_from_the_url(loki: LokiReceiver) -> None:
    loki.auth = ("user", "p@ss word")
    good = LokiStore(f"http://user:p%40ss%20word@127.0.0.1:{loki.port}")
    bad = LokiStore(f"http://user:wrong@127.0.0.1:{loki.port}")
    for s in (good, bad):
        await s.open()
    try:
        await good.write_batch([record(1)])
        with pytest.raises(StoreError, match="answered 401") as info:
            await bad.write_batch([record(2)])
    finally:
        for s in (good, bad):
            await s.close()
    assert "wrong" not in str(info.value)
    assert [line["id"] for line in loki.lines()] == ["r0001"]


async def test_refused_entries_are_not_resent(loki: LokiReceiver, store: LokiStore,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """Loki stores the valid entries of a push and answers 400 for the rest: resending would
    never succeed, so the ones it ignored are reported refused (from its "total ignored" count)
    and the reason is logged; a 400 without that count refuses the whole batch."""
    loki.reject_before = int(T0 + 2) * 10**9
    with caplog.at_level(logging.WARNING):
        assert await store.write_batch([record(1), record(2), record(3)]) == 1
    assert [line["id"] for line in loki.lines()] == ["r0002", "r0003"]
    assert "timestamp too old" in caplog.text
    assert "total ignored: 1 out of 3" in caplog.text
    assert loki.attempts == 1
    loki.fail_next(1, 400, "error at least one label pair is required per stream")
    assert await store.write_batch([record(4), record(5)]) == 2


async def test_blocked_ingestion_is_not_retried(loki: LokiReceiver, store: LokiStore,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """Loki's block_ingestion_status_code (260 by default) is a 2xx asking clients not to retry."""
    loki.fail_next(2, 260, "ingestion blocked until 2030-01-01T00:00:00Z")
    with caplog.at_level(logging.WARNING):
        refused = [await store.write_batch([record(n)]) for n in (1, 2, 3)]
    assert refused == [1, 1, 0]
    assert [line["id"] for line in loki.lines()] == ["r0003"]
    messages = [r.getMessage() for r in caplog.records]
    assert sum("answered 260" in m and "ingestion blocked" in m for m in messages) == 1
    assert any("accepts pushes again" in m for m in messages)


async def test_too_large_batches_are_split(loki: LokiReceiver, store: LokiStore,
                                           caplog: pytest.LogCaptureFixture) -> None:
    batch = [record(n, response="x" * 3000) for n in range(8)]
    loki.max_body = 8000  # about two records per push
    assert await store.write_batch(batch) == 0
    assert loki.lines() == batch
    assert len(loki.pushes) > 2
    with caplog.at_level(logging.WARNING):  # alone still too large
        assert await store.write_batch([record(9, response="y" * 10_000)]) == 1
    assert "r0009 is too large" in caplog.text
    assert len(loki.lines()) == 8


async def test_purge_deletes_nothing(store: LokiStore) -> None:
    assert await store.purge(T0 + 10**9, 1) == 0


async def test_with_sqlite_through_the_recorder(loki: LokiReceiver, tmp_path: Path) -> None:
    """Several backends at once: Loki failing first only delays Loki; SQLite gets it at once."""
    settings = AnalyticsConfig.build(analytics_backend="sqlite,loki", analytics_dir=str(tmp_path),
                                     analytics_loki_url=loki.url, analytics_retention_days=0)
    stores = open_stores(settings)
    assert [s.name for s in stores] == ["sqlite", "loki"]
    recorder = Recorder(stores, settings, CollectorRegistry())
    loki.fail_next(1, 503, "ingester not ready")
    await recorder.start()
    try:
        batch = [record(n) for n in range(3)]
        for rec in batch:
            recorder.submit(rec)
        sqlite = stores[0]
        assert isinstance(sqlite, QueryableStore)

        for _ in range(200):
            if all([await sqlite.get(r["id"]) for r in batch]):
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("SQLite did not get the records")
        assert loki.entries == []  # Loki's first push failed; its retry waits for the back-off
        await settle(lambda: len(loki.entries) == 3, timeout=5.0)
        assert loki.attempts >= 2
        assert sorted(loki.lines(), key=lambda r: r["id"]) == batch
    finally:
        await recorder.close()


async def test_refused_records_count_as_dropped(loki: LokiReceiver, tmp_path: Path) -> None:
    """Through the recorder: what Loki ignores for good is in ollama_analytics_dropped_total,
    the rest in writes_total{status="success"}; nothing is sent twice."""
    settings = AnalyticsConfig.build(analytics_backend="loki", analytics_dir=str(tmp_path),
                                     analytics_loki_url=loki.url, analytics_retention_days=0,
                                     analytics_batch_size=10)
    registry = CollectorRegistry()
    recorder = Recorder(open_stores(settings), settings, registry)
    loki.reject_before = int(T0 + 3) * 10**9  # the first three records are too old for Loki
    await recorder.start()
    try:
        for n in range(8):
            recorder.submit(record(n))
        await settle(lambda: len(loki.entries) == 5, timeout=5.0)
        await settle(lambda: registry.get_sample_value(
            "ollama_analytics_dropped_total", {"backend": "loki"}) == 3, timeout=5.0)
    finally:
        await recorder.close()
    assert registry.get_sample_value("ollama_analytics_writes_total",
                                     {"backend": "loki", "status": "success"}) == 5
    assert registry.get_sample_value("ollama_analytics_writes_total",
                                     {"backend": "loki", "status": "error"}) == 0
    assert len(loki.entries) == 5


@pytest.mark.parametrize(("body", "reason"), [
    ({"streams": [{"stream": {"a": "b"}, "values": [[1700000000000000000, "x"]]}]},
     "decimal digits"),
    ({"streams": [{"stream": {"a": "b"}, "values": [["1700000000", "x"]]}]}, "nanoseconds"),
    ({"streams": [{"stream": {"a": "b"}, "values": [["1700000000000000001", "x"],
                                                    ["1700000000000000000", "y"]]}]},
     "out of order"),
    ({"streams": [{"stream": {"a-b": "c"}, "values": []}]}, "invalid label name"),
    ({"streams": [{"stream": {"__name__": "c"}, "values": []}]}, "invalid label name"),
    ({"streams": [{"stream": {"a": ""}, "values": []}]}, "non-empty string"),
    ({"streams": [{"stream": {"a": 1}, "values": []}]}, "non-empty string"),
    ({"streams": [{"stream": {}, "values": []}]}, "at least one label"),
    ({"streams": [{"stream": {"a": "b"}, "values": [["1700000000000000000", {"x": 1}]]}]},
     "must be a string"),
    ({"streams": [{"stream": {"a": "b"}, "values": [["1700000000000000000", "x", {"k": 1}]]}]},
     "structured metadata"),
    ({"streams": [{"labels": "{a=\"b\"}", "entries": []}]}, '"stream" and "values"'),
])
async def test_the_receiver_refuses_what_loki_would(loki: LokiReceiver, body: dict[str, Any],
                                                    reason: str) -> None:
    async with aiohttp.ClientSession() as http, \
            http.post(f"{loki.url}/loki/api/v1/push", json=body) as resp:
        assert resp.status == 400
        assert reason in await resp.text()
    assert loki.entries == []
    assert loki.pushes == []


async def test_the_receiver_checks_headers(loki: LokiReceiver) -> None:
    good = b'{"streams": [{"stream": {"a": "b"}, "values": [["1700000000000000000", "x"]]}]}'
    push = f"{loki.url}/loki/api/v1/push"
    async with aiohttp.ClientSession() as http:
        async with http.post(push, data=good, headers={"Content-Type": "text/plain"}) as resp:
            assert resp.status == 400
            assert "Content-Type" in await resp.text()
        async with http.post(push, data=good, headers={"Content-Type": "application/json",
                                                       "Content-Encoding": "gzip"}) as resp:
            assert resp.status == 400
            assert "gzip but the body is not" in await resp.text()
        async with http.get(push) as resp:
            assert resp.status == 405
        async with http.post(f"{loki.url}/loki/api/v1/pushes", data=good) as resp:
            assert resp.status == 404
        async with http.post(push, data=good, headers={"Content-Type": "application/json"}
                             ) as resp:
            assert resp.status == 204
    assert [e.line for e in loki.entries] == ["x"]
