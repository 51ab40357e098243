"""Clients for a load test, in a process of their own, so that the proxy under test shares
neither its event loop nor the GIL with them.

`python tests/loadgen.py URL --chats N --over S --searchers K --pause P` starts N `/api/chat`
requests, each with a prompt of its own, evenly over S seconds (all at once with 0), while K
clients query `/analytics/search`, each waiting P seconds between its searches (as a dashboard
refreshes), until every chat is answered. It prints one JSON object: the
statuses of the chats and of the searches, counted, the most chats in flight at once, and the
seconds it took.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter

import aiohttp
import orjson


async def run(url: str, chats: int, over: float, searchers: int, pause: float
              ) -> dict[str, object]:
    chat_status: Counter[str] = Counter()
    search_status: Counter[str] = Counter()
    done = asyncio.Event()
    started = time.perf_counter()
    in_flight = most = 0

    async def chat(session: aiohttp.ClientSession, n: int) -> None:
        nonlocal in_flight, most
        await asyncio.sleep(over * n / chats)
        body = {"model": "llama3.2", "messages": [
            {"role": "user", "content": f"Why is the sky blue, question {n}?"}]}
        in_flight += 1
        most = max(most, in_flight)
        async with session.post(url + "/api/chat", data=orjson.dumps(body)) as resp:
            await resp.read()
            chat_status[str(resp.status)] += 1
        in_flight -= 1

    async def search(session: aiohttp.ClientSession) -> None:
        while not done.is_set():
            async with session.get(url + "/analytics/search",
                                   params={"prompt_search": "sky", "limit": "50"}) as resp:
                await resp.read()
                search_status[str(resp.status)] += 1
            await asyncio.sleep(pause)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        readers = [asyncio.create_task(search(session)) for _ in range(searchers)]
        await asyncio.gather(*(chat(session, n) for n in range(chats)))
        done.set()
        await asyncio.gather(*readers)
    return {"chats": dict(chat_status), "searches": dict(search_status), "most_in_flight": most,
            "seconds": time.perf_counter() - started}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--chats", type=int, default=200)
    parser.add_argument("--over", type=float, default=0.0)
    parser.add_argument("--searchers", type=int, default=4)
    parser.add_argument("--pause", type=float, default=0.0)
    args = parser.parse_args()
    result = asyncio.run(run(args.url.rstrip("/"), args.chats, args.over, args.searchers,
                             args.pause))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
