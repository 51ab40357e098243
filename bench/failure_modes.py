"""The timing figures of failure modes 17-19, each next to its baseline measured in the same run.

Contract: ``python bench/failure_modes.py [--rounds N] [--quick] [--only fm17,fm18,fm19]`` prints
one table row per figure: the median over rounds of the baseline and of the proxy, the added ms
and the ratio, then a PASS/MISS line per target of shared/reference/failure-modes.md. Rounds
alternate baseline and measured, so drift in the machine's load hits both alike. Exit status 0
once the report is printed (a missed target included: it is a report, not a test), 1 if a run
failed. tests/test_fm_load.py asserts the behaviour of the same scenarios (nothing lost, nothing
locked, queues bounded); the figures are here because two shared cores cannot time them reliably.

- FM17: event-loop lag p99 of a proxy in this process (on uvloop, as `serve` runs) while
  tests/loadgen.py puts `--chats` streamed chats through it and 4 dashboards search every 50 ms,
  recording to SQLite; baseline: the same chats through a proxy without analytics, no searches.
- FM18: request p99 at `--rate` requests a second for `--seconds`, open loop, through a proxy
  process whose Loki store takes 100 ms a row (queue 50: it drops); baseline: the same proxy with
  a Loki that answers at once.
- FM19: the p99 of how much longer the gap between two frames is at the client than at the fake
  (`--streams` streams of 64 frames 20 ms apart); baseline: the same streams straight to the fake.

The fake Ollama and the proxy processes come from tests/helpers.py (`fake_process`,
`proxy_process`), the clients of FM17 from tests/loadgen.py.
"""

from __future__ import annotations

import argparse
import asyncio
import calendar
import gc
import itertools
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil
from aiohttp import web

BENCH = Path(__file__).resolve().parent
TESTS = BENCH.parent / "tests"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from helpers import fake_process, proxy_process  # noqa: E402  (tests/, put on the path above)
from wire import upstream  # noqa: E402

FRAMES = 64  # per FM19 stream: 63 tokens and the final line
FRAME_GAP = 0.02
CHAT = b'{"model":"llama3.2","stream":false,"messages":[{"role":"user","content":"hi"}]}'
LOKI_ARGS = ("--analytics-backend", "loki", "--analytics-queue-size", "50",
             "--analytics-batch-size", "10", "--analytics-loki-url")


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]


def go_epoch(stamp: str) -> float:
    """Epoch seconds of Go's RFC 3339 (nanoseconds, Z) created_at, as the fake writes it."""
    whole, _, frac = stamp.rstrip("Z").partition(".")
    return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + float("0." + (frac or "0"))


# --- FM17: event-loop lag ---------------------------------------------------------------------

async def loop_lag(samples: list[float], stop: asyncio.Event, every: float = 0.001) -> None:
    """How late this event loop wakes a 1 ms timer, again and again until `stop`. Timed with
    perf_counter: uvloop's clock ticks in whole milliseconds."""
    while not stop.is_set():
        asked = time.perf_counter()
        await asyncio.sleep(every)
        samples.append(time.perf_counter() - asked - every)


async def load(url: str, chats: int, searchers: int, lags: list[float] | None = None
               ) -> dict[str, Any]:
    """tests/loadgen.py's result for `chats` chats started over half a second and `searchers`
    dashboards searching every 50 ms; with `lags`, this loop's lag samples meanwhile."""
    stop = asyncio.Event()
    # A proxy in this process shares it with whatever else lives here (pytest's heap, in the
    # tests), whose collection would pause it: set that aside.
    gc.collect()
    gc.freeze()
    try:
        monitor = asyncio.create_task(loop_lag(lags if lags is not None else [], stop))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(TESTS / "loadgen.py"), url, "--chats", str(chats), "--over",
            "0.5", "--searchers", str(searchers), "--pause", "0.05",
            stdout=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
        stop.set()
        await monitor
    finally:
        gc.unfreeze()
    result: dict[str, Any] = orjson.loads(out)
    return result


@asynccontextmanager
async def in_process_proxy(upstream_url: str, analytics_dir: str | None) -> AsyncIterator[str]:
    """The real app, with the runner settings `serve` uses, in this event loop; its URL."""
    from ollama_metrics.analytics.settings import AnalyticsConfig
    from ollama_metrics.config import Config
    from ollama_metrics.observe.metrics import new_registry
    from ollama_metrics.server.app import create_app
    from ollama_metrics.server.lifecycle import make_runner

    config = Config.build(listen="127.0.0.1:0", upstream=upstream_url)
    analytics = (AnalyticsConfig.build(analytics_dir=analytics_dir, analytics_batch_size=50)
                 if analytics_dir else AnalyticsConfig.build(analytics_backend="none"))
    runner = make_runner(create_app(config, new_registry(), analytics), config)
    await runner.setup()
    try:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(runner, sock).start()
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        await runner.cleanup()


