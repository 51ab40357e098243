"""The aiohttp internals the proxy relies on (src/ollama_metrics/internals.py), each checked here
against the installed aiohttp, so that an upgrade that moves one fails the suite instead of
quietly switching the guard, the header timeout or the fast path off.

The start check (`connection.verify`) is itself tested against stand-in classes that lack one
internal each (a check of the check: the stand-ins are aiohttp's own classes with one thing
removed), and the refusal to start is tested on the real CLI in a subprocess whose aiohttp has
lost `_parser`.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.client_proto import ResponseHandler
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from conftest import StartProxy
from fake_ollama import FakeOllama, Scenario
from ollama_metrics.server import connection, internals, relay
from ollama_metrics.server.fast import PLANE
from ollama_metrics.server.internals import Unsupported
from ollama_metrics.server.proxy import PARSE_INLINE


def test_pyproject_pins_the_aiohttp_verified() -> None:
    """pyproject.toml, the start message and the installed aiohttp agree on the series."""
    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    assert f'"{internals.PIN}",' in pyproject
    assert aiohttp.__version__.startswith(internals.VERIFIED + ".")
    major, minor = internals.VERIFIED.split(".")
    assert internals.PIN.endswith(f",<{major}.{int(minor) + 1}")  # stops before the next minor


def test_the_guard_and_head_clock_install_with_this_aiohttp() -> None:
    connection.verify()  # raises Unsupported, naming the internal, if any is missing


# --- the start check, against aiohttp's classes with one internal taken away ------------------

class _NoParser(RequestHandler):
    __slots__ = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        del self._parser


class _ParserWithoutFeed(RequestHandler):
    __slots__ = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._parser = object()  # type: ignore[assignment]


class _DeafParser:
    def feed_data(self, data: bytes) -> tuple[list[Any], bool, bytes]:
        return [], False, b""


class _ParserThatReadsNothing(RequestHandler):
    __slots__ = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._parser = _DeafParser()  # type: ignore[assignment]


class _NoWaiter(RequestHandler):
    __slots__ = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        del self._waiter


class _ServerOfAnotherLayout(web.Server):
    __slots__ = ("extra",)


class _ServerWithoutHooks(web.Server):
    connection_made = None  # type: ignore[assignment]


@pytest.mark.parametrize(("server", "handler", "missing"), [
    (web.Server, _NoParser, "RequestHandler._parser"),
    (web.Server, _ParserWithoutFeed, "RequestHandler._parser"),
    (web.Server, _ParserThatReadsNothing, "returns the requests it read"),
    (web.Server, _NoWaiter, "RequestHandler._waiter"),
    (_ServerOfAnotherLayout, RequestHandler, "class can be switched"),
    (_ServerWithoutHooks, RequestHandler, "web.Server.connection_made"),
], ids=["no _parser", "_parser without feed_data", "_parser reads nothing", "no _waiter",
        "Server of another layout", "no connection_made"])
def test_the_start_check_names_what_is_missing(server: type[web.Server],
                                               handler: type[RequestHandler],
                                               missing: str) -> None:
    with pytest.raises(Unsupported) as caught:
        connection.verify(server, handler)
    assert missing in caught.value.missing
    assert internals.PIN in str(caught.value)


def test_the_proxy_refuses_to_start_without_the_guard() -> None:
    """`serve` on an aiohttp whose connections keep no `_parser`: exit 6 and one line saying
    what is missing and what to install, no traceback, nothing served."""
    code = textwrap.dedent("""
        import sys
        from aiohttp.web_protocol import RequestHandler
        init = RequestHandler.__init__
        def without_parser(self, *args, **kwargs):
            init(self, *args, **kwargs)
            del self._parser
        RequestHandler.__init__ = without_parser
        sys.argv = ["ollama-metrics", "serve", "--listen", "127.0.0.1:0",
                    "--upstream", "http://127.0.0.1:9", "--analytics-backend", "none"]
        from ollama_metrics.cli import main
        main()
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 6, done.stderr
    assert done.stderr.splitlines() == [
        f"ollama-metrics: aiohttp {aiohttp.__version__} lacks RequestHandler._parser (the "
        "connection's request parser), which the proxy needs for its request guard and header "
        "timeout; it will not run without them. Install the aiohttp it was verified with: pip "
        f"install '{internals.PIN}'"]
    assert "listening" not in done.stdout + done.stderr


# --- the fast path -----------------------------------------------------------------------------

def test_the_fast_path_is_available_with_this_aiohttp() -> None:
    """relay.py relays a streamed reply from inside aiohttp's parser callbacks by switching the
    reply's StreamReader to a subclass. With an aiohttp where that is refused every reply is
    still relayed, only the slower way (logged at start): fail here rather than let an upgrade
    make the proxy quietly slower."""
    if not internals.c_response_parser():
        pytest.skip("aiohttp's C extensions are off: the fast path is for its C parser")
    assert relay.UNAVAILABLE is None and relay.AVAILABLE


def test_the_parser_callbacks_the_fast_path_overrides_are_aiohttp_s() -> None:
    """_Forwarding overrides what aiohttp's parser calls on a reply's StreamReader, and pauses
    and resumes the connections as aiohttp does: if aiohttp renames one, the override would be
    dead code and chunks would go the slow way, or not at all."""
    for name in ("feed_data", "feed_eof", "set_exception", "begin_http_chunk_receiving",
                 "end_http_chunk_receiving"):
        assert name in vars(StreamReader), name
        assert name in vars(relay._Forwarding), name
    assert "total_bytes" in StreamReader.__slots__
    assert callable(ResponseHandler.pause_reading) and callable(ResponseHandler.resume_reading)
    assert isinstance(BaseProtocol.writing_paused, property)


@pytest.mark.uvloop
async def test_a_streamed_reply_takes_the_fast_path(fake: FakeOllama, start_proxy: StartProxy,
                                                   http: aiohttp.ClientSession) -> None:
    """While a reply streams, it is relayed from the parser callback, not the plain loop. (A
    request the data plane hands to aiohttp: a body above what the plane reads whole.)"""
    if not relay.AVAILABLE:
        pytest.skip(f"no fast path here: {relay.UNAVAILABLE}")
    fake.scenarios["slow:latest"] = Scenario(tokens=["a "] * 6, token_delay=0.1)
    proxy = await start_proxy(fake.url)
    seen: list[int] = []
    async with http.post(proxy.url + "/api/generate",
                         json={"model": "slow", "prompt": "x" * (PARSE_INLINE + 1)}) as resp:
        async for _ in resp.content:
            seen.append(len(relay._relays))
    assert max(seen) == 1, seen
    await asyncio.sleep(0)
    assert not relay._relays
    assert proxy.app[PLANE].handed == 1
