"""Soak: mixed traffic through the proxy for a chosen time, with the proxy's RSS sampled throughout.

Contract: ``python bench/soak.py --minutes 10`` starts the fake Ollama (``tests/fake_ollama.py``)
and ``python -m ollama_metrics serve`` (SQLite analytics in a temporary directory) as process
groups, drives a steady mix of traffic through the proxy for the chosen time -- streamed and
whole generates and chats, ``/v1`` SSE, embeddings, Ollama errors, streams Ollama cuts short,
clients that leave mid-stream, unknown models, searches on ``/analytics/search``, scrapes of
``/metrics`` -- samples the proxy's RSS every ``--sample`` seconds, then stops the traffic and
waits ``--settle`` seconds. It prints a table (minute, RSS MiB, SQLite's heap MiB, requests
done), the least-squares slope of RSS after the warm-up (MiB/min), RSS after settling against the
post-warm-up baseline, and PASS/FAIL: slope < 1 MiB/min, and settled RSS within 5 MiB (or 10 %)
of the baseline.

SQLite's page caches are part of RSS and fill up to their configured sizes (about 6 MiB in all)
in the first minutes, then stay; after 10 s without analytics traffic the store lets them go.
The proxy runs under ``heap_probe.py``, which reports SQLite's heap, so each figure is given both
raw and less that heap, which tells a cache filling from a leak in the proxy's own objects; the
verdict (exit status) needs both to pass, and every request answered as expected. Exit status
0 on PASS, 1 on FAIL or when something failed to run, 130 on Ctrl-C. Every
child is killed on the way out.

``run_soak`` is the same soak as a function, for the suite's short version.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
import psutil

from processes import Children, StartupError, free_port, wait_for_listening_line, wait_for_port

BENCH_DIR = Path(__file__).resolve().parent
FAKE = BENCH_DIR.parent / "tests" / "fake_ollama.py"
MIB = 2**20
SLOPE_LIMIT = 1.0  # MiB per minute
SETTLE_SLACK = 5.0  # MiB, or 10 % of the baseline if that is more
# A word no prompt of the mix leaves out, so a test can look for prompt text in the proxy's log.
MARKER = "soakmarker"

SCENARIOS = {
    "llama3.2:latest": {"tokens": [f" word{n}" for n in range(12)], "token_delay": 0.004},
    "slow:latest": {"tokens": [" slow"] * 40, "token_delay": 0.02},
    "broken:latest": {"error_before": [500, "model runner has unexpectedly stopped"]},
    "dies:latest": {"tokens": [" x"] * 10, "token_delay": 0.004, "drop_after": 3},
    "all-minilm:latest": {},
}
_TEXT = ("why is the sky blue summarize this text translate into french explain how tides work "
         "write a python function that sorts a list fix this bug in my code list five fruits "
         "compose a short poem about the sea analyze the data help me plan a trip what time is "
         "it describe quantum computing in simple words")
VOCABULARY = tuple(_TEXT.split())

Kind = Callable[[aiohttp.ClientSession, str, random.Random], Awaitable[str]]


def prompt(rng: random.Random) -> str:
    words = rng.choices(VOCABULARY, k=rng.randint(6, 30))
    return " ".join([*words, MARKER, str(rng.randrange(10**6))])


async def _post(session: aiohttp.ClientSession, url: str, body: dict[str, object]) -> str:
    async with session.post(url, data=orjson.dumps(body)) as resp:
        await resp.read()
        return str(resp.status)


async def generate_stream(s: aiohttp.ClientSession, base: str, rng: random.Random) -> str:
    return await _post(s, base + "/api/generate", {"model": "llama3.2", "prompt": prompt(rng)})


async def generate_whole(s: aiohttp.ClientSession, base: str, rng: random.Random) -> str:
    return await _post(s, base + "/api/generate",
                       {"model": "llama3.2", "prompt": prompt(rng), "stream": False})


def _chat(rng: random.Random, **extra: object) -> dict[str, object]:
    return {"model": "llama3.2", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": prompt(rng)}], **extra}


async def chat_stream(s: aiohttp.ClientSession, base: str, rng: random.Random) -> str:
    return await _post(s, base + "/api/chat", _chat(rng))


async def openai_sse(s: aiohttp.ClientSession, base: str, rng: random.Random) -> str:
    return await _post(s, base + "/v1/chat/completions", _chat(
        rng, stream=True, stream_options={"include_usage": True}))


async def openai_whole(s: aiohttp.ClientSession, base: str, rng: random.Random) -> str:
    return await _post(s, base + "/v1/chat/completions", _chat(rng))


async def embed(s: aiohttp.ClientSession, base: str, rng: random.Random) -> str:
    return await _post(s, base + "/api/embed", {"model": "all-minilm", "input": prompt(rng)})


async def ollama_error(s: aiohttp.ClientSession, base: str, rng: random.Random) -> str:
    return await _post(s, base + "/api/generate", {"model": "broken", "prompt": prompt(rng)})


async def unknown_model(s: aiohttp.ClientSession, base: str, rng: random.Random) -> str:
    return await _post(s, base + "/api/chat", {**_chat(rng), "model": f"nope{rng.randrange(9)}"})


async def upstream_dies(s: aiohttp.ClientSession, base: str, rng: random.Random) -> str:
    try:
        return await _post(s, base + "/api/generate", {"model": "dies", "prompt": prompt(rng)})
    except aiohttp.ClientPayloadError:
        return "cut"  # as expected: the reply ends without its final chunk


async def client_leaves(s: aiohttp.ClientSession, base: str, rng: random.Random) -> str:
    resp = await s.post(base + "/api/generate",
                        data=orjson.dumps({"model": "slow", "prompt": prompt(rng)}))
    await resp.content.readline()
    await resp.content.readline()
    resp.close()  # drops the connection mid-stream
    return "left"


async def search(s: aiohttp.ClientSession, base: str, rng: random.Random) -> str:
    params = {"prompt_search": rng.choice(VOCABULARY), "limit": "20"}
    async with s.get(base + "/analytics/search", params=params) as resp:
        await resp.read()
        return str(resp.status)


async def scrape(s: aiohttp.ClientSession, base: str, rng: random.Random) -> str:
    async with s.get(base + "/metrics") as resp:
        await resp.read()
        return str(resp.status)


MIX: list[tuple[Kind, int]] = [
    (generate_stream, 25), (generate_whole, 10), (chat_stream, 15), (openai_sse, 10),
    (openai_whole, 5), (embed, 5), (ollama_error, 5), (unknown_model, 3), (upstream_dies, 5),
    (client_leaves, 5), (search, 9), (scrape, 3),
]
# What each kind answers when all is well; anything else is counted as a failure.
EXPECTED = {"ollama_error": "500", "unknown_model": "404", "upstream_dies": "cut",
            "client_leaves": "left"}


@dataclass
class Sample:
    t: float  # seconds since traffic started
    rss: int
    sqlite: int  # SQLite's heap, part of rss
    done: int

    @property
    def own(self) -> int:
        """RSS less SQLite's heap: what the proxy itself holds."""
        return self.rss - self.sqlite