async def fm17(rounds: int, chats: int) -> tuple[list[float], list[float]]:
    """Per round, lag p99 without analytics and with SQLite and searches."""
    scenarios = orjson.dumps({"llama3.2:latest": {"tokens": ["sky "] * 20, "token_delay": 0.05}})
    bare_p99: list[float] = []
    sqlite_p99: list[float] = []
    with fake_process("--scenarios", scenarios.decode()) as fake, \
            tempfile.TemporaryDirectory(prefix="fm17-") as store:
        async with in_process_proxy(fake.url, None) as bare, \
                in_process_proxy(fake.url, store) as recorded:
            for _ in range(rounds):
                for url, searchers, out in ((bare, 0, bare_p99), (recorded, 4, sqlite_p99)):
                    lags: list[float] = []
                    result = await load(url, chats, searchers, lags)
                    if result["chats"] != {"200": chats}:
                        raise RuntimeError(f"FM17: chats answered {result['chats']}")
                    out.append(percentile(lags, 99))
    return bare_p99, sqlite_p99


# --- FM18: backpressure -----------------------------------------------------------------------

def slow_loki(rows: list[int], per_row: float) -> web.Application:
    """A Loki push endpoint that takes `per_row` seconds for each record of a push."""

    async def push(request: web.Request) -> web.Response:
        n = sum(len(s["values"]) for s in orjson.loads(await request.read())["streams"])
        await asyncio.sleep(per_row * n)
        rows.append(n)
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/loki/api/v1/push", push)
    return app


async def open_loop(url: str, rate: float, seconds: float, body: bytes) -> list[float]:
    """Send `rate` requests a second for `seconds`, each on schedule whatever the others do;
    the latency of each, in seconds. Every answer must be a 200."""
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one() -> None:
            sent = time.perf_counter()
            async with session.post(url, data=body) as resp:
                await resp.read()
                if resp.status != 200:
                    raise AssertionError(f"{url}: {resp.status}")
            latencies.append(time.perf_counter() - sent)

        tasks = []
        gc.disable()  # this process's pauses are not the proxy's
        try:
            start = loop.time()
            for n in range(int(rate * seconds)):
                if (wait := start + n / rate - loop.time()) > 0:
                    await asyncio.sleep(wait)
                tasks.append(asyncio.create_task(one()))
            await asyncio.gather(*tasks)
        finally:
            gc.enable()
    return latencies


async def scrape(http: aiohttp.ClientSession, url: str, name: str, **labels: str) -> float:
    """One sample's value, picked out of the exposition by its line (parsing all of it would
    cost this process milliseconds while it sends load)."""
    async with http.get(url + "/metrics", headers={"Accept-Encoding": "identity"}) as resp:
        text = await resp.text()
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        if head.split("{", 1)[0] == name and all(label in head for label in wanted):
            return float(value)
    raise AssertionError(f"no {name} {labels} in the exposition")


async def fm18(rounds: int, rate: float, seconds: float) -> tuple[list[float], list[float]]:
    """Per round, request p99 with a Loki that answers at once and with one that drops."""
    fast_p99: list[float] = []
    slow_p99: list[float] = []
    async with upstream(slow_loki([], 0.1)) as loki, upstream(slow_loki([], 0.0)) as fast_loki:
        with fake_process() as fake, \
                proxy_process(fake.url, *LOKI_ARGS, fast_loki.url) as fast, \
                proxy_process(fake.url, *LOKI_ARGS, loki.url) as slow:
            for proxy in (fast, slow):  # connections and code paths warm
                await open_loop(proxy.url + "/api/chat", 100, 0.5, CHAT)
            turns = [(fast.url, fast_p99), (slow.url, slow_p99)]
            for _ in range(rounds):
                turns.reverse()  # each goes first as often
                for url, out in turns:
                    out.append(percentile(await open_loop(url + "/api/chat", rate, seconds,
                                                          CHAT), 99))
    return fast_p99, slow_p99


# --- FM19: frame gaps -------------------------------------------------------------------------

async def streams(url: str, n: int, model: str = "frames") -> list[list[tuple[float, bytes]]]:
    """`n` streamed generations at once; per stream, every line with its arrival (wall clock).
    Every stream must be a 200."""
    body = orjson.dumps({"model": model, "prompt": "count"})
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=timeout) as session:

        async def one() -> list[tuple[float, bytes]]:
            # Chunks as they arrive, split afterwards: reading line by line would cost this
            # process (on the same cores as the proxy and the fake) several times more.
            chunks = []
            async with session.post(url + "/api/generate", data=body) as resp:
                if resp.status != 200:
                    raise AssertionError(f"{url}: {resp.status}")
                async for chunk in resp.content.iter_any():
                    chunks.append((time.time(), chunk))
            lines, carry = [], b""
            for arrived, chunk in chunks:
                *whole, carry = (carry + chunk).split(b"\n")
                lines += [(arrived, line) for line in whole]
            if carry:
                raise AssertionError(f"a stream ended mid-line: {carry[:80]!r}")
            return lines

        # This process's own collector would pause every stream at random: noise.
        gc.disable()
        try:
            return await asyncio.gather(*(one() for _ in range(n)))
        finally:
            gc.enable()


