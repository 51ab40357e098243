"""Running out of file descriptors is logged once, clearly, on either event loop.

The proxy runs as a process whose open-file limit is 64 (soft and hard, so it cannot lift it),
and the test holds more connections open than that. Before, uvloop said nothing at all (libuv
accepts and closes each new connection at once), and asyncio logged a traceback at every retry
of accept.
"""

from __future__ import annotations

import asyncio
import re
import socket
import sys
import tempfile
import textwrap
from collections.abc import Iterator

import pytest

from helpers import Process, fake_process, raw_request
from wire import parse_replies

pytestmark = [pytest.mark.slow(reason="proxy processes run out of descriptors"),
              pytest.mark.skipif(sys.platform == "win32", reason="no descriptor limit on sockets")]

LIMIT = 64
OUT = "out of file descriptors (limit 64"
BACK = "file descriptors available again"


@pytest.fixture(scope="module")
def fake() -> Iterator[Process]:
    with fake_process() as process:
        yield process


def _proxy(upstream: str, loop: str, scratch: str) -> Process:
    code = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_NOFILE, ({LIMIT}, {LIMIT}))
        if {loop!r} == "asyncio":
            sys.modules["uvloop"] = None  # as where uvloop is not installed
        sys.argv = ["ollama-metrics", "serve", "--listen", "127.0.0.1:0", "--upstream",
                    {upstream!r}, "--analytics-backend", "none", "--ps-interval", "0"]
        from ollama_metrics.cli import main
        main()
    """)
    process = Process([sys.executable, "-c", code], cwd=scratch)
    process.port = int(process.wait_for(r"listening on http://127\.0\.0\.1:(\d+)").group(1))
    return process


def _flood(port: int, n: int = 2 * LIMIT) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
async def test_running_out_of_descriptors_is_logged_once_an_episode(fake: Process, loop: str
                                                                    ) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        proxy = _proxy(fake.url, loop, scratch)
        try:
            held = _flood(proxy.port)
            proxy.wait_for(re.escape(OUT), timeout=5)
            await asyncio.sleep(2.5)  # two more probes, and asyncio's retries of accept
            held += _flood(proxy.port, 8)
            await asyncio.sleep(1.5)
            for s in held:
                s.close()
            proxy.wait_for(BACK, timeout=5)
            (reply,) = parse_replies(await raw_request(
                proxy.port,
                b"GET /api/version HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"))
            assert reply.status == 200
            # Again at once: within a minute of the last one told, not told again.
            held = _flood(proxy.port)
            await asyncio.sleep(2.5)
            for s in held:
                s.close()
        finally:
            proxy.stop()
    output = proxy.output
    assert output.count(OUT) == 1, output
    assert output.count(BACK) == 1, output
    assert "Traceback" not in output and "socket.accept()" not in output, output
    (line,) = [x for x in output.splitlines() if OUT in x]
    assert " ERROR " in line and "ulimit -n" in line and "LimitNOFILE=" in line
