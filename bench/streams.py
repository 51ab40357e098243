"""Many concurrent streamed generations: does each frame reach the client when it was sent?

Contract: ``measure_streams`` opens ``n`` connections at once, sends one streamed
``/api/generate`` on each (``Connection: close``) and records every read with its arrival time.
Afterwards (nothing is parsed while frames arrive, so the client's own cost stays small and the
same for every target) it de-chunks each reply and pairs every NDJSON line with its arrival time
and its ``created_at`` stamp. The **stretch** of a pair of consecutive frames is how much longer
the gap between them was at the client than at the upstream: queueing in whatever sits between
(the hop under test, and the upstream's and this client's own event loops, which the direct run
shows). Replies that are not 200 or do not end with ``"done": true`` count as failed.

Run alone: ``python bench/streams.py --port P [--streams N] [--path PATH]`` prints a JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import cast

import uvloop

from ttft import percentile

BODY = b'{"model":"llama3.2","prompt":"Count to sixty-four."}'


@dataclass
class StreamsResult:
    stretch_ms: list[float] = field(default_factory=list)
    frames: int = 0
    failed: int = 0
    first_error: str = ""

    @property
    def stretch_p99_ms(self) -> float:
        return percentile(self.stretch_ms, 99.0)


class _Exchange(asyncio.Protocol):
    def __init__(self, request: bytes, done: asyncio.Future[None]) -> None:
        self.request, self.done = request, done
        self.reads: list[tuple[float, bytes]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).write(self.request)

    def data_received(self, data: bytes) -> None:
        self.reads.append((time.time(), data))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


def _lines(reads: list[tuple[float, bytes]]) -> list[tuple[float, bytes]]:
    """The reply's NDJSON lines, each with the arrival time of the read that completed it."""
    raw = b"".join(data for _, data in reads)
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep or not head.startswith(b"HTTP/1.1 200"):
        raise ValueError(f"not a 200 reply: {head[:80]!r}")
    if b"transfer-encoding: chunked" not in head.lower():
        raise ValueError("reply not chunked")
    ends, at = [], 0  # raw offset where each read ends, and when it arrived
    for arrived, data in reads:
        at += len(data)
        ends.append((at, arrived))
    lines, line, pos, base = [], bytearray(), 0, len(head) + len(sep)
    read = iter(ends)
    end, arrived = next(read)
    while True:
        eol = rest.index(b"\r\n", pos)
        size = int(rest[pos:eol].split(b";")[0], 16)
        if size == 0:
            break
        start = eol + 2
        for k in range(start, start + size):  # per byte: a line may end mid-chunk
            line.append(rest[k])
            if rest[k] == 0x0A:
                while base + k >= end:
                    end, arrived = next(read)
                lines.append((arrived, bytes(line[:-1])))
                line.clear()
        pos = start + size + 2
    if line:
        raise ValueError("reply ended inside a line")
    return lines


def _stamp(line: bytes) -> float:
    created = json.loads(line)["created_at"]
    return datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp()


async def measure_streams(host: str, port: int, path: str, n: int) -> StreamsResult:
    request = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json"
               f"\r\nContent-Length: {len(BODY)}\r\nConnection: close\r\n\r\n").encode() + BODY
    loop = asyncio.get_running_loop()

    async def one() -> list[tuple[float, bytes]]:
        done: asyncio.Future[None] = loop.create_future()
        exchange = _Exchange(request, done)
        transport, _ = await loop.create_connection(lambda: exchange, host, port)
        try:
            await asyncio.wait_for(done, 120)
        finally:
            transport.close()
        return exchange.reads

    gc.disable()  # a collection of this process's heap would stretch gaps at random
    try:
        replies = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
    finally:
        gc.enable()
    result = StreamsResult()
    for reply in replies:
        try:
            if isinstance(reply, BaseException):
                raise reply
            lines = _lines(reply)
            if not lines or json.loads(lines[-1][1]).get("done") is not True:
                raise ValueError("stream did not end with a done:true line")
            made = [(arrived, _stamp(line)) for arrived, line in lines]
        except (OSError, ValueError, TimeoutError, StopIteration) as exc:
            result.failed += 1
            result.first_error = result.first_error or f"{type(exc).__name__}: {exc}"
            continue
        result.frames += len(made)
        result.stretch_ms += [((a2 - a1) - (m2 - m1)) * 1000
                              for (a1, m1), (a2, m2) in itertools.pairwise(made)]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Inter-frame gaps of concurrent streams.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/api/generate?chunk_delay_ms=20&chunks=63")
    parser.add_argument("--streams", type=int, default=200)
    args = parser.parse_args(argv)
    result = uvloop.run(measure_streams(args.host, args.port, args.path, args.streams))
    print(json.dumps({"frames": result.frames, "failed": result.failed,
                      "first_error": result.first_error,
                      "stretch_p99_ms": round(result.stretch_p99_ms, 3)}))
    return 0 if not result.failed else 1


if __name__ == "__main__":
    sys.exit(main())
