"""`ollama-metrics top`: render() on real snapshots, the live view driven in a real terminal
(tmux), --once's exit status and messages, and the usage errors."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner

from conftest import StartProxy
from fake_ollama import FakeOllama, Scenario
from helpers import fake_process, proxy_process, settle
from ollama_metrics.analytics.settings import AnalyticsConfig
from ollama_metrics.cli import main
from ollama_metrics.server.app import LIVE
from ollama_metrics.ui.top import render
from services import require
from wrapper_helpers import free_port

LONG = "an-extremely-long-model-name-that-no-column-can-hold-whole:70b"
TITLES = ("In flight", "Per model", "Recent")
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def sections(lines: list[str]) -> dict[str, list[str]]:
    """The screen's lines under each section title (column header first), by title."""
    found: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in lines:
        title = next((t for t in TITLES if line.startswith(t)), None)
        if title is not None:
            current = found.setdefault(title, [])
        elif current is not None and line.strip():
            current.append(line)
    return found


def row(section: list[str], first: str) -> list[str] | None:
    """The cells of the section's first row whose first cell is `first` (cells never hold
    spaces except STATUS, which is split in two)."""
    for line in section[1:]:
        cells = line.split()
        if cells and cells[0] == first:
            return cells
    return None


# --- render, on a snapshot from a real proxy ------------------------------------------------


async def test_render_real_snapshot(fake: FakeOllama, start_proxy: StartProxy) -> None:
    fake.scenarios["slow:latest"] = Scenario(tokens=["a"] * 200, token_delay=0.02)
    fake.scenarios[LONG] = Scenario(tokens=["b"] * 6)
    proxy = await start_proxy(fake.url)
    async with aiohttp.ClientSession() as http:
        for body in ({"model": "llama3.2", "prompt": "hi", "stream": False},
                     {"model": "llama3.2", "prompt": "hi", "stream": False},
                     {"model": LONG, "prompt": "hi"},
                     {"model": "missing", "prompt": "hi"}):
            async with http.post(proxy.url + "/api/generate", json=body) as r:
                await r.read()
        await settle(lambda: len(proxy.app[LIVE].snapshot()["recent"]) == 4)
        slow = await http.post(proxy.url + "/api/generate", json={"model": "slow", "prompt": "x"})
        for _ in range(5):
            await slow.content.readline()
        async with http.get(proxy.url + "/analytics/live") as r:
            snapshot: dict[str, Any] = await r.json()
        slow.close()

    assert len(snapshot["recent"]) == 4 and len(snapshot["active"]) == 1
    lines = render(snapshot, 100, 40, url=proxy.url)
    assert len(lines) <= 40 and all(len(line) <= 100 for line in lines), lines
    assert proxy.url in lines[0]
    assert "in flight 1" in lines[1] and "4 requests" in lines[1] and "1 error" in lines[1]
    screen = sections(lines)
    assert list(screen) == list(TITLES)
    assert "In flight (1)" in lines and "Per model (last 60 s)" in lines

    flight = screen["In flight"]
    assert flight[0].split() == ["MODEL", "ENDPOINT", "ELAPSED", "TOKENS", "TTFT"]
    cells = row(flight, "slow:latest")
    assert cells is not None and cells[1] == "/api/generate", flight
    assert int(cells[3]) == snapshot["active"][0]["chunks"] >= 5
    assert cells[2].endswith("s") and cells[4].endswith("s")  # elapsed and TTFT, measured

    per_model = screen["Per model"]
    llama = row(per_model, "llama3.2:latest")
    (stats,) = [m for m in snapshot["models"] if m["model"] == "llama3.2:latest"]
    assert llama == ["llama3.2:latest", f"{stats['requests_per_second']:.2f}",
                     f"{stats['tokens_per_second']:.1f}", "2", "8", "0"], per_model
    missing = row(per_model, "missing:latest")
    assert missing is not None and missing[-1] == "1"  # the 404 counts as an error

    recent = screen["Recent"]
    assert len(recent) == 5  # header and the four finished requests, newest first
    assert recent[1].split()[1:5] == ["missing:latest", "/api/generate", "error", "404"]
    assert recent[-1].split()[1:5] == ["llama3.2:latest", "/api/generate", "success", "200"]
    assert re.fullmatch(r"\d\d:\d\d:\d\d", recent[1].split()[0])

    # The long name is cut to its column, never shown whole, and never pushes columns right.
    assert not any(LONG in line for line in lines)
    assert any(line.startswith(LONG[:39] + "…") for line in per_model)  # at most 40 wide
    (cut_name,) = [c for line in recent for c in line.split() if c.endswith("…")]
    assert LONG.startswith(cut_name[:-1]) and len(cut_name) >= 8
    header = recent[0]
    assert all(line.index("/api/generate") == header.index("ENDPOINT") for line in recent[1:])

    # A small terminal: the limits hold, every section keeps its title, the rest is counted.
    small = render(snapshot, 60, 15, url=proxy.url, footer="q quits")
    assert len(small) == 15 and all(len(line) <= 60 for line in small), small
    assert small[-1] == "q quits"
    cut = sections(small[:-1])
    assert list(cut) == list(TITLES)
    assert [len(cut[t]) for t in TITLES] == [2, 2, 2]  # column header and one row each
    assert "Per model (last 60 s)   +2 more" in small and "Recent   +3 more" in small
    assert cut["Recent"][1].split()[1].startswith("missing")  # the newest, cut to fit
    assert not any(LONG in line for line in small)

    # A failure, with the last data still shown under it.
    stale = render(snapshot, 80, 40, url=proxy.url, error="no proxy answers at x (refused)")
    assert stale[1] == "! no proxy answers at x (refused)" and "In flight (1)" in stale
    assert render(None, 30, 10, error="the proxy needs a token (401): pass --token")[1:] == [
        "! the proxy needs a token", "! (401): pass --token"]


