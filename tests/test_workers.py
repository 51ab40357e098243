"""`serve --workers 2`: two event loops in processes of their own share the port; one Ollama
supervisor, one /api/ps poller, one store writer; /metrics, /analytics/live and the model label
bound cover both workers; SIGTERM drains both."""

from __future__ import annotations

import asyncio
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import psutil
import pytest

from helpers import Process, fake_process, proxy_process, settle
from ollama_metrics.server.workers import RESTART_AFTER

pytestmark = pytest.mark.slow(reason="starts serve --workers 2 (three processes) and a fake")

GENERATE = {"model": "llama3.2", "prompt": "hi", "stream": False}


@pytest.fixture
def ollama() -> Iterator[Process]:
    with fake_process() as p:
        yield p


def _pid(record_id: str) -> str:
    """The process part of an Interaction id (observe/interaction.new_id)."""
    return record_id[12:16]


def _workers(proxy: Process) -> list[psutil.Process]:
    children: list[psutil.Process] = psutil.Process(proxy.proc.pid).children()
    return children


async def _scrape(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(f"{url}/metrics") as resp:
        assert resp.status == 200
        return await resp.text()


def _value(text: str, line_start: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def _set_scenario(fake: Process, model: str, **fields: object) -> None:
    async with aiohttp.ClientSession() as http, \
            http.put(f"{fake.url}/_fake/scenarios", json={model: fields}) as resp:
        assert resp.status == 200


async def _one_each(http: aiohttp.ClientSession, url: str, n: int) -> None:
    """`n` requests, each on a connection of its own (the kernel spreads connections)."""
    async def one() -> None:
        async with aiohttp.ClientSession() as own, \
                own.post(f"{url}/api/generate", json=GENERATE) as resp:
            assert resp.status == 200
            await resp.read()
    await asyncio.gather(*(one() for _ in range(n)))


async def test_both_workers_serve_and_metrics_sum(ollama: Process) -> None:
    with proxy_process(ollama.url, "--workers", "2", "--analytics-backend", "none") as proxy:
        assert len(_workers(proxy)) == 2
        async with aiohttp.ClientSession() as http:
            await _one_each(http, proxy.url, 40)
            # Every completion, from both processes, in whichever worker answered (the other
            # worker's as it published them, at most LIVE_PUBLISH_EVERY ago).
            for _ in range(40):
                async with http.get(f"{proxy.url}/analytics/live?recent=100") as resp:
                    live = await resp.json()
                if len(live["recent"]) == 40:
                    break
                await asyncio.sleep(0.05)
            assert len(live["recent"]) == 40
            assert len({_pid(r["id"]) for r in live["recent"]}) == 2
            series = ('ollama_requests_total{endpoint="/api/generate",model="llama3.2:latest",'
                      'prompt_category="other",status="success"}')
            for _ in range(4):  # each scrape may be answered by either worker: all show the sum
                assert _value(await _scrape(http, proxy.url), series) == 40
            # One series per label set: no `pid` label from the multiprocess mode.
            text = await _scrape(http, proxy.url)
            assert "pid=" not in text
            assert _value(text, 'ollama_active_requests{model="llama3.2:latest"}') == 0
        assert proxy.stop() == 0


async def test_live_shows_requests_in_flight_of_both_workers(ollama: Process) -> None:
    await _set_scenario(ollama, "slow", token_delay=0.3, tokens=["a"] * 20)
    with proxy_process(ollama.url, "--workers", "2", "--analytics-backend", "none") as proxy:
        async with aiohttp.ClientSession() as http:
            async def stream() -> None:
                async with aiohttp.ClientSession() as own, own.post(
                        f"{proxy.url}/api/generate",
                        json={"model": "slow", "prompt": "x"}) as resp:
                    await resp.read()
            streams = [asyncio.create_task(stream()) for _ in range(12)]
            seen: dict[str, object] = {}

            async def all_in_flight() -> bool:
                async with http.get(f"{proxy.url}/analytics/live") as resp:
                    seen.update(await resp.json())
                return seen["active_count"] == 12

            for _ in range(100):
                if await all_in_flight():
                    break
                await asyncio.sleep(0.05)
            assert seen["active_count"] == 12
            active = seen["active"]
            assert isinstance(active, list)
            assert len({_pid(a["id"]) for a in active}) == 2
            text = await _scrape(http, proxy.url)
            assert _value(text, 'ollama_active_requests{model="slow:latest"}') == 12
            for task in streams:
                task.cancel()
            await asyncio.gather(*streams, return_exceptions=True)
        assert proxy.stop() == 0


async def test_sigterm_drains_both_workers_and_exits_zero(ollama: Process) -> None:
    await _set_scenario(ollama, "slow", token_delay=0.1, tokens=["a"] * 10)
    with proxy_process(ollama.url, "--workers", "2", "--analytics-backend", "none") as proxy:
        workers = _workers(proxy)

        async def stream() -> bytes:
            async with aiohttp.ClientSession() as own, own.post(
                    f"{proxy.url}/api/generate", json={"model": "slow", "prompt": "x"}) as resp:
                return await resp.read()

        streams = [asyncio.create_task(stream()) for _ in range(10)]
        async with aiohttp.ClientSession() as http:
            async def all_in_flight() -> bool:
                async with http.get(f"{proxy.url}/analytics/live") as resp:
                    return bool((await resp.json())["active_count"] == 10)
            for _ in range(100):
                if await all_in_flight():
                    break
                await asyncio.sleep(0.05)
        proxy.proc.send_signal(signal.SIGTERM)
        bodies = await asyncio.gather(*streams)
        # Every stream ran to its end (the grace is 10 s) through either worker.
        assert all(b'"done":true' in body for body in bodies)
        assert await asyncio.to_thread(proxy.proc.wait, 15) == 0
        assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
        assert "shutting down" in proxy.output


async def test_model_label_bound_holds_across_workers(ollama: Process) -> None:
    bound = 3
    with proxy_process(ollama.url, "--workers", "2", "--analytics-backend", "none",
                       "--max-extra-models", str(bound)) as proxy:
        async def ask(model: str) -> None:
            # Connection by connection, one name each: the names arrive at the two workers
            # in different orders, so each alone would admit a different first few.
            async with aiohttp.ClientSession() as own:
                for _ in range(2):
                    async with own.post(f"{proxy.url}/api/generate",
                                        json={"model": model, "prompt": "x",
                                              "stream": False}) as resp:
                        await resp.read()
        await asyncio.gather(*(ask(f"stray-{i % 12}") for i in range(24)))
        async with aiohttp.ClientSession() as http:
            text = await _scrape(http, proxy.url)
        stray = {line.split('model="', 1)[1].split('"', 1)[0]
                 for line in text.splitlines()
                 if line.startswith("ollama_requests_total{") and 'model="stray-' in line}
        assert 0 < len(stray) <= bound
        other = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                    if line.startswith("ollama_requests_total{") and 'model="other"' in line)
        admitted = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith("ollama_requests_total{") and 'model="stray-' in line)
        assert other + admitted == 48
        assert admitted == 4 * bound  # an admitted name counts in every worker
        assert proxy.stop() == 0


