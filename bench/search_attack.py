"""Search attack (issue 13): heavy full-text searches against a large store while proxied
chats run, as one running proxy with the SQLite store.

    python bench/search_attack.py [--records 200000] [--attackers 4] [--terms 200,32]

1. A store of --records interactions (bench/analytics_bench.py's RecordMaker) is built once per
   schema version and cached in the temp directory; each run works on a copy.
2. The proxy (`python -m ollama_metrics serve`, default options) runs in front of the test fake
   Ollama (tests/fake_ollama.py). A load generator, a process of its own, sends /api/chat
   (non-streamed) back to back on one connection for the whole run.
3. Quiet: --quiet seconds of chats alone. Then, per entry of --attacks (`stem*xN`: N prefix
   terms `stem* OR stem* OR …`), an attack: --attackers clients each search again and again,
   for at least --attack-seconds (and until each has had an answer), while a probe asks
   `/analytics/search?limit=5` every 0.5 s. `aa` is the stem of the bench vocabulary's most
   frequent word, so it matches every record, as `ka*` did in the data of issue 13; `aacq` is
   that word's 4-letter stem, longer than the SQLite prefix index covers.

Reported: proxied /api/chat p50/p99 quiet and under each attack, the attacks' statuses and
seconds, the probe's answers (ok / failed, slowest), and the proxy's peak RSS. Run it on main's
code with PYTHONPATH=/path/to/main/src for the "before" figures. It is a report, not a test:
exit 0 once printed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from analytics_bench import RecordMaker, fill
from processes import Children, free_port, wait_for_listening_line, wait_for_port

ROOT = Path(__file__).resolve().parent.parent


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else 0.0


async def seed(path: Path, records: int) -> None:
    from ollama_metrics.analytics.stores.sqlite import SqliteStore

    store = SqliteStore(path)
    await store.open()
    await fill(store, RecordMaker(), records)
    await store.close()


def cached_store(records: int) -> Path:
    from ollama_metrics.analytics.stores.sqlite_migrations import MIGRATIONS

    version = len(MIGRATIONS)
    path = Path(tempfile.gettempdir()) / f"om-search-attack-{records}-v{version}.db"
    if not path.exists():
        print(f"building a store of {records:,} records (once, cached at {path}) …",
              file=sys.stderr)
        partial = path.with_suffix(".partial")
        for leftover in partial.parent.glob(partial.name + "*"):
            leftover.unlink()
        asyncio.run(seed(partial, records))
        partial.rename(path)
    return path


async def loadgen(url: str) -> None:
    """Chats back to back until killed; one `wall_time latency_s status` line each."""
    body = b'{"model":"llama3.2","stream":false,"messages":[{"role":"user","content":"hi"}]}'
    async with aiohttp.ClientSession() as http:
        while True:
            t = time.time()
            start = time.perf_counter()
            async with http.post(url + "/api/chat", data=body) as resp:
                await resp.read()
            print(f"{t:.6f} {time.perf_counter() - start:.6f} {resp.status}", flush=True)
            await asyncio.sleep(0.002)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def attack(url: str, spec: str, attackers: int, seconds: float, pid: int
                 ) -> dict[str, Any]:
    stem, terms = spec.split("*x")
    text = " OR ".join([f"{stem}*"] * int(terms))
    outcomes: list[tuple[int, float, str]] = []
    probes: list[tuple[int, float]] = []
    peak = rss_mb(pid)
    done = asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=300)

    async def one(http: aiohttp.ClientSession) -> None:
        until = time.perf_counter() + seconds
        while True:
            start = time.perf_counter()
            try:
                async with http.get(url + "/analytics/search",
                                    params={"prompt_search": text, "limit": "100"}) as resp:
                    body = await resp.text()
                    outcomes.append((resp.status, time.perf_counter() - start, body[:100]))
            except Exception as exc:
                outcomes.append((0, time.perf_counter() - start, repr(exc)))
            if time.perf_counter() > until:
                return

    async def probe(http: aiohttp.ClientSession) -> None:
        while not done.is_set():
            start = time.perf_counter()
            try:
                async with http.get(url + "/analytics/search", params={"limit": "5"},
                                    timeout=aiohttp.ClientTimeout(total=30)) as resp:
                    await resp.read()
                    probes.append((resp.status, time.perf_counter() - start))
            except Exception:
                probes.append((0, time.perf_counter() - start))
            await asyncio.sleep(0.5)

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_mb(pid))
            await asyncio.sleep(0.1)

    async with aiohttp.ClientSession(timeout=timeout) as http:
        started = time.time()
        watchers = [asyncio.create_task(probe(http)), asyncio.create_task(sample())]
        await asyncio.gather(*(one(http) for _ in range(attackers)))
        done.set()
        await asyncio.gather(*watchers)
        ended = time.time()
    return {"spec": spec, "start": started, "end": ended, "outcomes": outcomes,
            "probes": probes, "peak_rss_mb": peak, "rss_after_mb": rss_mb(pid)}


def latencies(lines: list[str], start: float, end: float) -> list[float]:
    out = []
    for line in lines:
        t, latency, _status = line.split()
        if start <= float(t) < end:
            out.append(float(latency) * 1000)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--attackers", type=int, default=4)
    parser.add_argument("--attacks", default="aa*x200,aa*x32,aacq*x32",
                        help="comma-separated stem*xTERMS: one attack each")
    parser.add_argument("--attack-seconds", type=float, default=10.0)
    parser.add_argument("--quiet", type=float, default=8.0, help="seconds of chats alone")
    parser.add_argument("--loadgen", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loadgen:
        asyncio.run(loadgen(args.loadgen))
        return 0

    import ollama_metrics

    print(f"code: {Path(ollama_metrics.__file__).parent}", file=sys.stderr)
    source = cached_store(args.records)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "analytics").mkdir()
        shutil.copy(source, work / "analytics" / "interactions.db")
        children = Children(work)
        try:
            upstream = children.spawn("upstream", [
                sys.executable, str(ROOT / "tests" / "fake_ollama.py"), "--port", "0"])
            up_port = wait_for_listening_line(upstream, 20)
            port = free_port()
            env = {**os.environ, "ANALYTICS_DIR": str(work / "analytics")}
            proxy = children.spawn("proxy", [
                sys.executable, "-m", "ollama_metrics", "serve", "--listen",
                f"127.0.0.1:{port}", "--upstream", f"http://127.0.0.1:{up_port}"], env=env)
            opened = time.perf_counter()
            wait_for_port(proxy, port, 600)
            url = f"http://127.0.0.1:{port}"
            asyncio.run(_ready(url))
            print(f"proxy up, store open in {time.perf_counter() - opened:.1f} s",
                  file=sys.stderr)
            out = (work / "loadgen.out").open("wb")
            gen = subprocess.Popen([sys.executable, __file__, "--loadgen", url], stdout=out,
                                   stderr=subprocess.STDOUT)
            try:
                time.sleep(1.0)  # warm-up, not counted
                quiet_start = time.time()
                time.sleep(args.quiet)
                quiet_end = time.time()
                results = []
                for spec in args.attacks.split(","):
                    print(f"attack: {args.attackers} x {spec} …", file=sys.stderr)
                    results.append(asyncio.run(attack(url, spec, args.attackers,
                                                      args.attack_seconds, proxy.process.pid)))
                    time.sleep(1.0)
            finally:
                gen.terminate()
                gen.wait()
                out.close()
            lines = (work / "loadgen.out").read_text().splitlines()
            report(args, latencies(lines, quiet_start, quiet_end), results, lines)
        finally:
            children.stop_all()
    return 0


async def _ready(url: str) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(600):
            async with http.get(url + "/analytics/search", params={"limit": "1"}) as resp:
                if resp.status == 200:
                    return
            await asyncio.sleep(0.5)


def report(args: argparse.Namespace, quiet: list[float], results: list[dict[str, Any]],
           lines: list[str]) -> None:
    print(f"\nsearch attack: {args.records:,} records, {args.attackers} attackers\n")
    print(f"{'phase':<28}{'chats':>7}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}")
    print(f"{'quiet':<28}{len(quiet):>7}{pct(quiet, 50):>9.2f}{pct(quiet, 99):>9.2f}"
          f"{max(quiet, default=0):>9.2f}")
    for r in results:
        under = latencies(lines, r["start"], r["end"])
        print(f"{'attack ' + r['spec']:<28}{len(under):>7}"
              f"{pct(under, 50):>9.2f}{pct(under, 99):>9.2f}{max(under, default=0):>9.2f}")
    for r in results:
        print(f"\nattack {r['spec']}: {r['end'] - r['start']:.1f} s, "
              f"peak RSS {r['peak_rss_mb']:.0f} MB, after {r['rss_after_mb']:.0f} MB")
        for status in sorted({o[0] for o in r["outcomes"]}):
            times = [o[1] for o in r["outcomes"] if o[0] == status]
            body = next(o[2] for o in r["outcomes"] if o[0] == status)
            print(f"  search -> {status} x{len(times)}, median {statistics.median(times):.2f} s, "
                  f"max {max(times):.2f} s  {body[:90]}")
        ok = [s for st, s in r["probes"] if st == 200]
        failed = len(r["probes"]) - len(ok)
        print(f"  probe /analytics/search?limit=5: {len(ok)} ok, {failed} failed, slowest "
              f"{max((s for _, s in r['probes']), default=0) * 1000:.0f} ms"
              + (f", median ok {statistics.median(ok) * 1000:.0f} ms" if ok else ""))


if __name__ == "__main__":
    sys.exit(main())
