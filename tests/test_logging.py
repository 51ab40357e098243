"""What reaches the log: text a client controls is escaped, and a store's error is logged as the
store reported it."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import orjson
import pytest

from conftest import StartProxy
from helpers import _start, fake_process, raw_request
from ollama_metrics.printable import printable


def test_printable_escapes_what_a_terminal_would_act_on() -> None:
    assert printable("llama3.2 · 模型 \\x1b") == "llama3.2 · 模型 \\x1b"  # printable: as is
    assert printable("a\x1b[31mb\nc\r\td\x00\x7f\x9b\u202e\u2028") == (
        "a\\x1b[31mb\\nc\\r\\td\\x00\\x7f\\x9b\\u202e\\u2028")
    assert printable(ValueError("bad\nline")) == "bad\\nline"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_path_with_controls_is_logged_escaped(start_proxy: StartProxy,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    # Ollama is down, so the proxy logs the request's path with the reason it answers 502.
    proxy = await start_proxy(f"http://127.0.0.1:{_closed_port()}")
    reply = await raw_request(proxy.port, b"GET /api/chat%1b[31mRED%0d%07%7f%c2%9b%e2%80%ae "
                              b"HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 502 ")
    [line] = [r.getMessage() for r in caplog.records if "RED" in r.getMessage()]
    assert "GET /api/chat\\x1b[31mRED\\r\\x07\\x7f\\x9b\\u202e: cannot reach Ollama" in line
    assert line.isprintable()


def _can_mount_tmpfs(where: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    mount = subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs",
                            str(where)], capture_output=True)
    return mount.returncode == 0


@pytest.mark.slow(reason="a proxy process on a 1 MB tmpfs")
def test_a_full_disk_is_logged_as_sqlite_reports_it(tmp_path: Path) -> None:
    """The analytics directory on a 1 MB file system of its own (a tmpfs in a mount namespace
    of the proxy's process): once it is full, the log says so, as SQLite did."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _can_mount_tmpfs(disk):
        pytest.skip("needs `unshare -rm` (Linux, user namespaces) to mount a small tmpfs")
    mounted = ["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=1m tmpfs "$0" && exec "$@"',
               str(disk)]
    with fake_process() as fake:
        proxy = _start([*mounted, sys.executable, "-m", "ollama_metrics", "serve", "--listen",
                        "127.0.0.1:0", "--upstream", fake.url, "--analytics-dir", str(disk)],
                       r"listening on http://127\.0\.0\.1:(\d+)")
        try:
            body = orjson.dumps({"model": "llama3.2", "stream": False, "messages": [
                {"role": "user", "content": "all work and no play " * 3000}]})
            for _ in range(100):
                request = urllib.request.Request(proxy.url + "/api/chat", data=body)
                with urllib.request.urlopen(request) as resp:
                    assert resp.status == 200  # the client never notices
                if "failed, retrying" in proxy.output:
                    break
            proxy.wait_for("analytics: write to sqlite failed, retrying: database or disk is full")
        finally:
            proxy.stop()
    assert "cannot rollback" not in proxy.output