def delays(streams: list[list[tuple[float, bytes]]]) -> tuple[list[float], list[float]]:
    """Per frame, arrival minus the instant the fake made it; per pair of frames, how much
    longer the gap between them was at the client than at the fake."""
    delay, stretch = [], []
    for lines in streams:
        made = [(arrived, go_epoch(orjson.loads(line)["created_at"])) for arrived, line in lines]
        delay += [arrived - at for arrived, at in made]
        stretch += [(a2 - a1) - (m2 - m1) for (a1, m1), (a2, m2) in itertools.pairwise(made)]
    return delay, stretch


def upstream_ports(pid: int, port: int) -> set[int]:
    """Local ports of the process's established connections to `port`."""
    return {c.laddr.port for c in psutil.Process(pid).net_connections("tcp")
            if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED}


def frames_scenario() -> str:
    tokens = [f"{k:02d}" for k in range(FRAMES - 1)]
    return orjson.dumps({"frames:latest": {"tokens": tokens, "token_delay": FRAME_GAP},
                         "quick:latest": {}}).decode()


async def fm19(rounds: int, n: int) -> tuple[list[float], list[float]]:
    """Per round, the inter-frame stretch p99 direct and through the proxy."""
    direct_p99, proxied_p99 = [], []
    with fake_process("--scenarios", frames_scenario()) as fake, \
            tempfile.TemporaryDirectory(prefix="fm19-") as store, \
            proxy_process(fake.url, "--analytics-dir", store) as proxy:
        for url in (fake.url, proxy.url):  # first connections, imports, caches: not measured
            await streams(url, n)
        for _ in range(rounds):
            direct_p99.append(percentile(delays(await streams(fake.url, n))[1], 99))
            proxied_p99.append(percentile(delays(await streams(proxy.url, n))[1], 99))
    return direct_p99, proxied_p99


# --- the report -------------------------------------------------------------------------------

@dataclass
class Row:
    name: str
    baseline: str
    limit_ms: float  # the target for the added ms
    base: list[float] = field(default_factory=list)
    measured: list[float] = field(default_factory=list)

    def added_ms(self) -> float:
        return (statistics.median(self.measured) - statistics.median(self.base)) * 1e3

    def ratio(self) -> float:
        return statistics.median(self.measured) / max(statistics.median(self.base), 1e-9)


def render(rows: list[Row]) -> str:
    out = [f"{'figure':<44} {'baseline':<22} {'base ms':>8} {'ms':>8} {'added':>8} {'ratio':>6}"]
    for r in rows:
        out.append(f"{r.name:<44} {r.baseline:<22} {statistics.median(r.base) * 1e3:8.2f} "
                   f"{statistics.median(r.measured) * 1e3:8.2f} {r.added_ms():+8.2f} "
                   f"{r.ratio():5.2f}x")
    out.append("")
    for r in rows:
        verdict = "PASS" if r.added_ms() < r.limit_ms else "MISS"
        out.append(f"{verdict}  {r.name}: added {r.added_ms():+.2f} ms (target < {r.limit_ms:g}"
                   f" ms; rounds: base {', '.join(f'{x * 1e3:.2f}' for x in r.base)}; "
                   f"measured {', '.join(f'{x * 1e3:.2f}' for x in r.measured)})")
    return "\n".join(out)


async def run(args: argparse.Namespace) -> list[Row]:
    only = set(args.only.split(","))
    rows = []
    figures: list[tuple[str, str, str, float, Callable[[], Awaitable[tuple[list[float],
                                                                          list[float]]]]]] = [
        ("fm17", f"FM17 loop lag p99, {args.chats} chats + 4 searches", "no analytics", 2.0,
         lambda: fm17(args.rounds, args.chats)),
        ("fm18", f"FM18 request p99 @{args.rate:g}/s, writer 100 ms/row", "writer at once", 2.0,
         lambda: fm18(args.rounds, args.rate, args.seconds)),
        ("fm19", f"FM19 frame gap stretch p99 @{args.streams} streams", "direct", 5.0,
         lambda: fm19(args.rounds, args.streams)),
    ]
    for key, name, baseline, limit, measure in figures:
        if key in only:
            print(f"measuring {name} ...", file=sys.stderr, flush=True)
            base, measured = await measure()
            rows.append(Row(name, baseline, limit, base, measured))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per figure")
    parser.add_argument("--chats", type=int, default=200, help="FM17: concurrent chats")
    parser.add_argument("--rate", type=float, default=500, help="FM18: requests a second")
    parser.add_argument("--seconds", type=float, default=1.0, help="FM18: seconds per round")
    parser.add_argument("--streams", type=int, default=100, help="FM19: concurrent streams")
    parser.add_argument("--only", default="fm17,fm18,fm19", help="a subset, comma-separated")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 1 round, 20 chats, 50/s for 0.4 s, 10 streams")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.chats, args.rate, args.seconds, args.streams = 1, 20, 50, 0.4, 10
    import uvloop

    try:
        rows = uvloop.run(run(args))
    except (AssertionError, RuntimeError, OSError) as exc:
        print(f"failed: {exc}", file=sys.stderr)
        return 1
    print(render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
