"""`serve` starting and supervising `ollama serve`: the real spawn, ports, restart and shutdown,
with the stand-in `ollama` (tests/bin/ollama) first on PATH."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import Process, fake_process
from wrapper_helpers import (
    child_pid,
    free_port,
    get,
    gone,
    metric,
    runs,
    serve_args,
    use_standin,
    wrapper_process,
)

pytestmark = [pytest.mark.slow(reason="starts, restarts and stops Ollama processes"),
              pytest.mark.timeout(60)]


@pytest.fixture
def standin(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    return use_standin(monkeypatch, tmp_path)


def _serve(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ollama_metrics", "serve", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_starts_ollama_behind_the_proxy_and_stops_both(
    standin: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The user's OLLAMA_HOST must not move the proxy; the child gets its own, the rest pass.
    monkeypatch.setenv("OLLAMA_HOST", "127.0.0.1:9")
    monkeypatch.setenv("OLLAMA_KEEP_ALIVE", "7m")
    with wrapper_process() as proxy:
        child = child_pid(proxy)
        status, body = get(proxy.url + "/api/tags")
        assert status == 200
        assert b"llama3.2:latest" in body
        (pid, env), = runs(standin, "serve")
        assert pid == child
        assert env["OLLAMA_KEEP_ALIVE"] == "7m"
        ollama_host = env["OLLAMA_HOST"]
        assert ollama_host.startswith("127.0.0.1:")
        assert json.loads(get(proxy.url + "/test")[1])["upstream"]["url"] == \
            f"http://{ollama_host}"
        assert metric(proxy.url, "ollama_upstream_restarts_total") == 0
        assert proxy.stop() == 0
    assert gone(child, timeout=0)
    # Proxy first (it drains), then the child: a polite stop, no kill.
    out = proxy.output
    assert out.index("shutting down") < out.index("stopping ollama serve")
    assert "killing" not in out
    assert "Traceback" not in out


@pytest.mark.parametrize("workers", ["1", "2"])
def test_ctrl_c_at_the_terminal_reaches_the_proxy_only(standin: Path, workers: str) -> None:
    # A terminal's Ctrl-C is SIGINT to its whole foreground process group: the proxy's group
    # here (setsid makes the proxy lead one). Ollama, in a group of its own, must not get it
    # directly, but be stopped by the proxy once the proxy has drained. Workers get it too,
    # and ignore it: one Ctrl-C is one signal, a drain, not a stop at once.
    proxy = Process(["setsid", sys.executable, "-m", "ollama_metrics", "serve",
                     *serve_args(free_port()), "--workers", workers])
    try:
        proxy.port = int(proxy.wait_for(r"listening on http://127\.0\.0\.1:(\d+)").group(1))
        child = child_pid(proxy)
        assert os.getpgid(child) != os.getpgid(proxy.proc.pid) == proxy.proc.pid
        os.killpg(proxy.proc.pid, signal.SIGINT)
        assert proxy.proc.wait(15) == 0
    finally:
        proxy.stop()
    assert gone(child, timeout=0)
    out = proxy.output
    assert out.index("shutting down") < out.index("stopping ollama serve")
    assert "stopping now" not in out


def test_child_killed_mid_stream_is_restarted(
    standin: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FAKE_OLLAMA_SCENARIOS", json.dumps({
        "slow:latest": {"tokens": ["tick"] * 200, "token_delay": 0.05},
        "llama3.2:latest": {},
    }))
    with wrapper_process("--restart-backoff", "1") as proxy:
        first = child_pid(proxy)
        request = urllib_stream(proxy.url + "/api/generate",
                                {"model": "slow", "prompt": "count"})
        lines = [next(request) for _ in range(3)]
        assert all(json.loads(line)["done"] is False for line in lines)
        killed_at = time.monotonic()
        os.kill(first, signal.SIGKILL)
        rest = list(request)  # the stream ends without its final `done: true` line
        assert not any(json.loads(line).get("done") for line in rest if line.strip())

        # Meanwhile the proxy answers, with a clear 502: Ollama cannot be reached, or (a pooled
        # connection the dead child reset before the proxy saw it close) its connection failed.
        status, body = get(proxy.url + "/api/tags")
        assert status == 502
        error = json.loads(body)["error"]
        assert "cannot reach Ollama" in error or "connection to Ollama at" in error, error

        second = child_pid(proxy, after=first)
        proxy.wait_for(r"ollama serve is back \(restart 1\)")
        assert time.monotonic() - killed_at < 1 + 5  # the back-off, then the child's start
        assert get(proxy.url + "/api/tags")[0] == 200
        assert metric(proxy.url, "ollama_upstream_restarts_total") == 1
        assert "exited unexpectedly with signal SIGKILL" in proxy.output
        assert len(runs(standin, "serve")) == 2
    assert gone(second, timeout=0)


def test_runners_left_by_a_crashed_ollama_are_killed(
    standin: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FAKE_OLLAMA_RUNNER", "1")
    with wrapper_process() as proxy:
        first = child_pid(proxy)
        (runner, _), = runs(standin, "runner")
        assert not gone(runner, timeout=0)
        os.kill(first, signal.SIGKILL)  # the runner outlives it, in its process group
        assert gone(runner, timeout=5)
        proxy.wait_for(r"ollama serve is back \(restart 1\)")
        (_, _), (second_runner, _) = runs(standin, "runner")
    assert gone(second_runner, timeout=0)  # a clean stop ends the runners too


def test_back_off_doubles_while_restarts_fail(
    standin: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    failing = tmp_path / "fail"
    monkeypatch.setenv("FAKE_OLLAMA_EXIT_FILE", str(failing))
    with wrapper_process("--restart-backoff", "0.1", "--restart-backoff-max", "3") as proxy:
        first = child_pid(proxy)
        failing.write_text("3")  # from now on each new child exits at once with code 3
        os.kill(first, signal.SIGKILL)
        proxy.wait_for(r"signal SIGKILL .* restarting it in 0\.1s")
        proxy.wait_for(r"code 3 \(last output: Error: the stand-in was told to fail\); "
                       r"restarting it in 0\.2s")
        proxy.wait_for(r"restarting it in 0\.4s")
        failing.unlink()
        proxy.wait_for(r"ollama serve is back \(restart [3-9]\)")
        assert get(proxy.url + "/api/version")[0] == 200
        restarts = metric(proxy.url, "ollama_upstream_restarts_total")
        assert restarts is not None
        assert restarts >= 3


def test_child_that_ignores_sigterm_is_killed_after_the_grace_period(
    standin: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FAKE_OLLAMA_IGNORE_TERM", "1")
    with wrapper_process("--ollama-stop-grace", "0.5") as proxy:
        child = child_pid(proxy)
        started = time.monotonic()
        assert proxy.stop() == 0
        assert time.monotonic() - started < 8
    assert gone(child, timeout=0)
    assert "did not stop within 0.5s; killing it" in proxy.output


def test_a_second_signal_kills_a_slow_ollama_at_once(
    standin: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ctrl-C twice: the proxy does not wait out Ollama's stop grace either."""
    monkeypatch.setenv("FAKE_OLLAMA_IGNORE_TERM", "1")
    with wrapper_process("--ollama-stop-grace", "60") as proxy:
        child = child_pid(proxy)
        proxy.proc.send_signal(signal.SIGINT)
        proxy.wait_for("stopping ollama serve")
        proxy.proc.send_signal(signal.SIGINT)
        assert proxy.proc.wait(timeout=8) == 0
    assert gone(child, timeout=0)
    assert "stopping now: killing ollama serve" in proxy.output


