"""The writer process: records are built and written there, never on the proxy's event loop;
it is bounded, restarted when it dies, drained on shutdown, and shared by several proxies."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from analytics_helpers import record, records
from conftest import StartProxy
from fake_ollama import FakeOllama
from helpers import fake_process, proxy_process, settle
from ollama_metrics.analytics.recorder import Recorder
from ollama_metrics.analytics.settings import AnalyticsConfig
from ollama_metrics.analytics.stores import open_stores
from ollama_metrics.server.app import RECORDER

CHAT = b'{"model":"llama3.2","messages":[{"role":"user","content":"Why is the sky blue?"}]}'
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads child processes from /proc")


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _recorder(proxy_app: object) -> Recorder:
    recorder = proxy_app[RECORDER]  # type: ignore[index]
    assert isinstance(recorder, Recorder)
    return recorder


async def test_a_writer_killed_is_restarted_counted_and_writes_again(
    fake: FakeOllama, start_proxy: StartProxy, http: aiohttp.ClientSession, tmp_path: Path,
) -> None:
    proxy = await start_proxy(fake.url, analytics=AnalyticsConfig.build(
        analytics_dir=str(tmp_path)))
    process = _recorder(proxy.app).process
    assert process is not None
    first = process.pid
    assert first is not None and first != os.getpid()  # written elsewhere than this loop
    async with http.post(proxy.url + "/api/chat", data=CHAT) as resp:
        await resp.read()
    await records(proxy, http, 1)
    await settle(lambda: proxy.sample("ollama_analytics_writes_total", backend="sqlite",
                                      status="success") == 1)  # reported: not lost with it
    os.kill(first, signal.SIGKILL)
    await settle(lambda: proxy.sample("ollama_analytics_writer_restarts_total") == 1, 10)
    assert process.pid != first
    for _ in range(3):
        async with http.post(proxy.url + "/api/chat", data=CHAT) as resp:
            await resp.read()
    assert len(await records(proxy, http, 4)) == 4  # the new writer writes
    await settle(lambda: proxy.sample("ollama_analytics_writes_total", backend="sqlite",
                                      status="success") == 4)
    assert proxy.sample("ollama_analytics_dropped_total", backend="sqlite") == 0


async def test_a_stopped_writer_costs_counted_drops_never_waits(
    fake: FakeOllama, start_proxy: StartProxy, http: aiohttp.ClientSession, tmp_path: Path,
) -> None:
    """The writer cannot read (stopped): the socket and then the proxy's bounded buffer fill,
    later records are dropped and counted, and requests go on at their own pace."""
    settings = AnalyticsConfig.build(analytics_dir=str(tmp_path), analytics_queue_size=2)
    proxy = await start_proxy(fake.url, analytics=settings)
    process = _recorder(proxy.app).process
    assert process is not None and process.pid is not None
    body = CHAT.replace(b"Why is the sky blue?", b"why " * 10_000)  # about 40 kB a record
    os.kill(process.pid, signal.SIGSTOP)
    try:
        slowest = 0.0
        for _ in range(40):
            started = time.perf_counter()
            async with http.post(proxy.url + "/api/chat", data=body) as resp:
                assert resp.status == 200
                await resp.read()
            slowest = max(slowest, time.perf_counter() - started)
        assert slowest < 0.5
        await settle(lambda: proxy.sample("ollama_analytics_dropped_total",
                                          backend="sqlite") > 0)
        assert proxy.sample("ollama_analytics_writes_total", backend="sqlite",
                            status="success") == 0
    finally:
        os.kill(process.pid, signal.SIGCONT)
    await settle(lambda: proxy.sample("ollama_analytics_queue_size", backend="sqlite") == 0, 10)
    dropped = proxy.sample("ollama_analytics_dropped_total", backend="sqlite")
    stored = len(await records(proxy, http, int(40 - dropped)))
    assert stored + dropped == 40 and stored > 0
    assert proxy.sample("ollama_analytics_writer_restarts_total") == 0


async def test_several_proxies_feed_one_writer(tmp_path: Path) -> None:
    """A second Recorder (another worker's) attaches to the first one's writer: both are
    written, each proxy's figures are its own records'."""
    settings = AnalyticsConfig.build(analytics_dir=str(tmp_path), analytics_retention_days=0)
    first_registry, second_registry = CollectorRegistry(), CollectorRegistry()
    first = Recorder(open_stores(settings), settings, first_registry)
    await first.start()
    assert first.process is not None
    second = Recorder(open_stores(settings), settings, second_registry,
                      writer=first.process.address)
    await second.start()
    try:
        assert second.process is None  # started nothing
        for n in range(5):
            first.submit(record(n))
        for n in range(5, 8):
            second.submit(record(n))

        def written(registry: CollectorRegistry) -> float:
            return registry.get_sample_value("ollama_analytics_writes_total",
                                             {"backend": "sqlite", "status": "success"}) or 0

        await settle(lambda: written(first_registry) == 5 and written(second_registry) == 3)
    finally:
        await second.close()
        await first.close()
    db = sqlite3.connect(tmp_path / "interactions.db")
    assert db.execute("SELECT COUNT(*) FROM interactions").fetchone() == (8,)
    db.close()


async def test_closing_writes_out_what_was_sent(tmp_path: Path) -> None:
    """Records sent in the last loop turn before close() are written, and the writer exits."""
    settings = AnalyticsConfig.build(analytics_dir=str(tmp_path), analytics_retention_days=0)
    registry = CollectorRegistry()
    recorder = Recorder(open_stores(settings), settings, registry)
    await recorder.start()
    assert recorder.process is not None
    pid = recorder.process.pid
    for n in range(300):
        recorder.submit(record(n))
    await recorder.close()
    assert registry.get_sample_value("ollama_analytics_writes_total",
                                     {"backend": "sqlite", "status": "success"}) == 300
    assert registry.get_sample_value("ollama_analytics_dropped_total", {"backend": "sqlite"}) == 0
    db = sqlite3.connect(tmp_path / "interactions.db")
    assert db.execute("SELECT COUNT(*) FROM interactions").fetchone() == (300,)
    db.close()
    assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # exited and reaped


@linux_only
@pytest.mark.slow(reason="starts proxy processes")
def test_a_writer_process_only_with_analytics(tmp_path: Path) -> None:
    with fake_process() as fake:
        with proxy_process(fake.url, "--analytics-backend", "none") as proxy:
            time.sleep(0.5)
            assert _children(proxy.proc.pid) == []
        with proxy_process(fake.url, "--analytics-dir", str(tmp_path)) as proxy:
            (writer,) = _children(proxy.proc.pid)
            assert proxy.stop() == 0
        with pytest.raises(ProcessLookupError):
            os.kill(writer, 0)  # the writer stopped with the proxy


async def test_searches_answer_while_the_writer_writes(
    fake: FakeOllama, start_proxy: StartProxy, tmp_path: Path,
) -> None:
    """The proxy reads the store itself: searches answer while the writer is busy."""
    proxy = await start_proxy(fake.url, analytics=AnalyticsConfig.build(
        analytics_dir=str(tmp_path), analytics_retention_days=0))
    recorder = _recorder(proxy.app)
    async with aiohttp.ClientSession() as http:
        for n in range(2000):
            recorder.submit(record(n, prompt=f"sky number {n}"))
        answered = 0
        while proxy.sample("ollama_analytics_writes_total", backend="sqlite",
                           status="success") < 2000:
            async with http.get(proxy.url + "/analytics/search",
                                params={"prompt_search": "sky", "limit": "5"}) as resp:
                assert resp.status == 200, await resp.text()
                await resp.read()
            answered += 1
            await asyncio.sleep(0)
        assert answered > 0


@pytest.mark.parametrize("capture", ["full", "truncated"])
def test_what_the_proxy_leaves_out_changes_no_record(capture: str) -> None:
    """channel.trim drops the middle messages and the tails of long texts before they are
    encoded: the writer builds from what arrives the very record built from everything."""
    from ollama_metrics.analytics import channel
    from ollama_metrics.analytics import record as building
    from ollama_metrics.analytics.privacy import Privacy
    from ollama_metrics.observe.interaction import Interaction, Message

    settings = AnalyticsConfig.build(analytics_capture=capture, analytics_max_messages=6,
                                     analytics_max_text=1000, analytics_max_record_kb=16)

    def exchange() -> Interaction:
        i = Interaction(method="POST", path="/api/chat", endpoint="/api/chat",
                        started_at=1.0, started=2.0, ended=3.0, ended_at=2.0, id="x",
                        system="rules " * 5000, prompt="ask me@example.com " * 3000)
        i.messages = [Message(role="user", text=f"turn {n} " + "word " * (n * 700),
                              thinking="hmm " * 2000 if n % 3 else None)
                      for n in range(20)]
        i.response_pieces = ["answer " * 100]
        return i

    privacy = Privacy.from_settings(settings)
    whole = building.build(exchange(), privacy)
    sent = exchange()
    elided = channel.trim(sent, settings.max_messages, privacy.decisive_chars)
    payload, n = channel.encode([(channel.INTERACTION, sent, elided)])
    assert n == 1 and elided == 14 and len(payload) < 40_000
    ((kind, data, left_out),) = channel.decode(payload)
    assert kind == channel.INTERACTION
    assert building.build(channel.interaction(data, left_out), privacy) == whole
    assert whole["truncated"] and whole["messages"][3] == {"elided": 14}
