"""How much one oversized request adds to the SQLite store: the record-side caps of issue 13.

    python bench/record_caps.py [--messages 1000000]

Runs the real app in-process in front of the test suite's fake Ollama, sends each hostile
request once (a chat of many messages, tool-call arguments, `options`, a long prompt), waits
for its record and prints the database growth and the stored record's size. Compare against
another checkout with `PYTHONPATH=/path/to/other/src`.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fake_ollama import FakeOllama
from ollama_metrics.analytics.settings import AnalyticsConfig
from ollama_metrics.config import Config
from ollama_metrics.observe.metrics import new_registry
from ollama_metrics.server.app import create_app
from ollama_metrics.server.lifecycle import make_runner

MB = 2**20


def cases(messages: int) -> dict[str, dict[str, object]]:
    # Short messages: the whole body must stay under --max-parse-bytes (32 MiB) to be parsed.
    many = [{"role": "user", "content": "hi"}] * messages
    big, half = "x" * (20 * MB), "x" * (10 * MB)
    return {
        f"chat of {messages:,} messages": {"model": "llama3.2", "stream": False,
                                           "messages": many},
        "20 MB tool-call arguments": {"model": "llama3.2", "stream": False, "messages": [
            {"role": "assistant", "content": "",
             "tool_calls": [{"function": {"name": "f", "arguments": {"a": big}}}]},
            {"role": "user", "content": "go on"}]},
        "20 MB options": {"model": "llama3.2", "stream": False, "prompt": "hi",
                          "options": {"stop": [half], "junk": half}},
        "100 messages of 60 KB": {"model": "llama3.2", "stream": False,
                                  "messages": [{"role": "user", "content": "y" * 60_000}] * 100},
        "20 MB prompt": {"model": "llama3.2", "stream": False, "prompt": big},
    }


def db_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("interactions.db*"))


async def one(fake: FakeOllama, body: dict[str, object] | None) -> tuple[int, int]:
    """Database bytes after the proxy (in a fresh directory) stored `body`'s record and closed,
    and the record's size as the search API returns it."""
    with tempfile.TemporaryDirectory() as tmp:
        config = Config.build(listen="127.0.0.1:0", upstream=fake.url)
        app = create_app(config, new_registry(), AnalyticsConfig.build(analytics_dir=tmp))
        runner = make_runner(app, config)
        await runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(runner, sock).start()
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        found: list[dict[str, object]] = []
        async with aiohttp.ClientSession() as http:
            if body is not None:
                endpoint = "/api/chat" if "messages" in body else "/api/generate"
                async with http.post(url + endpoint, data=orjson.dumps(body)) as resp:
                    await resp.read()
                deadline = time.monotonic() + 120
                while not found and time.monotonic() < deadline:
                    await asyncio.sleep(0.2)
                    async with http.get(url + "/analytics/search") as resp:
                        found = (await resp.json())["results"]
        await runner.cleanup()  # closes the store: the WAL is checkpointed into the file
        size = db_bytes(Path(tmp))
        return size, len(orjson.dumps(found[0])) if found else 0


async def run(messages: int) -> None:
    fake = FakeOllama()
    await fake.start()
    empty, _ = await one(fake, None)
    print(f"{'request':<32} {'body MB':>8} {'DB growth KB':>13} {'record KB':>10}")
    for name, body in cases(messages).items():
        size, record = await one(fake, body)
        print(f"{name:<32} {len(orjson.dumps(body)) / MB:>8.1f} {(size - empty) / 1024:>13.0f} "
              f"{record / 1024:>10.1f}")
    await fake.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    asyncio.run(run(parser.parse_args().messages))
    return 0


if __name__ == "__main__":
    sys.exit(main())
