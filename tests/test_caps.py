"""Caps on what a client controls: a 20 MB model name, the 404 that echoes it, the live list,
and request bodies too large to parse on the event loop or too many to parse at once."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import io
import pickle
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil
import pytest

from analytics_helpers import records
from conftest import StartProxy
from fake_ollama import FakeOllama, Scenario
from helpers import fake_process, proxy_process, settle
from ollama_metrics.analytics.settings import AnalyticsConfig
from ollama_metrics.observe.interaction import CAPS
from ollama_metrics.ollama.request import read_request, read_request_apart
from ollama_metrics.server.proxy import PARSE_APART

HUGE = 20 * 1024 * 1024


def huge_model_body(n: int = 0) -> bytes:
    return b'{"model":"' + bytes([97 + n % 26]) * HUGE + b'","prompt":"hi","stream":false}'


async def test_huge_model_name_is_capped_everywhere(
        fake: FakeOllama, start_proxy: StartProxy, http: aiohttp.ClientSession,
        tmp_path: Path) -> None:
    proxy = await start_proxy(fake.url, analytics=AnalyticsConfig.build(
        analytics_dir=str(tmp_path)))
    body = huge_model_body()
    async with http.post(proxy.url + "/api/generate", data=io.BytesIO(body)) as resp:
        assert resp.status == 404
        reply = await resp.read()
    # Forwarded unchanged, and Ollama's 404 echoing the name relayed unchanged.
    assert fake.requests[-1].body_sha256 == hashlib.sha256(body).hexdigest()
    assert len(reply) > HUGE
    # Metrics: counted under the bounded label, never the name.
    await settle(lambda: proxy.sample("ollama_requests_total", model="other",
                                      endpoint="/api/generate", status="error",
                                      prompt_category="other") == 1)
    # The live list keeps the name cut to its cap.
    async with http.get(proxy.url + "/analytics/live") as resp:
        (entry,) = (await resp.json())["recent"]
    assert entry["model"] == "a" * CAPS["model"]
    # The record: name and error text cut to their caps.
    (r,) = await records(proxy, http, 1)
    assert r["model"] == "a" * CAPS["model"]
    assert r["error"].startswith("model 'aaa") and len(r["error"]) <= CAPS["error"]


@pytest.mark.slow(reason="forty 20 MB model names")
async def test_live_snapshot_stays_small_after_huge_names(
        fake: FakeOllama, start_proxy: StartProxy, http: aiohttp.ClientSession) -> None:
    proxy = await start_proxy(fake.url)
    for n in range(5):
        async with http.post(proxy.url + "/api/generate",
                             data=io.BytesIO(huge_model_body(n))) as resp:
            assert resp.status == 404
            await resp.read()
    async with http.get(proxy.url + "/analytics/live", params={"recent": "500"}) as resp:
        assert resp.status == 200
        snapshot = await resp.read()
    assert len(snapshot) < 16 * 1024, len(snapshot)


async def test_recent_zero_lists_none(proxy: Any, http: aiohttp.ClientSession) -> None:
    async with http.post(proxy.url + "/api/generate",
                         json={"model": "llama3.2", "prompt": "hi", "stream": False}) as resp:
        await resp.read()
    async with http.get(proxy.url + "/analytics/live", params={"recent": "0"}) as resp:
        assert (await resp.json())["recent"] == []


@pytest.fixture
def parse_threads() -> Iterator[list[str]]:
    """Names of the threads read_request ran on, seen through the profiler hook."""
    seen: list[str] = []
    code = read_request.__code__

    def hook(frame: types.FrameType, event: str, arg: object) -> None:
        if event == "call" and frame.f_code is code:
            seen.append(threading.current_thread().name)

    threading.setprofile(hook)
    sys.setprofile(hook)
    try:
        yield seen
    finally:
        sys.setprofile(None)
        threading.setprofile(None)


async def test_large_bodies_are_parsed_off_the_loop(
        proxy: Any, http: aiohttp.ClientSession, parse_threads: list[str]) -> None:
    small = {"model": "llama3.2", "prompt": "hi", "stream": False}
    large = {**small, "prompt": "word " * 200_000}
    for body in (small, large):
        async with http.post(proxy.url + "/api/generate", json=body) as resp:
            assert resp.status == 200
            await resp.read()
    loop_thread = threading.current_thread().name
    assert parse_threads[0] == loop_thread
    assert parse_threads[1] != loop_thread
    await settle(lambda: proxy.sample("ollama_requests_total", model="llama3.2:latest",
                                      endpoint="/api/generate", status="success",
                                      prompt_category="other") == 2)


@pytest.mark.slow(reason="three 30 MB bodies")
async def test_bodies_over_the_parse_budget_go_on_unread(
        fake: FakeOllama, start_proxy: StartProxy, http: aiohttp.ClientSession,
        tmp_path: Path) -> None:
    # max_parse_bytes 1 MB: the budget is 2 MB, so two 0.9 MB bodies in flight fill it.
    fake.scenarios["slow:latest"] = Scenario(first_delay=1.0)
    proxy = await start_proxy(fake.url, analytics=AnalyticsConfig.build(
        analytics_dir=str(tmp_path)), max_parse_bytes=1_000_000)
    bodies = [b'{"model":"slow","stream":false,"prompt":"' + bytes([97 + n]) * 900_000 + b'"}'
              for n in range(3)]

    async def post(body: bytes, after: float) -> int:
        await asyncio.sleep(after)
        async with http.post(proxy.url + "/api/generate", data=io.BytesIO(body)) as resp:
            await resp.read()
            return resp.status

    statuses = await asyncio.gather(*(post(b, 0.2 * n) for n, b in enumerate(bodies)))
    assert statuses == [200, 200, 200]
    sent = {hashlib.sha256(b).hexdigest() for b in bodies}
    # All three reached Ollama whole.
    assert {r.body_sha256 for r in fake.requests if r.method == "POST"} == sent
    found = await records(proxy, http, 3)
    assert sorted(r["model"] or "" for r in found) == ["", "slow:latest", "slow:latest"]
    # Once those exchanges ended, their budget is free again.
    async with http.post(proxy.url + "/api/generate", data=io.BytesIO(bodies[0])) as resp:
        assert resp.status == 200
    assert sorted(r["model"] or "" for r in await records(proxy, http, 4)) == [
        "", "slow:latest", "slow:latest", "slow:latest"]


@pytest.mark.slow
async def test_forty_huge_model_names_leave_memory_and_database_near_rest(
        tmp_path: Path) -> None:
    with fake_process() as fake, proxy_process(fake.url, "--analytics-dir",
                                               str(tmp_path)) as proxy:
        process = psutil.Process(proxy.proc.pid)
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            async def generate(body: bytes) -> None:
                async with http.post(proxy.url + "/api/generate", data=io.BytesIO(body)) as resp:
                    await resp.read()

            await generate(b'{"model":"warm-up","prompt":"hi","stream":false}')
            await asyncio.sleep(1.0)
            db = tmp_path / "interactions.db"
            baseline = process.memory_info().rss
            db_before = sum(f.stat().st_size for f in tmp_path.glob("interactions.db*"))
            body = huge_model_body()
            for _ in range(40):
                await generate(body)
            del body
            gc.collect()
            async with http.get(proxy.url + "/analytics/live",
                                params={"recent": "500"}) as resp:
                snapshot = await resp.read()
            found = 0
            for _ in range(100):  # the writer batches in the background
                async with http.get(proxy.url + "/analytics/search",
                                    params={"limit": "100"}) as resp:
                    found = len((await resp.json())["results"])
                if found == 41:
                    break
                await asyncio.sleep(0.1)
            assert found == 41
            await asyncio.sleep(1.0)
        rise = (process.memory_info().rss - baseline) / 2**20
        growth = (sum(f.stat().st_size for f in tmp_path.glob("interactions.db*"))
                  - db_before) / 2**20
        print(f"RSS rise {rise:.1f} MiB, database growth {growth:.2f} MiB, "
              f"live snapshot {len(snapshot)} bytes")
        assert db.exists()
        assert len(snapshot) < 64 * 1024
        assert rise < 100, f"RSS {rise:.1f} MiB above its resting size"
        assert growth < 5, f"database grew {growth:.1f} MiB"


def _parse_processes() -> list[psutil.Process]:
    """The proxy's parse processes (server/parsing.py): children of this test's process."""
    return [p for p in psutil.Process().children(recursive=True)
            if "ollama_metrics.ollama.parse_apart" in p.cmdline()]


def _chat_body(n: int) -> bytes:
    """A chat of `n` short messages (a system message among them, and one with an image),
    ending with a question: the many-small-objects shape that is slow to parse."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": "be brief"}]
    messages += [{"role": "user" if k % 2 else "assistant", "content": f"turn {k}"}
                 for k in range(n)]
    messages[n // 2] = {"role": "system", "content": "a rule from the middle"}
    messages[3] = {"role": "user", "content": "look", "images": [
        "aGVsbG8=", "data:image/png;base64,d29ybGQ=", "https://example.com/a.png", {"x": 1}]}
    messages.append({"role": "user", "content": "Why is the sky blue?"})
    return orjson.dumps({"model": "llama3.2", "stream": False, "messages": messages,
                         "options": {"temperature": 0.2}, "seed": 7})


@pytest.mark.parametrize(("n", "keep"), [(10, 100), (500, 100), (500, 7), (4, 2)])
def test_a_body_parsed_apart_makes_the_record_of_a_body_parsed_here(n: int, keep: int) -> None:
    """read_request_apart sends back only what a record keeps of the messages (the first and
    last halves of `keep`, and how many it left out): the record built from that is the record
    built from the whole read, prompt and system text included."""
    from ollama_metrics.analytics import channel
    from ollama_metrics.analytics import record as building
    from ollama_metrics.analytics.privacy import Privacy
    from ollama_metrics.observe.interaction import Interaction

    body = _chat_body(n)
    privacy = Privacy.from_settings(AnalyticsConfig.build(analytics_max_messages=keep))

    def exchange() -> Interaction:
        return Interaction(method="POST", path="/api/chat", endpoint="/api/chat",
                           started_at=1.0, started=2.0, ended=3.0, ended_at=2.0, id="x")

    here = exchange()
    read_request(body, here)
    apart = exchange()
    fields = pickle.loads(pickle.dumps(read_request_apart(body, keep, False)))  # as it crosses back
    apart.capped |= fields.pop("capped")
    for name, value in fields.items():
        setattr(apart, name, value)
    assert apart.prompt == here.prompt == "Why is the sky blue?"
    assert apart.system == here.system
    assert len(apart.messages or []) == min(len(here.messages or []), keep)
    assert "aGVsbG8=" not in repr(apart.messages)  # images came back as digests
    elided = apart.messages_elided + channel.trim(apart, keep, privacy.decisive_chars)
    assert elided == max(0, n + 2 - keep)
    payload, _ = channel.encode([(channel.INTERACTION, apart, elided)])
    ((_, data, left_out),) = channel.decode(payload)
    assert building.build(channel.interaction(data, left_out), privacy) == \
        building.build(here, privacy)


async def test_huge_bodies_are_parsed_in_a_process_of_their_own(
        fake: FakeOllama, start_proxy: StartProxy, http: aiohttp.ClientSession,
        tmp_path: Path, parse_threads: list[str]) -> None:
    """A body over PARSE_APART is parsed in another process (orjson holds the GIL for its whole
    parse: on a thread, a 30 MB chat held the loop 0.4 s); the metrics and the record get
    from it what a body parsed here gives them."""
    proxy = await start_proxy(fake.url, analytics=AnalyticsConfig.build(
        analytics_dir=str(tmp_path), analytics_max_messages=10))
    body = _chat_body(60_000)
    assert len(body) > PARSE_APART
    async with http.post(proxy.url + "/api/chat", data=io.BytesIO(body),
                         headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 200
        await resp.read()
    assert parse_threads == []  # not here: not on the loop, not on a thread
    assert len(_parse_processes()) == 1
    assert fake.requests[-1].body_sha256 == hashlib.sha256(body).hexdigest()  # sent whole
    await settle(lambda: proxy.sample("ollama_requests_total", model="llama3.2:latest",
                                      endpoint="/api/chat", status="success",
                                      prompt_category="question") == 1)
    (found,) = await records(proxy, http, 1)
    async with http.get(proxy.url + f"/analytics/messages/{found['id']}") as resp:
        whole = await resp.json()
    assert whole["model"] == "llama3.2:latest"
    assert whole["messages"][5] == {"elided": 60_002 - 10}
    assert whole["messages"][-1]["content"] == "Why is the sky blue?"
    assert whole["system"] == "be brief\na rule from the middle"


async def test_a_parse_process_that_dies_costs_no_request(
        fake: FakeOllama, start_proxy: StartProxy, http: aiohttp.ClientSession,
        tmp_path: Path) -> None:
    """Killed between two bodies, the parse process costs neither of them anything: the body
    that finds it dead is parsed on the thread, and the next starts another."""
    proxy = await start_proxy(fake.url, analytics=AnalyticsConfig.build(
        analytics_dir=str(tmp_path)))
    body = _chat_body(60_000)

    for round_ in range(3):
        async with http.post(proxy.url + "/api/chat", data=io.BytesIO(body),
                             headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 200
            await resp.read()
        if round_ == 0:
            (first,) = _parse_processes()
            first.kill()
            first.wait(5)
    (last,) = _parse_processes()
    assert last.pid != first.pid
    await settle(lambda: proxy.sample("ollama_requests_total", model="llama3.2:latest",
                                      endpoint="/api/chat", status="success",
                                      prompt_category="question") == 3)


@pytest.mark.slow(reason="two 10 MB chats, one of them abandoned mid-parse")
async def test_a_client_that_leaves_mid_parse_leaves_no_stale_answer(
        fake: FakeOllama, start_proxy: StartProxy, http: aiohttp.ClientSession,
        tmp_path: Path) -> None:
    """The client goes away while its body is in the parse process: the exchange is cancelled,
    and the process, whose answer nobody will read, is ended, so the next body gets its own
    answer, not the one left behind."""
    proxy = await start_proxy(fake.url, analytics=AnalyticsConfig.build(
        analytics_dir=str(tmp_path)))
    left = _chat_body(250_000).replace(b"Why is the sky blue?", b"Summarize the above")
    _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                 b"\r\nContent-Length: %d\r\n\r\n%b" % (len(left), left))
    await writer.drain()

    await settle(lambda: bool(_parse_processes()))
    (abandoned,) = _parse_processes()
    writer.close()  # mid-parse: a 10 MB chat takes the parse process about 0.1 s
    await settle(lambda: not abandoned.is_running() or abandoned.status() == "zombie")
    body = _chat_body(250_000)
    async with http.post(proxy.url + "/api/chat", data=io.BytesIO(body),
                         headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 200
        await resp.read()
    await settle(lambda: proxy.sample("ollama_requests_total", model="llama3.2:latest",
                                      endpoint="/api/chat", status="success",
                                      prompt_category="question") == 1)
    assert not proxy.sample("ollama_requests_total", model="llama3.2:latest",
                            endpoint="/api/chat", status="success",
                            prompt_category="summarize")


def test_a_body_parsed_apart_keeps_the_routes_stream_default() -> None:
    """/api/chat streams when the body does not say: the parse process is told the default."""
    body = orjson.dumps({"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]})
    assert read_request_apart(body, 100, True)["stream"] is True
    assert read_request_apart(body, 100, False)["stream"] is False
    said = orjson.dumps({"model": "llama3.2", "stream": False, "prompt": "hi"})
    assert read_request_apart(said, 100, True)["stream"] is False


@pytest.mark.slow(reason="parses of 3 MB bodies cancelled at six moments")
async def test_a_parse_cancelled_at_any_moment_frees_the_parse_process() -> None:
    """Cancelled while the body goes out, while it is parsed, or while its answer (well over a
    pipe's buffer: a 3 MB prompt comes back whole) is read: the next parse is answered and
    close() ends, each in bounded time."""
    from ollama_metrics.server.parsing import ParseProcess

    parser = ParseProcess()
    body = bytearray(orjson.dumps({"model": "m", "prompt": "word " * 600_000}))
    try:
        for delay in (0.0, 0.005, 0.02, 0.05, 0.1, 0.2):
            task = asyncio.ensure_future(parser.parse(body, 100, True))
            await asyncio.sleep(delay)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, 20)  # a TimeoutError fails the test
            fields = await asyncio.wait_for(parser.parse(body, 100, True), 20)
            assert fields is not None and fields["prompt"] == "word " * 600_000
    finally:
        await asyncio.wait_for(parser.close(), 20)
