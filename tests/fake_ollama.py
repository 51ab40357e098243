"""A fake Ollama server that speaks the real wire protocol, for testing the proxy.

Contract (see /work/shared/reference/ollama-api.md, sections 1-4 and 6-8):

* ``FakeOllama`` is a real aiohttp server on a real socket.  Every route of the real
  server exists with its methods; unknown paths answer ``404 page not found`` and
  known paths with a wrong method ``405 method not allowed`` (text/plain, like gin).
* The Host check and CORS rules of the real server apply (403 with an empty body).
* Behaviour per model comes from a ``Scenario`` chosen by the request's ``model``
  field (``name`` without a tag matches ``name:latest``): tokens, thinking,
  tool calls, delays, and toxic modes (error before the first byte, in-band error
  after N chunks, connection abort after N chunks, lines split across writes, gzip).
* "N chunks" counts upstream chunks: one NDJSON line, or for SSE one event per
  token; the closing events (finish, usage, ``[DONE]``) count as one.
* Nothing is written before the first chunk is ready: ``first_delay`` holds back
  even the status line.  Streams are flushed frame by frame.
* Every request is recorded (``RequestRecord``) with a streamed SHA-256 of its body;
  a client that goes away before the handler finishes is recorded as disconnected.
* ``/_fake/requests`` (GET), ``/_fake/scenarios`` (PUT), ``/_fake/reset`` (POST) let
  a test drive a fake running as a separate process
  (``python tests/fake_ollama.py --port 0`` prints ``LISTENING <port>``).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence

import orjson

from fake.native import NativeRoutes
from fake.openai import OpenAIRoutes
from fake.scenario import (
    RequestRecord,
    Scenario,
    _Handler,
)

__all__ = ["FakeOllama", "RequestRecord", "Scenario"]


class FakeOllama(NativeRoutes, OpenAIRoutes):
    def __init__(self, scenarios: dict[str, Scenario] | None = None, *, check_host: bool = True,
                 version: str = "0.33.0", extra_origins: Sequence[str] = ()) -> None:
        super().__init__(scenarios, check_host=check_host, version=version,
                         extra_origins=extra_origins)
        get, post, head, delete = "GET", "POST", "HEAD", "DELETE"
        self._routes: dict[str, dict[str, _Handler]] = {
            "/": {head: self._root, get: self._root},
            "/api/version": {head: self._version, get: self._version},
            "/api/status": {get: self._status},
            "/api/pull": {post: self._pull},
            "/api/push": {post: self._push},
            "/api/tags": {head: self._tags, get: self._tags},
            "/api/show": {post: self._show},
            "/api/delete": {delete: self._delete},
            "/api/me": {post: self._unauthorized},
            "/api/signout": {post: self._signout},
            "/api/create": {post: self._create},
            "/api/copy": {post: self._copy},
            "/api/experimental/web_search": {post: self._unauthorized},
            "/api/experimental/web_fetch": {post: self._unauthorized},
            "/api/experimental/model-recommendations": {get: self._recommendations},
            "/api/ps": {get: self._ps},
            "/api/generate": {post: self._generate},
            "/api/chat": {post: self._chat},
            "/api/embed": {post: self._embed},
            "/api/embeddings": {post: self._embeddings},
            "/v1/chat/completions": {post: self._v1_chat},
            "/v1/completions": {post: self._v1_completions},
            "/v1/embeddings": {post: self._v1_embeddings},
            "/v1/models": {get: self._v1_models},
            "/v1/responses": {post: self._not_implemented},
            "/v1/audio/transcriptions": {post: self._not_implemented},
            "/v1/messages": {post: self._not_implemented},
        }
        # gin ":param" routes: one non-empty path segment after the prefix
        self._param_routes: dict[str, dict[str, _Handler]] = {
            "/api/blobs/": {post: self._blob_upload, head: self._blob_head},
            "/api/user/keys/": {delete: self._signout},
            "/v1/models/": {get: self._v1_model},
        }



# --- process mode -----------------------------------------------------------------


async def _serve(host: str, port: int, scenarios: dict[str, Scenario] | None,
                 check_host: bool) -> None:
    fake = FakeOllama(scenarios, check_host=check_host)
    await fake.start(host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"LISTENING {fake.port}", flush=True)
    await stop.wait()
    await fake.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fake Ollama server for tests.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--scenarios",
                        help='JSON {"model:tag": {scenario fields}}; replaces the defaults')
    parser.add_argument("--no-check-host", action="store_true",
                        help="disable Ollama's Host header check")
    args = parser.parse_args(argv)
    scenarios = None
    if args.scenarios:
        given = orjson.loads(args.scenarios)
        scenarios = {name: Scenario.from_json(fields) for name, fields in given.items()}
    serve = _serve(args.host, args.port, scenarios, not args.no_check_host)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve)
    else:
        uvloop.run(serve)
    return 0


if __name__ == "__main__":
    sys.exit(main())