async def test_in_flight_counts_those_not_listed(fake: FakeOllama, start_proxy: StartProxy
                                                 ) -> None:
    """The snapshot lists at most `shown` requests in flight (1,000 in service; 2 here), and
    `active_count` has them all: top shows that count, and how many it does not list."""
    fake.scenarios["slow:latest"] = Scenario(tokens=["a"] * 200, token_delay=0.02)
    proxy = await start_proxy(fake.url)
    proxy.app[LIVE].shown = 2
    async with aiohttp.ClientSession() as http:
        streams = [await http.post(proxy.url + "/api/generate",
                                   json={"model": "slow", "prompt": str(n)}) for n in range(5)]
        for stream in streams:
            await stream.content.readline()
        async with http.get(proxy.url + "/analytics/live") as r:
            snapshot: dict[str, Any] = await r.json()
        for stream in streams:
            stream.close()
    assert (snapshot["active_count"], len(snapshot["active"])) == (5, 2)
    lines = render(snapshot, 100, 40, url=proxy.url)
    assert lines[1].startswith("in flight 5 "), lines
    assert "In flight (5)   +3 more" in lines, lines
    assert len(sections(lines)["In flight"]) == 3  # column header and the two listed
    small = render(snapshot, 100, 12)  # room for one of the two listed: one more unseen
    assert "In flight (5)   +4 more" in small, small


async def test_a_request_without_a_model_reads_as_the_other_views_write_it(
        fake: FakeOllama, start_proxy: StartProxy) -> None:
    proxy = await start_proxy(fake.url)
    async with aiohttp.ClientSession() as http:
        async with http.post(proxy.url + "/api/generate", json={"prompt": "hi"}) as r:
            assert r.status == 400
        await settle(lambda: len(proxy.app[LIVE].snapshot()["recent"]) == 1)
        async with http.get(proxy.url + "/analytics/live") as r:
            snapshot: dict[str, Any] = await r.json()
    assert [m["model"] for m in snapshot["models"]] == [None]
    screen = sections(render(snapshot, 100, 40))
    assert row(screen["Per model"], "-") is not None, screen
    assert screen["Recent"][1].split()[1] == "-", screen



