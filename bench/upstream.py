"""A fast fake Ollama used as the benchmark's upstream.

Contract:
  * ``python bench/upstream.py [--port N]`` binds 127.0.0.1 (port 0 = any free port), prints exactly
    ``LISTENING <port>`` on stdout once it accepts connections, then serves until SIGTERM/SIGINT.
    No access log, no other output.
  * ``POST /api/generate``: with ``"stream": false`` one JSON object
    (``application/json; charset=utf-8``) shaped like Ollama's final chunk with the full text;
    otherwise (the Ollama default) NDJSON (``application/x-ndjson``, chunked) with one line per
    token and a final ``"done": true`` line carrying counts and nanosecond durations. Nothing, not
    even the status line, is sent before the first chunk is ready, as in Ollama.
  * Timing knobs, per request as query parameters, defaulting to the CLI options (env fallbacks):
    ``first_delay_ms`` (before the first chunk), ``chunk_delay_ms`` (between chunks), ``chunks``
    (number of token chunks, default 16). A ``stream: false`` reply waits as long as the whole
    stream would have.
  * ``GET /api/tags`` returns one model, ``GET /api/version`` a version; ``GET /`` and ``HEAD /``
    return ``Ollama is running``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import uvloop
from aiohttp import web

MODEL = "llama3.2"
TOKENS = (
    "The", " sky", " looks", " blue", " because", " air", " molecules", " scatter",
    " short", " blue", " wavelengths", " of", " sunlight", " more", " than", " red.",
)
VERSION_BODY = b'{"version":"0.33.0"}'
CONTEXT = list(range(128006, 128006 + 32))
TAGS_BODY = json.dumps({
    "models": [{
        "name": "llama3.2:latest",
        "model": "llama3.2:latest",
        "modified_at": "2025-05-04T17:37:44.706015396-07:00",
        "size": 2019393189,
        "digest": "a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72",
        "details": {
            "parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
            "parameter_size": "3.2B", "quantization_level": "Q4_K_M",
        },
    }],
}).encode()


@dataclass(frozen=True)
class Timing:
    """How slowly the fake model 'generates'."""

    first_delay_s: float
    chunk_delay_s: float
    chunks: int


DEFAULT_TIMING = web.AppKey("default_timing", Timing)


def _created_at() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _timing_for(request: web.Request) -> Timing:
    base = request.app[DEFAULT_TIMING]
    query = request.query
    if not query:
        return base
    return Timing(
        first_delay_s=float(query.get("first_delay_ms", base.first_delay_s * 1000)) / 1000,
        chunk_delay_s=float(query.get("chunk_delay_ms", base.chunk_delay_s * 1000)) / 1000,
        chunks=int(query.get("chunks", base.chunks)),
    )


def _final_fields(started_ns: int, first_ns: int, eval_count: int) -> dict[str, Any]:
    now = time.perf_counter_ns()
    return {
        "done": True,
        "done_reason": "stop",
        "context": CONTEXT,
        "total_duration": now - started_ns,
        "load_duration": (first_ns - started_ns) // 10,
        "prompt_eval_count": 26,
        "prompt_eval_duration": first_ns - started_ns,
        "eval_count": eval_count,
        "eval_duration": now - first_ns,
    }


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def generate(request: web.Request) -> web.StreamResponse:
    started_ns = time.perf_counter_ns()
    raw = await request.read()
    if not raw:
        return _error(400, "missing request body")
    try:
        body = json.loads(raw)
    except ValueError as exc:
        return _error(400, f"invalid JSON: {exc}")
    if not isinstance(body, dict):
        return _error(400, "json: cannot unmarshal into Go value of type api.GenerateRequest")
    timing = _timing_for(request)
    tokens = [TOKENS[i % len(TOKENS)] for i in range(timing.chunks)]

    if body.get("stream") is False:
        delay = timing.first_delay_s + timing.chunk_delay_s * max(len(tokens) - 1, 0)
        if delay:
            await asyncio.sleep(delay)
        first_ns = time.perf_counter_ns()
        reply = {"model": MODEL, "created_at": _created_at(), "response": "".join(tokens)}
        reply.update(_final_fields(started_ns, first_ns, len(tokens)))
        return web.Response(
            body=json.dumps(reply, separators=(",", ":")).encode(),
            content_type="application/json",
            charset="utf-8",
        )

    if timing.first_delay_s:
        await asyncio.sleep(timing.first_delay_s)
    first_ns = time.perf_counter_ns()
    response = web.StreamResponse()
    response.content_type = "application/x-ndjson"
    await response.prepare(request)
    for index, token in enumerate(tokens):
        if index and timing.chunk_delay_s:
            await asyncio.sleep(timing.chunk_delay_s)
        line = {"model": MODEL, "created_at": _created_at(), "response": token, "done": False}
        await response.write(json.dumps(line, separators=(",", ":")).encode() + b"\n")
    final = {"model": MODEL, "created_at": _created_at(), "response": ""}
    final.update(_final_fields(started_ns, first_ns, len(tokens)))
    await response.write(json.dumps(final, separators=(",", ":")).encode() + b"\n")
    await response.write_eof()
    return response


async def tags(request: web.Request) -> web.Response:
    return web.Response(body=TAGS_BODY, content_type="application/json", charset="utf-8")


async def version(request: web.Request) -> web.Response:
    return web.Response(body=VERSION_BODY, content_type="application/json", charset="utf-8")


async def root(request: web.Request) -> web.Response:
    return web.Response(text="Ollama is running")


def create_app(timing: Timing) -> web.Application:
    app = web.Application()
    app[DEFAULT_TIMING] = timing
    app.router.add_post("/api/generate", generate)
    app.router.add_get("/api/tags", tags)  # aiohttp also answers HEAD for GET routes
    app.router.add_get("/api/version", version)
    app.router.add_get("/", root)
    return app


async def serve(port: int, timing: Timing) -> None:
    runner = web.AppRunner(create_app(timing), access_log=None, handle_signals=False)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    site = web.SockSite(runner, sock, backlog=1024)
    await site.start()
    print(f"LISTENING {sock.getsockname()[1]}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fast fake Ollama upstream for benchmarks.")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (default: 0)")
    parser.add_argument(
        "--first-delay-ms", type=float,
        default=_env_float("FAKE_OLLAMA_FIRST_DELAY_MS", 0.0),
        help="delay before the first chunk (env FAKE_OLLAMA_FIRST_DELAY_MS, default 0)",
    )
    parser.add_argument(
        "--chunk-delay-ms", type=float,
        default=_env_float("FAKE_OLLAMA_CHUNK_DELAY_MS", 0.0),
        help="delay between chunks (env FAKE_OLLAMA_CHUNK_DELAY_MS, default 0)",
    )
    parser.add_argument(
        "--chunks", type=int, default=int(_env_float("FAKE_OLLAMA_CHUNKS", 16)),
        help="token chunks per reply (env FAKE_OLLAMA_CHUNKS, default 16)",
    )
    args = parser.parse_args(argv)
    timing = Timing(args.first_delay_ms / 1000, args.chunk_delay_ms / 1000, args.chunks)
    uvloop.run(serve(args.port, timing))
    return 0


if __name__ == "__main__":
    sys.exit(main())
