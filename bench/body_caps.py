"""Large request bodies and huge model names against the proxy: loop stalls, memory, disk.

    python bench/body_caps.py                              # this tree's code only
    python bench/body_caps.py --baseline-src ../main/src   # and another tree's, side by side
    python bench/body_caps.py --analytics-backend none     # the request path alone

Each code tree runs `python -m ollama_metrics serve` (analytics on, SQLite, defaults otherwise)
in front of tests/fake_ollama.py. A thread pings the proxy every 5 ms on one keep-alive
connection with GET /analytics/loaded, which the proxy answers itself: the fake upstream
is busy parsing the same large bodies, so a ping through it would time the fake, not the proxy.
A stall is the longest ping while the load runs. Loads, in this order:

- `40 x 20 MB model`: forty /api/generate one after another naming a 20 MB model, which Ollama's
  404 echoes; then GET /analytics/live?recent=500.
- `chat N x 30 MB`: N concurrent /api/chat bodies of ~750k short messages each (the shape that
  is slow to parse: many small objects), sent at once.

Rows: max ping ms (the stall; the quiet row is the floor), the proxy's peak RSS rise, its RSS
rise once idle after the attack, the database's growth and the live snapshot's size. A report,
not a test: it exits 0 once printed.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import io
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import aiohttp
import psutil

from processes import Children, free_port, wait_for_listening_line, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
PING = b'{"model":"llama3.2","prompt":"hi","stream":false}'
MIB = 1 << 20


class Pinger:
    """Small requests every 5 ms from a thread of its own; `window()` gives the longest one."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._samples: list[tuple[float, float]] = []  # (sent at, latency)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self._port, timeout=60)
        while not self._stop.is_set():
            t = time.perf_counter()
            conn.request("GET", "/analytics/loaded")
            conn.getresponse().read()
            self._samples.append((t, time.perf_counter() - t))
            time.sleep(0.005)
        conn.close()

    def window(self, start: float, end: float) -> float:
        """The longest ping (ms) that overlapped [start, end]."""
        return max((lat for t, lat in self._samples if t <= end and t + lat >= start),
                   default=0.0) * 1e3

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class Rss:
    """The proxy's RSS, polled every 10 ms; `peak()` since the last `reset()`."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self._peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def now(self) -> int:
        return int(self._process.memory_info().rss)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self.now())
            time.sleep(0.01)

    def reset(self) -> None:
        self._peak = self.now()

    def peak(self) -> int:
        return self._peak

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def chat_body() -> bytes:
    message = b'{"role":"user","content":"hello there"},'
    count = 30_000_000 // len(message)
    return (b'{"model":"llama3.2","stream":false,"messages":[' + message * (count - 1)
            + message[:-1] + b"]}")


def model_body() -> bytes:
    return b'{"model":"' + b"m" * (20 * MIB) + b'","prompt":"hi","stream":false}'


async def post(http: aiohttp.ClientSession, url: str, body: bytes) -> int:
    async with http.post(url, data=io.BytesIO(body),
                         headers={"Content-Type": "application/json"}) as resp:
        await resp.read()
        return resp.status


def db_size(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("interactions.db*"))


async def measure(src: str, quick: bool, backend: str) -> dict[str, str]:
    rows: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="body-caps-") as scratch:
        children = Children(Path(scratch))
        try:
            fake = children.spawn("fake", [sys.executable, str(ROOT / "tests/fake_ollama.py"),
                                           "--port", "0"])
            fake_port = wait_for_listening_line(fake, 20)
            port = free_port()
            data = Path(scratch) / "analytics"
            proxy = children.spawn("proxy", [
                sys.executable, "-m", "ollama_metrics", "serve", "--listen", f"127.0.0.1:{port}",
                "--upstream", f"http://127.0.0.1:{fake_port}", "--analytics-dir", str(data),
                "--analytics-backend", backend],
                env={**os.environ, "PYTHONPATH": src})
            wait_for_port(proxy, port, 20)
            url = f"http://127.0.0.1:{port}"
            timeout = aiohttp.ClientTimeout(total=600)
            async with aiohttp.ClientSession(timeout=timeout) as http:
                await post(http, url + "/api/generate", PING)
                pinger, rss = Pinger(port), Rss(proxy.process.pid)
                try:
                    await asyncio.sleep(1.0)
                    rows["quiet: max ping ms"] = f"{pinger.window(0, time.perf_counter()):.1f}"
                    await asyncio.sleep(2.0)
                    base, db_base = rss.now(), db_size(data)
                    body = model_body()
                    start = time.perf_counter()
                    for _ in range(5 if quick else 40):
                        await post(http, url + "/api/generate", body)
                    end = time.perf_counter()
                    del body
                    label = f"{5 if quick else 40} x 20 MB model"
                    rows[f"{label}: max ping ms"] = f"{pinger.window(start, end):.1f}"
                    await asyncio.sleep(3.0)  # the writer batches in the background
                    rows[f"{label}: idle RSS rise MiB"] = f"{(rss.now() - base) / MIB:.0f}"
                    rows[f"{label}: database growth MiB"] = \
                        f"{(db_size(data) - db_base) / MIB:.1f}"
                    start = time.perf_counter()
                    async with http.get(url + "/analytics/live",
                                        params={"recent": "500"}) as resp:
                        size = len(await resp.read())
                    end = time.perf_counter()
                    rows["live?recent=500: bytes"] = str(size)
                    rows["live?recent=500: max ping ms"] = f"{pinger.window(start, end):.1f}"
                    body = chat_body()
                    for n in (1, 8):
                        await asyncio.sleep(1.0)
                        rss.reset()
                        base = rss.now()
                        start = time.perf_counter()
                        await asyncio.gather(*(post(http, url + "/api/chat", body)
                                               for _ in range(n)))
                        end = time.perf_counter()
                        rows[f"chat {n} x 30 MB: max ping ms"] = \
                            f"{pinger.window(start, end):.1f}"
                        rows[f"chat {n} x 30 MB: peak RSS rise MiB"] = \
                            f"{(rss.peak() - base) / MIB:.0f}"
                    del body
                finally:
                    pinger.stop()
                    rss.stop()
        finally:
            children.stop_all()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--baseline-src", help="another tree's src/ to measure first")
    parser.add_argument("--quick", action="store_true", help="5 huge model names, not 40")
    parser.add_argument("--analytics-backend", default="sqlite",
                        help="the proxy's --analytics-backend (none: no records built)")
    args = parser.parse_args()
    trees = {"this tree": str(ROOT / "src")}
    if args.baseline_src:
        trees = {"baseline": str(Path(args.baseline_src).resolve()), **trees}
    results = {}
    for name, src in trees.items():
        print(f"measuring {name} ({src})", file=sys.stderr)
        results[name] = asyncio.run(measure(src, args.quick, args.analytics_backend))
    names = list(results)
    width = max(len(r) for r in results[names[-1]])
    print(f"{'metric':<{width}}  " + "  ".join(f"{n:>12}" for n in names))
    for row in results[names[-1]]:
        print(f"{row:<{width}}  " + "  ".join(f"{results[n].get(row, '-'):>12}"
                                              for n in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