def test_an_ollama_that_never_answers(standin: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_OLLAMA_SILENT", "1")
    result = _serve(*serve_args(free_port(), "--ollama-start-timeout", "0.5"))
    assert result.returncode == 1
    assert "did not answer at http://127.0.0.1:" in result.stderr
    assert "within 0.5s (--ollama-start-timeout)" in result.stderr
    (pid, _), = runs(standin, "serve")
    assert gone(pid, timeout=5)


def test_sigterm_while_ollama_starts_stops_it(
    standin: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FAKE_OLLAMA_SILENT", "1")
    p = Process([sys.executable, "-m", "ollama_metrics", "serve", *serve_args(free_port())])
    try:
        child = child_pid(p)
    finally:
        assert p.stop() == 0
    assert gone(child, timeout=0)
    assert "Traceback" not in p.output


def test_no_ollama_on_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    result = _serve(*serve_args(free_port()))
    assert result.returncode == 127
    assert "`ollama` was not found on PATH" in result.stderr
    assert "--ollama-bin" in result.stderr
    assert "Traceback" not in result.stderr


def test_ollama_already_on_the_listen_port_is_explained() -> None:
    with fake_process() as ollama:
        result = _serve("--listen", f"127.0.0.1:{ollama.port}")
    assert result.returncode == 4
    err = result.stderr
    assert f"Ollama 0.33.0 is already answering on 127.0.0.1:{ollama.port}" in err
    assert "ollama-metrics serve --upstream http://127.0.0.1:11435" in err  # way out 1
    assert f"--listen 127.0.0.1:11436 --upstream http://127.0.0.1:{ollama.port}" in err  # 2
    assert "Traceback" not in err


def test_ollama_port_taken_by_another_program(standin: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _serve(*serve_args(port))
    assert result.returncode == 5
    assert f"127.0.0.1:{port}, where Ollama should listen, is taken" in result.stderr
    assert "--ollama-host" in result.stderr
    assert runs(standin, "serve") == []


def test_ollama_failing_to_start_says_why(
    standin: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FAKE_OLLAMA_EXIT", "3")
    result = _serve(*serve_args(free_port()))
    assert result.returncode == 1
    assert "ollama serve exited with code 3 while starting: Error: the stand-in was told to " \
        "fail" in result.stderr


def test_an_ollama_already_at_the_child_address_is_used(standin: Path) -> None:
    # The README's first quick start: Ollama moved to 11435 by hand, then `ollama-metrics serve`.
    with fake_process() as ollama:
        proxy = Process([sys.executable, "-m", "ollama_metrics", "serve",
                         *serve_args(ollama.port)])
        try:
            proxy.port = int(proxy.wait_for(r"listening on http://127\.0\.0\.1:(\d+)").group(1))
            assert "Ollama 0.33.0 already answers" in proxy.output
            assert get(proxy.url + "/api/version")[0] == 200
        finally:
            assert proxy.stop() == 0
    assert runs(standin, "serve") == []


def urllib_stream(url: str, body: dict[str, object]) -> Iterator[bytes]:
    """POST `body` and yield the reply's lines as they come; ends quietly on a cut stream."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=10) as resp:
        try:
            yield from resp
        except (http.client.IncompleteRead, ConnectionError):
            return




def test_an_ollama_the_user_is_starting_is_waited_for(standin: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The quick start's race: the user's `ollama serve` takes a while to bind; the proxy,
    started right after, waits for it instead of starting a second Ollama on its port."""
    port = free_port()
    theirs = Process(["ollama", "serve"], env={"OLLAMA_HOST": f"127.0.0.1:{port}",
                                               "FAKE_OLLAMA_BIND_DELAY": "1.5"})
    try:
        time.sleep(0.2)  # it runs (the stand-in's interpreter is up), and does not listen yet
        proxy = Process([sys.executable, "-m", "ollama_metrics", "serve", *serve_args(port)])
        try:
            proxy.port = int(proxy.wait_for(r"listening on http://127\.0\.0\.1:(\d+)").group(1))
            assert "waiting up to 3.0s for it" in proxy.output
            assert "Ollama 0.33.0 already answers" in proxy.output
            assert get(proxy.url + "/api/version")[0] == 200
        finally:
            assert proxy.stop() == 0
        assert theirs.proc.poll() is None, theirs.output  # theirs still serves
    finally:
        theirs.stop()
    assert [pid for pid, _ in runs(standin, "serve")] == [theirs.proc.pid]