# --- the live view in a real terminal ---------------------------------------------------------


class Tmux:
    """A tmux server of our own (its own socket and no user config), one session."""

    def __init__(self, socket: Path, session: str) -> None:
        self.base = ["tmux", "-S", str(socket), "-f", "/dev/null"]
        self.session = session

    def __call__(self, *args: str) -> str:
        done = subprocess.run([*self.base, *args], capture_output=True, text=True, timeout=10,
                              check=True)
        return done.stdout

    def screen(self) -> list[str]:
        return self("capture-pane", "-p", "-t", self.session).splitlines()

    def flags(self) -> tuple[str, str]:
        """(alternate screen on, cursor visible) as tmux sees the pane: '1'/'0' each."""
        on, cursor = self("display-message", "-p", "-t", self.session,
                          "#{alternate_on} #{cursor_flag}").split()
        return on, cursor

    def wait(self, check: Callable[[list[str]], bool], what: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while not check(screen := self.screen()):
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not on screen in time:\n" + "\n".join(screen))
            time.sleep(0.1)


@contextmanager
def tmux(tmp_path: Path, command: list[str]) -> Iterator[Tmux]:
    require("tmux")
    term = Tmux(tmp_path / "tmux.sock", f"top-{os.getpid()}")
    try:
        term("new-session", "-d", "-s", term.session, "-x", "160", "-y", "45", *command)
        yield term
    finally:
        subprocess.run([*term.base, "kill-server"], capture_output=True, timeout=10)


def post(url: str, body: dict[str, Any]) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with _opener.open(request, timeout=20) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def tokens_in_flight(screen: list[str], model: str) -> int | None:
    cells = row(sections(screen).get("In flight", []), model)
    return int(cells[3]) if cells is not None and cells[1] == "/api/chat" else None


@pytest.mark.slow(reason="ollama-metrics top in a real terminal (tmux)")
def test_live_view_in_tmux(tmp_path: Path) -> None:
    scenarios = {"slow:latest": {"tokens": ["t"] * 100, "token_delay": 0.05},
                 "quick:latest": {"tokens": ["q"] * 12}}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    top = shlex.join([sys.executable, "-m", "ollama_metrics", "top", "--url", url,
                      "--interval", "0.3"])
    # Run it twice, quit once with q and once with Ctrl-C; after each, say how it exited and
    # whether the terminal's mode is the one it found. The shell survives the Ctrl-C (trap).
    script = (f'trap : INT; before=$(stty -g); for key in q C-c; do {top}; '
              f'echo "TOP-EXIT=$key:$?"; [ "$(stty -g)" = "$before" ] && echo "TTY-SAME=$key"; '
              'done; exec sleep 600')
    with fake_process("--scenarios", json.dumps(scenarios)) as fake, \
            tmux(tmp_path, ["bash", "-c", script]) as term:
        # Nothing listens yet: a clear message, and it keeps trying.
        term.wait(lambda s: any(f"! no proxy answers at {url}" in line for line in s),
                  "the unreachable message")
        assert any("retrying every 0.3 s" in line for line in term.screen())
        assert term.flags() == ("1", "0")  # alternate screen, cursor hidden
        with proxy_process(fake.url, "--listen", f"127.0.0.1:{port}",
                           "--analytics-backend", "none"):
            term.wait(lambda s: "In flight (0)" in s and "nothing finished yet" in
                      " ".join(s), "the first frame from the proxy")
            assert not any("no proxy answers" in line for line in term.screen())

            for body in ({"model": "quick", "prompt": "a", "stream": False},
                         {"model": "quick", "messages": [{"role": "user", "content": "b"}]},
                         {"model": "quick", "prompt": "c"}, {"model": "nope", "prompt": "d"}):
                endpoint = "/api/chat" if "messages" in body else "/api/generate"
                post(url + endpoint, body)
            slow = threading.Thread(target=post, args=(
                url + "/api/chat", {"model": "slow", "messages": [{"role": "user",
                                                                    "content": "go"}]}))
            slow.start()
            try:
                def ready(screen: list[str]) -> bool:
                    parts = sections(screen)
                    quick = row(parts.get("Per model", []), "quick:latest")
                    recent = [line.split() for line in parts.get("Recent", [])[1:]]
                    return (bool(tokens_in_flight(screen, "slow:latest"))
                            and quick is not None and quick[2] == f"{36 / 60:.1f}"
                            and sum(r[1] == "quick:latest" for r in recent) == 3
                            and ["nope:latest", "/api/generate", "error", "404"] in
                            [r[1:5] for r in recent])

                term.wait(ready, "the slow stream in flight, quick ones done, tokens/s")
                first = tokens_in_flight(term.screen(), "slow:latest")
                assert first is not None
                term.wait(lambda s: (tokens_in_flight(s, "slow:latest") or 0) > first,
                          "the in-flight token count growing")
                assert any(line.startswith("in flight 1 ") for line in term.screen())

                term("send-keys", "-t", term.session, "q")
                term.wait(lambda s: "TOP-EXIT=q:0" in s, "top ending on q")
                assert "TTY-SAME=q" in term.screen(), term.screen()
                assert term.flags() == ("0", "1")  # main screen, cursor shown
                assert not any(t in line for line in term.screen() for t in TITLES)

                # The loop starts it again; Ctrl-C ends it just as cleanly.
                term.wait(lambda s: any(line.startswith("In flight (") for line in s),
                          "top running again")
                assert term.flags() == ("1", "0")
                term("send-keys", "-t", term.session, "C-c")
                term.wait(lambda s: "TOP-EXIT=C-c:0" in s, "top ending on Ctrl-C")
                screen = term.screen()
                assert "TTY-SAME=C-c" in screen and "Traceback" not in " ".join(screen), screen
                assert term.flags() == ("0", "1")
            finally:
                slow.join(15)


# --- --once ---------------------------------------------------------------------------------


async def top_once(url: str, token: str | None = None) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k != "ANALYTICS_TOKEN"}
    if token is not None:
        env["ANALYTICS_TOKEN"] = token  # the variable, as a user would set it
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ollama_metrics", "top", "--once", "--url", url, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_once_unreachable() -> None:
    port = free_port()
    code, out, err = await top_once(f"127.0.0.1:{port}")
    assert code == 1, (out, err)
    assert f"no proxy answers at http://127.0.0.1:{port}" in out
    assert "Traceback" not in err


