"""The data plane's CPU for a request that arrives a byte a read (a slow or hostile client).

    python bench/dribble.py

A data plane connection (server/fast.py's Client, on the real app, over a stand-in transport)
is fed a request one byte per read, as the kernel hands over a client that sends a byte at a
time slowly enough: a head of N bytes, then a head and body of N/2 each. Each row is the CPU
for the whole request and per byte read. The per-byte cost should grow little as N doubles
(what grows is the copy of the buffer at each read, a memcpy); a cost that doubles with N is the
whole buffer re-searched or re-parsed at each read (before that was fixed: 2 s for a 60 KB head,
41 s of the event loop's time for a 30 KB head and 30 KB body). A report, not a test: it exits 0
once printed.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ollama_metrics.config import Config
from ollama_metrics.observe.metrics import new_registry
from ollama_metrics.server.app import create_app
from ollama_metrics.server.fast import PLANE


class _Transport:
    """Enough of a transport for a connection that never gets to answer."""

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default

    def close(self) -> None: ...

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def write(self, data: bytes) -> None: ...


def _requests(size: int) -> dict[str, bytes]:
    head = b"POST /api/nope HTTP/1.1\r\nHost: localhost\r\nX-A: "
    half = size // 2
    return {
        "head": head + b"a" * size,  # never ends: the head being waited for
        "head+body": head + b"a" * half + b"\r\nContent-Length: %d\r\n\r\n" % half
                     + b"x" * (half - 1),  # one byte short: the body being waited for
    }


async def main() -> None:
    config = Config.build(upstream="http://127.0.0.1:9", listen="127.0.0.1:0")
    plane = create_app(config, new_registry())[PLANE]
    print(f"{'request':<10} {'bytes':>7} {'CPU s':>7} {'us/byte':>8}")
    for size in (16_000, 32_000, 60_000):
        for name, request in _requests(size).items():
            client = plane.connection(lambda: asyncio.Protocol(), None)
            client.connection_made(_Transport())  # type: ignore[arg-type]
            started = time.process_time()
            for at in range(len(request)):
                client.data_received(request[at:at + 1])
            spent = time.process_time() - started
            print(f"{name:<10} {len(request):>7} {spent:>7.2f} {spent / len(request) * 1e6:>8.2f}")


if __name__ == "__main__":
    asyncio.run(main())