@dataclass
class SoakResult:
    samples: list[Sample]
    warmup_s: float
    traffic_s: float
    settled: Sample | None = None
    outcomes: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    first_failure: str = ""
    proxy_log: str = ""

    @property
    def measured(self) -> list[Sample]:
        return [s for s in self.samples if self.warmup_s <= s.t <= self.traffic_s]

    def baseline_mib(self, own: bool = True) -> float:
        """Memory at the end of the warm-up: the smallest of the first samples after it."""
        head = self.measured[:3]
        return min(s.own if own else s.rss for s in head) / MIB if head else float("nan")

    def slope_mib_per_min(self, own: bool = True) -> float:
        return slope([(s.t / 60, (s.own if own else s.rss) / MIB) for s in self.measured])

    def settled_mib(self, own: bool = True) -> float:
        if self.settled is None:
            return float("nan")
        return (self.settled.own if own else self.settled.rss) / MIB

    @property
    def requests(self) -> int:
        return sum(self.outcomes.values())

    def slope_ok(self, own: bool = True) -> bool:
        return self.slope_mib_per_min(own) < SLOPE_LIMIT

    def settled_ok(self, own: bool = True) -> bool:
        baseline = self.baseline_mib(own)
        return self.settled_mib(own) <= baseline + max(SETTLE_SLACK, 0.1 * baseline)

    @property
    def passed(self) -> bool:
        return (self.slope_ok(own=False) and self.settled_ok(own=False) and self.slope_ok()
                and self.settled_ok() and not self.failures)


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x (nan with fewer than two points)."""
    n = len(points)
    if n < 2:
        return float("nan")
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else float("nan")


async def _drive(base: str, until: float, rate: float, seed: int, result: SoakResult) -> None:
    """Start requests at `rate` per second until `until` (loop time), at most 64 at a time."""
    rng = random.Random(seed)
    kinds, weights = zip(*MIX, strict=True)
    gate = asyncio.Semaphore(64)
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def one(kind: Kind) -> None:
            name = kind.__name__
            try:
                outcome = await kind(session, base, rng)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                outcome = f"{type(exc).__name__}: {exc}"
            finally:
                gate.release()
            result.outcomes[name] += 1
            if outcome != EXPECTED.get(name, "200"):
                result.failures[name] += 1
                result.first_failure = result.first_failure or f"{name}: {outcome}"

        next_at = loop.time()
        while (now := loop.time()) < until:
            if now < next_at:
                await asyncio.sleep(next_at - now)
            next_at += 1 / rate
            await gate.acquire()
            task = asyncio.create_task(one(rng.choices(kinds, weights)[0]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks)


class Probe:
    """The proxy's RSS and SQLite's heap in it, as heap_probe.py reports it."""

    def __init__(self, pid: int, heap_file: Path) -> None:
        self.process = psutil.Process(pid)
        self.heap_file = heap_file

    def sample(self, t: float, done: int) -> Sample:
        try:
            heap = int(self.heap_file.read_text())
        except (OSError, ValueError):  # not written yet
            heap = 0
        return Sample(t, self.process.memory_info().rss, heap, done)


async def _sample(probe: Probe, started: float, every: float, until: float,
                  result: SoakResult, report: Callable[[Sample], None] | None) -> None:
    loop = asyncio.get_running_loop()
    while (now := loop.time()) <= until:
        sample = probe.sample(now - started, result.requests)
        result.samples.append(sample)
        if report is not None:
            report(sample)
        await asyncio.sleep(every)


async def run_soak(*, duration_s: float, warmup_s: float, settle_s: float, rate: float = 20.0,
                   sample_s: float = 2.0, seed: int = 1, proxy_args: tuple[str, ...] = (),
                   report: Callable[[Sample], None] | None = None) -> SoakResult:
    """Start the fake Ollama and the proxy, drive traffic for `duration_s`, let it settle."""
    with tempfile.TemporaryDirectory(prefix="ollama-metrics-soak-") as scratch:
        work = Path(scratch)
        children = Children(work)
        try:
            fake = children.spawn("fake-ollama", [
                sys.executable, str(FAKE), "--port", "0",
                "--scenarios", orjson.dumps(SCENARIOS).decode()])
            upstream = f"http://127.0.0.1:{wait_for_listening_line(fake, 15)}"
            port = free_port()
            heap_file = work / "sqlite-heap"
            proxy = children.spawn("proxy", [
                sys.executable, str(BENCH_DIR / "heap_probe.py"), str(heap_file), "serve",
                "--listen", f"127.0.0.1:{port}", "--upstream", upstream,
                "--analytics-dir", str(work / "analytics"), *proxy_args], cwd=work)
            wait_for_port(proxy, port, 30)
            probe = Probe(proxy.process.pid, heap_file)
            loop = asyncio.get_running_loop()
            started = loop.time()
            result = SoakResult([], warmup_s, duration_s)
            sampler = asyncio.create_task(_sample(
                probe, started, sample_s, started + duration_s, result, report))
            await _drive(f"http://127.0.0.1:{port}", started + duration_s, rate, seed, result)
            await sampler
            await asyncio.sleep(settle_s)
            result.settled = probe.sample(loop.time() - started, result.requests)
            if proxy.exited() is not None:
                raise StartupError(f"the proxy exited during the soak:\n{proxy.log_tail()}")
        finally:
            children.stop_all()
        result.proxy_log = (work / "proxy.log").read_text(errors="replace")
        return result


def render(result: SoakResult) -> str:
    def row(label: str, s: Sample) -> str:
        return (f"{label:>7}  {s.rss / MIB:>8.1f}  {s.sqlite / MIB:>11.1f}  {s.own / MIB:>15.1f}"
                f"  {s.done:>8}")

    lines = [f"{'minute':>7}  {'RSS MiB':>8}  {'SQLite MiB':>11}  {'RSS-SQLite MiB':>15}"
             f"  {'requests':>8}"]
    shown = -1
    for s in result.samples:
        if int(s.t // 60) != shown:
            shown = int(s.t // 60)
            lines.append(row(str(shown), s))
    lines.append(row("end", result.samples[-1]))
    if result.settled is not None:
        lines.append(row("settled", result.settled))
    mix = ", ".join(f"{name} {n}" for name, n in result.outcomes.most_common())
    lines += [
        "",
        f"requests: {result.requests} in {result.traffic_s / 60:.1f} min ({mix})",
        f"failures: {sum(result.failures.values())}"
        + (f" (first: {result.first_failure})" if result.failures else ""),
        f"after warm-up ({result.warmup_s / 60:.1f} min), least squares over "
        f"{len(result.measured)} samples:",
    ]
    for own, what in ((False, "RSS"), (True, "RSS less SQLite's heap")):
        baseline, settled = result.baseline_mib(own), result.settled_mib(own)
        lines += [
            f"  {what}: baseline {baseline:.1f} MiB, slope "
            f"{result.slope_mib_per_min(own):+.3f} MiB/min, settled {settled:.1f} MiB "
            f"({settled - baseline:+.1f} MiB)",
        ]
    verdict = [
        (result.slope_ok(own=False), f"RSS slope < {SLOPE_LIMIT:g} MiB/min"),
        (result.settled_ok(own=False), f"settled RSS within max({SETTLE_SLACK:g} MiB, 10 %) of "
                                       "its baseline"),
        (result.slope_ok(), f"the same, less SQLite's heap: slope < {SLOPE_LIMIT:g} MiB/min"),
        (result.settled_ok(), "the same, less SQLite's heap: settled near its baseline"),
        (not result.failures, "every request answered as expected"),
    ]
    lines += [f"{'PASS' if ok else 'FAIL'}: {text}" for ok, text in verdict]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Soak the proxy with mixed traffic; watch RSS.")
    add = parser.add_argument
    add("--minutes", type=float, default=10.0, help="traffic duration (default: 10)")
    add("--warmup", type=float, default=1.0, help="minutes left out of the slope (default: 1)")
    add("--settle", type=float, default=30.0, help="seconds to wait after traffic (default: 30)")
    add("--rate", type=float, default=20.0, help="requests started per second (default: 20)")
    add("--sample", type=float, default=2.0, help="seconds between RSS samples (default: 2)")
    add("--proxy-args", default="", metavar="ARGS", help="extra options for the proxy")
    args = parser.parse_args(argv)
    if args.minutes <= args.warmup or args.rate <= 0 or args.sample <= 0:
        parser.error("--minutes must exceed --warmup; --rate and --sample must be positive")
    print(f"soak: {args.minutes:g} min of mixed traffic at {args.rate:g} req/s, RSS sampled "
          f"every {args.sample:g} s, warm-up {args.warmup:g} min, settle {args.settle:g} s",
          file=sys.stderr, flush=True)

    def progress(s: Sample) -> None:
        print(f"  {s.t:7.0f} s  RSS {s.rss / MIB:7.1f} MiB  SQLite {s.sqlite / MIB:5.1f} MiB  "
              f"{s.done:7} requests", file=sys.stderr, flush=True)

    soak = run_soak(duration_s=args.minutes * 60, warmup_s=args.warmup * 60,
                    settle_s=args.settle, rate=args.rate, sample_s=args.sample,
                    proxy_args=tuple(args.proxy_args.split()), report=progress)
    try:
        with contextlib.suppress(NotImplementedError):
            signal.signal(signal.SIGTERM, signal.default_int_handler)
        result = asyncio.run(soak)
    except KeyboardInterrupt:
        return 130
    except StartupError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 1
    print(render(result))
    return 0 if result.passed else 1


if __name__ == "__main__":
    started = time.monotonic()
    code = main()
    print(f"(took {time.monotonic() - started:.0f} s)", file=sys.stderr)
    sys.exit(code)