async def test_records_of_both_workers_are_stored_once_each(ollama: Process,
                                                            tmp_path: Path) -> None:
    with proxy_process(ollama.url, "--workers", "2", "--analytics-backend", "sqlite",
                       "--analytics-dir", str(tmp_path)) as proxy:
        async with aiohttp.ClientSession() as http:
            await _one_each(http, proxy.url, 30)
        assert proxy.stop() == 0
    db = sqlite3.connect(tmp_path / "interactions.db")
    try:
        ids = [row[0] for row in db.execute("SELECT id FROM interactions")]
    finally:
        db.close()
    assert len(ids) == 30 == len(set(ids))
    assert len({_pid(i) for i in ids}) == 2


async def test_a_worker_that_dies_is_replaced(ollama: Process) -> None:
    with proxy_process(ollama.url, "--workers", "2", "--analytics-backend", "none") as proxy:
        first = _workers(proxy)
        first[0].kill()
        await asyncio.sleep(RESTART_AFTER)

        def replaced() -> bool:
            now = _workers(proxy)
            return len(now) == 2 and first[0].pid not in {w.pid for w in now}
        await settle(replaced, timeout=10)
        async with aiohttp.ClientSession() as http:
            await _one_each(http, proxy.url, 10)
        assert proxy.stop() == 0
        assert "starting another" in proxy.output


def test_a_port_held_by_another_proxy_with_workers_is_in_use(ollama: Process) -> None:
    """SO_REUSEPORT would let a second proxy share the first one's connections: it is refused
    as a port in use, as without workers."""
    with proxy_process(ollama.url, "--workers", "2", "--analytics-backend", "none") as first:
        second = subprocess.run(
            [sys.executable, "-m", "ollama_metrics", "serve", "--listen",
             f"127.0.0.1:{first.port}", "--upstream", ollama.url, "--workers", "2",
             "--analytics-backend", "none"], capture_output=True, text=True, timeout=30)
        assert second.returncode == 3, second.stderr
        assert f"port {first.port} on 127.0.0.1 is already in use" in second.stderr
        assert first.stop() == 0


async def test_the_store_writers_queue_shows_with_workers(ollama: Process) -> None:
    """The queue of a store that cannot take records (a Loki that is down) grows, and /metrics
    says so whichever worker answers (the Recorder's gauge is a callback in the main process)."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        loki = f"http://127.0.0.1:{closed.getsockname()[1]}"
        with proxy_process(ollama.url, "--workers", "2", "--analytics-backend", "loki",
                           "--analytics-loki-url", loki, "--analytics-drain-grace", "0"
                           ) as proxy:
            async with aiohttp.ClientSession() as http:
                await _one_each(http, proxy.url, 1)  # taken by the writer, retried
                await asyncio.sleep(0.3)
                await _one_each(http, proxy.url, 6)  # these wait in the queue

                async def queued() -> float:
                    return _value(await _scrape(http, proxy.url),
                                  'ollama_analytics_queue_size{backend="loki"}')
                for _ in range(60):
                    if await queued() >= 6:
                        break
                    await asyncio.sleep(0.05)
                assert await queued() >= 6
                assert _value(await _scrape(http, proxy.url),
                              'ollama_analytics_queue_capacity{backend="loki"}') == 10_000
            assert proxy.stop() == 0
