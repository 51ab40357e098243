"""Time to first token of a streamed ``/api/generate``, measured by a minimal HTTP/1.1 client.

Contract: ``measure_ttft`` sends ``samples`` sequential streamed generate requests over one
keep-alive connection (reconnecting, outside the timed span, only if the server closes it) and
returns, per request, the wall time from writing the request to having the first complete NDJSON
body line. Each response is read to its end and checked: status 200, ``application/x-ndjson``, and a
final ``"done": true`` line. Failed requests are counted, not timed. Raw asyncio streams keep the
client's own overhead small and identical for every target.

Run alone: ``python bench/ttft.py --port P [--path PATH] [--samples N]`` prints a JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import uvloop

BODY = b'{"model":"llama3.2","prompt":"Why is the sky blue?"}'
WARMUP = 5
REQUEST_FAILURES = (OSError, ValueError, asyncio.IncompleteReadError, TimeoutError)


@dataclass
class TtftResult:
    samples_ms: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms) if self.samples_ms else float("nan")

    @property
    def p99_ms(self) -> float:
        return percentile(self.samples_ms, 99.0)


def percentile(values: list[float], pct: float) -> float:
    """Linear interpolation between closest ranks (same as numpy's default)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * pct / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


class ResponseError(ValueError):
    """The response was not a complete, well-formed NDJSON generate stream."""


@dataclass
class _Head:
    status: int
    headers: dict[str, str]


async def _read_head(reader: asyncio.StreamReader) -> _Head:
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionResetError("server closed the connection before responding")
    parts = status_line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise ResponseError(f"bad status line {status_line!r}")
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return _Head(int(parts[1]), headers)


async def _body(reader: asyncio.StreamReader, head: _Head) -> AsyncIterator[bytes]:
    if "chunked" in head.headers.get("transfer-encoding", "").lower():
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return
            while size:
                piece = await reader.read(min(size, 65536))
                if not piece:
                    raise ResponseError("connection closed inside a chunk")
                size -= len(piece)
                yield piece
            await reader.readexactly(2)
    elif "content-length" in head.headers:
        remaining = int(head.headers["content-length"])
        while remaining:
            piece = await reader.read(min(remaining, 65536))
            if not piece:
                raise ResponseError("connection closed before Content-Length bytes")
            remaining -= len(piece)
            yield piece
    else:
        while piece := await reader.read(65536):
            yield piece


async def _one_request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[float, bool]:
    """Return (seconds to first body line, whether the server keeps the connection open)."""
    started = time.perf_counter()
    writer.write(request)
    head = await _read_head(reader)
    first_line_at: float | None = None
    body = bytearray()
    async for piece in _body(reader, head):
        if first_line_at is None and b"\n" in piece:
            first_line_at = time.perf_counter()
        body += piece
    if head.status != 200:
        raise ResponseError(f"status {head.status}: {bytes(body[:200])!r}")
    if not head.headers.get("content-type", "").startswith("application/x-ndjson"):
        raise ResponseError(f"content-type {head.headers.get('content-type')!r}")
    lines = bytes(body).splitlines()
    if first_line_at is None or not lines or json.loads(lines[-1]).get("done") is not True:
        raise ResponseError(f"stream did not end with a done:true line: {bytes(body[-200:])!r}")
    keep_alive = head.headers.get("connection", "").lower() != "close"
    return first_line_at - started, keep_alive


async def measure_ttft(host: str, port: int, path: str, samples: int) -> TtftResult:
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Accept: application/x-ndjson\r\nContent-Length: {len(BODY)}\r\n\r\n"
    ).encode() + BODY
    result = TtftResult()
    connection: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    try:
        for index in range(WARMUP + samples):
            if connection is None:
                connection = await asyncio.open_connection(host, port)
            try:
                seconds, keep_alive = await asyncio.wait_for(_one_request(*connection, request), 30)
            except REQUEST_FAILURES as exc:
                keep_alive = False
                if index >= WARMUP:
                    result.errors += 1
                    result.first_error = result.first_error or f"{type(exc).__name__}: {exc}"
            else:
                if index >= WARMUP:
                    result.samples_ms.append(seconds * 1000)
            if not keep_alive:
                connection[1].close()
                connection = None
    finally:
        if connection is not None:
            connection[1].close()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Time to first NDJSON line of /api/generate.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/api/generate?first_delay_ms=20&chunk_delay_ms=5")
    parser.add_argument("--samples", type=int, default=200)
    args = parser.parse_args(argv)
    result = uvloop.run(measure_ttft(args.host, args.port, args.path, args.samples))
    summary = {
        "samples": len(result.samples_ms),
        "errors": result.errors,
        "first_error": result.first_error,
        "median_ms": round(result.median_ms, 3),
        "p99_ms": round(result.p99_ms, 3),
    }
    print(json.dumps(summary))
    return 0 if not result.errors else 1


if __name__ == "__main__":
    sys.exit(main())