@pytest.mark.slow(reason="proxy processes")
async def test_once_with_and_without_token(fake: FakeOllama, start_proxy: StartProxy) -> None:
    proxy = await start_proxy(fake.url, AnalyticsConfig(backends=(), token="s3cret"))
    code, out, err = await top_once(proxy.url)
    assert code == 1, (out, err)
    assert "needs a token (401): pass --token or set ANALYTICS_TOKEN" in out
    code, out, _ = await top_once(proxy.url, "wrong")
    assert code == 1 and "refused the token (401)" in out
    code, out, err = await top_once(proxy.url, "s3cret")
    assert code == 0, (out, err)
    assert "In flight (0)" in out and "nothing finished yet" in out and "!" not in out


def test_usage_errors() -> None:
    """Without a terminal, the live view says to use --once; a URL it cannot use is named.
    (In-process: CliRunner's stdin is no terminal.)"""
    result = CliRunner().invoke(main, ["top", "--url", "http://127.0.0.1:1"])
    assert result.exit_code == 2 and "needs a terminal; --once prints one frame" in result.stderr
    assert "\x1b[" not in result.stdout  # nothing was drawn
    result = CliRunner().invoke(main, ["top", "--once", "--url", "ftp://x"])
    assert result.exit_code == 2 and "--url" in result.stderr
    assert "expected http://HOST:PORT" in result.stderr
